// Package proxy is the read API server: routes, handlers, HTTP caching headers and errors.
package proxy

import (
	"context"
	"net/http"
	"sync"
	"sync/atomic"

	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// Reader answers reads through the cache; *cachepolicy.Resolver is the real one.
type Reader interface {
	Get(ctx context.Context, p *cachepolicy.Policy, vals []string, args ...any) (cachepolicy.Result, error)
	GetMany(ctx context.Context, p *cachepolicy.Policy, ids []int64) ([]cachepolicy.Item, cachepolicy.Result, error)
}

// Policies are the compiled policies of the routes.
type Policies struct {
	Tenant, Course, Dispatch, DispatchList, TenantStats *cachepolicy.Policy
}

// Options configures the read API.
type Options struct {
	// AccessSample is the fraction of requests logged (0 none, 1 all); 5xx are always logged.
	AccessSample float64
	// Manifests configures the SCORM manifest route; nil leaves the route out.
	Manifests *Manifests
	// Sessions configures the session routes; nil leaves them out.
	Sessions *Sessions
}

// Server is the read API. Its Handler is safe for concurrent use.
type Server struct {
	opts Options
	read Reader
	pol  Policies
	log  zerolog.Logger
	m    *metrics
	// inflight counts the requests in the handler, access-log line included (Wait).
	inflight inflight
}

// inflight counts requests in the handler. A WaitGroup would not do: a request may begin (a
// connection that had already read it) while Wait waits, which WaitGroup forbids. The hot path
// is one atomic add each way; the lock is taken only when the count falls to zero.
type inflight struct {
	n    atomic.Int64
	mu   sync.Mutex
	zero chan struct{} // closed when n falls to zero; nil while nobody waits
}

func (f *inflight) begin() { f.n.Add(1) }

func (f *inflight) end() {
	if f.n.Add(-1) != 0 {
		return
	}
	f.mu.Lock()
	if f.zero != nil {
		close(f.zero)
		f.zero = nil
	}
	f.mu.Unlock()
}

// wait waits until no request is in the handler, or ctx ends; it reports whether none is.
func (f *inflight) wait(ctx context.Context) bool {
	f.mu.Lock()
	if f.n.Load() == 0 {
		f.mu.Unlock()
		return true
	}
	if f.zero == nil {
		f.zero = make(chan struct{})
	}
	zero := f.zero
	f.mu.Unlock()
	select {
	case <-zero:
		return true
	case <-ctx.Done():
		return false
	}
}

// New returns the read API server. It registers its metrics on reg and starts no goroutines.
func New(opts Options, read Reader, pol Policies, log zerolog.Logger, reg prometheus.Registerer) *Server {
	return &Server{opts: opts, read: read, pol: pol, log: log, m: newMetrics(reg)}
}

// Wait waits until no request is in the handler (its access-log line written), or ctx ends;
// it reports whether none is. After http.Server.Shutdown gave up, the requests still running
// outlive their connections: the log writer must not close before their lines are written.
func (s *Server) Wait(ctx context.Context) bool { return s.inflight.wait(ctx) }

// Handler returns the whole read API with its middleware.
func (s *Server) Handler() http.Handler {
	return s.observe(s.routes())
}
