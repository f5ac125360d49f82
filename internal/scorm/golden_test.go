package scorm_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cachecar/cachecar/internal/scorm/scormgen"
)

var update = flag.Bool("update", false, "rewrite testdata/golden from the demo packages")

// marshalGolden renders m as the golden files store it: indented, without HTML escaping (so
// launch URLs read as they are), with a final newline.
func marshalGolden(t *testing.T, m any) []byte {
	t.Helper()
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(m); err != nil {
		t.Fatalf("encode: %v", err)
	}
	return buf.Bytes()
}

func TestGoldenDemoPackages(t *testing.T) {
	for _, s := range scormgen.Demo() {
		name := strings.TrimSuffix(s.Filename, ".zip")
		t.Run(name, func(t *testing.T) {
			got := marshalGolden(t, parseSpec(t, s))
			path := filepath.Join("testdata", "golden", name+".json")
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test -run TestGoldenDemoPackages -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from the parse of %s; if the change is intended, run with -update\ngot:\n%s", path, s.Filename, got)
			}
		})
	}
}
