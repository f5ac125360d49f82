// Package admin serves cachecar's operational ports: health, readiness and metrics.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/cachecar/cachecar/internal/httpx"
	"github.com/cachecar/cachecar/invalidation"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Lifecycle states of the process, as readiness sees them.
const (
	Starting int32 = iota
	Serving
	Draining
)

// Pinger checks one dependency.
type Pinger interface {
	Ping(ctx context.Context) error
}

// HealthOptions configures the health port.
type HealthOptions struct {
	// CheckTimeout bounds each dependency check; it must be positive.
	CheckTimeout time.Duration
	// CacheEnabled is false when caching is switched off by config.
	CacheEnabled bool
	// Pprof serves net/http/pprof under /debug/pprof/.
	Pprof bool
	// Listener is the invalidation listener; nil when invalidation is off.
	Listener ListenerStatus
	// Sessions is the session store; nil when sessions are off.
	Sessions SessionStatus
	// Cache reports the breakers and the in-process tier; nil shows none of them.
	Cache CacheStatus
	// MemoryCache is set when the cache is the process's memory alone (no Valkey configured).
	MemoryCache bool
	// AdminAddr is where the admin port listens; "" when it is closed (no token configured).
	AdminAddr string
}

// CacheStatus reports the read path's breakers and in-process tier; *cachepolicy.Resolver is
// the real one.
type CacheStatus interface {
	ValkeyCircuit() int   // cachepolicy.CircuitClosed, CircuitHalfOpen or CircuitOpen
	DatabaseCircuit() int // the same states
	Tier() (bool, cachepolicy.TierStats)
}

// TierStatus is the in-process tier in /health/detailed.
type TierStatus struct {
	Enabled  bool   `json:"enabled"`
	Entries  uint64 `json:"entries"`
	Bytes    uint64 `json:"bytes"`
	MaxBytes uint64 `json:"maxBytes"`
}

// SessionStatus reports the session store's backend; *sessions.Store is the real one.
type SessionStatus interface {
	Active() string  // "valkey" or "postgres"
	HasValkey() bool // Valkey is configured for sessions
}

// ListenerStatus reports the invalidation listener's state; *invalidation.Listener is the real one.
type ListenerStatus interface {
	Status() invalidation.Status
}

// Health serves /health, /health/detailed, /ready and /metrics.
type Health struct {
	opts    HealthOptions
	started time.Time
	state   atomic.Int32
	db      Pinger
	valkey  Pinger // nil: no Valkey configured
	gather  prometheus.Gatherer
	now     func() time.Time
}

// NewHealth returns the health server in the Starting state. valkey may be nil.
func NewHealth(opts HealthOptions, db, valkey Pinger, gather prometheus.Gatherer) *Health {
	return &Health{opts: opts, started: time.Now(), db: db, valkey: valkey, gather: gather, now: time.Now}
}

// SetState moves the lifecycle state (Starting, Serving, Draining).
func (h *Health) SetState(s int32) { h.state.Store(s) }

// Handler returns the health port's routes. Each path also has a method-less pattern that
// answers 405 in JSON, because the mux's own 405 is plain text.
func (h *Health) Handler() http.Handler {
	mux := http.NewServeMux()
	get := func(p string, handler http.Handler) {
		mux.Handle("GET "+p, handler)
		mux.Handle(p, methodNotAllowed("GET, HEAD"))
	}
	get("/health", http.HandlerFunc(h.live))
	get("/health/detailed", http.HandlerFunc(h.detailed))
	get("/ready", http.HandlerFunc(h.ready))
	get("/metrics", promhttp.HandlerFor(h.gather, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError}))
	if h.opts.Pprof {
		// One method-less pattern covers the whole tree: one per path would conflict with
		// "GET /debug/pprof/" (each matches more methods, the other more paths).
		get("/debug/pprof/", http.HandlerFunc(pprof.Index))
		mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		adminError(w, http.StatusNotFound, "no_route", "no such route; the health port serves /health, /health/detailed, /ready and /metrics")
	})
	return httpx.Canonical(mux, adminError)
}

// methodNotAllowed answers a path's other methods: 405 with Allow, in JSON.
func methodNotAllowed(allow string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", allow)
		adminError(w, http.StatusMethodNotAllowed, "method_not_allowed", "method "+r.Method+" is not allowed here; allowed: "+allow)
	})
}

// live is liveness: the process serves. It never looks at dependencies, so that a database or
// Valkey outage never gets the pod restarted.
func (h *Health) live(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{
		"status":    "ok",
		"timestamp": h.now().UTC().Format(time.RFC3339),
		"uptime":    h.uptime(),
	})
}

func (h *Health) uptime() float64 {
	return float64(time.Since(h.started).Milliseconds()) / 1000
}

// ServiceStatus is one dependency in /health/detailed.
type ServiceStatus struct {
	Status       string   `json:"status"`
	ResponseTime *float64 `json:"responseTime,omitempty"` // milliseconds
	Error        string   `json:"error,omitempty"`
	// Since and LastNotification are the listener's: when it entered its state, and when the
	// last notification came (RFC 3339).
	Since            string `json:"since,omitempty"`
	LastNotification string `json:"lastNotification,omitempty"`
	// Store is the sessions': the store that serves reads now.
	Store string `json:"store,omitempty"`
	// PostgresCopies is the sessions' copies of PostgreSQL's answers: "up" while kept (the
	// LISTEN connection listens, the session table's notify triggers are in place, and
	// PostgreSQL answers the reads), "standby" while Valkey answers them, "down" while they
	// cannot be kept; absent when turned off.
	PostgresCopies string `json:"postgresCopies,omitempty"`
	// Migration is the sessions' rolling migration (sessions.migration): "connect-redis" or
	// "connect-pg-simple"; absent when none runs.
	Migration string `json:"migration,omitempty"`
	// Circuit is the breaker in front of the service: closed, half-open or open.
	Circuit string `json:"circuit,omitempty"`
	// Tier is the cache's in-process tier.
	Tier *TierStatus `json:"tier,omitempty"`
	// Listen is the admin port's address.
	Listen string `json:"listen,omitempty"`
}

// listenerStatus maps the listener's state onto a service status: up while live; down while
// (re)connecting; error when the schema or triggers keep it from starting.
func (h *Health) listenerStatus() ServiceStatus {
	if h.opts.Listener == nil {
		return ServiceStatus{Status: "disabled"}
	}
	st := h.opts.Listener.Status()
	out := ServiceStatus{Status: "down", Error: st.Error, Since: st.Since.UTC().Format(time.RFC3339)}
	switch st.State {
	case invalidation.StateLive:
		out.Status = "up"
	case invalidation.StateError:
		out.Status = "error"
	}
	if !st.LastNotification.IsZero() {
		out.LastNotification = st.LastNotification.UTC().Format(time.RFC3339Nano)
	}
	return out
}

func (h *Health) check(ctx context.Context, p Pinger) ServiceStatus {
	ctx, cancel := context.WithTimeout(ctx, h.opts.CheckTimeout)
	defer cancel()
	start := time.Now()
	err := p.Ping(ctx)
	ms := float64(time.Since(start).Microseconds()) / 1000
	if err != nil {
		// The message names the failure class only; addresses and DSNs stay in the logs.
		msg := failureClass(err)
		if ctx.Err() != nil {
			msg = "timed out after " + h.opts.CheckTimeout.String()
		}
		return ServiceStatus{Status: "down", ResponseTime: &ms, Error: msg}
	}
	return ServiceStatus{Status: "up", ResponseTime: &ms}
}

// failureClass names what kind of failure err is, without its details: a wrong password is
// told apart from a server that does not answer, which is what an operator looks at first.
func failureClass(err error) string {
	var pgErr *pgconn.PgError
	msg := err.Error()
	switch {
	case errors.As(err, &pgErr) && strings.HasPrefix(pgErr.Code, "28"), // invalid authorization
		strings.Contains(msg, "WRONGPASS"), strings.Contains(msg, "NOAUTH"),
		strings.Contains(msg, "NOPERM"):
		return "authentication or permission refused"
	case strings.Contains(msg, "tls:"), strings.Contains(msg, "x509:"):
		return "TLS handshake failed"
	case strings.Contains(msg, "OOM "):
		return "out of memory: writes refused (maxmemory reached)"
	case strings.Contains(msg, "READONLY "):
		return "read-only: writes refused (a replica)"
	case strings.Contains(msg, "circuit open"):
		return "circuit open after repeated failures (see the log)"
	case strings.Contains(msg, "goes through a connection pooler"):
		return "a connection pooler, not PostgreSQL itself (see database.session_pooler)"
	}
	return "unreachable"
}

// detailed reports every dependency: healthy when all are up, degraded when the cache or the
// invalidation listener is down (reads still work, from PostgreSQL), unhealthy when PostgreSQL
// is down (503).
func (h *Health) detailed(w http.ResponseWriter, r *http.Request) {
	var db, redis ServiceStatus
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); db = h.check(r.Context(), h.db) }()
	if h.valkey != nil {
		wg.Add(1)
		go func() { defer wg.Done(); redis = h.check(r.Context(), h.valkey) }()
	} else {
		redis = ServiceStatus{Status: "disabled"}
	}
	wg.Wait()
	cache := ServiceStatus{Status: "up"}
	if c := h.opts.Cache; c != nil {
		db.Circuit = cachepolicy.CircuitName(c.DatabaseCircuit())
		if h.valkey != nil {
			redis.Circuit = cachepolicy.CircuitName(c.ValkeyCircuit())
		}
		if h.valkey != nil || h.opts.MemoryCache {
			on, st := c.Tier()
			cache.Tier = &TierStatus{Enabled: on, Entries: st.Entries, Bytes: st.Bytes, MaxBytes: st.Limit}
		}
	}
	switch {
	case !h.opts.CacheEnabled:
		cache.Status = "disabled"
	case h.valkey == nil && !h.opts.MemoryCache:
		cache.Status = "disabled"
	case h.opts.MemoryCache:
		// No Valkey: the cache is this process's memory, up while the process is.
	case redis.Status != "up", redis.Circuit == "open", redis.Circuit == "half-open":
		cache.Status = "degraded"
	}
	listener := h.listenerStatus()
	sessions := ServiceStatus{Status: "disabled"}
	if h.opts.Sessions != nil {
		// up: served from Valkey (or from PostgreSQL, with no Valkey configured or while
		// migrating from connect-pg-simple); degraded: Valkey is configured but down or not yet
		// reconciled, PostgreSQL serves.
		sessions = ServiceStatus{Status: "up", Store: h.opts.Sessions.Active()}
		if pc, ok := h.opts.Sessions.(interface{ PostgresCopies() string }); ok {
			sessions.PostgresCopies = pc.PostgresCopies()
		}
		if mg, ok := h.opts.Sessions.(interface{ Migration() string }); ok {
			sessions.Migration = mg.Migration()
		}
		// Migrating from connect-pg-simple, PostgreSQL serves the reads by design.
		if h.opts.Sessions.HasValkey() && sessions.Store != "valkey" && sessions.Migration != "connect-pg-simple" {
			sessions.Status = "degraded"
		}
		if db.Status != "up" {
			sessions.Status = "down"
		}
	}
	if cache.Status == "up" && listener.Status != "up" && listener.Status != "disabled" {
		// Without the listener, invalidated policies' reads bypass the cache.
		cache.Status = "degraded"
	}
	status, code := "healthy", http.StatusOK
	if cache.Status == "degraded" || sessions.Status == "degraded" {
		status = "degraded"
	}
	if db.Status != "up" {
		status, code = "unhealthy", http.StatusServiceUnavailable
	}
	writeJSON(w, code, map[string]any{
		"status":    status,
		"timestamp": h.now().UTC().Format(time.RFC3339),
		"uptime":    h.uptime(),
		"services": map[string]ServiceStatus{"database": db, "redis": redis, "cache": cache, "listener": listener, "sessions": sessions,
			"admin": h.adminStatus()},
	})
}

// adminStatus says whether the admin port listens: up, or disabled (no token configured, so it
// is not listening at all).
func (h *Health) adminStatus() ServiceStatus {
	if h.opts.AdminAddr == "" {
		return ServiceStatus{Status: "disabled", Error: "no admin token configured: the admin port is not listening"}
	}
	return ServiceStatus{Status: "up", Listen: h.opts.AdminAddr}
}

// ready is readiness: 503 while starting, while draining, and while PostgreSQL is unreachable.
// A Valkey outage keeps the pod ready: reads still work from PostgreSQL.
func (h *Health) ready(w http.ResponseWriter, r *http.Request) {
	switch h.state.Load() {
	case Starting:
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not_ready", "reason": "starting"})
		return
	case Draining:
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not_ready", "reason": "draining"})
		return
	}
	if s := h.check(r.Context(), h.db); s.Status != "up" {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not_ready", "reason": "database " + s.Error})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(code)
	w.Write(b)
}
