package cachepolicy

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/valkey-io/valkey-go"
)

// TestNoTrackingRunsWithoutTier connects as an ACL user that may not turn on client tracking:
// the store must say so and run without the in-process tier, reads still cached in Valkey.
func TestNoTrackingRunsWithoutTier(t *testing.T) {
	addr, prefix := testenv.Valkey(t)
	admin, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	ctx := context.Background()
	user, pass := "notrack"+testenv.Suffix(), "pw"+testenv.Suffix()
	if err := admin.Do(ctx, admin.B().Arbitrary("ACL", "SETUSER", user, "on", ">"+pass, "~*", "&*", "+@all", "-client|tracking").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Do(context.Background(), admin.B().Arbitrary("ACL", "DELUSER", user).Build()) })

	var log bytes.Buffer
	m := NewMetrics(prometheus.NewRegistry())
	s := NewStore(StoreOptions{Addrs: []string{addr}, Username: user, Password: pass, Timeout: time.Second, DialTimeout: time.Second,
		ReconnectMax: time.Second, TierSize: MinTierSize, BreakerThreshold: 5, BreakerMinOpen: time.Second}, zerolog.New(&log), m)
	if err := s.Connect(); err != nil {
		t.Fatalf("connect as %s: %v", user, err)
	}
	defer s.Close()
	if on, _ := s.Tier(); on {
		t.Fatal("the in-process tier is on although the user may not turn on tracking")
	}
	if !strings.Contains(log.String(), "running without the in-process tier") {
		t.Fatalf("no start-up warning; log: %s", log.String())
	}
	p := itemPolicy(t, "")
	r := New(Options{Namespace: prefix, QueryTimeout: time.Second}, s, nil, zerolog.Nop(), m)
	load := func(context.Context) ([]byte, error) { return []byte(`{"id":9}`), nil }
	if res, err := r.GetFunc(ctx, p, []string{"9"}, load); err != nil || res.Cache != Miss {
		t.Fatalf("first read: %s %v", res.Cache, err)
	}
	if res, err := r.GetFunc(ctx, p, []string{"9"}, load); err != nil || res.Cache != Hit || res.Local {
		t.Fatalf("second read: %s local=%v %v; want a HIT from Valkey", res.Cache, res.Local, err)
	}
}
