package scormgen_test

import (
	"archive/zip"
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/scorm/scormgen"
)

// entries returns the names and contents of the zip b, in order.
func entries(t *testing.T, b []byte) ([]string, map[string][]byte) {
	t.Helper()
	r, err := zip.NewReader(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatalf("zip.NewReader: %v", err)
	}
	var names []string
	contents := make(map[string][]byte)
	for _, f := range r.File {
		names = append(names, f.Name)
		if want := time.Date(2024, 1, 1, 9, 0, 0, 0, time.UTC); !f.Modified.Equal(want) {
			t.Errorf("%s modified %v, want %v", f.Name, f.Modified, want)
		}
		rc, err := f.Open()
		if err != nil {
			t.Fatal(err)
		}
		contents[f.Name], err = io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatalf("read %s: %v", f.Name, err)
		}
	}
	return names, contents
}

// wellFormed fails unless b is well-formed XML.
func wellFormed(t *testing.T, b []byte) {
	t.Helper()
	d := xml.NewDecoder(bytes.NewReader(b))
	for {
		_, err := d.Token()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatalf("manifest is not well-formed: %v\n%s", err, b)
		}
	}
}

func TestDemoPackages(t *testing.T) {
	wantFiles := map[string][]string{
		"intro-to-safety-scorm12.zip": {"imsmanifest.xml", "welcome/index.html", "hazards/index.html", "hazards/scenes.txt",
			"checklist.html", "shared/style.css", "shared/runtime.js"},
		"compliance-basics-scorm12.zip": {"imsmanifest.xml", "content/conduct/index.html", "content/gifts/index.html",
			"content/speakup/index.html", "content/notes/facilitator.html"},
		"data-privacy-2004-4th.zip": {"imsmanifest.xml", "course/modules/m1/identifiers.html", "course/modules/m1/categories.html",
			"course/modules/m2/lawful.html", "course/modules/m3/breach.html", "course/modules/glossary.html", "course/modules/common/privacy.css"},
		"leadership-2004-3rd.zip": {"imsmanifest.xml", "direction/index.html", "feedback/index.html", "reading.html",
			"theme/lead.css", "theme/lead.js"},
		"onboarding-2004-4th.zip":       {"imsmanifest.xml", "manager/guide.html", "welcome.html", "tools.html"},
		"workplace-ethics-2004-2nd.zip": {"imsmanifest.xml", "ethics.html"},
	}
	demo := scormgen.Demo()
	if len(demo) != len(wantFiles) {
		t.Fatalf("Demo has %d packages, want %d", len(demo), len(wantFiles))
	}
	for _, s := range demo {
		t.Run(s.Filename, func(t *testing.T) {
			b, err := scormgen.Build(s)
			if err != nil {
				t.Fatalf("Build: %v", err)
			}
			again, err := scormgen.Build(s)
			if err != nil || !bytes.Equal(b, again) {
				t.Fatalf("Build is not reproducible (err %v)", err)
			}
			names, contents := entries(t, b)
			if !reflect.DeepEqual(names, wantFiles[s.Filename]) {
				t.Errorf("entries = %q\nwant      %q", names, wantFiles[s.Filename])
			}
			manifest := contents["imsmanifest.xml"]
			wellFormed(t, manifest)
			if !strings.Contains(string(manifest), "<schemaversion>") {
				t.Errorf("manifest has no schemaversion:\n%s", manifest)
			}
			for name, c := range contents {
				if strings.HasSuffix(name, ".html") && !strings.Contains(string(c), "<h1>") {
					t.Errorf("%s is not a generated page: %q", name, c)
				}
			}
		})
	}
}

func TestBuildPages(t *testing.T) {
	tests := []struct {
		version, scormType string
		want, notWant      string
	}{
		{scormgen.Version12, "sco", `api.LMSSetValue("cmi.core.lesson_status", "completed")`, "API_1484_11"},
		{scormgen.Version2004Ed4, "sco", `api.SetValue("cmi.completion_status", "completed")`, "LMSInitialize"},
		{scormgen.Version2004Ed4, "asset", "Reference material", "<script>"},
	}
	for _, tt := range tests {
		t.Run(tt.version+" "+tt.scormType, func(t *testing.T) {
			s := scormgen.Spec{
				Version: tt.version, Identifier: "M",
				Organizations: []scormgen.Organization{{Identifier: "O", Title: "T", Items: []scormgen.Item{
					{Identifier: "I", Title: "Fish & <Chips>", Resource: "R"}}}},
				Resources: []scormgen.Resource{{Identifier: "R", ScormType: tt.scormType, Href: "p.html",
					Files: []scormgen.File{{Href: "given.txt", Content: []byte("given")}}}},
			}
			b, err := scormgen.Build(s)
			if err != nil {
				t.Fatal(err)
			}
			_, contents := entries(t, b)
			page := string(contents["p.html"])
			if !strings.Contains(page, tt.want) || strings.Contains(page, tt.notWant) {
				t.Errorf("page does not fit %s %s:\n%s", tt.version, tt.scormType, page)
			}
			if !strings.Contains(page, "<title>Fish &amp; &lt;Chips&gt;</title>") {
				t.Errorf("title not escaped:\n%s", page)
			}
			if string(contents["given.txt"]) != "given" {
				t.Errorf("given content = %q", contents["given.txt"])
			}
		})
	}
}

func TestBuildManifestOverride(t *testing.T) {
	b, err := scormgen.Build(scormgen.Spec{Manifest: []byte("<not-a-manifest/>"),
		Resources: []scormgen.Resource{{Identifier: "R", Href: "a/b.html"}}})
	if err != nil {
		t.Fatal(err)
	}
	names, contents := entries(t, b)
	if !reflect.DeepEqual(names, []string{"imsmanifest.xml", "a/b.html"}) || string(contents["imsmanifest.xml"]) != "<not-a-manifest/>" {
		t.Errorf("entries %q, manifest %q", names, contents["imsmanifest.xml"])
	}
}

func TestBuildErrors(t *testing.T) {
	item := func(mutate func(*scormgen.Item)) []scormgen.Organization {
		it := scormgen.Item{Identifier: "I", Resource: "R"}
		mutate(&it)
		return []scormgen.Organization{{Identifier: "O", Items: []scormgen.Item{it}}}
	}
	tests := []struct {
		name string
		spec scormgen.Spec
		want string
	}{
		{"unknown version", scormgen.Spec{Identifier: "M", Version: "1.3"}, `build M: unknown SCORM version "1.3"`},
		{"sequencing collection in 1.2", scormgen.Spec{Identifier: "M", Version: scormgen.Version12,
			SequencingCollection: []scormgen.Sequencing{{ID: "S"}}}, "build M: sequencing needs SCORM 2004"},
		{"organization sequencing in 1.2", scormgen.Spec{Identifier: "M", Version: scormgen.Version12,
			Organizations: []scormgen.Organization{{Identifier: "O", Sequencing: &scormgen.Sequencing{}}}},
			`build M: organization "O": sequencing needs SCORM 2004`},
		{"completion threshold in 1.2", scormgen.Spec{Identifier: "M", Version: scormgen.Version12,
			Organizations: item(func(it *scormgen.Item) { it.CompletionThresholdText = "0.5" })},
			`build M: item "I": completion threshold and sequencing need SCORM 2004`},
		{"mastery score in 2004", scormgen.Spec{Identifier: "M", Version: scormgen.Version2004Ed4,
			Organizations: item(func(it *scormgen.Item) { it.MasteryScore = "80" })},
			`build M: item "I": mastery score, max time allowed and prerequisites are SCORM 1.2 only`},
		{"file outside the package", scormgen.Spec{Identifier: "M", Version: scormgen.Version12,
			Resources: []scormgen.Resource{{Identifier: "R", Href: "../evil.html"}}},
			`build M: resource R: file "../evil.html" is outside the package`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := scormgen.Build(tt.spec)
			if err == nil || err.Error() != tt.want {
				t.Errorf("err = %v, want %q", err, tt.want)
			}
		})
	}
}

func TestBuildSkipsExternalFiles(t *testing.T) {
	s := scormgen.Spec{Version: scormgen.Version12, Identifier: "M",
		Resources: []scormgen.Resource{
			{Identifier: "R1", XMLBase: "https://cdn.example.com/", Href: "a.html"},
			{Identifier: "R2", Href: "/abs.html"},
			{Identifier: "R3", Href: "local.html?x=1#y"},
		}}
	b, err := scormgen.Build(s)
	if err != nil {
		t.Fatal(err)
	}
	if names, _ := entries(t, b); !reflect.DeepEqual(names, []string{"imsmanifest.xml", "local.html"}) {
		t.Errorf("entries = %q", names)
	}
}

func TestWriteDemo(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "manifests")
	names, err := scormgen.WriteDemo(dir)
	if err != nil {
		t.Fatalf("WriteDemo: %v", err)
	}
	if len(names) < 5 {
		t.Fatalf("WriteDemo wrote %d packages, want at least 5", len(names))
	}
	old := time.Date(2020, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, n := range names {
		if filepath.Base(n) != n {
			t.Errorf("name %q is not a bare file name", n)
		}
		if err := os.Chtimes(filepath.Join(dir, n), old, old); err != nil {
			t.Fatal(err)
		}
	}
	corrupted := filepath.Join(dir, names[0])
	if err := os.WriteFile(corrupted, []byte("garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(corrupted, old, old); err != nil {
		t.Fatal(err)
	}

	again, err := scormgen.WriteDemo(dir)
	if err != nil {
		t.Fatalf("second WriteDemo: %v", err)
	}
	if !reflect.DeepEqual(names, again) {
		t.Errorf("names changed: %q then %q", names, again)
	}
	for i, s := range scormgen.Demo() {
		path := filepath.Join(dir, s.Filename)
		info, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		rewritten := !info.ModTime().Equal(old)
		if rewritten != (i == 0) {
			t.Errorf("%s rewritten = %v, want %v", s.Filename, rewritten, i == 0)
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		want, err := scormgen.Build(s)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s content differs from Build", s.Filename)
		}
	}
	all, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != len(names) {
		t.Errorf("directory holds %d files, want %d (temporary files left?)", len(all), len(names))
	}
}
