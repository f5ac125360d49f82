package invalidation

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	up         prometheus.Gauge
	reconnects prometheus.Counter
	notes      *prometheus.CounterVec
	keys       prometheus.Counter
	lag        prometheus.Histogram
	resyncs    *prometheus.CounterVec
	resyncKeys prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		up: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cachecar_invalidation_listener_up",
			Help: "1 while the invalidation listener is connected, listening and resynced.",
		}),
		reconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cachecar_invalidation_reconnects_total",
			Help: "Listener sessions that ended (connection lost, failed, or a cache failure) and were retried.",
		}),
		notes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cachecar_invalidation_notifications_total",
			Help: "Notifications received, by outcome: applied, table_wide, foreign (a table no policy uses), malformed.",
		}, []string{"outcome"}),
		keys: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cachecar_invalidation_keys_deleted_total",
			Help: "Cache keys deleted by notifications (tag-set members included).",
		}),
		lag: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "cachecar_invalidation_lag_seconds",
			Help:    "From the writing statement's trigger (just before its commit) to its keys deleted in Valkey.",
			Buckets: []float64{.0005, .001, .002, .003, .005, .0075, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}),
		resyncs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cachecar_invalidation_resyncs_total",
			Help: "Resyncs (every database-derived entry deleted), by reason: connect (after a gap) or table_wide.",
		}, []string{"reason"}),
		resyncKeys: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cachecar_invalidation_resync_keys_deleted_total",
			Help: "Keys deleted by resyncs.",
		}),
	}
	reg.MustRegister(m.up, m.reconnects, m.notes, m.keys, m.lag, m.resyncs, m.resyncKeys)
	for _, o := range []string{"applied", "table_wide", "foreign", "malformed"} {
		m.notes.WithLabelValues(o)
	}
	for _, r := range []string{"connect", "table_wide"} {
		m.resyncs.WithLabelValues(r)
	}
	return m
}
