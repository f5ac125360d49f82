package proxy

import (
	"archive/zip"
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/cachecar/cachecar/internal/scorm"
	"github.com/cachecar/cachecar/internal/scorm/scormgen"
	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// manifestHarness serves the manifest route from dir through the real resolver and a real
// Valkey, so that MISS, HIT and the cached 422 verdict are the real thing.
type manifestHarness struct {
	h   http.Handler
	dir string
}

func newManifestHarness(t *testing.T) *manifestHarness {
	t.Helper()
	addr, prefix := testenv.Valkey(t)
	m := cachepolicy.NewMetrics(prometheus.NewRegistry())
	store := cachepolicy.NewStore(cachepolicy.StoreOptions{Addrs: []string{addr}, Timeout: time.Second, DialTimeout: time.Second, ReconnectMax: time.Second}, zerolog.Nop(), m)
	if err := store.Connect(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	res := cachepolicy.New(cachepolicy.Options{Namespace: prefix, QueryTimeout: 5 * time.Second}, store, nil, zerolog.Nop(), m)
	pol, err := cachepolicy.NewPolicy("manifest", "scorm:manifest:{filename}:{mtime}", []string{"filename", "mtime"}, time.Hour, `^.+$`, "", "")
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "manifests")
	os.Mkdir(dir, 0o755)
	srv := New(Options{AccessSample: 1, Manifests: &Manifests{Dir: dir, Policy: pol, Reader: res,
		Limits: scorm.Options{MaxManifestBytes: 64 << 10, MaxEntries: 100}}}, nil, Policies{}, zerolog.Nop(), prometheus.NewRegistry())
	return &manifestHarness{h: srv.Handler(), dir: dir}
}

func (m *manifestHarness) get(t *testing.T, name string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest("GET", "http://sidecar/v1/manifests/"+name, nil)
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	m.h.ServeHTTP(rec, req)
	return rec.Result(), rec.Body.Bytes()
}

func (m *manifestHarness) write(t *testing.T, name string, b []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(m.dir, name), b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func demoZip(t *testing.T, version string) []byte {
	t.Helper()
	for _, s := range scormgen.Demo() {
		if s.Version == version {
			b, err := scormgen.Build(s)
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
	}
	t.Fatalf("no demo package of version %s", version)
	return nil
}

func zipOf(t *testing.T, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, body := range files {
		w, _ := zw.Create(name)
		w.Write([]byte(body))
	}
	zw.Close()
	return buf.Bytes()
}

func TestManifestMissHitAndNewKeyOnTouch(t *testing.T) {
	m := newManifestHarness(t)
	m.write(t, "course-2004.zip", demoZip(t, scormgen.Version2004Ed4))

	r1, b1 := m.get(t, "course-2004.zip")
	r2, b2 := m.get(t, "course-2004.zip")
	if r1.StatusCode != 200 || r1.Header.Get("X-Cache") != "MISS" || r2.Header.Get("X-Cache") != "HIT" || !bytes.Equal(b1, b2) {
		t.Fatalf("twice: %d %s, %d %s", r1.StatusCode, r1.Header.Get("X-Cache"), r2.StatusCode, r2.Header.Get("X-Cache"))
	}
	var man struct {
		Version       string
		Organizations []struct {
			Items []struct {
				LaunchURL string `json:"launch_url"`
				Children  []json.RawMessage
			}
		}
	}
	if err := json.Unmarshal(b1, &man); err != nil || man.Version != "2004 4th Edition" || len(man.Organizations) == 0 {
		t.Fatalf("manifest JSON: %v %s", err, b1)
	}
	// touch: a new mtime is a new key, so the next answer is a fresh parse.
	later := time.Now().Add(time.Hour)
	os.Chtimes(filepath.Join(m.dir, "course-2004.zip"), later, later)
	if r, _ := m.get(t, "course-2004.zip"); r.Header.Get("X-Cache") != "MISS" {
		t.Fatalf("after touch: %s, want MISS under the new key", r.Header.Get("X-Cache"))
	}
	if r, _ := m.get(t, "course-2004.zip"); r.Header.Get("X-Cache") != "HIT" {
		t.Fatalf("after touch, second read: %s, want HIT", r.Header.Get("X-Cache"))
	}
	// Replacing the package's content (and so its mtime) is never answered with the old parse.
	m.write(t, "course-2004.zip", demoZip(t, scormgen.Version12))
	os.Chtimes(filepath.Join(m.dir, "course-2004.zip"), later.Add(time.Hour), later.Add(time.Hour))
	_, b := m.get(t, "course-2004.zip")
	if !strings.Contains(string(b), `"version":"1.2"`) {
		t.Fatalf("replaced package answered with %s", b[:min(len(b), 120)])
	}
}

func TestManifestBadNames(t *testing.T) {
	m := newManifestHarness(t)
	outside := filepath.Join(filepath.Dir(m.dir), "secret.zip")
	os.WriteFile(outside, demoZip(t, scormgen.Version12), 0o644)
	for _, name := range []string{
		"a%2Fb.zip", "a%5Cb.zip", "..%2Fsecret.zip", "a..b.zip", ".hidden.zip", "x%00.zip", "course.txt", "course.zip.txt",
		"course", ".zip", strings.Repeat("a", 300) + ".zip", "%C3%A9.zip", "a%20b.zip", "a:b.zip", "a*.zip",
	} {
		r, b := m.get(t, name)
		if r.StatusCode != 400 || !strings.Contains(string(b), `"code":"bad_filename"`) {
			t.Errorf("%q: %d %s, want 400 bad_filename", name, r.StatusCode, b)
		}
	}
	// A symlink inside the directory that leads outside is never followed.
	os.Symlink(outside, filepath.Join(m.dir, "escape.zip"))
	os.Symlink("../secret.zip", filepath.Join(m.dir, "escape-rel.zip"))
	for _, name := range []string{"escape.zip", "escape-rel.zip"} {
		r, b := m.get(t, name)
		if r.StatusCode != 400 || strings.Contains(string(b), "version") {
			t.Errorf("symlink %s: %d %s, want 400 and nothing from outside", name, r.StatusCode, b)
		}
	}
	// A symlink that stays inside is an ordinary file.
	m.write(t, "real.zip", demoZip(t, scormgen.Version12))
	os.Symlink("real.zip", filepath.Join(m.dir, "alias.zip"))
	if r, _ := m.get(t, "alias.zip"); r.StatusCode != 200 {
		t.Errorf("symlink inside the directory: %d, want 200", r.StatusCode)
	}
	if r, _ := m.get(t, "missing.zip"); r.StatusCode != 404 {
		t.Errorf("missing: %d, want 404", r.StatusCode)
	}
	os.Mkdir(filepath.Join(m.dir, "folder.zip"), 0o755)
	if r, _ := m.get(t, "folder.zip"); r.StatusCode != 404 {
		t.Errorf("a directory named .zip: %d, want 404", r.StatusCode)
	}
	if r, _ := m.get(t, "real.zip?x=1"); r.StatusCode != 400 {
		t.Errorf("unknown query parameter: %d, want 400", r.StatusCode)
	}
}

func TestManifestInvalidPackagesAnswer422AndTheVerdictIsCached(t *testing.T) {
	m := newManifestHarness(t)
	const cp = `xmlns="http://www.imsglobal.org/xsd/imscp_v1p1"`
	bomb := func() []byte {
		// imsmanifest.xml of 8 MiB of spaces: far past the 64 KiB limit once inflated.
		var buf bytes.Buffer
		zw := zip.NewWriter(&buf)
		w, _ := zw.Create("imsmanifest.xml")
		w.Write(bytes.Repeat([]byte(" "), 8<<20))
		zw.Close()
		return buf.Bytes()
	}
	for _, tc := range []struct {
		name string
		data []byte
		want string
	}{
		{"not-a-zip.zip", []byte("this is not a zip"), "not a valid zip"},
		{"no-manifest.zip", zipOf(t, map[string]string{"index.html": "<p>hi</p>"}), "no imsmanifest.xml"},
		{"nested-manifest.zip", zipOf(t, map[string]string{"course/imsmanifest.xml": "<manifest/>"}), "root of the zip"},
		{"malformed.zip", zipOf(t, map[string]string{"imsmanifest.xml": "<manifest " + cp + "><organizations>"}), "malformed XML"},
		{"no-orgs.zip", zipOf(t, map[string]string{"imsmanifest.xml": "<manifest " + cp + ` identifier="m"><resources/></manifest>`}), "no organizations"},
		{"missing-resource.zip", zipOf(t, map[string]string{"imsmanifest.xml": "<manifest " + cp + ` identifier="m"><organizations default="o"><organization identifier="o"><title>T</title><item identifier="i1" identifierref="r9"><title>I</title></item></organization></organizations><resources/></manifest>`}), `references missing resource "r9"`},
		{"no-launchable.zip", zipOf(t, map[string]string{"imsmanifest.xml": "<manifest " + cp + ` identifier="m"><organizations default="o"><organization identifier="o"><title>T</title><item identifier="i1"><title>I</title></item></organization></organizations><resources/></manifest>`}), "no launchable resource"},
		{"entities.zip", zipOf(t, map[string]string{"imsmanifest.xml": `<!DOCTYPE m [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><manifest ` + cp + `>&b;</manifest>`}), "DTD and entity declarations are not allowed"},
		{"bomb.zip", bomb(), "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m.write(t, tc.name, tc.data)
			r1, b1 := m.get(t, tc.name)
			r2, b2 := m.get(t, tc.name)
			var e struct {
				Error struct{ Code, Message string }
			}
			json.Unmarshal(b1, &e)
			if r1.StatusCode != 422 || e.Error.Code != "invalid_package" || !strings.Contains(e.Error.Message, tc.want) {
				t.Fatalf("%d %s, want 422 invalid_package naming %q", r1.StatusCode, b1, tc.want)
			}
			if r1.Header.Get("X-Cache") != "MISS" || r2.StatusCode != 422 || r2.Header.Get("X-Cache") != "HIT" || !bytes.Equal(b1, b2) {
				t.Fatalf("verdict not cached: %s then %d %s", r1.Header.Get("X-Cache"), r2.StatusCode, r2.Header.Get("X-Cache"))
			}
		})
	}
}
