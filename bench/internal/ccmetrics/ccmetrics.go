// Package ccmetrics reads the series of cachecar's health port that the benchmarks compare.
package ccmetrics

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Snapshot is one read of cachecar's /metrics: the counters summed over their labels (every
// policy; the lookups split by result), and the in-process tier's gauges.
type Snapshot struct {
	// LookupsHit, LookupsMiss, LookupsStale and LookupsBypass are cachecar_cache_lookups_total by
	// result; LookupsOther holds any result this package does not name.
	LookupsHit, LookupsMiss, LookupsStale, LookupsBypass, LookupsOther float64
	// LocalHits is cachecar_cache_local_hits_total: the hits the in-process tier answered, a
	// subset of LookupsHit.
	LocalHits float64
	// DBQueries is cachecar_db_queries_total over every policy and outcome: the PostgreSQL
	// loads cachecar made.
	DBQueries float64
	// TierEnabled, TierEntries and TierBytes are the gauges cachecar_tier_enabled,
	// cachecar_tier_entries and cachecar_tier_bytes (-1 when the series is absent).
	TierEnabled, TierEntries, TierBytes float64
	// Session reads (cachecar_session_ops_total, op get): all, those Valkey answered, and of
	// those the ones answered from the in-process copy (cachecar_session_local_reads_total).
	SessionGets, SessionGetsValkey, SessionLocal float64
	// SessionGetsPostgres are the session reads PostgreSQL served, and SessionPGLocal those of
	// them answered from the copies of PostgreSQL's answers
	// (cachecar_session_postgres_local_reads_total).
	SessionGetsPostgres, SessionPGLocal float64
}

// Sub returns the counters of s minus those of before (what happened between the two reads)
// and the gauges of s as they are.
func (s Snapshot) Sub(before Snapshot) Snapshot {
	return Snapshot{
		LookupsHit:    s.LookupsHit - before.LookupsHit,
		LookupsMiss:   s.LookupsMiss - before.LookupsMiss,
		LookupsStale:  s.LookupsStale - before.LookupsStale,
		LookupsBypass: s.LookupsBypass - before.LookupsBypass,
		LookupsOther:  s.LookupsOther - before.LookupsOther,
		LocalHits:     s.LocalHits - before.LocalHits,
		DBQueries:     s.DBQueries - before.DBQueries,
		TierEnabled:   s.TierEnabled,
		TierEntries:   s.TierEntries,
		TierBytes:     s.TierBytes,

		SessionGets:       s.SessionGets - before.SessionGets,
		SessionGetsValkey: s.SessionGetsValkey - before.SessionGetsValkey,
		SessionLocal:      s.SessionLocal - before.SessionLocal,

		SessionGetsPostgres: s.SessionGetsPostgres - before.SessionGetsPostgres,
		SessionPGLocal:      s.SessionPGLocal - before.SessionPGLocal,
	}
}

// LocalFraction is LocalHits over LookupsHit: the share of hits the in-process tier answered
// without a Valkey round trip. ok is false when there was no hit.
func (s Snapshot) LocalFraction() (f float64, ok bool) {
	if s.LookupsHit <= 0 {
		return 0, false
	}
	return s.LocalHits / s.LookupsHit, true
}

// Fields formats s as "key=value" pairs separated by spaces, for bench/run.sh to read.
func (s Snapshot) Fields() string {
	return fmt.Sprintf("lookups_hit=%.0f lookups_miss=%.0f lookups_stale=%.0f lookups_bypass=%.0f lookups_other=%.0f "+
		"local_hits=%.0f db_queries=%.0f tier_enabled=%.0f tier_entries=%.0f tier_bytes=%.0f "+
		"session_gets=%.0f session_gets_valkey=%.0f session_local=%.0f session_gets_postgres=%.0f session_pg_local=%.0f",
		s.LookupsHit, s.LookupsMiss, s.LookupsStale, s.LookupsBypass, s.LookupsOther,
		s.LocalHits, s.DBQueries, s.TierEnabled, s.TierEntries, s.TierBytes,
		s.SessionGets, s.SessionGetsValkey, s.SessionLocal, s.SessionGetsPostgres, s.SessionPGLocal)
}

// Scrape reads health's /metrics (health is the base URL of cachecar's health port).
func Scrape(ctx context.Context, client *http.Client, health string) (Snapshot, error) {
	s := Snapshot{TierEnabled: -1, TierEntries: -1, TierBytes: -1}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(health, "/")+"/metrics", nil)
	if err != nil {
		return s, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return s, fmt.Errorf("scrape /metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return s, fmt.Errorf("scrape /metrics: status %d", resp.StatusCode)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return s, fmt.Errorf("scrape /metrics: %w", err)
	}
	if len(fams) == 0 {
		return s, fmt.Errorf("scrape /metrics: no metrics")
	}
	// A counter vector has no series before its first increment: absent families read 0.
	for _, m := range fams["cachecar_cache_lookups_total"].GetMetric() {
		v := m.GetCounter().GetValue()
		switch label(m, "result") {
		case "hit":
			s.LookupsHit += v
		case "miss":
			s.LookupsMiss += v
		case "stale":
			s.LookupsStale += v
		case "bypass":
			s.LookupsBypass += v
		default:
			s.LookupsOther += v
		}
	}
	s.LocalHits = sum(fams["cachecar_cache_local_hits_total"])
	s.DBQueries = sum(fams["cachecar_db_queries_total"])
	for _, m := range fams["cachecar_session_ops_total"].GetMetric() {
		if label(m, "op") != "get" {
			continue
		}
		v := m.GetCounter().GetValue()
		s.SessionGets += v
		switch label(m, "store") {
		case "valkey":
			s.SessionGetsValkey += v
		case "postgres":
			s.SessionGetsPostgres += v
		}
	}
	s.SessionLocal = sum(fams["cachecar_session_local_reads_total"])
	s.SessionPGLocal = sum(fams["cachecar_session_postgres_local_reads_total"])
	for name, dst := range map[string]*float64{
		"cachecar_tier_enabled": &s.TierEnabled,
		"cachecar_tier_entries": &s.TierEntries,
		"cachecar_tier_bytes":   &s.TierBytes,
	} {
		if ms := fams[name].GetMetric(); len(ms) > 0 {
			*dst = ms[0].GetGauge().GetValue()
		}
	}
	return s, nil
}

// sum adds up every series of a counter family (nil: 0).
func sum(f *dto.MetricFamily) float64 {
	var t float64
	for _, m := range f.GetMetric() {
		t += m.GetCounter().GetValue()
	}
	return t
}

func label(m *dto.Metric, name string) string {
	for _, lp := range m.GetLabel() {
		if lp.GetName() == name {
			return lp.GetValue()
		}
	}
	return ""
}

// Tier is what /health/detailed says of the in-process tier.
type Tier struct {
	Enabled  bool
	MaxBytes uint64 // the configured size (cache.tier_max_bytes)
}

// TierConfig reads the in-process tier's state and configured size from health's
// /health/detailed. ok is false when the answer has no tier section (no shared cache).
func TierConfig(ctx context.Context, client *http.Client, health string) (t Tier, ok bool, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(health, "/")+"/health/detailed", nil)
	if err != nil {
		return t, false, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return t, false, fmt.Errorf("/health/detailed: %w", err)
	}
	defer resp.Body.Close()
	// 503 (unhealthy) still carries the body.
	var body struct {
		Services struct {
			Cache struct {
				Tier *struct {
					Enabled  bool   `json:"enabled"`
					MaxBytes uint64 `json:"maxBytes"`
				} `json:"tier"`
			} `json:"cache"`
		} `json:"services"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return t, false, fmt.Errorf("/health/detailed: status %d, %w", resp.StatusCode, err)
	}
	if body.Services.Cache.Tier == nil {
		return t, false, nil
	}
	return Tier{Enabled: body.Services.Cache.Tier.Enabled, MaxBytes: body.Services.Cache.Tier.MaxBytes}, true, nil
}
