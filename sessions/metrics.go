package sessions

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	ops        *prometheus.CounterVec
	active     *prometheus.GaugeVec
	reconciles *prometheus.CounterVec
	pruned     prometheus.Counter
	restored   prometheus.Counter
	local      prometheus.Counter
	missing    prometheus.Counter
	pgLocal    prometheus.Counter
	migration  *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cachecar_session_ops_total",
			Help: "Session reads and writes by op (get, put, delete, touch), the store that answered (valkey, postgres) and outcome (ok, not_found, error).",
		}, []string{"op", "store", "outcome"}),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cachecar_session_store_active",
			Help: "1 for the store that serves session reads now (valkey, or postgres while Valkey is down or not reconciled).",
		}, []string{"store"}),
		reconciles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cachecar_session_reconciles_total",
			Help: "Reconciliations of Valkey from PostgreSQL after Valkey missed writes or lost its data, by outcome.",
		}, []string{"outcome"}),
		pruned: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cachecar_session_pruned_total",
			Help: "Expired session rows deleted from PostgreSQL by this sidecar.",
		}),
		restored: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cachecar_session_restored_total",
			Help: "Session keys a touch found missing in Valkey while PostgreSQL had the session alive, and put back (expiry rounding at a session's end, or eviction).",
		}),
		local: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cachecar_session_local_reads_total",
			Help: "Session reads from Valkey answered by this process's tracked copy of the key (and of the sentinel) without a round trip; also counted in cachecar_session_ops_total.",
		}),
		missing: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cachecar_session_valkey_missing_total",
			Help: "Session reads a trusted Valkey answered absent and PostgreSQL had alive, served from PostgreSQL (a key that ran out a moment before its row, or eviction: a steady climb points at eviction).",
		}),
		pgLocal: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cachecar_session_postgres_local_reads_total",
			Help: "Session reads PostgreSQL serves (Valkey down or not reconciled, no Valkey, a migration from connect-pg-simple) answered by this process's copy, kept correct by the session table's notify triggers; also counted in cachecar_session_ops_total.",
		}),
		migration: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cachecar_session_migration",
			Help: "1 for the rolling migration this sidecar runs (sessions.migration: connect-redis, connect-pg-simple), or none.",
		}, []string{"migration"}),
	}
	reg.MustRegister(m.ops, m.active, m.reconciles, m.pruned, m.restored, m.local, m.missing, m.pgLocal, m.migration)
	for _, o := range []string{"ok", "error"} {
		m.reconciles.WithLabelValues(o)
	}
	return m
}
