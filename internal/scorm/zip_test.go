package scorm_test

import (
	"archive/zip"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"runtime"
	"strings"
	"testing"

	"github.com/cachecar/cachecar/internal/scorm"
	"github.com/cachecar/cachecar/internal/scorm/scormgen"
)

// entry is one file of a test zip.
type entry struct {
	name string
	data []byte
	raw  *zip.FileHeader
}

// makeZip builds a zip in memory. An entry with raw set is written with CreateRaw: data is
// then the already compressed bytes and raw the header, sizes and CRC included.
func makeZip(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, e := range entries {
		var w io.Writer
		var err error
		if e.raw != nil {
			h := *e.raw
			h.Name = e.name
			w, err = zw.CreateRaw(&h)
		} else {
			w, err = zw.CreateHeader(&zip.FileHeader{Name: e.name, Method: zip.Deflate})
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(e.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// validManifest is a small valid SCORM 1.2 manifest.
const validManifest = `<manifest identifier="M" xmlns="` + nsCP12 + `" xmlns:adlcp="` + nsADLCP12 + `">` + validBody + `</manifest>`

func parseBytes(b []byte, opts scorm.Options) (*scorm.Manifest, error) {
	return scorm.ParseZip(bytes.NewReader(b), int64(len(b)), opts)
}

func TestParseZipErrors(t *testing.T) {
	manifest := []byte(validManifest)
	stored := func(data []byte, mutate func(*zip.FileHeader)) *zip.FileHeader {
		h := &zip.FileHeader{Method: zip.Store, CRC32: crc32.ChecksumIEEE(data),
			CompressedSize64: uint64(len(data)), UncompressedSize64: uint64(len(data))}
		if mutate != nil {
			mutate(h)
		}
		return h
	}
	manyNames := make([]entry, 0, 5)
	for i := range 4 {
		manyNames = append(manyNames, entry{name: fmt.Sprintf("f%d.html", i)})
	}
	longNames := []entry{
		{name: "imsmanifest.xml", data: manifest},
		{name: strings.Repeat("d/", 1100) + "x.html"},
	}
	tests := []struct {
		name string
		zip  []byte
		opts scorm.Options
		want string
	}{
		{"empty file", nil, scorm.Options{}, "scorm: file is not a valid zip archive"},
		{"not a zip", []byte("<manifest/>"), scorm.Options{}, "scorm: file is not a valid zip archive"},
		{"truncated zip", makeZip(t, entry{name: "imsmanifest.xml", data: manifest})[:40], scorm.Options{}, "scorm: file is not a valid zip archive"},
		{"no manifest", makeZip(t, entry{name: "index.html", data: []byte("hi")}), scorm.Options{}, "scorm: zip has no imsmanifest.xml at its root"},
		{"manifest name in another case", makeZip(t, entry{name: "IMSManifest.xml", data: manifest}), scorm.Options{}, "scorm: zip has no imsmanifest.xml at its root"},
		{"manifest in a folder", makeZip(t, entry{name: "course/imsmanifest.xml", data: manifest}), scorm.Options{},
			"scorm: imsmanifest.xml must be at the root of the zip, not in a folder"},
		{"two manifests", makeZip(t, entry{name: "imsmanifest.xml", data: manifest}, entry{name: "imsmanifest.xml", data: manifest}), scorm.Options{},
			"scorm: zip has more than one imsmanifest.xml at its root"},
		{"manifest too large", makeZip(t, entry{name: "imsmanifest.xml", data: manifest}), scorm.Options{MaxManifestBytes: 100},
			"scorm: imsmanifest.xml is larger than 100 bytes"},
		{"too many entries", makeZip(t, append([]entry{{name: "imsmanifest.xml", data: manifest}}, manyNames...)...), scorm.Options{MaxEntries: 4},
			"scorm: zip has more than 4 entries"},
		{"central directory too large", makeZip(t, longNames...), scorm.Options{MaxEntries: 2},
			"scorm: zip central directory is larger than 2048 bytes"},
		{"unsupported compression", makeZip(t, entry{name: "imsmanifest.xml", data: manifest, raw: stored(manifest, func(h *zip.FileHeader) { h.Method = 12 })}),
			scorm.Options{}, "scorm: imsmanifest.xml uses unsupported compression method 12"},
		{"bad checksum", makeZip(t, entry{name: "imsmanifest.xml", data: manifest, raw: stored(manifest, func(h *zip.FileHeader) { h.CRC32++ })}),
			scorm.Options{}, "scorm: imsmanifest.xml cannot be read from the zip: corrupt or truncated data"},
		{"encrypted", makeZip(t, entry{name: "imsmanifest.xml", data: manifest, raw: stored(manifest, func(h *zip.FileHeader) { h.Flags |= 1 })}),
			scorm.Options{}, "scorm: imsmanifest.xml is encrypted"},
		{"corrupt deflate data", makeZip(t, entry{name: "imsmanifest.xml", data: []byte("not deflate at all"),
			raw: &zip.FileHeader{Method: zip.Deflate, CompressedSize64: 18, UncompressedSize64: 100}}),
			scorm.Options{}, "scorm: imsmanifest.xml cannot be read from the zip: corrupt or truncated data"},
		{"manifest errors pass through", makeZip(t, entry{name: "imsmanifest.xml", data: []byte(`<manifest><organizations/></manifest>`)}),
			scorm.Options{}, "scorm: manifest has no organizations"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := parseBytes(tt.zip, tt.opts)
			if m != nil {
				t.Errorf("got a manifest with the error")
			}
			mustInvalid(t, err, tt.want)
		})
	}
}

func TestParseZipAcceptsLimits(t *testing.T) {
	manifest := []byte(validManifest)
	b := makeZip(t, entry{name: "imsmanifest.xml", data: manifest}, entry{name: "a.html"}, entry{name: "course/imsmanifest.xml"})
	tests := []struct {
		name string
		opts scorm.Options
	}{
		{"defaults", scorm.Options{}},
		{"negative means default", scorm.Options{MaxManifestBytes: -1, MaxEntries: -1}},
		{"exact limits", scorm.Options{MaxManifestBytes: int64(len(manifest)), MaxEntries: 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := parseBytes(b, tt.opts)
			if err != nil {
				t.Fatalf("ParseZip: %v", err)
			}
			if m.Version != "1.2" || m.Organizations[0].Items[0].LaunchURL != "a.html" {
				t.Errorf("manifest = %+v", m)
			}
		})
	}
}

// failingReader fails every read, like a broken disk.
type failingReader struct{ err error }

func (f failingReader) ReadAt([]byte, int64) (int, error) { return 0, f.err }

func TestParseZipReaderError(t *testing.T) {
	disk := errors.New("disk on fire")
	_, err := scorm.ParseZip(failingReader{disk}, 1000, scorm.Options{})
	if !errors.Is(err, disk) || errors.Is(err, scorm.ErrInvalidPackage) {
		t.Fatalf("err = %v; want the reader's error, not ErrInvalidPackage", err)
	}
	if got, want := err.Error(), "scorm: read zip: disk on fire"; got != want {
		t.Errorf("err = %q, want %q", got, want)
	}
}

// allocated returns the bytes the heap allocated while f ran.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// bitWriter writes a DEFLATE bit stream (least significant bit first).
type bitWriter struct {
	out   []byte
	acc   uint64
	nbits uint
}

func (w *bitWriter) bits(v uint64, n uint) {
	w.acc |= v << w.nbits
	w.nbits += n
	for w.nbits >= 8 {
		w.out = append(w.out, byte(w.acc))
		w.acc >>= 8
		w.nbits -= 8
	}
}

// code writes a Huffman code, which DEFLATE stores most significant bit first.
func (w *bitWriter) code(c uint64, n uint) {
	var r uint64
	for i := uint(0); i < n; i++ {
		r = r<<1 | (c>>i)&1
	}
	w.bits(r, n)
}

func (w *bitWriter) flush() []byte {
	if w.nbits > 0 {
		w.out = append(w.out, byte(w.acc))
	}
	return w.out
}

// deflateBomb returns a raw DEFLATE stream expanding to about n zero bytes (exactly the
// returned size): one fixed-Huffman block holding a literal zero and then matches of
// length 258 at distance 1, 13 bits for every 258 bytes, so 1 GiB costs 6.5 MiB.
func deflateBomb(n int64) ([]byte, int64) {
	w := &bitWriter{out: make([]byte, 0, n/258*13/8+16)}
	w.bits(1, 1)    // BFINAL
	w.bits(1, 2)    // BTYPE 01: fixed Huffman codes
	w.code(0x30, 8) // literal 0
	matches := (n - 1) / 258
	for range matches {
		w.code(0xC5, 8) // length symbol 285: 258 bytes
		w.code(0, 5)    // distance symbol 0: distance 1
	}
	w.code(0, 7) // end of block
	return w.flush(), 1 + matches*258
}

func TestParseZipBombMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a 1 GiB zip bomb")
	}
	bomb, size := deflateBomb(1 << 30)
	// Check the bomb is what it claims: the first MiB inflates to zeros.
	var probe bytes.Buffer
	zr := makeZip(t, entry{name: "imsmanifest.xml", data: bomb, raw: &zip.FileHeader{
		Method: zip.Deflate, CompressedSize64: uint64(len(bomb)), UncompressedSize64: uint64(size)}})
	r, err := zip.NewReader(bytes.NewReader(zr), int64(len(zr)))
	if err != nil {
		t.Fatal(err)
	}
	rc, err := r.File[0].Open()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.CopyN(&probe, rc, 1<<20); err != nil || bytes.Count(probe.Bytes(), []byte{0}) != 1<<20 {
		t.Fatalf("bomb does not inflate to zeros: %v", err)
	}
	rc.Close()

	tests := []struct {
		name     string
		declared uint64
		opts     scorm.Options
		want     string
		maxAlloc uint64
	}{
		{
			name: "declared size of 1 GiB", declared: uint64(size),
			want:     "scorm: imsmanifest.xml is larger than 4194304 bytes",
			maxAlloc: 1 << 20,
		},
		{
			// archive/zip stops at the declared size; the limit bounds the buffer either way.
			name: "declared size under the limit, expands to 1 GiB", declared: 3 << 20,
			want:     "scorm: imsmanifest.xml cannot be read from the zip: corrupt or truncated data",
			maxAlloc: 5 << 20,
		},
		{
			name: "lower limit", declared: uint64(size), opts: scorm.Options{MaxManifestBytes: 1 << 20},
			want:     "scorm: imsmanifest.xml is larger than 1048576 bytes",
			maxAlloc: 1 << 20,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := makeZip(t, entry{name: "imsmanifest.xml", data: bomb, raw: &zip.FileHeader{
				Method: zip.Deflate, CompressedSize64: uint64(len(bomb)), UncompressedSize64: tt.declared}})
			var err error
			n := allocated(func() { _, err = parseBytes(b, tt.opts) })
			mustInvalid(t, err, tt.want)
			t.Logf("allocated %d bytes", n)
			if n > tt.maxAlloc {
				t.Errorf("allocated %d bytes, want at most %d", n, tt.maxAlloc)
			}
		})
	}
}

// manyEntries returns a zip of imsmanifest.xml and n-1 empty stored files.
func manyEntries(t testing.TB, n int) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for i := range n {
		name := fmt.Sprintf("f%06d", i)
		if i == 0 {
			name = "imsmanifest.xml"
		}
		if _, err := zw.CreateHeader(&zip.FileHeader{Name: name, Method: zip.Store}); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestParseZipEntryCountMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("builds zips of 10001 and 70000 entries")
	}
	// 70000 entries need the zip64 end record. Its count is then set to 70000-65536: archive/zip
	// compares counts modulo 65536 only and accepts it, so only walking the directory catches it.
	lying := manyEntries(t, 70000)
	i := bytes.LastIndex(lying, []byte("PK\x06\x06"))
	if i < 0 {
		t.Fatal("no zip64 end record")
	}
	binary.LittleEndian.PutUint64(lying[i+24:], 70000-65536)
	binary.LittleEndian.PutUint64(lying[i+32:], 70000-65536)
	if r, err := zip.NewReader(bytes.NewReader(lying), int64(len(lying))); err != nil || len(r.File) != 70000 {
		t.Fatalf("archive/zip should accept the lying count: %v", err)
	}

	tests := []struct {
		name string
		zip  []byte
		opts scorm.Options
		want string
	}{
		{"one over the default", manyEntries(t, 10001), scorm.Options{}, "scorm: zip has more than 10000 entries"},
		{"count in the end record lies", lying, scorm.Options{}, "scorm: zip has more than 10000 entries"},
		{"lower limit", lying, scorm.Options{MaxEntries: 10}, "scorm: zip has more than 10 entries"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var err error
			n := allocated(func() { _, err = parseBytes(tt.zip, tt.opts) })
			mustInvalid(t, err, tt.want)
			t.Logf("allocated %d bytes", n)
			// archive/zip would spend a few hundred bytes per entry; the check spends none.
			if n > 256<<10 {
				t.Errorf("allocated %d bytes, want at most 256 KiB", n)
			}
		})
	}
}

func TestParseZipPrependedData(t *testing.T) {
	// A zip with data in front (a self-extracting stub) is still read, as archive/zip does.
	b := append([]byte(strings.Repeat("#!stub\n", 100)), makeZip(t, entry{name: "imsmanifest.xml", data: []byte(validManifest)})...)
	if _, err := parseBytes(b, scorm.Options{}); err != nil {
		t.Fatalf("ParseZip: %v", err)
	}
}

func TestParseZipInsecureEntryNames(t *testing.T) {
	// Only the manifest is read, by exact name, so other entries' names do not matter, even
	// when archive/zip is told to flag them (it then still returns a usable reader).
	t.Setenv("GODEBUG", "zipinsecurepath=0")
	b := makeZip(t, entry{name: "imsmanifest.xml", data: []byte(validManifest)}, entry{name: "../escape.html"}, entry{name: `dir\file.html`})
	if _, err := zip.NewReader(bytes.NewReader(b), int64(len(b))); !errors.Is(err, zip.ErrInsecurePath) {
		t.Fatalf("archive/zip err = %v, want ErrInsecurePath (is GODEBUG honoured?)", err)
	}
	if _, err := parseBytes(b, scorm.Options{}); err != nil {
		t.Fatalf("ParseZip: %v", err)
	}
}

func BenchmarkParseZip(b *testing.B) {
	for _, s := range scormgen.Demo()[:3] {
		data, err := scormgen.Build(s)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(s.Filename, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				if _, err := parseBytes(data, scorm.Options{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
