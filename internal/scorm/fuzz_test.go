package scorm_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"

	"github.com/cachecar/cachecar/internal/scorm"
	"github.com/cachecar/cachecar/internal/scorm/scormgen"
)

// checkResult is the fuzz invariant: an error wraps ErrInvalidPackage and comes without a
// manifest; a manifest marshals to JSON and has a default organization and a launchable item.
func checkResult(t *testing.T, m *scorm.Manifest, err error) {
	t.Helper()
	if err != nil {
		if !errors.Is(err, scorm.ErrInvalidPackage) {
			t.Fatalf("error does not wrap ErrInvalidPackage: %v", err)
		}
		if m != nil {
			t.Fatalf("manifest returned with error %v", err)
		}
		return
	}
	if m == nil {
		t.Fatal("nil manifest without error")
	}
	if _, err := json.Marshal(m); err != nil {
		t.Fatalf("json.Marshal: %v", err)
	}
	// What a successful parse promises: a default organization among the organizations, and
	// at least one item to launch.
	defaultFound, launchable := false, false
	var walk func([]scorm.Item)
	walk = func(items []scorm.Item) {
		for _, it := range items {
			launchable = launchable || it.LaunchURL != ""
			walk(it.Children)
		}
	}
	for _, o := range m.Organizations {
		defaultFound = defaultFound || o.Identifier == m.DefaultOrganization
		walk(o.Items)
	}
	if !defaultFound || !launchable {
		t.Fatalf("default organization found %v, launchable item %v", defaultFound, launchable)
	}
}

// FuzzParse feeds arbitrary bytes to Parse. Seeds: testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	f.Add([]byte(validManifest))
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := scorm.Parse(data)
		checkResult(t, m, err)
	})
}

// FuzzParseZip feeds arbitrary bytes to ParseZip as a zip. Seeds: testdata/fuzz/FuzzParseZip
// and the demo packages.
func FuzzParseZip(f *testing.F) {
	for _, s := range scormgen.Demo() {
		b, err := scormgen.Build(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// Small limits let the fuzzer reach them.
		m, err := scorm.ParseZip(bytes.NewReader(data), int64(len(data)), scorm.Options{MaxManifestBytes: 64 << 10, MaxEntries: 64})
		checkResult(t, m, err)
	})
}
