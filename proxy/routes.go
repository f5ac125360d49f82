package proxy

import "net/http"

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
	return mux
}
