package cachepolicy

import "github.com/prometheus/client_golang/prometheus"

// Metrics are the resolver's Prometheus series. Labels are policy names, results and outcomes:
// small fixed sets, never ids.
type Metrics struct {
	lookups      *prometheus.CounterVec   // policy, result: hit|miss|bypass
	queries      *prometheus.CounterVec   // policy, outcome: ok|not_found|unavailable|timeout|error
	queryTime    *prometheus.HistogramVec // policy
	shared       *prometheus.CounterVec   // policy: loads answered by another caller's query
	fillsRefused *prometheus.CounterVec   // policy: fills refused because an invalidation revoked the lease
	valkeyErrs   *prometheus.CounterVec   // op
	valkeyUp     prometheus.Gauge
	valkeyConns  prometheus.Counter
}

// NewMetrics registers the resolver's metrics on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cachecar_cache_lookups_total",
			Help: "Cache lookups by policy and result (hit, miss, bypass when the cache could not be used).",
		}, []string{"policy", "result"}),
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cachecar_db_queries_total",
			Help: "PostgreSQL loads by policy and outcome.",
		}, []string{"policy", "outcome"}),
		queryTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "cachecar_db_query_duration_seconds",
			Help:    "Duration of PostgreSQL loads by policy.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"policy"}),
		shared: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cachecar_loads_shared_total",
			Help: "Misses answered by a load another request of this process had already started (single-flight).",
		}, []string{"policy"}),
		valkeyErrs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cachecar_valkey_errors_total",
			Help: "Valkey calls that failed or timed out, by operation.",
		}, []string{"op"}),
		valkeyUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cachecar_valkey_up",
			Help: "1 while the last Valkey call succeeded, 0 while Valkey is failing or not connected.",
		}),
		valkeyConns: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cachecar_valkey_connects_total",
			Help: "Successful connections of the Valkey client (start-up and reconnects after an outage at start-up).",
		}),
	}
	m.fillsRefused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cachecar_cache_fills_refused_total",
		Help: "Fills refused because an invalidation deleted the fill lease while the load ran (the stale-set race, closed).",
	}, []string{"policy"})
	reg.MustRegister(m.lookups, m.queries, m.queryTime, m.shared, m.fillsRefused, m.valkeyErrs, m.valkeyUp, m.valkeyConns)
	return m
}
