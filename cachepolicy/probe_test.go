package cachepolicy

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
)

// TestStaleIfErrorDoesNotWaitForTheProbe: while the database breaker is not closed and
// ProbeDatabase runs, a read holding an entry inside stale_if_error answers it at once instead
// of becoming the breaker's probe, which on a frozen database waits out the query timeout. The
// breaker's pause has passed when the reads come, so without this the first read would be let
// through as the probe and load.
func TestStaleIfErrorDoesNotWaitForTheProbe(t *testing.T) {
	t.Parallel()
	for _, batch := range []bool{false, true} {
		name := "Get"
		if batch {
			name = "GetMany"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			pool := itemsDB(t)
			addr, prefix := testenv.Valkey(t)
			f := newCtlFixture(t, pool, addr, prefix, 0, Options{})
			p := shortPolicy(t, 300*time.Millisecond, 0, time.Minute)
			ctx := context.Background()
			read := func() (Result, error) {
				if batch {
					_, res, err := f.res.GetMany(ctx, p, []int64{1, 2})
					return res, err
				}
				return f.res.Get(ctx, p, []string{"1"}, int64(1))
			}
			loads := func() int64 {
				if batch {
					return f.loader.many.Load()
				}
				return f.loader.one.Load()
			}
			if res, err := read(); err != nil || res.Cache != Miss {
				t.Fatalf("fill: %s %v", res.Cache, err)
			}
			f.awaitStale(t, p, "item:1", "item:2")
			f.ctl.fail.Store(true)
			for range dbBreakerThreshold {
				f.res.db.Failure()
			}
			time.Sleep(dbBreakerMinOpen * 3 / 2) // past the breaker's pause (250 ms, +20% at most)

			pctx, cancel := context.WithCancel(ctx)
			done := make(chan struct{})
			go func() {
				defer close(done)
				f.res.ProbeDatabase(pctx, func(context.Context) error { return errors.New("connection refused") })
			}()
			defer func() { cancel(); <-done }()
			for f.res.probers.Load() == 0 {
				time.Sleep(time.Millisecond)
			}
			before := loads()
			res, err := read()
			if err != nil || res.Cache != Stale || res.StaleReason != StaleIfError {
				t.Fatalf("read with the database failing: %s %q %v; want STALE stale-if-error", res.Cache, res.StaleReason, err)
			}
			if n := loads() - before; n != 0 {
				t.Fatalf("the read loaded %d times: it took the breaker's probe instead of answering its stale entry", n)
			}
		})
	}
}
