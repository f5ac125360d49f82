// Package httpx holds what cachecar's HTTP ports share around net/http's ServeMux.
package httpx

import (
	"net/http"
	"path"
	"strings"
)

// ErrorWriter writes an error answer in a port's JSON shape.
type ErrorWriter func(w http.ResponseWriter, status int, code, message string)

// Canonical answers in JSON, through werr, the requests ServeMux answers before any pattern
// matches: it redirects a path with an empty, . or .. segment to its cleaned form, and answers
// the request-target * with a bare 400. An unclean path is a 404 rather than the cleaned path's
// answer: /v1/courses/../tenants/1 names no course, and a client that sends it has a bug to see.
// (OPTIONS * never gets here unless the server's DisableGeneralOptionsHandler is set.)
func Canonical(mux http.Handler, werr ErrorWriter) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.RequestURI == "*":
			werr(w, http.StatusBadRequest, "bad_request", "the request-target * names no resource")
		case !CleanPath(r.URL.EscapedPath()):
			werr(w, http.StatusNotFound, "no_route", "no such route: a path is matched as sent, and this one is not clean (an empty, . or .. segment)")
		default:
			mux.ServeHTTP(w, r)
		}
	})
}

// CleanPath reports whether p is a path ServeMux matches as it is, without redirecting to
// another: rooted, with no empty, . or .. segment (a trailing slash is kept, as ServeMux does).
func CleanPath(p string) bool {
	if !strings.HasPrefix(p, "/") {
		return false
	}
	c := path.Clean(p)
	if c != "/" && strings.HasSuffix(p, "/") {
		c += "/"
	}
	return c == p
}
