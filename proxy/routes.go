package proxy

import (
	"net/http"
	"strings"

	"github.com/cachecar/cachecar/internal/httpx"
	"github.com/cachecar/cachecar/sessions"
)

// routes lists the whole read API. Each path also has a method-less pattern that answers 405
// in JSON, because the mux's own 405 is plain text.
func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	get := func(path string, h http.Handler) {
		mux.Handle("GET "+path, h)
		mux.Handle(path, methodNotAllowed("GET, HEAD"))
	}
	get("/v1/tenants/{id}", s.single(s.pol.Tenant, "tenant id"))
	get("/v1/tenants/{id}/stats", s.single(s.pol.TenantStats, "tenant id"))
	get("/v1/tenants/{id}/dispatches", s.dispatchList())
	get("/v1/courses/{id}", s.single(s.pol.Course, "course id"))
	get("/v1/courses", s.courseBatch())
	get("/v1/dispatches/{id}", s.single(s.pol.Dispatch, "dispatch id"))
	if s.opts.Manifests != nil {
		get("/v1/manifests/{filename}", s.manifest())
	}
	if s.opts.Sessions != nil {
		s.sessionRoutes(mux)
	}
	mux.Handle("/", notFound())
	h := httpx.Canonical(mux, writeJSONError)
	if s.opts.Sessions == nil {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// /v1/sessions//touch is a touch of the empty sid: a bad sid (400), as the session
		// routes answer it, rather than an unclean path.
		if strings.HasPrefix(r.URL.EscapedPath(), "/v1/sessions//") {
			s.sessionError(w, r, sessions.CheckSID(""))
			return
		}
		h.ServeHTTP(w, r)
	})
}
