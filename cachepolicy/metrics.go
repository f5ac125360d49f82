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

	localHits      *prometheus.CounterVec // policy: hits answered by the in-process tier
	staleServed    *prometheus.CounterVec // policy, reason
	refreshes      *prometheus.CounterVec // policy, why: stale|ahead
	shed           *prometheus.CounterVec // policy: loads refused by the bulkhead
	circuit        prometheus.Gauge       // Valkey breaker state
	circuitChanges *prometheus.CounterVec // state
	dbCircuit      prometheus.Gauge
	tierOn         prometheus.Gauge
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
	m.localHits = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cachecar_cache_local_hits_total",
		Help: "Hits answered from the in-process tier, without a Valkey round trip (a subset of the lookups with result hit).",
	}, []string{"policy"})
	m.staleServed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cachecar_cache_stale_served_total",
		Help: "Entries served past their TTL, by policy and reason (stale-while-revalidate, stale-if-error).",
	}, []string{"policy", "reason"})
	m.refreshes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cachecar_cache_refreshes_total",
		Help: "Background refreshes that took the refresh lease and loaded, by policy and why (stale: an entry served stale; ahead: refresh-ahead of a hot key).",
	}, []string{"policy", "why"})
	m.shed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cachecar_db_loads_shed_total",
		Help: "Loads refused because database.max_loads loads were already running (answered 503 with Retry-After).",
	}, []string{"policy"})
	m.circuit = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "cachecar_valkey_circuit_state",
		Help: "The Valkey circuit breaker: 0 closed, 1 half-open, 2 open (reads go to PostgreSQL).",
	})
	m.circuitChanges = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "cachecar_valkey_circuit_transitions_total",
		Help: "Transitions of the Valkey circuit breaker, by the state entered.",
	}, []string{"state"})
	m.dbCircuit = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "cachecar_db_circuit_state",
		Help: "The database circuit breaker: 0 closed, 1 half-open, 2 open (loads fail fast).",
	})
	m.tierOn = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "cachecar_tier_enabled",
		Help: "1 while the in-process tier (Valkey client tracking) is on.",
	})
	reg.MustRegister(m.lookups, m.queries, m.queryTime, m.shared, m.fillsRefused, m.valkeyErrs, m.valkeyUp, m.valkeyConns,
		m.localHits, m.staleServed, m.refreshes, m.shed, m.circuit, m.circuitChanges, m.dbCircuit, m.tierOn)
	return m
}
