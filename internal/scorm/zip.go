package scorm

import (
	"archive/zip"
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// manifestName is the only place a package's manifest may be: the root of the zip.
const manifestName = "imsmanifest.xml"

// ParseZip reads the SCORM package in the zip held by r (size bytes) and parses its
// imsmanifest.xml. Errors caused by the package's content wrap ErrInvalidPackage; an error
// from r itself (a failing disk) is returned wrapped but without it.
//
// Memory stays bounded whatever the zip holds: the entry count and the central directory
// size are checked before archive/zip loads the directory, and imsmanifest.xml is read
// through a limit of opts.MaxManifestBytes, whatever size the zip declares for it.
func ParseZip(r io.ReaderAt, size int64, opts Options) (*Manifest, error) {
	if size < 0 {
		return nil, fmt.Errorf("scorm: negative zip size %d", size)
	}
	opts = opts.withDefaults()
	ra := &boundedReaderAt{r: r, size: size}
	data, err := readManifest(ra, size, opts)
	if ra.err != nil {
		// The reader failed: the package may be fine, so this is not ErrInvalidPackage.
		return nil, fmt.Errorf("scorm: read zip: %w", ra.err)
	}
	if err != nil {
		return nil, err
	}
	return Parse(data)
}

// readManifest returns the bytes of the package's imsmanifest.xml.
func readManifest(ra *boundedReaderAt, size int64, opts Options) ([]byte, error) {
	if err := checkDirectory(ra, size, opts.MaxEntries); err != nil {
		return nil, err
	}
	zr, err := zip.NewReader(ra, size)
	// ErrInsecurePath (with GODEBUG zipinsecurepath=0) comes with a usable reader: the
	// package is never extracted here, only its manifest is read by exact name.
	if err != nil && !errors.Is(err, zip.ErrInsecurePath) {
		return nil, invalidf("file is not a valid zip archive")
	}
	// checkDirectory follows archive/zip's own way of finding the directory; this is the
	// backstop should the two ever disagree.
	if len(zr.File) > opts.MaxEntries {
		return nil, invalidf("zip has more than %d entries", opts.MaxEntries)
	}

	var manifest *zip.File
	nested := false
	for _, f := range zr.File {
		switch {
		case f.Name == manifestName:
			if manifest != nil {
				return nil, invalidf("zip has more than one %s at its root", manifestName)
			}
			manifest = f
		case strings.HasSuffix(f.Name, "/"+manifestName):
			nested = true
		}
	}
	if manifest == nil {
		if nested {
			return nil, invalidf("%s must be at the root of the zip, not in a folder", manifestName)
		}
		return nil, invalidf("zip has no %s at its root", manifestName)
	}

	limit := opts.MaxManifestBytes
	if manifest.UncompressedSize64 > uint64(limit) {
		return nil, invalidf("%s is larger than %d bytes", manifestName, limit)
	}
	if manifest.Flags&0x1 != 0 {
		return nil, invalidf("%s is encrypted", manifestName)
	}
	rc, err := manifest.Open()
	if errors.Is(err, zip.ErrAlgorithm) {
		return nil, invalidf("%s uses unsupported compression method %d", manifestName, manifest.Method)
	}
	if err != nil {
		return nil, invalidf("%s cannot be read from the zip: corrupt entry", manifestName)
	}
	defer rc.Close()
	// The declared size is a hint for the buffer only; the limit holds even if it lies.
	data, err := readLimited(rc, limit, int(manifest.UncompressedSize64))
	if errors.Is(err, errTooLarge) {
		return nil, invalidf("%s is larger than %d bytes", manifestName, limit)
	}
	if err != nil {
		return nil, invalidf("%s cannot be read from the zip: corrupt or truncated data", manifestName)
	}
	return data, nil
}

// errTooLarge reports that readLimited hit its limit.
var errTooLarge = errors.New("too large")

// readLimited reads r to the end, failing with errTooLarge past limit bytes. hint, the expected
// size, sizes the buffer so an honest entry costs one allocation.
func readLimited(r io.Reader, limit int64, hint int) ([]byte, error) {
	if hint < 0 || int64(hint) > limit {
		hint = int(limit)
	}
	buf := make([]byte, 0, hint+1)
	lr := io.LimitReader(r, limit+1)
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := lr.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if int64(len(buf)) > limit {
			return nil, errTooLarge
		}
		if errors.Is(err, io.EOF) {
			return buf, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

// boundedReaderAt confines reads to [0, size) and remembers the first error of the
// underlying reader, so that a failing disk is told apart from a corrupt zip: offsets outside
// the file come from the zip's content and get io.EOF without touching the reader.
type boundedReaderAt struct {
	r    io.ReaderAt
	size int64
	err  error
}

// ReadAt implements io.ReaderAt.
func (b *boundedReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= b.size {
		return 0, io.EOF
	}
	short := false
	if rest := b.size - off; int64(len(p)) > rest {
		p, short = p[:rest], true
	}
	n, err := b.r.ReadAt(p, off)
	if err != nil && !errors.Is(err, io.EOF) {
		if b.err == nil {
			b.err = err
		}
		return n, err
	}
	if err == nil && short {
		err = io.EOF
	}
	return n, err
}

// Zip record layout (APPNOTE.TXT), as archive/zip reads it.
const (
	sigDirectoryHeader = 0x02014b50
	sigDirectoryEnd    = 0x06054b50
	sigDirectory64Loc  = 0x07064b50
	sigDirectory64End  = 0x06064b50
	lenDirectoryHeader = 46
	lenDirectoryEnd    = 22
	lenDirectory64Loc  = 20
	lenDirectory64End  = 56
)

// checkDirectory counts the central directory entries of the zip before archive/zip loads
// them. archive/zip keeps a File (a few hundred bytes) per entry and reads entries until one
// is malformed, checking the count only modulo 65536 against the end record, so neither the
// declared count nor the file size bounds what it allocates. This walks the same records
// (found the way archive/zip finds them) in constant memory and stops past maxEntries
// entries or maxEntries KiB of directory. It reports only those limits: anything it cannot
// make sense of is left to archive/zip to reject.
func checkDirectory(r io.ReaderAt, size int64, maxEntries int) error {
	start, ok := directoryStart(r, size)
	if !ok {
		return nil
	}
	maxBytes := int64(maxEntries) << 10
	br := bufio.NewReader(io.NewSectionReader(r, start, size-start))
	var hdr [lenDirectoryHeader]byte
	var total int64
	for n := 0; ; n++ {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return nil
		}
		le := binary.LittleEndian
		if le.Uint32(hdr[0:]) != sigDirectoryHeader {
			return nil
		}
		if n >= maxEntries {
			return invalidf("zip has more than %d entries", maxEntries)
		}
		rest := int(le.Uint16(hdr[28:])) + int(le.Uint16(hdr[30:])) + int(le.Uint16(hdr[32:]))
		total += int64(lenDirectoryHeader + rest)
		if total > maxBytes {
			return invalidf("zip central directory is larger than %d bytes", maxBytes)
		}
		if _, err := br.Discard(rest); err != nil {
			return nil
		}
	}
}

// directoryStart finds the offset of the first central directory header the way
// archive/zip's readDirectoryEnd does: the end record in the last 1 KiB or 65 KiB, the zip64
// end record when the end record says so, and the base offset of data prepended to the zip.
func directoryStart(r io.ReaderAt, size int64) (int64, bool) {
	var buf []byte
	var endOffset int64
	found := false
	for _, n := range []int64{1024, 65 * 1024} {
		n = min(n, size)
		buf = make([]byte, n)
		if _, err := r.ReadAt(buf, size-n); err != nil && !errors.Is(err, io.EOF) {
			return 0, false
		}
		if p := findDirectoryEnd(buf); p >= 0 {
			buf, endOffset, found = buf[p:], size-n+int64(p), true
			break
		}
		if n == size {
			break
		}
	}
	if !found {
		return 0, false
	}
	le := binary.LittleEndian
	records := uint64(le.Uint16(buf[10:]))
	dirSize := uint64(le.Uint32(buf[12:]))
	dirOffset := uint64(le.Uint32(buf[16:]))
	if records == 0xffff || dirSize == 0xffff || dirOffset == 0xffffffff {
		loc := make([]byte, lenDirectory64Loc)
		locOffset := endOffset - lenDirectory64Loc
		if locOffset >= 0 {
			if _, err := r.ReadAt(loc, locOffset); err != nil {
				return 0, false
			}
			if le.Uint32(loc) == sigDirectory64Loc && le.Uint32(loc[4:]) == 0 && le.Uint32(loc[16:]) == 1 {
				p := le.Uint64(loc[8:])
				if p > uint64(size) {
					return 0, false
				}
				end64 := make([]byte, lenDirectory64End)
				if _, err := r.ReadAt(end64, int64(p)); err != nil || le.Uint32(end64) != sigDirectory64End {
					return 0, false
				}
				endOffset = int64(p)
				dirSize = le.Uint64(end64[40:])
				dirOffset = le.Uint64(end64[48:])
			}
		}
	}
	const maxInt64 = 1<<63 - 1
	if dirSize > maxInt64 || dirOffset > maxInt64 {
		return 0, false
	}
	base := endOffset - int64(dirSize) - int64(dirOffset)
	if o := base + int64(dirOffset); o < 0 || o >= size {
		return 0, false
	}
	if base > 0 {
		// As archive/zip: trust a directory header at the declared offset over a base offset.
		var sig [4]byte
		if _, err := r.ReadAt(sig[:], int64(dirOffset)); err == nil && le.Uint32(sig[:]) == sigDirectoryHeader {
			base = 0
		}
	}
	return base + int64(dirOffset), true
}

// findDirectoryEnd returns the position of the end of central directory record in b, searching
// backwards as archive/zip does, or -1.
func findDirectoryEnd(b []byte) int {
	for i := len(b) - lenDirectoryEnd; i >= 0; i-- {
		if binary.LittleEndian.Uint32(b[i:]) == sigDirectoryEnd {
			n := int(binary.LittleEndian.Uint16(b[i+lenDirectoryEnd-2:]))
			if n+lenDirectoryEnd+i > len(b) {
				return -1
			}
			return i
		}
	}
	return -1
}
