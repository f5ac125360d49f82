package ccmetrics

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
)

const exposition = `# TYPE cachecar_cache_lookups_total counter
cachecar_cache_lookups_total{policy="course",result="hit"} 10
cachecar_cache_lookups_total{policy="tenant",result="hit"} 5
cachecar_cache_lookups_total{policy="course",result="miss"} 2
# TYPE cachecar_cache_local_hits_total counter
cachecar_cache_local_hits_total{policy="course"} 9
# TYPE cachecar_db_queries_total counter
cachecar_db_queries_total{policy="course"} 2
# TYPE cachecar_session_ops_total counter
cachecar_session_ops_total{op="get",outcome="ok",store="valkey"} 7
cachecar_session_ops_total{op="get",outcome="not_found",store="valkey"} 1
cachecar_session_ops_total{op="get",outcome="ok",store="postgres"} 3
cachecar_session_ops_total{op="put",outcome="ok",store="valkey"} 100
# TYPE cachecar_session_local_reads_total counter
cachecar_session_local_reads_total 6
# TYPE cachecar_session_postgres_local_reads_total counter
cachecar_session_postgres_local_reads_total 2
# TYPE cachecar_tier_enabled gauge
cachecar_tier_enabled 1
`

func TestScrapeSumsTheCounters(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		w.Write([]byte(exposition))
	}))
	defer srv.Close()
	s, err := Scrape(context.Background(), srv.Client(), srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	want := Snapshot{LookupsHit: 15, LookupsMiss: 2, LocalHits: 9, DBQueries: 2, TierEnabled: 1, TierEntries: -1, TierBytes: -1,
		SessionGets: 11, SessionGetsValkey: 8, SessionLocal: 6, SessionGetsPostgres: 3, SessionPGLocal: 2}
	if s != want {
		t.Fatalf("scraped %+v\nwant    %+v", s, want)
	}
	d := s.Sub(Snapshot{SessionGets: 1, SessionGetsValkey: 1, SessionLocal: 1, SessionGetsPostgres: 1, SessionPGLocal: 1})
	if d.SessionGets != 10 || d.SessionGetsValkey != 7 || d.SessionLocal != 5 || d.SessionGetsPostgres != 2 || d.SessionPGLocal != 1 {
		t.Fatalf("Sub: %+v", d)
	}
}
