package scorm

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"testing/iotest"
)

func TestResolveRef(t *testing.T) {
	tests := []struct {
		base, ref, want string
	}{
		{"", "a.html", "a.html"},
		{"", "", ""},
		{"a/", "", "a/"},
		{"a/b", "c", "a/c"},
		{"a/b/", "c", "a/b/c"},
		{"a/b/", "./c/./d", "a/b/c/d"},
		{"a/b/", "..", "a/"},
		{"a/b/", "../..", ""},
		{"a/b/", "../../..", "../"},
		{"a/b/", "../../../x", "../x"},
		{"", "../x", "../x"},
		{"../", "../x", "../../x"},
		{"a/", "/x", "/x"},
		{"a/", "/x/../y", "/y"},
		{"a/", "?q", "a/?q"},
		{"a/", "#f", "a/#f"},
		{"a/", "x?q=../y#f", "a/x?q=../y#f"},
		{"a/", "mailto:x@example.com", "mailto:x@example.com"},
		{"a/", "HTTP://Example.com/x", "HTTP://Example.com/x"},
		{"https://h.example/a/b", "c", "https://h.example/a/c"},
		{"https://h.example/a/b/", "../../../c", "https://h.example/c"},
		{"https://h.example", "c", "https://h.example/c"},
		{"https://h.example/a/", "/c", "https://h.example/c"},
		{"https://h.example/a/", "//o.example/c", "https://o.example/c"},
		{"//h.example/a/", "c", "//h.example/a/c"},
		{"//h.example/a/", "//o.example/c", "//o.example/c"},
		{"file:///srv/pkg/", "x.html", "file:///srv/pkg/x.html"},
		{"a/", "1x:y", "a/1x:y"},
		{"a/", "c:/x", "c:/x"},
		{"a/", "my file.html", "a/my file.html"},
		{"a//b/", "c", "a//b/c"},
	}
	for _, tt := range tests {
		if got := resolveRef(tt.base, tt.ref); got != tt.want {
			t.Errorf("resolveRef(%q, %q) = %q, want %q", tt.base, tt.ref, got, tt.want)
		}
	}
}

func TestResolveBase(t *testing.T) {
	tests := []struct {
		bases []string
		want  string
	}{
		{nil, ""},
		{[]string{"", "", ""}, ""},
		{[]string{"a", "b", "c"}, "a/b/c/"},
		{[]string{"a/", "", "c/"}, "a/c/"},
		{[]string{"a/", "/b/", "c"}, "/b/c/"},
		{[]string{"a/", "http://h.example", "c"}, "http://h.example/c/"},
		{[]string{"a/?x=1#y", "b/"}, "a/b/"},
		{[]string{"https://h.example/p/", "../q/", "r"}, "https://h.example/q/r/"},
	}
	for _, tt := range tests {
		if got := resolveBase(tt.bases...); got != tt.want {
			t.Errorf("resolveBase(%q) = %q, want %q", tt.bases, got, tt.want)
		}
	}
}

func TestAppendParameters(t *testing.T) {
	tests := []struct {
		url, params, want string
	}{
		{"a.html", "", "a.html"},
		{"a.html", "x=1", "a.html?x=1"},
		{"a.html", "?x=1", "a.html?x=1"},
		{"a.html", "&x=1", "a.html?x=1"},
		{"a.html", "?&?x=1", "a.html?x=1"},
		{"a.html?v=1", "x=1", "a.html?v=1&x=1"},
		{"a.html?", "x=1", "a.html?x=1"},
		{"a.html?v=1&", "x=1", "a.html?v=1&x=1"},
		{"a.html", "#f", "a.html#f"},
		{"a.html?v=1", "#f", "a.html?v=1#f"},
		{"a.html#g", "#f", "a.html#g"},
		{"a.html#g", "x=1", "a.html?x=1#g"},
		{"a.html?v=1#g", "x=1", "a.html?v=1&x=1#g"},
		{"a.html#g?h", "x=1", "a.html?x=1#g?h"},
		{"a.html", "?", "a.html"},
	}
	for _, tt := range tests {
		if got := appendParameters(tt.url, tt.params); got != tt.want {
			t.Errorf("appendParameters(%q, %q) = %q, want %q", tt.url, tt.params, got, tt.want)
		}
	}
}

func TestReadLimited(t *testing.T) {
	tests := []struct {
		name    string
		data    string
		limit   int64
		hint    int
		want    string
		wantErr error
	}{
		{"under", "hello", 10, 5, "hello", nil},
		{"exact", "hello", 5, 5, "hello", nil},
		{"hint lies low", "hello world", 100, 1, "hello world", nil},
		{"hint lies high", "hi", 100, 1 << 30, "hi", nil},
		{"negative hint", "hi", 100, -1, "hi", nil},
		{"over, whatever the hint says", "hello world", 5, 2, "", errTooLarge},
		{"empty", "", 5, 0, "", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// OneByteReader makes every read short, as a decompressor's may be.
			got, err := readLimited(iotest.OneByteReader(strings.NewReader(tt.data)), tt.limit, tt.hint)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if err == nil && !bytes.Equal(got, []byte(tt.want)) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
			if cap(got) > int(tt.limit)+1 {
				t.Errorf("buffer capacity %d exceeds the limit", cap(got))
			}
		})
	}
	if _, err := readLimited(iotest.ErrReader(iotest.ErrTimeout), 10, 0); !errors.Is(err, iotest.ErrTimeout) {
		t.Errorf("reader error = %v, want %v", err, iotest.ErrTimeout)
	}
}

func TestDetectVersion(t *testing.T) {
	ns := func(uris ...string) map[string]bool {
		m := make(map[string]bool)
		for _, u := range uris {
			m[u] = true
		}
		return m
	}
	tests := []struct {
		schemaVersion string
		namespaces    map[string]bool
		want          string
	}{
		{"1.2", nil, Version12},
		{" CAM  1.3 ", nil, Version2004Ed2},
		{"2004 3rd Edition", nil, Version2004Ed3},
		{"2004 4TH EDITION", nil, Version2004Ed4},
		{"1.2", ns(nsADLCP2004), Version12},
		{"", ns(nsADLCP12), Version12},
		{"whatever", ns(nsADLCP12), Version12},
		{"", ns(nsADLCP2004), Version2004Ed4},
		{"SCORM 2004 3rd", ns(nsADLCP2004), Version2004Ed3},
		{"2nd edition", ns(nsIMSSS), Version2004Ed2},
		{"1.3", ns(nsADLSEQ), Version2004Ed2},
		{"", ns(nsCP2004), VersionUnknown},
		{"1.1", nil, VersionUnknown},
	}
	for _, tt := range tests {
		if got := detectVersion(tt.schemaVersion, tt.namespaces); got != tt.want {
			t.Errorf("detectVersion(%q, %v) = %q, want %q", tt.schemaVersion, tt.namespaces, got, tt.want)
		}
	}
}
