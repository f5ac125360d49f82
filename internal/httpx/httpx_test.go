package httpx

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestCleanPath(t *testing.T) {
	for p, want := range map[string]bool{
		"/": true, "/v1/courses/1": true, "/v1/sessions/": true, "/a.b/c..d": true,
		"": false, "v1": false, "//": false, "/v1//courses": false, "/v1/./x": false,
		"/v1/../x": false, "/v1/x/..": false, "/v1/x/.": false, "/v1/x//": false,
	} {
		if got := CleanPath(p); got != want {
			t.Errorf("CleanPath(%q) = %v, want %v", p, got, want)
		}
	}
}

func TestCanonical(t *testing.T) {
	var reached bool
	var codes []string
	h := Canonical(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { reached = true }),
		func(w http.ResponseWriter, status int, code, _ string) {
			codes = append(codes, code)
			w.WriteHeader(status)
		})
	for _, tt := range []struct {
		target  string
		status  int
		reaches bool
	}{
		{"/v1/courses/1", 200, true},
		{"/v1/courses//1", 404, false},
		{"*", 400, false},
	} {
		reached, codes = false, nil
		r := httptest.NewRequest("GET", "http://x/", nil)
		r.RequestURI = tt.target
		if tt.target != "*" {
			r = httptest.NewRequest("GET", tt.target, nil)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, r)
		if rec.Code != tt.status || reached != tt.reaches {
			t.Errorf("%s: status %d reached %v (codes %q), want %d %v", tt.target, rec.Code, reached, codes, tt.status, tt.reaches)
		}
	}
}
