package cachepolicy

import (
	"context"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// The hit path's cost per read, with allocations: from the in-process tier, from Valkey, and
// from the memory store of a sidecar without Valkey. `make bench` runs these; the Valkey ones
// need the test servers as the tests do.

func benchHits(b *testing.B, store *Store, prefix string) {
	p, err := NewPolicy("item", "item:{id}", []string{"id"}, time.Hour, `^[1-9][0-9]{0,18}$`, "SELECT 1", "")
	if err != nil {
		b.Fatal(err)
	}
	m := NewMetrics(prometheus.NewRegistry())
	r := New(Options{Namespace: prefix, QueryTimeout: time.Second, LeaseWait: time.Second}, store, nil, zerolog.Nop(), m)
	ctx := context.Background()
	body := []byte(`{"id":7,"title":"a course of about a hundred bytes of JSON, as the demo's rows are","status":"active"}`)
	load := func(context.Context) ([]byte, error) { return body, nil }
	vals := []string{"7"}
	for range 3 { // miss, then hits (the tier's first hit comes from Valkey)
		if _, err := r.GetFunc(ctx, p, vals, load); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		res, err := r.GetFunc(ctx, p, vals, load)
		if err != nil || res.Cache != Hit {
			b.Fatalf("%v %s", err, res.Cache)
		}
	}
}

func valkeyStore(b *testing.B, tier int) (*Store, string) {
	addr, prefix := testenv.Valkey(b)
	s := NewStore(StoreOptions{Addrs: []string{addr}, Timeout: time.Second, DialTimeout: time.Second, ReconnectMax: time.Second,
		TierSize: tier, BreakerThreshold: 5, BreakerMinOpen: time.Second}, zerolog.Nop(), NewMetrics(prometheus.NewRegistry()))
	if err := s.Connect(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(s.Close)
	return s, prefix
}

func BenchmarkHitTier(b *testing.B) {
	s, prefix := valkeyStore(b, MinTierSize)
	benchHits(b, s, prefix)
}

func BenchmarkHitValkey(b *testing.B) {
	s, prefix := valkeyStore(b, 0)
	benchHits(b, s, prefix)
}

func BenchmarkHitMemory(b *testing.B) {
	benchHits(b, NewMemoryStore(MinTierSize, zerolog.Nop(), NewMetrics(prometheus.NewRegistry())), "")
}

// BenchmarkETag is the entity tag of a course's JSON (about 430 bytes), computed on every answer.
func BenchmarkETag(b *testing.B) {
	body := []byte(`{"id":77,"tenant_id":28,"title":"Leadership Essentials #77","description":"Course 77: a generated demo course for cachecar. Learn, practise, pass. Learn, practise, pass. Learn, practise, pass. Learn, practise, pass. ","version":2,"scorm_package":"leadership-2004-3rd.zip","status":"published","created_at":"2026-09-09T23:33:25.411011+00:00","updated_at":"2026-11-26T05:13:12.303503+00:00"}`)
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		ETag(body)
	}
}
