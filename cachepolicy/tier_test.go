package cachepolicy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"
	"github.com/valkey-io/valkey-go"
)

// testLoader stands between the counting loader and PostgreSQL: it can be switched to fail as
// a dead database does (ErrUnavailable), and to hold every load until released, so that a test
// can act while a load is in flight.
type testLoader struct {
	Loader
	fail atomic.Bool

	mu      sync.Mutex
	hold    chan struct{} // non-nil: loads wait until it is closed
	entered chan struct{} // each held load sends here once it waits
}

// holdLoads makes every load from now on wait until release is called (also at the end of the
// test). entered receives once for each load that waits.
func (l *testLoader) holdLoads(t *testing.T) (entered <-chan struct{}, release func()) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	hold, ent := make(chan struct{}), make(chan struct{}, 64)
	l.hold, l.entered = hold, ent
	var once sync.Once
	release = func() {
		once.Do(func() {
			l.mu.Lock()
			if l.hold == hold {
				l.hold, l.entered = nil, nil
			}
			l.mu.Unlock()
			close(hold)
		})
	}
	t.Cleanup(release) // before the pool closes: a held load would keep its connection
	return ent, release
}

func (l *testLoader) wait(ctx context.Context) error {
	l.mu.Lock()
	hold, ent := l.hold, l.entered
	l.mu.Unlock()
	if hold == nil {
		return nil
	}
	select {
	case ent <- struct{}{}:
	default:
	}
	select {
	case <-hold:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%w: %v", ErrTimeout, ctx.Err())
	}
}

func (l *testLoader) LoadOne(ctx context.Context, sql string, args ...any) ([]byte, error) {
	if err := l.wait(ctx); err != nil {
		return nil, err
	}
	if l.fail.Load() {
		return nil, fmt.Errorf("%w: test loader switched off", ErrUnavailable)
	}
	return l.Loader.LoadOne(ctx, sql, args...)
}

func (l *testLoader) LoadMany(ctx context.Context, sql string, ids []int64) (map[int64][]byte, error) {
	if err := l.wait(ctx); err != nil {
		return nil, err
	}
	if l.fail.Load() {
		return nil, fmt.Errorf("%w: test loader switched off", ErrUnavailable)
	}
	return l.Loader.LoadMany(ctx, sql, ids)
}

// ctlFixture is a fixture whose resolver has options of the test's choosing, whose store may
// run the in-process tier, and whose loader the test controls.
type ctlFixture struct {
	*fixture
	ctl *testLoader
}

// newCtlFixture is newFixture with opts (Namespace is set to prefix, QueryTimeout defaults to
// 2s) and an in-process tier of tierSize bytes (0: none). Several fixtures on one prefix are
// several sidecars sharing one Valkey.
func newCtlFixture(t *testing.T, pool *pgxpool.Pool, addr, prefix string, tierSize int, opts Options) *ctlFixture {
	t.Helper()
	m := NewMetrics(prometheus.NewRegistry())
	store := NewStore(StoreOptions{Addrs: []string{addr}, Timeout: time.Second, DialTimeout: time.Second,
		ReconnectMax: 200 * time.Millisecond, TierSize: tierSize}, zerolog.Nop(), m)
	t.Cleanup(store.Close)
	if err := store.Connect(); err != nil {
		t.Fatal(err)
	}
	if on, _ := store.Tier(); on != (tierSize > 0) {
		t.Fatalf("in-process tier on=%v with TierSize %d", on, tierSize)
	}
	ctl := &testLoader{Loader: NewPG(pool)}
	loader := &countingLoader{Loader: ctl}
	raw, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(raw.Close)
	opts.Namespace = prefix
	if opts.QueryTimeout == 0 {
		opts.QueryTimeout = 2 * time.Second
	}
	res := New(opts, store, loader, zerolog.Nop(), m)
	return &ctlFixture{fixture: &fixture{res: res, store: store, loader: loader, prefix: prefix, raw: raw}, ctl: ctl}
}

// rawPTTL is the remaining TTL of key (without the prefix) as Valkey reports it: -2 when the
// key is absent, -1 when it has no expiry.
func (f *fixture) rawPTTL(t *testing.T, key string) time.Duration {
	t.Helper()
	ms, err := f.raw.Do(context.Background(), f.raw.B().Pttl().Key(f.prefix+key).Build()).AsInt64()
	if err != nil {
		t.Fatal(err)
	}
	return time.Duration(ms) * time.Millisecond
}

// rawExists reports whether Valkey holds fullKey (the prefix included).
func (f *fixture) rawExists(t *testing.T, fullKey string) bool {
	t.Helper()
	n, err := f.raw.Do(context.Background(), f.raw.B().Exists().Key(fullKey).Build()).AsInt64()
	if err != nil {
		t.Fatal(err)
	}
	return n == 1
}

// eventually polls cond every few milliseconds until it holds, failing the test after within.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// awaitStale waits until the entries of p under keys (without the prefix) are past their fresh
// TTL: their PTTL is inside the stale window (or they are gone).
func (f *fixture) awaitStale(t *testing.T, p *Policy, keys ...string) {
	t.Helper()
	for _, k := range keys {
		eventually(t, 2*time.Second, k+" past its TTL", func() bool { return f.rawPTTL(t, k) <= p.staleWindow() })
	}
}

func setBody(t *testing.T, pool *pgxpool.Pool, id int64, body string) {
	t.Helper()
	if _, err := pool.Exec(context.Background(), "UPDATE items SET body = $2 WHERE id = $1", id, body); err != nil {
		t.Fatal(err)
	}
}

// shortPolicy is itemPolicy with a short TTL and the given stale windows.
func shortPolicy(t *testing.T, ttl, swr, sie time.Duration) *Policy {
	t.Helper()
	p := itemPolicy(t, "")
	p.TTL, p.StaleWhileRevalidate, p.StaleIfError = ttl, swr, sie
	return p
}

const body1 = `{"id" : 1, "name" : "item 1"}`

func TestTierServesLocallyAndFollowsInvalidation(t *testing.T) {
	t.Parallel()
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newCtlFixture(t, pool, addr, prefix, 32<<20, Options{})
	ctx := context.Background()
	key := prefix + "tier:a"
	f.rawSet(t, "tier:a", "v1", time.Minute)

	body, _, local, err := f.store.Get(ctx, key)
	if err != nil || string(body) != "v1" || local {
		t.Fatalf("first Get: %q local=%v %v; want v1 from Valkey", body, local, err)
	}
	body, pttl, local, err := f.store.Get(ctx, key)
	if err != nil || string(body) != "v1" || !local {
		t.Fatalf("second Get: %q local=%v %v; want v1 from the in-process tier", body, local, err)
	}
	if pttl <= 0 || pttl > time.Minute {
		t.Fatalf("local PTTL %v, want the server's, within its minute", pttl)
	}
	if on, st := f.store.Tier(); !on || st.Entries == 0 || st.Limit == 0 {
		t.Fatalf("Tier() = %v %+v; want on, holding an entry", on, st)
	}

	// Another client changes the key: Valkey's tracking message drops the local copy.
	f.rawSet(t, "tier:a", "v2", time.Minute)
	eventually(t, 2*time.Second, "the tier serves the new value", func() bool {
		body, _, _, err := f.store.Get(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		return string(body) == "v2"
	})
	eventually(t, 2*time.Second, "the new value is cached locally", func() bool {
		body, _, local, err := f.store.Get(ctx, key)
		if err != nil || string(body) != "v2" {
			t.Fatalf("Get after the change: %q %v", body, err)
		}
		return local
	})
	if err := f.raw.Do(ctx, f.raw.B().Del().Key(key).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Second, "the deleted key is a miss", func() bool {
		body, _, _, err := f.store.Get(ctx, key)
		if err != nil && !errors.Is(err, errMiss) {
			t.Fatal(err)
		}
		if err == nil && string(body) != "v2" {
			t.Fatalf("Get after DEL: %q", body)
		}
		return errors.Is(err, errMiss)
	})
}

func TestTierResolverHitIsLocalWithBodyAndAge(t *testing.T) {
	t.Parallel()
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newCtlFixture(t, pool, addr, prefix, 32<<20, Options{})
	p := itemPolicy(t, "")
	ctx := context.Background()

	// Filled by the resolver: a miss, then a hit from Valkey, then a hit from the tier.
	want := []struct {
		cache string
		local bool
	}{{Miss, false}, {Hit, false}, {Hit, true}, {Hit, true}}
	for i, w := range want {
		r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
		if err != nil || r.Cache != w.cache || r.Local != w.local || string(r.Body) != body1 {
			t.Fatalf("read %d: %s local=%v %q %v; want %s local=%v %q", i, r.Cache, r.Local, r.Body, err, w.cache, w.local, body1)
		}
		if w.local && (r.Age < 0 || r.Age > 2*time.Second) {
			t.Fatalf("read %d: local hit of a fresh fill has age %v", i, r.Age)
		}
	}
	if n := f.loader.one.Load(); n != 1 {
		t.Fatalf("%d queries, want 1", n)
	}

	// An entry filled 42s (give or take its TTL's jitter) ago: the tier counts its PTTL down
	// from what Valkey said, so a local hit has the same age as one from Valkey.
	f.rawSet(t, "item:2", `{"id":2,"raw":true}`, 18*time.Second)
	wantAge := p.ttlFor(prefix+"item:2") - 18*time.Second
	for i, local := range []bool{false, true} {
		r, err := f.res.Get(ctx, p, []string{"2"}, int64(2))
		if err != nil || r.Cache != Hit || r.Local != local || string(r.Body) != `{"id":2,"raw":true}` {
			t.Fatalf("read %d of item:2: %s local=%v %q %v", i, r.Cache, r.Local, r.Body, err)
		}
		if r.Age < wantAge-10*time.Millisecond || r.Age > wantAge+2*time.Second {
			t.Fatalf("read %d of item:2 (local=%v): age %v, want about %v", i, local, r.Age, wantAge)
		}
	}

	// An invalidation through the resolver drops the local copy.
	if _, err := f.res.Invalidate(ctx, []string{prefix + "item:1"}, nil); err != nil {
		t.Fatal(err)
	}
	setBody(t, pool, 1, `{"id":1,"v":2}`)
	eventually(t, 2*time.Second, "a read after the invalidation loads the new row", func() bool {
		r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
		if err != nil {
			t.Fatal(err)
		}
		return string(r.Body) == `{"id":1,"v":2}`
	})
}

// TestTierReadAfterInvalidateMissesLocalCopy: a read that starts after Resolver.Invalidate has
// returned must not be answered from the in-process copy of a key it deleted, by name or through
// its tag. Valkey's tracking message that drops the copy comes after the delete's reply, so the
// resolver cannot rely on it having arrived when Invalidate returns.
func TestTierReadAfterInvalidateMissesLocalCopy(t *testing.T) {
	t.Parallel()
	for _, byTag := range []bool{false, true} {
		t.Run(fmt.Sprintf("tag=%v", byTag), func(t *testing.T) {
			t.Parallel()
			pool := itemsDB(t)
			addr, prefix := testenv.Valkey(t)
			f := newCtlFixture(t, pool, addr, prefix, 32<<20, Options{})
			ctx := context.Background()
			p, vals, args := itemPolicy(t, ""), []string{"1"}, []any{int64(1)}
			keys, tags := []string{prefix + "item:1"}, []string(nil)
			if byTag {
				p, vals, args = listPolicy(t), []string{"1", "1"}, []any{int64(1), int64(1)}
				keys, tags = nil, []string{prefix + tagPrefix + "list:1"}
			}
			const rounds = 100
			served := 0
			for i := 0; i < rounds; i++ {
				// Filled (and registered in its tag) by the resolver, then read from the tier.
				deadline := time.Now().Add(2 * time.Second)
				for {
					r, err := f.res.Get(ctx, p, vals, args...)
					if err != nil {
						t.Fatal(err)
					}
					if r.Cache == Hit && r.Local {
						break
					}
					if time.Now().After(deadline) {
						t.Fatalf("round %d: the entry is not served from the tier within 2s (last %s)", i, r.Cache)
					}
				}
				if _, err := f.res.Invalidate(ctx, keys, tags); err != nil {
					t.Fatal(err)
				}
				r, err := f.res.Get(ctx, p, vals, args...)
				if err != nil {
					t.Fatal(err)
				}
				if r.Cache == Hit {
					served++
				}
			}
			if served > 0 {
				t.Fatalf("%d of %d reads started after Invalidate returned were hits of the deleted entry", served, rounds)
			}
		})
	}
}

func TestStaleWhileRevalidateServesOldAndRefreshesOnce(t *testing.T) {
	t.Parallel()
	for _, tier := range []int{0, 32 << 20} {
		t.Run(fmt.Sprintf("tier=%d", tier), func(t *testing.T) {
			t.Parallel()
			pool := itemsDB(t)
			addr, prefix := testenv.Valkey(t)
			f := newCtlFixture(t, pool, addr, prefix, tier, Options{})
			p := shortPolicy(t, 300*time.Millisecond, 5*time.Second, 0)
			key := prefix + "item:1"
			ctx := context.Background()

			start := time.Now()
			if r, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); err != nil || r.Cache != Miss || string(r.Body) != body1 {
				t.Fatalf("fill: %s %q %v", r.Cache, r.Body, err)
			}
			setBody(t, pool, 1, `{"id":1,"v":2}`)
			// Hold the refresh so that every stale reader below arrives while it runs.
			entered, release := f.ctl.holdLoads(t)
			var first Result
			eventually(t, 2*time.Second, "the entry goes stale", func() bool {
				r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
				if err != nil || string(r.Body) != body1 {
					t.Fatalf("read before the refresh: %s %q %v", r.Cache, r.Body, err)
				}
				if r.Cache == Hit {
					return false
				}
				first = r
				return true
			})
			if d := time.Since(start); d < p.ttlFor(key)-5*time.Millisecond {
				t.Fatalf("served stale %v after the fill, before its TTL %v", d, p.ttlFor(key))
			}
			if first.Cache != Stale || first.StaleReason != StaleWhileRevalidate || first.Age < p.ttlFor(key) {
				t.Fatalf("past TTL: %s %q age %v; want STALE stale-while-revalidate, older than the TTL %v",
					first.Cache, first.StaleReason, first.Age, p.ttlFor(key))
			}
			select {
			case <-entered:
			case <-time.After(2 * time.Second):
				t.Fatal("no background refresh started within 2s of a stale read")
			}

			var wg sync.WaitGroup
			results := make([]Result, 20)
			errs := make([]error, 20)
			for i := range results {
				wg.Add(1)
				go func() {
					defer wg.Done()
					results[i], errs[i] = f.res.Get(ctx, p, []string{"1"}, int64(1))
				}()
			}
			wg.Wait()
			for i, r := range results {
				if errs[i] != nil || r.Cache != Stale || r.StaleReason != StaleWhileRevalidate || string(r.Body) != body1 {
					t.Fatalf("stale reader %d: %s %q %q %v", i, r.Cache, r.StaleReason, r.Body, errs[i])
				}
			}
			release()
			eventually(t, 2*time.Second, "the refresh fills the new row", func() bool {
				b, _ := f.rawGet(t, "item:1")
				return string(b) == `{"id":1,"v":2}`
			})
			if pttl := f.rawPTTL(t, "item:1"); pttl <= p.staleWindow() {
				t.Fatalf("refreshed entry has PTTL %v: not fresh again", pttl)
			}
			eventually(t, 2*time.Second, "a hit of the refreshed entry", func() bool {
				r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
				if err != nil {
					t.Fatal(err)
				}
				return r.Cache == Hit && string(r.Body) == `{"id":1,"v":2}`
			})
			if n := f.loader.one.Load(); n != 2 {
				t.Fatalf("%d queries, want 2: the fill and one refresh for 21 stale reads", n)
			}
		})
	}
}

// TestStaleRefreshAcrossSidecarsCostsOneQuery: two sidecars read the same stale entry; the one
// that finds the other's refresh lease must not query PostgreSQL (it has already answered its
// reader from the stale entry, and its load could not be stored anyway).
func TestStaleRefreshAcrossSidecarsCostsOneQuery(t *testing.T) {
	t.Parallel()
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	a := newCtlFixture(t, pool, addr, prefix, 0, Options{})
	b := newCtlFixture(t, pool, addr, prefix, 0, Options{})
	p := shortPolicy(t, 300*time.Millisecond, 5*time.Second, 0)
	ctx := context.Background()
	if _, err := a.res.Get(ctx, p, []string{"1"}, int64(1)); err != nil {
		t.Fatal(err)
	}
	setBody(t, pool, 1, `{"id":1,"v":2}`)
	a.awaitStale(t, p, "item:1")

	entered, release := a.ctl.holdLoads(t)
	if r, err := a.res.Get(ctx, p, []string{"1"}, int64(1)); err != nil || r.Cache != Stale {
		t.Fatalf("A: %s %v, want STALE", r.Cache, err)
	}
	<-entered // A's refresh holds the refresh lease and is reading PostgreSQL
	if _, ok := a.rawGet(t, "item:1"+refreshSuffix); !ok {
		t.Fatal("A's refresh runs without a refresh lease in Valkey")
	}
	if r, err := b.res.Get(ctx, p, []string{"1"}, int64(1)); err != nil || r.Cache != Stale || string(r.Body) != body1 {
		t.Fatalf("B: %s %q %v, want the stale entry", r.Cache, r.Body, err)
	}
	// B's background refresh, if any, runs now; give it the time to reach PostgreSQL.
	deadline := time.Now().Add(300 * time.Millisecond)
	for time.Now().Before(deadline) && b.loader.one.Load() == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	if n := b.loader.one.Load(); n != 0 {
		t.Errorf("B ran %d queries for an entry A is refreshing under its refresh lease, want 0", n)
	}
	release()
	eventually(t, 2*time.Second, "A's refresh fills the new row", func() bool {
		v, _ := a.rawGet(t, "item:1")
		return string(v) == `{"id":1,"v":2}`
	})
	if r, err := b.res.Get(ctx, p, []string{"1"}, int64(1)); err != nil || r.Cache != Hit || string(r.Body) != `{"id":1,"v":2}` {
		t.Fatalf("B after A's refresh: %s %q %v", r.Cache, r.Body, err)
	}
}

// TestRefreshLeaseRefreshAhead: a hit past RefreshAhead of its TTL refreshes the entry in the
// background, before it expires.
func TestRefreshLeaseRefreshAhead(t *testing.T) {
	t.Parallel()
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newCtlFixture(t, pool, addr, prefix, 0, Options{})
	p := shortPolicy(t, 2*time.Second, 0, 0)
	p.RefreshAhead = 0.25
	key := prefix + "item:1"
	ctx := context.Background()
	if _, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); err != nil {
		t.Fatal(err)
	}
	setBody(t, pool, 1, `{"id":1,"v":2}`)
	threshold := time.Duration(p.RefreshAhead * float64(p.ttlFor(key)))
	eventually(t, 2*time.Second, "a hit past RefreshAhead", func() bool {
		r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
		if err != nil || r.Cache != Hit || string(r.Body) != body1 {
			t.Fatalf("read: %s %q %v", r.Cache, r.Body, err)
		}
		if r.Age < threshold {
			time.Sleep(50 * time.Millisecond) // hits below the threshold are not what this tests
			return false
		}
		return true
	})
	// Only Valkey is read from here on: the refresh must land before the entry expires.
	eventually(t, 3*time.Second, "refresh ahead (or expiry)", func() bool {
		b, ok := f.rawGet(t, "item:1")
		if !ok {
			t.Fatalf("item:1 expired without being refreshed ahead of its TTL (%d queries)", f.loader.one.Load())
		}
		return string(b) == `{"id":1,"v":2}`
	})
	if pttl := f.rawPTTL(t, "item:1"); pttl < p.ttlFor(key)/2 {
		t.Fatalf("refreshed entry has PTTL %v of %v", pttl, p.ttlFor(key))
	}
	if n := f.loader.one.Load(); n != 2 {
		t.Fatalf("%d queries, want 2 (the fill and one refresh)", n)
	}
}

func TestStaleIfErrorServesOldWhenLoadFails(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		sie  time.Duration
	}{{"sie=5s", 5 * time.Second}, {"sie=0", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			pool := itemsDB(t)
			addr, prefix := testenv.Valkey(t)
			f := newCtlFixture(t, pool, addr, prefix, 0, Options{})
			p := shortPolicy(t, 300*time.Millisecond, 0, tc.sie)
			key := prefix + "item:1"
			ctx := context.Background()
			if r, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); err != nil || r.Cache != Miss {
				t.Fatalf("fill: %s %v", r.Cache, err)
			}
			f.awaitStale(t, p, "item:1")
			f.ctl.fail.Store(true)
			r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
			if tc.sie == 0 {
				if !errors.Is(err, ErrUnavailable) || r.Body != nil {
					t.Fatalf("no stale-if-error window: %s %q %v; want ErrUnavailable", r.Cache, r.Body, err)
				}
				return
			}
			if err != nil || r.Cache != Stale || r.StaleReason != StaleIfError || string(r.Body) != body1 || r.Age < p.ttlFor(key) {
				t.Fatalf("database down past TTL: %s %q %q age %v %v; want the old entry as STALE stale-if-error",
					r.Cache, r.StaleReason, r.Body, r.Age, err)
			}
			if n := f.loader.one.Load(); n != 2 {
				t.Fatalf("%d loads, want 2 (the fill, the failed reload)", n)
			}
			// The failed reload gave its refresh lease back and left the entry.
			if _, ok := f.rawGet(t, "item:1"+refreshSuffix); ok {
				t.Fatal("the failed reload left its refresh lease")
			}
			if b, _ := f.rawGet(t, "item:1"); string(b) != body1 {
				t.Fatalf("entry is %q after the failed reload", b)
			}
			// The database comes back: the next read reloads.
			f.ctl.fail.Store(false)
			setBody(t, pool, 1, `{"id":1,"v":2}`)
			eventually(t, 2*time.Second, "a reload after the database is back", func() bool {
				r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
				return err == nil && string(r.Body) == `{"id":1,"v":2}`
			})
		})
	}
}

func TestStaleIfErrorGetMany(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		sie  time.Duration
	}{{"sie=5s", 5 * time.Second}, {"sie=0", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			pool := itemsDB(t)
			addr, prefix := testenv.Valkey(t)
			f := newCtlFixture(t, pool, addr, prefix, 0, Options{})
			p := shortPolicy(t, 300*time.Millisecond, 0, tc.sie)
			ctx := context.Background()
			first, state, err := f.res.GetMany(ctx, p, []int64{1, 2})
			if err != nil || state.Cache != Miss {
				t.Fatalf("fill: %s %v", state.Cache, err)
			}
			f.awaitStale(t, p, "item:1", "item:2")
			f.ctl.fail.Store(true)
			items, state, err := f.res.GetMany(ctx, p, []int64{1, 2})
			if tc.sie == 0 {
				if !errors.Is(err, ErrUnavailable) {
					t.Fatalf("no stale-if-error window: %v %s %v; want ErrUnavailable", items, state.Cache, err)
				}
				return
			}
			if err != nil || state.Cache != Stale {
				t.Fatalf("database down past TTL: state %s %v; want STALE", state.Cache, err)
			}
			for i := range items {
				if items[i].ID != first[i].ID || !bytes.Equal(items[i].Body, first[i].Body) || items[i].Body == nil {
					t.Fatalf("item %d: %+v, want the cached %+v", i, items[i], first[i])
				}
			}
		})
	}
}

func TestNegativeCaching(t *testing.T) {
	t.Parallel()
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newCtlFixture(t, pool, addr, prefix, 0, Options{})
	p := itemPolicy(t, "")
	p.NegativeTTL = 30 * time.Second
	ctx := context.Background()

	r, err := f.res.Get(ctx, p, []string{"99"}, int64(99))
	if !errors.Is(err, ErrNotFound) || r.Cache != Miss {
		t.Fatalf("absent row: %s %v, want a MISS with ErrNotFound", r.Cache, err)
	}
	if b, ok := f.rawGet(t, "item:99"); !ok || !isNegative(b) {
		t.Fatalf("item:99 holds %q (present=%v), want the negative marker", b, ok)
	}
	if pttl := f.rawPTTL(t, "item:99"); pttl <= 0 || pttl > p.NegativeTTL {
		t.Fatalf("negative entry PTTL %v, want within NegativeTTL %v", pttl, p.NegativeTTL)
	}
	// The row appears, but nothing invalidates the key: the cached "not found" stands.
	if _, err := pool.Exec(ctx, `INSERT INTO items VALUES (99, '{"id":99}')`); err != nil {
		t.Fatal(err)
	}
	r, err = f.res.Get(ctx, p, []string{"99"}, int64(99))
	if !errors.Is(err, ErrNotFound) || r.Cache != Hit || r.Body != nil {
		t.Fatalf("second read: %s %q %v; want a HIT with ErrNotFound", r.Cache, r.Body, err)
	}
	if n := f.loader.one.Load(); n != 1 {
		t.Fatalf("%d queries, want 1: the negative entry answered the second read", n)
	}
	if _, err := f.res.Invalidate(ctx, []string{prefix + "item:99"}, nil); err != nil {
		t.Fatal(err)
	}
	r, err = f.res.Get(ctx, p, []string{"99"}, int64(99))
	if err != nil || r.Cache != Miss || string(r.Body) != `{"id":99}` {
		t.Fatalf("after the invalidation: %s %q %v; want the new row as a MISS", r.Cache, r.Body, err)
	}
	if n := f.loader.one.Load(); n != 2 {
		t.Fatalf("%d queries, want 2", n)
	}

	// Batch reads store and honour the same marker.
	items, state, err := f.res.GetMany(ctx, p, []int64{98})
	if err != nil || state.Cache != Miss || items[0].Body != nil {
		t.Fatalf("batch of an absent row: %+v %s %v", items, state.Cache, err)
	}
	if b, _ := f.rawGet(t, "item:98"); !isNegative(b) {
		t.Fatalf("item:98 holds %q after a batch not-found, want the negative marker", b)
	}
	items, state, err = f.res.GetMany(ctx, p, []int64{98})
	if err != nil || state.Cache != Hit || items[0].Body != nil || f.loader.many.Load() != 1 {
		t.Fatalf("second batch: %+v %s %v after %d batch queries; want a HIT from the negative entry",
			items, state.Cache, err, f.loader.many.Load())
	}
	if r, err := f.res.Get(ctx, p, []string{"98"}, int64(98)); !errors.Is(err, ErrNotFound) || r.Cache != Hit {
		t.Fatalf("single read of a batch-cached not-found: %s %v", r.Cache, err)
	}

	// NegativeTTL 0 stores nothing.
	q := itemPolicy(t, "")
	if _, err := f.res.Get(ctx, q, []string{"97"}, int64(97)); !errors.Is(err, ErrNotFound) {
		t.Fatal(err)
	}
	if _, _, err := f.res.GetMany(ctx, q, []int64{96}); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"item:97", "item:96"} {
		if b, ok := f.rawGet(t, k); ok {
			t.Fatalf("%s holds %q with NegativeTTL 0", k, b)
		}
	}
}

func TestLeaseWaitAcrossSidecars(t *testing.T) {
	t.Parallel()
	for _, tier := range []int{0, 32 << 20} {
		t.Run(fmt.Sprintf("tier=%d", tier), func(t *testing.T) {
			t.Parallel()
			pool := itemsDB(t)
			addr, prefix := testenv.Valkey(t)
			a := newCtlFixture(t, pool, addr, prefix, tier, Options{})
			b := newCtlFixture(t, pool, addr, prefix, tier, Options{LeaseWait: 2 * time.Second})
			p := itemPolicy(t, "")
			ctx := context.Background()

			entered, release := a.ctl.holdLoads(t)
			resA := make(chan Result, 1)
			go func() {
				r, err := a.res.Get(ctx, p, []string{"1"}, int64(1))
				if err != nil {
					t.Error(err)
				}
				resA <- r
			}()
			<-entered
			if v, _ := a.rawGet(t, "item:1"); !isLease(v) {
				t.Fatalf("A loads without its fill lease in Valkey (key holds %q)", v)
			}
			resB := make(chan Result, 1)
			go func() {
				r, err := b.res.Get(ctx, p, []string{"1"}, int64(1))
				if err != nil {
					t.Error(err)
				}
				resB <- r
			}()
			select {
			case r := <-resB:
				t.Fatalf("B answered (%s) while A's load was still running: it did not wait for A's fill", r.Cache)
			case <-time.After(100 * time.Millisecond):
			}
			release()
			ra, rb := <-resA, <-resB
			if ra.Cache != Miss || string(ra.Body) != body1 {
				t.Fatalf("A: %s %q", ra.Cache, ra.Body)
			}
			if rb.Cache != Hit || !bytes.Equal(rb.Body, ra.Body) {
				t.Fatalf("B: %s %q; want A's fill as a HIT", rb.Cache, rb.Body)
			}
			if n := b.loader.one.Load(); n != 0 {
				t.Fatalf("B ran %d queries while waiting on A's lease, want 0", n)
			}
		})
	}
}

func TestLeaseWaitRunsOutOrNotAtAll(t *testing.T) {
	t.Parallel()
	for _, wait := range []time.Duration{0, 200 * time.Millisecond} {
		t.Run(fmt.Sprintf("wait=%v", wait), func(t *testing.T) {
			t.Parallel()
			pool := itemsDB(t)
			addr, prefix := testenv.Valkey(t)
			a := newCtlFixture(t, pool, addr, prefix, 0, Options{})
			b := newCtlFixture(t, pool, addr, prefix, 0, Options{LeaseWait: wait})
			p := itemPolicy(t, "")
			ctx := context.Background()
			entered, release := a.ctl.holdLoads(t)
			doneA := make(chan error, 1)
			go func() {
				_, err := a.res.Get(ctx, p, []string{"1"}, int64(1))
				doneA <- err
			}()
			<-entered
			lease, _ := a.rawGet(t, "item:1")
			start := time.Now()
			r, err := b.res.Get(ctx, p, []string{"1"}, int64(1))
			if err != nil || r.Cache != Miss || string(r.Body) != body1 {
				t.Fatalf("B under A's lease: %s %q %v; want the row, loaded by B", r.Cache, r.Body, err)
			}
			if d := time.Since(start); d < wait-10*time.Millisecond {
				t.Fatalf("B loaded after %v, before its LeaseWait %v ran out", d, wait)
			}
			if n := b.loader.one.Load(); n != 1 {
				t.Fatalf("B ran %d queries, want 1", n)
			}
			if v, _ := a.rawGet(t, "item:1"); string(v) != string(lease) {
				t.Fatalf("B replaced A's lease with %q: it must not fill under another's lease", v)
			}
			release()
			if err := <-doneA; err != nil {
				t.Fatal(err)
			}
			if v, _ := a.rawGet(t, "item:1"); string(v) != body1 {
				t.Fatalf("A's fill: key holds %q", v)
			}
		})
	}
}

// TestLeaseWaitTakesOverAfterFailedLoad: the reader holding the lease fails and gives it back;
// the waiting sidecar then takes the lease, loads and fills.
func TestLeaseWaitTakesOverAfterFailedLoad(t *testing.T) {
	t.Parallel()
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	a := newCtlFixture(t, pool, addr, prefix, 0, Options{})
	b := newCtlFixture(t, pool, addr, prefix, 0, Options{LeaseWait: 2 * time.Second})
	p := itemPolicy(t, "")
	ctx := context.Background()
	a.ctl.fail.Store(true)
	entered, release := a.ctl.holdLoads(t)
	doneA := make(chan error, 1)
	go func() {
		_, err := a.res.Get(ctx, p, []string{"1"}, int64(1))
		doneA <- err
	}()
	<-entered
	resB := make(chan Result, 1)
	go func() {
		r, err := b.res.Get(ctx, p, []string{"1"}, int64(1))
		if err != nil {
			t.Error(err)
		}
		resB <- r
	}()
	time.Sleep(50 * time.Millisecond)
	release()
	if err := <-doneA; !errors.Is(err, ErrUnavailable) {
		t.Fatalf("A: %v, want ErrUnavailable", err)
	}
	r := <-resB
	if r.Cache != Miss || string(r.Body) != body1 || b.loader.one.Load() != 1 {
		t.Fatalf("B: %s %q after %d queries; want its own load", r.Cache, r.Body, b.loader.one.Load())
	}
	if v, _ := b.rawGet(t, "item:1"); string(v) != body1 {
		t.Fatalf("B did not fill after taking over the lease: key holds %q", v)
	}
}

func TestBulkheadShedsLoadsPastMaxLoads(t *testing.T) {
	t.Parallel()
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	// Invalidation never live: every read bypasses the cache, as when Valkey's breaker is open
	// and all reads fall through to PostgreSQL at once. Those are shed when the bulkhead is full.
	f := newCtlFixture(t, pool, addr, prefix, 0, Options{MaxLoads: 1, Invalidation: true})
	p := itemPolicy(t, "")
	p.Invalidated = true
	ctx := context.Background()
	entered, release := f.ctl.holdLoads(t)
	done1 := make(chan Result, 1)
	go func() {
		r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
		if err != nil {
			t.Error(err)
		}
		done1 <- r
	}()
	<-entered
	start := time.Now()
	r, err := f.res.Get(ctx, p, []string{"2"}, int64(2))
	if !errors.Is(err, ErrOverloaded) || r.Body != nil {
		t.Fatalf("second bypassed load with MaxLoads 1 busy: %s %q %v; want ErrOverloaded", r.Cache, r.Body, err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("the shed read took %v: it waited instead of failing at once", d)
	}
	if _, _, err := f.res.GetMany(ctx, p, []int64{3}); !errors.Is(err, ErrOverloaded) {
		t.Fatalf("bypassed batch load with MaxLoads 1 busy: %v, want ErrOverloaded", err)
	}
	if n := f.loader.one.Load() + f.loader.many.Load(); n != 1 {
		t.Fatalf("%d loads reached the loader, want 1 (the shed ones must not)", n)
	}
	release()
	if r := <-done1; string(r.Body) != body1 {
		t.Fatalf("held load: %q", r.Body)
	}

	// With the cache in use, a miss is not shed: it waits for the slot, as for a pooled
	// connection, and is answered when the slot frees.
	f.res.SetLive(true)
	entered, release = f.ctl.holdLoads(t)
	go func() {
		r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
		if err != nil {
			t.Error(err)
		}
		done1 <- r
	}()
	<-entered
	done2 := make(chan error, 1)
	go func() {
		_, err := f.res.Get(ctx, p, []string{"2"}, int64(2))
		done2 <- err
	}()
	select {
	case err := <-done2:
		t.Fatalf("a miss with the bulkhead full ended at once (%v); want it to wait for the slot", err)
	case <-time.After(100 * time.Millisecond):
	}
	release()
	<-done1
	if err := <-done2; err != nil {
		t.Fatalf("the waiting miss: %v", err)
	}
	for _, k := range []string{"item:1", "item:2"} {
		if _, ok := f.rawGet(t, k); !ok {
			t.Fatalf("%s not filled after the bulkhead freed", k)
		}
	}
}

func TestDBCircuitOpensAndRecovers(t *testing.T) {
	t.Parallel()
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newCtlFixture(t, pool, addr, prefix, 0, Options{})
	p := itemPolicy(t, "")
	q := shortPolicy(t, 300*time.Millisecond, 0, 5*time.Second) // keeps a stale entry to fall back on
	ctx := context.Background()
	if _, err := f.res.Get(ctx, q, []string{"5"}, int64(5)); err != nil {
		t.Fatal(err)
	}
	f.awaitStale(t, q, "item:5")
	base := f.loader.one.Load()

	f.ctl.fail.Store(true)
	var third time.Time
	for i := 0; i < dbBreakerThreshold; i++ {
		if i == dbBreakerThreshold-1 {
			third = time.Now()
		}
		if _, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("failing load %d: %v, want ErrUnavailable", i, err)
		}
		if s := f.res.DatabaseCircuit(); (s == CircuitOpen) != (i == dbBreakerThreshold-1) {
			t.Fatalf("after %d failures the circuit is %s", i+1, CircuitName(s))
		}
	}
	if n := f.loader.one.Load() - base; n != dbBreakerThreshold {
		t.Fatalf("%d loads, want %d", n, dbBreakerThreshold)
	}
	if _, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("circuit open: %v, want ErrUnavailable", err)
	}
	if _, _, err := f.res.GetMany(ctx, p, []int64{2, 3}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("batch, circuit open: %v, want ErrUnavailable", err)
	}
	// The stale entry is served without trying the database.
	if r, err := f.res.Get(ctx, q, []string{"5"}, int64(5)); err != nil || r.Cache != Stale || r.StaleReason != StaleIfError {
		t.Fatalf("stale entry, circuit open: %s %q %v; want STALE stale-if-error", r.Cache, r.StaleReason, err)
	}
	if n := f.loader.one.Load() + f.loader.many.Load() - base; n != dbBreakerThreshold {
		t.Fatalf("%d loads reached the loader, want %d: the open circuit must refuse them", n, dbBreakerThreshold)
	}
	if s := f.res.DatabaseCircuit(); s != CircuitOpen {
		t.Fatalf("circuit %s, want open", CircuitName(s))
	}

	f.ctl.fail.Store(false)
	var r Result
	eventually(t, 2*time.Second, "a read succeeds once the database is back", func() bool {
		var err error
		r, err = f.res.Get(ctx, p, []string{"1"}, int64(1))
		if err != nil && !errors.Is(err, ErrUnavailable) {
			t.Fatal(err)
		}
		return err == nil
	})
	if d := time.Since(third); d < dbBreakerMinOpen-dbBreakerMinOpen/5 {
		t.Fatalf("a load went through %v after the circuit opened, before its %v back-off", d, dbBreakerMinOpen)
	}
	if r.Cache != Miss || string(r.Body) != body1 {
		t.Fatalf("first read after recovery: %s %q", r.Cache, r.Body)
	}
	if s := f.res.DatabaseCircuit(); s != CircuitClosed {
		t.Fatalf("circuit %s after a good load, want closed", CircuitName(s))
	}
	if n := f.loader.one.Load() + f.loader.many.Load() - base; n != dbBreakerThreshold+1 {
		t.Fatalf("%d loads, want %d: one probe after the failures", n, dbBreakerThreshold+1)
	}
}

func TestRefreshLeaseRaceWithInvalidate(t *testing.T) {
	t.Parallel()
	addr, prefix := testenv.Valkey(t)
	pool := itemsDB(t)
	f := newCtlFixture(t, pool, addr, prefix, 0, Options{})
	s := f.store
	ctx := context.Background()
	const fresh, stale, leaseTTL = 300 * time.Millisecond, 5 * time.Second, 2 * time.Second
	tag := prefix + tagPrefix + "rl:1"

	// fill stores name with a fill lease, fresh for 300ms then stale for 5s.
	fill := func(t *testing.T, name string) string {
		t.Helper()
		key := prefix + name
		l := newLease()
		if ok, err := s.Lease(ctx, key, l, nil, leaseTTL, fresh+stale); err != nil || !ok {
			t.Fatalf("lease: %v %v", ok, err)
		}
		if ok, err := s.Fill(ctx, key, l, []byte("v1"), fresh+stale); err != nil || !ok {
			t.Fatalf("fill: %v %v", ok, err)
		}
		return key
	}
	// refreshLease takes the refresh lease of key once it is stale, checking that it is
	// refused while the entry is fresh.
	refreshLease := func(t *testing.T, key string, tags []string) string {
		t.Helper()
		l := newLease()
		if ok, err := s.RefreshLease(ctx, key, l, tags, leaseTTL, fresh+stale, stale); err != nil || ok {
			t.Fatalf("refresh lease of a fresh entry: %v %v, want refused", ok, err)
		}
		if f.rawExists(t, refreshKey(key)) {
			t.Fatal("a refused refresh lease was written")
		}
		eventually(t, 2*time.Second, "refresh lease of the stale entry", func() bool {
			ok, err := s.RefreshLease(ctx, key, l, tags, leaseTTL, fresh+stale, stale)
			if err != nil {
				t.Fatal(err)
			}
			return ok
		})
		if v, _ := f.raw.Do(ctx, f.raw.B().Get().Key(refreshKey(key)).Build()).ToString(); v != l {
			t.Fatalf("companion holds %q, want the lease", v)
		}
		if ok, err := s.RefreshLease(ctx, key, newLease(), tags, leaseTTL, fresh+stale, stale); err != nil || ok {
			t.Fatalf("second refresh lease: %v %v, want refused while the first is held", ok, err)
		}
		return l
	}

	t.Run("absent", func(t *testing.T) {
		t.Parallel()
		if ok, err := s.RefreshLease(ctx, prefix+"rl:none", newLease(), nil, leaseTTL, fresh+stale, stale); err != nil || ok {
			t.Fatalf("refresh lease of an absent key: %v %v, want refused", ok, err)
		}
	})
	t.Run("no invalidation", func(t *testing.T) {
		t.Parallel()
		key := fill(t, "rl:a")
		l := refreshLease(t, key, nil)
		if ok, err := s.RefreshFill(ctx, key, l, []byte("v2"), fresh+stale); err != nil || !ok {
			t.Fatalf("refresh fill: %v %v, want stored", ok, err)
		}
		if v, _ := f.rawGet(t, "rl:a"); string(v) != "v2" {
			t.Fatalf("key holds %q, want v2", v)
		}
		if pttl := f.rawPTTL(t, "rl:a"); pttl <= stale {
			t.Fatalf("refilled PTTL %v: not fresh again", pttl)
		}
		if f.rawExists(t, refreshKey(key)) {
			t.Fatal("the refresh fill left its lease")
		}
	})
	t.Run("key invalidated", func(t *testing.T) {
		t.Parallel()
		key := fill(t, "rl:b")
		l := refreshLease(t, key, nil)
		n, err := s.Invalidate(ctx, []string{key}, nil)
		if err != nil || n != 2 {
			t.Fatalf("Invalidate = %d, %v; want the key and its refresh companion", n, err)
		}
		if f.rawExists(t, refreshKey(key)) {
			t.Fatal("the refresh companion survived the invalidation")
		}
		if ok, err := s.RefreshFill(ctx, key, l, []byte("v2"), fresh+stale); err != nil || ok {
			t.Fatalf("refresh fill after the invalidation: %v %v, want refused", ok, err)
		}
		if f.rawExists(t, key) {
			t.Fatal("the refresh that read before the invalidation landed after it")
		}
	})
	t.Run("tag invalidated", func(t *testing.T) {
		t.Parallel()
		key := fill(t, "rl:c")
		l := refreshLease(t, key, []string{tag})
		if n, err := s.Invalidate(ctx, nil, []string{tag}); err != nil || n != 2 {
			t.Fatalf("Invalidate(tag) = %d, %v; want the key and its refresh companion", n, err)
		}
		if f.rawExists(t, refreshKey(key)) || f.rawExists(t, key) {
			t.Fatal("the tag's invalidation left the key or its refresh companion")
		}
		if ok, err := s.RefreshFill(ctx, key, l, []byte("v2"), fresh+stale); err != nil || ok {
			t.Fatalf("refresh fill after the tag's invalidation: %v %v, want refused", ok, err)
		}
		if f.rawExists(t, key) {
			t.Fatal("the refresh that read before the invalidation landed after it")
		}
	})
}

func TestNotLiveServesCachedOnlyForStaleIfError(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		sie  time.Duration
	}{{"sie=30s", 30 * time.Second}, {"sie=0", 0}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			pool := itemsDB(t)
			addr, prefix := testenv.Valkey(t)
			f := newCtlFixture(t, pool, addr, prefix, 0, Options{Invalidation: true})
			if f.res.Live() {
				t.Fatal("a resolver with invalidation is live before SetLive(true)")
			}
			p := itemPolicy(t, "")
			p.Invalidated = true
			p.StaleIfError = tc.sie
			ctx := context.Background()
			const cached = `{"cached":true}`
			// Fresh by its PTTL (the minute's TTL plus the window, more or less).
			f.rawSet(t, "item:1", cached, p.ttlFor(prefix+"item:1")+p.staleWindow())

			r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
			if err != nil || r.Cache != Bypass || string(r.Body) != body1 {
				t.Fatalf("not live: %s %q %v; want the row from PostgreSQL as a BYPASS", r.Cache, r.Body, err)
			}
			if n := f.loader.one.Load(); n != 1 {
				t.Fatalf("%d queries, want 1", n)
			}
			if v, _ := f.rawGet(t, "item:1"); string(v) != cached {
				t.Fatalf("not live, the key was changed to %q", v)
			}

			f.ctl.fail.Store(true)
			r, err = f.res.Get(ctx, p, []string{"1"}, int64(1))
			items, state, berr := f.res.GetMany(ctx, p, []int64{1})
			if tc.sie == 0 {
				if !errors.Is(err, ErrUnavailable) {
					t.Errorf("not live, database down, no stale-if-error window: %s %q %q %v; want ErrUnavailable",
						r.Cache, r.StaleReason, r.Body, err)
				}
				if !errors.Is(berr, ErrUnavailable) {
					t.Errorf("batch, not live, database down, no stale-if-error window: %s %v %v; want ErrUnavailable",
						state.Cache, items, berr)
				}
				return
			}
			if err != nil || r.Cache != Stale || r.StaleReason != StaleIfError || string(r.Body) != cached {
				t.Fatalf("not live, database down: %s %q %q %v; want the cached entry as STALE stale-if-error",
					r.Cache, r.StaleReason, r.Body, err)
			}
			if berr != nil || state.Cache != Stale || string(items[0].Body) != cached {
				t.Fatalf("batch, not live, database down: %s %+v %v; want the cached entry as STALE", state.Cache, items, berr)
			}
			if n := f.loader.one.Load(); n != 2 {
				t.Fatalf("%d queries, want 2", n)
			}
		})
	}
}

// TestTierFirstReadOfLongEntryIsFresh: an entry whose TTL plus stale window exceeds the tier's
// own bound on a local copy (tierTTL) must still read as fresh, with its real age, on the read
// that brings it into the tier.
func TestTierFirstReadOfLongEntryIsFresh(t *testing.T) {
	t.Parallel()
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newCtlFixture(t, pool, addr, prefix, 32<<20, Options{Invalidation: false})
	p := itemPolicy(t, "")
	p.TTL, p.StaleWhileRevalidate, p.StaleIfError = time.Hour, 5*time.Minute, time.Hour
	ctx := context.Background()
	if r, err := f.res.Get(ctx, p, []string{"4"}, int64(4)); err != nil || r.Cache != Miss {
		t.Fatalf("fill: %s %v", r.Cache, err)
	}
	for i := 0; i < 3; i++ {
		r, err := f.res.Get(ctx, p, []string{"4"}, int64(4))
		if err != nil || r.Cache != Hit || r.Age > 5*time.Second {
			t.Fatalf("read %d after the fill: %s (%s) age %s %v; want a fresh HIT", i+1, r.Cache, r.StaleReason, r.Age, err)
		}
	}
}

// TestNegativeEntryLeavesWithItsTag: a cached "not found" of a tagged policy lives longer than
// the policy's TTL; its tag set must keep it as long, or invalidating the tag leaves it behind.
func TestNegativeEntryLeavesWithItsTag(t *testing.T) {
	t.Parallel()
	pool := itemsDB(t)
	for _, mem := range []bool{false, true} {
		addr, prefix := testenv.Valkey(t)
		f := newCtlFixture(t, pool, addr, prefix, 0, Options{QueryTimeout: 100 * time.Millisecond})
		if mem {
			m := NewMetrics(prometheus.NewRegistry())
			f.res = New(Options{QueryTimeout: 100 * time.Millisecond, Invalidation: true}, NewMemoryStore(MinTierSize, zerolog.Nop(), m), f.loader, zerolog.Nop(), m)
			f.res.SetLive(true)
			prefix = ""
		}
		f.res.SetLive(true)
		p, err := NewPolicy("list", "list:{group}:{page}", []string{"group", "page"}, 100*time.Millisecond, `^[1-9][0-9]{0,18}$`,
			"SELECT NULL::text WHERE $1::bigint > 0 AND $2::bigint > 0", "")
		if err != nil {
			t.Fatal(err)
		}
		tag, _ := NewTag("list", []string{"group", "page"}, []string{"group"})
		p.Tags, p.Invalidated, p.NegativeTTL = []*Tag{tag}, true, 5*time.Second
		ctx := context.Background()
		if _, err := f.res.Get(ctx, p, []string{"1", "1"}, int64(1), int64(1)); !errors.Is(err, ErrNotFound) {
			t.Fatalf("mem=%v: absent list: %v", mem, err)
		}
		// Past the lease (query timeout + 1 s) plus the TTL: a member registered for the TTL
		// alone is gone from its set by now.
		time.Sleep(1300 * time.Millisecond)
		if r, err := f.res.Get(ctx, p, []string{"1", "1"}, int64(1), int64(1)); !errors.Is(err, ErrNotFound) || r.Cache != Hit {
			t.Fatalf("mem=%v: the cached 404: %s %v", mem, r.Cache, err)
		}
		if _, err := f.res.Invalidate(ctx, nil, []string{prefix + "cachecar:tag:list:1"}); err != nil {
			t.Fatal(err)
		}
		if r, err := f.res.Get(ctx, p, []string{"1", "1"}, int64(1), int64(1)); r.Cache == Hit {
			t.Fatalf("mem=%v: the cached 404 survived its tag's invalidation (%v)", mem, err)
		}
	}
}

// TestDBCircuitOpensOnTimeouts: a database that stops answering times out rather than refusing;
// that must open the breaker too.
func TestDBCircuitOpensOnTimeouts(t *testing.T) {
	t.Parallel()
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newCtlFixture(t, pool, addr, prefix, 0, Options{QueryTimeout: 200 * time.Millisecond})
	p := itemPolicy(t, "SELECT body FROM items, pg_sleep(1) WHERE id = $1")
	ctx := context.Background()
	for i := 0; i < dbBreakerThreshold; i++ {
		if _, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); !errors.Is(err, ErrTimeout) {
			t.Fatalf("load %d: %v, want ErrTimeout", i+1, err)
		}
	}
	if f.res.DatabaseCircuit() != CircuitOpen {
		t.Fatalf("after %d timeouts the database circuit is %s, want open", dbBreakerThreshold, CircuitName(f.res.DatabaseCircuit()))
	}
	n := f.loader.one.Load()
	if _, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); !errors.Is(err, ErrUnavailable) || f.loader.one.Load() != n {
		t.Fatalf("with the circuit open: %v after %d loads (was %d); want ErrUnavailable without a load", err, f.loader.one.Load(), n)
	}
}

// A load in flight when this process's own change drops its key may carry the value from before
// the change: its callers get it, but the tier keeps no copy, so a read that starts after the
// change goes back to Valkey. An undisturbed load is kept.
func TestTierDropDuringLoadKeepsNoCopy(t *testing.T) {
	ctx := context.Background()
	key, reply, _ := setAndRead(t, "dropped", "old")

	for _, drop := range []bool{false, true} {
		stats := &tierStats{}
		st := newLocalStore(1<<20, stats)
		now := time.Now()
		if _, e := st.Flight(key, "GET", time.Minute, now); e != nil {
			t.Fatal("first Flight joined a load; want it to start one")
		}
		_, waiter := st.Flight(key, "GET", time.Minute, now)
		if waiter == nil {
			t.Fatal("second Flight did not join the load in flight")
		}
		if drop {
			stats.drop([]string{key})
		}
		st.Update(key, "GET", reply)
		got, err := waiter.Wait(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if s, _ := got.ToString(); s != "old" {
			t.Fatalf("drop=%v: the waiting caller got %q, want the load's reply", drop, s)
		}
		m, e := st.Flight(key, "GET", time.Minute, time.Now())
		kept := e == nil && !m.IsNil() && m.IsString()
		if _, _, peeked := stats.peek(key); peeked != kept {
			t.Fatalf("drop=%v: peek %v but Flight hit %v", drop, peeked, kept)
		}
		if kept == drop {
			t.Fatalf("drop=%v: copy kept %v, want %v", drop, kept, !drop)
		}
		st.Close(errors.New("test over"))
	}
}

// A tracked connection that silently stops delivering (a partition: nothing closes it, so no
// invalidation arrives and none is known to be missed) must not keep serving its copies: it is
// PINGed once idle for tierPingGap and closed, with its copies, when the PING goes unanswered.
func TestTierDropsCopiesOfASilentConnection(t *testing.T) {
	addr, prefix := testenv.Valkey(t)
	proxy := testenv.StartProxy(t, addr)
	raw, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	const timeout = 50 * time.Millisecond // the default valkey.timeout: PINGs wait 20 x that
	s := NewStore(StoreOptions{Addrs: []string{proxy.Addr()}, Timeout: timeout, DialTimeout: time.Second, ReconnectMax: time.Second,
		TierSize: MinTierSize}, zerolog.Nop(), NewMetrics(prometheus.NewRegistry()))
	if err := s.Connect(); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	key := prefix + "silent"
	if err := raw.Do(ctx, raw.B().Set().Key(key).Value("old").Ex(time.Hour).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	s.Get(ctx, key)
	if body, _, local, err := s.Get(ctx, key); err != nil || !local || string(body) != "old" {
		t.Fatalf("second read: %q local %v, %v; want the tier's copy", body, local, err)
	}

	proxy.Blackhole()
	changed := time.Now()
	if err := raw.Do(ctx, raw.B().Set().Key(key).Value("new").Ex(time.Hour).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	bound := 2*tierPingGap + 20*timeout + 2*time.Second // the documented bound, plus slack for this machine (without the PING: 30 s)
	for {
		body, _, _, err := s.Get(ctx, key)
		if err != nil || string(body) != "old" {
			t.Logf("the old copy was served for %s after the change", time.Since(changed).Round(time.Millisecond))
			break
		}
		if time.Since(changed) > bound {
			t.Fatalf("the tier still serves the old copy %s after the change, behind a silent connection", time.Since(changed).Round(time.Millisecond))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A tier read that joined another reader's load of the same key must not fail when that reader
// hangs up (the tier cancels the load's waiters with its error): valkey-go retries a read-only
// command whose own context is still live, so it reads again instead of counting a Valkey
// failure and querying PostgreSQL. This keeps that so (a client built with DisableRetry would
// fail it).
func TestTierJoinedReadSurvivesLeaderHangingUp(t *testing.T) {
	addr, prefix := testenv.Valkey(t)
	proxy := testenv.StartProxy(t, addr)
	raw, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	s := NewStore(StoreOptions{Addrs: []string{proxy.Addr()}, Timeout: 2 * time.Second, DialTimeout: time.Second, ReconnectMax: time.Second,
		TierSize: MinTierSize, BreakerThreshold: 5, BreakerMinOpen: time.Second}, zerolog.Nop(), NewMetrics(prometheus.NewRegistry()))
	if err := s.Connect(); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	for _, batch := range []bool{false, true} {
		key := fmt.Sprintf("%sjoined-%v", prefix, batch)
		if err := raw.Do(ctx, raw.B().Set().Key(key).Value("v").Ex(time.Hour).Build()).Error(); err != nil {
			t.Fatal(err)
		}
		read := func(ctx context.Context) (string, error) {
			if batch {
				out, _, err := s.MGet(ctx, []string{key})
				if err != nil {
					return "", err
				}
				return string(out[0]), nil
			}
			body, _, _, err := s.Get(ctx, key)
			return string(body), err
		}
		proxy.SetLatency(300 * time.Millisecond)
		leaderCtx, hangUp := context.WithCancel(ctx)
		leader := make(chan error, 1)
		go func() { _, err := read(leaderCtx); leader <- err }()
		time.Sleep(100 * time.Millisecond) // the leader's load is in flight
		joined := make(chan error, 1)
		var got string
		go func() {
			var err error
			got, err = read(ctx)
			joined <- err
		}()
		time.Sleep(50 * time.Millisecond) // the second read has joined it
		hangUp()
		if err := <-leader; !errors.Is(err, context.Canceled) {
			t.Fatalf("batch %v: the reader that hung up got %v, want context.Canceled", batch, err)
		}
		proxy.SetLatency(0)
		if err := <-joined; err != nil || got != "v" {
			t.Fatalf("batch %v: the joined read got %q, %v; want the value", batch, got, err)
		}
		if s.Circuit() != CircuitClosed {
			t.Fatalf("batch %v: breaker %d after a client hung up, want closed", batch, s.Circuit())
		}
	}
}

// Identical batches missing at once share one query, as concurrent misses of one key do, also
// when they list the ids in another order.
func TestGetManyConcurrentBatchesShareOneQuery(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newCtlFixture(t, pool, addr, prefix, 0, Options{})
	p := itemPolicy(t, "")
	ctx := context.Background()
	entered, release := f.ctl.holdLoads(t)
	type answer struct {
		items []Item
		res   Result
		err   error
	}
	batch := func(ids []int64, out chan<- answer) {
		items, res, err := f.res.GetMany(ctx, p, ids)
		out <- answer{items, res, err}
	}
	first, second := make(chan answer, 1), make(chan answer, 1)
	go batch([]int64{2, 3}, first)
	select {
	case <-entered: // the first batch's query is in flight
	case <-time.After(10 * time.Second):
		t.Fatal("the first batch never queried")
	}
	go batch([]int64{3, 2}, second)
	// The second batch's lookup has counted its two misses once it is about to join the load;
	// a query of its own would show on entered.
	for deadline := time.Now().Add(10 * time.Second); f.res.Stats()["item"].Misses < 4; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the second batch never looked its ids up")
		}
	}
	select {
	case <-entered:
		t.Fatal("the second identical batch ran a query of its own")
	case <-time.After(300 * time.Millisecond):
	}
	release()
	for _, ch := range []chan answer{first, second} {
		a := <-ch
		if a.err != nil || a.res.Cache != Miss || len(a.items) != 2 || a.items[0].Body == nil || a.items[1].Body == nil {
			t.Fatalf("batch answer: %+v %s %v", a.items, a.res.Cache, a.err)
		}
	}
	if n := f.loader.many.Load(); n != 1 {
		t.Fatalf("%d batch queries for two identical batches missing at once, want 1", n)
	}
	if n := testutil.ToFloat64(f.res.m.shared.WithLabelValues("item")); n != 2 {
		t.Fatalf("cachecar_loads_shared_total %v for the two batches, want 2 (both answered by one load)", n)
	}
}

// valkey-go dates a copy's expiry from when it read the reply (the reply's time plus the key's
// PTTL), later than the server ran the read: a copy would outlive its key by the reply's trip. A
// store dates it from when the read was asked for instead, which is never after the server ran
// it.
func TestTierCopyNeverOutlivesItsKey(t *testing.T) {
	addr, prefix := testenv.Valkey(t)
	stats := &tierStats{}
	c, err := valkey.NewClient(trackedOption(valkey.ClientOption{InitAddress: []string{addr}}, MinTierSize, stats))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	key := prefix + "expiring"
	if err := c.Do(ctx, c.B().Set().Key(key).Value("v").Px(time.Minute).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	// A reply as valkey-go hands it to the store: its expiry is when it was read plus the PTTL.
	reply, err := c.DoCache(ctx, c.B().Get().Key(key).Cache(), time.Hour).ToMessage()
	if err != nil {
		t.Fatal(err)
	}
	pxat := reply.CachePXAT()
	if pxat <= 0 {
		t.Fatalf("the reply carries no expiry (%d)", pxat)
	}

	// The same reply, for a read asked for 500 ms before it arrived: the server may have run it
	// at any moment since, so the copy must be gone 500 ms before pxat.
	const trip = 500 * time.Millisecond
	st := newLocalStore(1<<20, &tierStats{})
	defer st.Close(errors.New("test over"))
	if _, e := st.Flight(key, "GET", time.Hour, time.Now().Add(-trip)); e != nil {
		t.Fatal("Flight joined a load; want it to start one")
	}
	if got := st.Update(key, "GET", reply); got != pxat {
		t.Fatalf("Update returned %d, want the server's expiry %d (the entry's age is read from it)", got, pxat)
	}
	at := func(ms int64) bool {
		m, e := st.Flight(key, "GET", time.Hour, time.UnixMilli(ms))
		if e != nil {
			st.Cancel(key, "GET", errors.New("not loaded"))
			return false
		}
		return m.IsString()
	}
	if !at(pxat - trip.Milliseconds() - 100) {
		t.Fatal("the copy is not served 100 ms before its safe expiry")
	}
	if at(pxat - trip.Milliseconds() + 1) {
		t.Fatalf("the copy is served at pxat-%v+1ms: it may outlive the key", trip)
	}
}

// valkey-go matches a reply to the load of its key in flight. A load that failed while its
// request may still be on the wire (its caller gave up) leaves that reply to land in the next
// load of the key, dated from that load's start: it is handed to that load's callers but not
// kept.
func TestTierLateReplyIsNotKept(t *testing.T) {
	ctx := context.Background()
	key, reply, _ := setAndRead(t, "late", "v")
	st := newLocalStore(1<<20, &tierStats{})
	defer st.Close(errors.New("test over"))
	held := func() bool {
		m, e := st.Flight(key, "GET", time.Minute, time.Now())
		if e != nil {
			t.Fatal("a load of the key is still in flight")
		}
		if m.IsString() {
			return true
		}
		return false // Flight started a load: the caller sends the read
	}

	if held() { // the first load
		t.Fatal("a copy before any reply")
	}
	st.Cancel(key, "GET", context.Canceled) // its caller gave up; its request may be on the wire
	if held() {                             // the next load of the key
		t.Fatal("a copy after a failed load")
	}
	_, waiter := st.Flight(key, "GET", time.Minute, time.Now())
	if waiter == nil {
		t.Fatal("a second reader did not join the load in flight")
	}
	st.Update(key, "GET", reply) // the first load's late reply, matched to the second load
	if got, err := waiter.Wait(ctx); err != nil || !got.IsString() {
		t.Fatalf("the joined reader got %v, %v", got, err)
	}
	if held() {
		t.Fatal("the late reply was kept")
	}
	// The next reply is kept: here the second load's own, matched to the load held() just
	// started (a chain the count does not follow; README, Sessions), or after a quiet moment that
	// load's own.
	st.Update(key, "GET", reply)
	if !held() {
		t.Fatal("a reply after the late one was not kept")
	}
}

// A load that failed on the server's own error reply has had its reply: the next one is kept.
func TestTierServerErrorIsNotALateReply(t *testing.T) {
	ctx := context.Background()
	key, reply, c := setAndRead(t, "errored", "v")
	serverErr := c.Do(ctx, c.B().Arbitrary("NO-SUCH-COMMAND").Build()).Error()
	var verr *valkey.ValkeyError
	if !errors.As(serverErr, &verr) {
		t.Fatalf("want a server error reply, got %v", serverErr)
	}
	for _, failure := range []error{serverErr, valkey.ErrDoCacheAborted} {
		st := newLocalStore(1<<20, &tierStats{})
		if _, e := st.Flight(key, "GET", time.Minute, time.Now()); e != nil {
			t.Fatal("Flight joined a load")
		}
		st.Cancel(key, "GET", failure)
		if _, e := st.Flight(key, "GET", time.Minute, time.Now()); e != nil {
			t.Fatal("Flight joined a load")
		}
		st.Update(key, "GET", reply)
		m, e := st.Flight(key, "GET", time.Minute, time.Now())
		if e != nil || !m.IsString() {
			t.Fatalf("after %v: the next reply was not kept", failure)
		}
		st.Close(errors.New("test over"))
	}
}

// setAndRead sets a key (name under the test's prefix) to value in Valkey and returns it with a
// GET's reply, as valkey-go hands replies to the tier, and the plain client it used.
func setAndRead(t *testing.T, name, value string) (string, valkey.ValkeyMessage, valkey.Client) {
	t.Helper()
	addr, prefix := testenv.Valkey(t)
	c, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	ctx := context.Background()
	key := prefix + name
	if err := c.Do(ctx, c.B().Set().Key(key).Value(value).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	reply, err := c.Do(ctx, c.B().Get().Key(key).Build()).ToMessage()
	if err != nil {
		t.Fatal(err)
	}
	return key, reply, c
}
