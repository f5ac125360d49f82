package invalidation_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/cachecar/cachecar/invalidation"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/valkey-io/valkey-go"
)

// signallingCache passes every call to the resolver and reports each finished invalidation.
type signallingCache struct {
	*cachepolicy.Resolver
	done chan []string
}

func (c *signallingCache) Invalidate(ctx context.Context, keys, tags []string) (int, error) {
	n, err := c.Resolver.Invalidate(ctx, keys, tags)
	if err == nil {
		c.done <- keys
	}
	return n, err
}

// TestStaleSetRaceRefused forces the stale-set race on every iteration: a reader misses and
// reads version n of a row; while it holds that value, a writer commits n+1 and the listener
// deletes the key; only then does the reader try to fill. Without the lease, version n would sit
// in Valkey until its TTL, stale. The fill must be refused every time.
func TestStaleSetRaceRefused(t *testing.T) {
	iterations := 1000
	if testing.Short() {
		iterations = 100
	}
	ctx := context.Background()
	url := testenv.PostgresURL(t)
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if _, err := pool.Exec(ctx, `CREATE TABLE courses (id bigint PRIMARY KEY, tenant_id bigint NOT NULL, version int NOT NULL);
		INSERT INTO courses VALUES (1, 1, 1);`+invalidation.BookkeepingSQL); err != nil {
		t.Fatal(err)
	}
	addr, prefix := testenv.Valkey(t)
	policy, err := cachepolicy.NewPolicy("course", "course:{id}", []string{"id"}, 10*time.Minute, `^[1-9][0-9]{0,18}$`,
		"SELECT row_to_json(c)::text FROM courses c WHERE c.id = $1", "")
	if err != nil {
		t.Fatal(err)
	}
	policy.Invalidated = true
	spec := invalidation.Spec{Channel: "race_" + testenv.Suffix(), MaxRows: 100, Rules: []invalidation.Rule{{
		Policy: "course", Table: "courses", Columns: []string{"id"},
		Target: func(v []string) (string, bool, bool) { return prefix + policy.Key.Render(v[0]), false, true },
	}}}
	if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { _, err := invalidation.Install(ctx, tx, spec); return err }); err != nil {
		t.Fatal(err)
	}

	reg := prometheus.NewRegistry()
	m := cachepolicy.NewMetrics(reg)
	store := cachepolicy.NewStore(cachepolicy.StoreOptions{Addrs: []string{addr}, Timeout: time.Second, DialTimeout: time.Second, ReconnectMax: time.Second}, zerolog.Nop(), m)
	if err := store.Connect(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(store.Close)
	res := cachepolicy.New(cachepolicy.Options{Namespace: prefix, QueryTimeout: 5 * time.Second, Invalidation: true,
		Policies: []*cachepolicy.Policy{policy}}, store, cachepolicy.NewPG(pool), zerolog.Nop(), m)
	cache := &signallingCache{Resolver: res, done: make(chan []string, 16)}
	l := invalidation.New(invalidation.Options{URL: url, ConnectTimeout: 2 * time.Second, ReconnectMax: time.Second,
		PingInterval: 5 * time.Second, CacheTimeout: time.Second, ResyncTimeout: 10 * time.Second},
		spec, cache, zerolog.Nop(), prometheus.NewRegistry())
	lctx, stop := context.WithCancel(ctx)
	stopped := make(chan struct{})
	go func() { l.Run(lctx); close(stopped) }()
	t.Cleanup(func() { stop(); <-stopped })
	deadline := time.Now().Add(10 * time.Second)
	for !res.Live() {
		if time.Now().After(deadline) {
			t.Fatal("listener not live")
		}
		time.Sleep(5 * time.Millisecond)
	}
	raw, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(raw.Close)
	key := prefix + "course:1"

	write := func() {
		t.Helper()
		if _, err := pool.Exec(ctx, "UPDATE courses SET version = version + 1 WHERE id = 1"); err != nil {
			t.Fatal(err)
		}
		select {
		case keys := <-cache.done:
			if len(keys) != 1 || keys[0] != key {
				t.Fatalf("invalidated %v, want [%s]", keys, key)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("no invalidation within 5s")
		}
	}
	version := func(body []byte) int {
		t.Helper()
		var v struct{ Version int }
		if err := json.Unmarshal(body, &v); err != nil {
			t.Fatalf("body %q: %v", body, err)
		}
		return v.Version
	}

	for i := range iterations {
		write() // the key is empty now, and PostgreSQL holds version n
		readDone, proceed := make(chan []byte), make(chan struct{})
		type result struct {
			r   cachepolicy.Result
			err error
		}
		out := make(chan result, 1)
		go func() {
			r, err := res.GetFunc(ctx, policy, []string{"1"}, func(lctx context.Context) ([]byte, error) {
				var b []byte
				err := pool.QueryRow(lctx, policy.SQL, int64(1)).Scan(&b)
				readDone <- b
				<-proceed // hold the value read while the write and its invalidation pass
				return b, err
			})
			out <- result{r, err}
		}()
		old := <-readDone
		write() // version n+1 committed, and the key (with the reader's lease) deleted
		close(proceed)
		got := <-out
		if got.err != nil || got.r.Cache != cachepolicy.Miss || version(got.r.Body) != version(old) {
			t.Fatalf("iteration %d: reader got %q %s %v, want its own read %q as a MISS", i, got.r.Body, got.r.Cache, got.err, old)
		}
		cached, err := raw.Do(ctx, raw.B().Get().Key(key).Build()).AsBytes()
		if err == nil {
			t.Fatalf("iteration %d: Valkey holds %q after the invalidation; the stale fill of version %d landed", i, cached, version(old))
		}
		if !valkey.IsValkeyNil(err) {
			t.Fatal(err)
		}
		// The next read sees the new version and caches it.
		r, err := res.Get(ctx, policy, []string{"1"}, int64(1))
		if err != nil || version(r.Body) != version(old)+1 {
			t.Fatalf("iteration %d: next read %q %v, want version %d", i, r.Body, err, version(old)+1)
		}
		if r, err := res.Get(ctx, policy, []string{"1"}, int64(1)); err != nil || r.Cache != cachepolicy.Hit {
			t.Fatalf("iteration %d: third read %s %v, want a HIT", i, r.Cache, err)
		}
	}
	// Every forced race was refused by the lease check, not avoided some other way.
	refused := counter(t, reg, "cachecar_cache_fills_refused_total")
	t.Logf("%d forced stale-set races, %v fills refused, 0 stale values cached", iterations, refused)
	if refused != float64(iterations) {
		t.Fatalf("fills refused = %v, want %d", refused, iterations)
	}
}

// counter sums the values of a counter family in reg.
func counter(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}
