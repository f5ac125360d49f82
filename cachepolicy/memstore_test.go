package cachepolicy

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

func newMem(t *testing.T) *Store {
	t.Helper()
	return NewMemoryStore(MinTierSize, zerolog.Nop(), NewMetrics(prometheus.NewRegistry()))
}

// TestMemoryStoreLeases checks that the memory store closes the stale-set race as the Valkey
// store does: an invalidation between a lease and its fill refuses the fill.
func TestMemoryStoreLeases(t *testing.T) {
	s, ctx := newMem(t), context.Background()
	if _, _, _, err := s.Get(ctx, "k"); !errors.Is(err, errMiss) {
		t.Fatalf("empty key: %v, want errMiss", err)
	}
	got, _ := s.Lease(ctx, "k", "L1", []string{"tag:a"}, time.Second, time.Minute)
	if !got {
		t.Fatal("first lease refused")
	}
	if got, _ := s.Lease(ctx, "k", "L2", nil, time.Second, time.Minute); got {
		t.Fatal("second lease granted while the first is held")
	}
	if _, _, _, err := s.Get(ctx, "k"); !errors.Is(err, errLeased) {
		t.Fatalf("leased key: %v, want errLeased", err)
	}
	if n, _ := s.Invalidate(ctx, nil, []string{"tag:a"}); n != 0 {
		t.Fatalf("invalidate counted %d values, want 0 (only a lease)", n)
	}
	if ok, _ := s.Fill(ctx, "k", "L1", []byte("old"), time.Minute); ok {
		t.Fatal("fill accepted after an invalidation revoked its lease")
	}
	if _, _, _, err := s.Get(ctx, "k"); !errors.Is(err, errMiss) {
		t.Fatalf("after the refused fill: %v, want errMiss", err)
	}

	s.Lease(ctx, "k", "L3", nil, time.Second, time.Minute)
	if ok, _ := s.Fill(ctx, "k", "L3", []byte("new"), time.Minute); !ok {
		t.Fatal("fill with a held lease refused")
	}
	b, pttl, local, err := s.Get(ctx, "k")
	if err != nil || string(b) != "new" || !local || pttl <= 59*time.Second || pttl > time.Minute {
		t.Fatalf("Get = %q %s %v %v", b, pttl, local, err)
	}
	if n, _ := s.Invalidate(ctx, []string{"k"}, nil); n != 1 {
		t.Fatalf("invalidate deleted %d, want 1", n)
	}
}

// TestMemoryStoreRefreshAndBig covers refresh leases, expiry and values past fastcache's 64 KiB
// entry limit.
func TestMemoryStoreRefreshAndBig(t *testing.T) {
	s, ctx := newMem(t), context.Background()
	big := bytes.Repeat([]byte("x"), 300<<10)
	s.Lease(ctx, "big", "L", nil, time.Second, time.Minute)
	if ok, _ := s.Fill(ctx, "big", "L", big, 150*time.Millisecond); !ok {
		t.Fatal("fill refused")
	}
	if b, _, _, err := s.Get(ctx, "big"); err != nil || !bytes.Equal(b, big) {
		t.Fatalf("big value: %d bytes, %v", len(b), err)
	}
	// Fresh (PTTL above the 100ms stale window): no refresh lease.
	if ok, _ := s.RefreshLease(ctx, "big", "R", nil, time.Second, time.Minute, 100*time.Millisecond); ok {
		t.Fatal("refresh lease granted on a fresh entry")
	}
	time.Sleep(60 * time.Millisecond)
	if ok, _ := s.RefreshLease(ctx, "big", "R", nil, time.Second, time.Minute, 100*time.Millisecond); !ok {
		t.Fatal("refresh lease refused on a stale entry")
	}
	s.Invalidate(ctx, []string{"big"}, nil)
	if ok, _ := s.RefreshFill(ctx, "big", "R", []byte("late"), time.Minute); ok {
		t.Fatal("refresh fill accepted after an invalidation")
	}
	s.Lease(ctx, "short", "L", nil, time.Second, time.Minute)
	s.Fill(ctx, "short", "L", []byte("v"), 30*time.Millisecond)
	time.Sleep(50 * time.Millisecond)
	if _, _, _, err := s.Get(ctx, "short"); !errors.Is(err, errMiss) {
		t.Fatalf("expired entry: %v, want errMiss", err)
	}
	s.Lease(ctx, "r", "L", nil, time.Second, time.Minute)
	s.Fill(ctx, "r", "L", []byte("v"), time.Minute)
	if n, _ := s.DeletePrefixed(ctx, "*", []string{"r"}); n < 1 {
		t.Fatalf("resync deleted %d", n)
	}
	if _, _, _, err := s.Get(ctx, "r"); !errors.Is(err, errMiss) {
		t.Fatalf("after resync: %v", err)
	}
}
