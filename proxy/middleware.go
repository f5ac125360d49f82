package proxy

import (
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	requests *prometheus.CounterVec   // route, code, cache
	duration *prometheus.HistogramVec // route

	// series caches the two series of each (route, status, cache) seen, so that a request
	// skips WithLabelValues' hashing and locked lookups. The set is small: route templates,
	// the statuses handlers write, and the X-Cache values.
	mu     sync.RWMutex
	series map[seriesKey]series
}

type seriesKey struct {
	route  string
	status int
	cache  string
}

type series struct {
	count prometheus.Counter
	dur   prometheus.Observer
}

func (m *metrics) get(route string, status int, cache string) series {
	k := seriesKey{route, status, cache}
	m.mu.RLock()
	s, ok := m.series[k]
	m.mu.RUnlock()
	if ok {
		return s
	}
	s = series{m.requests.WithLabelValues(route, strconv.Itoa(status), cache), m.duration.WithLabelValues(route)}
	m.mu.Lock()
	if m.series == nil {
		m.series = make(map[seriesKey]series)
	}
	m.series[k] = s
	m.mu.Unlock()
	return s
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cachecar_http_requests_total",
			Help: "Read API requests by route template, status code and cache result.",
		}, []string{"route", "code", "cache"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "cachecar_http_request_duration_seconds",
			Help:    "Read API request duration by route template.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"route"}),
	}
	reg.MustRegister(m.requests, m.duration)
	return m
}

// recorder remembers the status and size a handler wrote.
type recorder struct {
	http.ResponseWriter
	status int
	bytes  int
	wrote  bool
}

func (r *recorder) WriteHeader(code int) {
	if !r.wrote {
		r.status, r.wrote = code, true
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if !r.wrote {
		r.status, r.wrote = http.StatusOK, true
	}
	n, err := r.ResponseWriter.Write(b)
	r.bytes += n
	return n, err
}

// observe gives every request an id, recovers panics as 500, counts it, and writes the access
// log line (route template, never the path: paths hold ids and session ids).
func (s *Server) observe(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.inflight.begin()
		defer s.inflight.end() // last: after the access-log line
		start := time.Now()
		rid := requestID(r.Header.Get("X-Request-Id"))
		w.Header().Set("X-Request-Id", rid)
		rec := &recorder{ResponseWriter: w}
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				s.log.Error().Str("request_id", rid).Interface("panic", p).Str("route", r.Pattern).Msg("handler panicked")
				if !rec.wrote {
					writeJSONError(rec, http.StatusInternalServerError, "internal", "internal error; see the sidecar's log")
				}
			}
			s.finish(rec, r, rid, start)
		}()
		next.ServeHTTP(rec, r)
	})
}

func (s *Server) finish(rec *recorder, r *http.Request, rid string, start time.Time) {
	d := time.Since(start)
	route := routeLabel(r, rec.status)
	cache := rec.Header().Get("X-Cache")
	ser := s.m.get(route, rec.status, cache)
	ser.count.Inc()
	ser.dur.Observe(d.Seconds())
	if rec.status < 500 && (s.opts.AccessSample <= 0 || (s.opts.AccessSample < 1 && rand.Float64() >= s.opts.AccessSample)) {
		return
	}
	s.log.Info().
		Str("request_id", rid).
		Str("method", r.Method).
		Str("route", route).
		Int("status", rec.status).
		Float64("duration_ms", float64(d.Microseconds())/1000).
		Str("cache", cache).
		Int("bytes", rec.bytes).
		Msg("request")
}

// routeLabel is the route of the metrics and the access log. It is bounded and never taken
// from the path:
//   - a matched route: its pattern, "GET /v1/courses/{id}";
//   - a 405: "method_not_allowed", for every route (only methodNotAllowed answers 405). It
//     comes from the route's method-less pattern ("/v1/courses/{id}"), which as a label would
//     split a route's series in two, and some paths serve several methods
//     (/v1/sessions/{sid}), so there is no one pattern to count it under;
//   - anything else (an unknown path, the catch-all "/", an unclean path, the request-target
//     *): "unmatched".
func routeLabel(r *http.Request, status int) string {
	switch {
	case status == http.StatusMethodNotAllowed:
		return "method_not_allowed"
	case r.Pattern == "" || r.Pattern == "/":
		return "unmatched"
	}
	return r.Pattern
}

// requestID keeps a caller's id when it is short and plain, else makes one.
func requestID(in string) string {
	if n := len(in); n > 0 && n <= 64 {
		ok := true
		for i := 0; i < n && ok; i++ {
			c := in[i]
			ok = c == '-' || c == '_' || c == '.' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
		}
		if ok {
			return in
		}
	}
	var b [16]byte
	const hex = "0123456789abcdef"
	v := rand.Uint64()
	for i := range b {
		b[i] = hex[v&15]
		v >>= 4
	}
	return string(b[:])
}
