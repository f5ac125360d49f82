package cachepolicy

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/valkey-io/valkey-go"
)

// countingLoader counts the queries that reach PostgreSQL.
type countingLoader struct {
	Loader
	one, many atomic.Int64
}

func (c *countingLoader) LoadOne(ctx context.Context, sql string, args ...any) ([]byte, error) {
	c.one.Add(1)
	return c.Loader.LoadOne(ctx, sql, args...)
}

func (c *countingLoader) LoadMany(ctx context.Context, sql string, ids []int64) (map[int64][]byte, error) {
	c.many.Add(1)
	return c.Loader.LoadMany(ctx, sql, ids)
}

// itemsDB creates table items (id, body) in the test's schema with rows 1..5.
func itemsDB(t *testing.T) *pgxpool.Pool {
	t.Helper()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, testenv.PostgresURL(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	_, err = pool.Exec(ctx, `CREATE TABLE items (id bigint PRIMARY KEY, body text);
		INSERT INTO items SELECT i, json_build_object('id', i, 'name', 'item ' || i)::text FROM generate_series(1, 5) i`)
	if err != nil {
		t.Fatal(err)
	}
	return pool
}

func itemPolicy(t *testing.T, sql string) *Policy {
	t.Helper()
	if sql == "" {
		sql = "SELECT body FROM items WHERE id = $1"
	}
	p, err := NewPolicy("item", "item:{id}", []string{"id"}, time.Minute, `^[1-9][0-9]{0,18}$`, sql,
		"SELECT id, body FROM items WHERE id = ANY($1)")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

type fixture struct {
	res    *Resolver
	store  *Store
	loader *countingLoader
	prefix string
	raw    valkey.Client
}

func newFixture(t *testing.T, pool *pgxpool.Pool, addr, prefix string, timeout time.Duration) *fixture {
	t.Helper()
	m := NewMetrics(prometheus.NewRegistry())
	store := NewStore(StoreOptions{Addrs: []string{addr}, Timeout: timeout, DialTimeout: time.Second, ReconnectMax: 200 * time.Millisecond},
		zerolog.Nop(), m)
	t.Cleanup(store.Close)
	if err := store.Connect(); err != nil {
		t.Fatal(err)
	}
	loader := &countingLoader{Loader: NewPG(pool)}
	raw, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(raw.Close)
	res := New(Options{Namespace: prefix, QueryTimeout: 2 * time.Second}, store, loader, zerolog.Nop(), m)
	return &fixture{res: res, store: store, loader: loader, prefix: prefix, raw: raw}
}

func TestMissThenHitStoresPostgresBytes(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	p := itemPolicy(t, "")
	ctx := context.Background()

	first, err := f.res.Get(ctx, p, []string{"3"}, int64(3))
	if err != nil {
		t.Fatal(err)
	}
	if first.Cache != Miss {
		t.Fatalf("first read: X-Cache %s, want MISS", first.Cache)
	}
	want := `{"id" : 3, "name" : "item 3"}`
	if string(first.Body) != want {
		t.Fatalf("body %q, want PostgreSQL's text %q", first.Body, want)
	}
	stored, err := f.raw.Do(ctx, f.raw.B().Get().Key(prefix+"item:3").Build()).AsBytes()
	if err != nil {
		t.Fatalf("key %sitem:3 not in Valkey: %v", prefix, err)
	}
	if !bytes.Equal(stored, first.Body) {
		t.Fatalf("Valkey holds %q, want the bytes served %q", stored, first.Body)
	}
	ttl, _ := f.raw.Do(ctx, f.raw.B().Pttl().Key(prefix+"item:3").Build()).AsInt64()
	if want := p.ttlFor(prefix + "item:3"); ttl <= 0 || ttl > want.Milliseconds() || want < 54*time.Second || want > 66*time.Second {
		t.Fatalf("PTTL %d ms, want within the key's TTL %s (the policy's 1m ±10%%)", ttl, want)
	}
	second, err := f.res.Get(ctx, p, []string{"3"}, int64(3))
	if err != nil {
		t.Fatal(err)
	}
	if second.Cache != Hit || !bytes.Equal(second.Body, first.Body) {
		t.Fatalf("second read: %s %q, want HIT with identical bytes", second.Cache, second.Body)
	}
	if n := f.loader.one.Load(); n != 1 {
		t.Fatalf("%d queries, want 1", n)
	}
}

func TestAgeComesFromRemainingTTL(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	p := itemPolicy(t, "")
	ctx := context.Background()
	// An entry filled 42 s ago has its TTL (the minute with this key's jitter) less 42 s left.
	f.raw.Do(ctx, f.raw.B().Set().Key(prefix+"item:1").Value(`{"id":1}`).Px(p.ttlFor(prefix+"item:1")-42*time.Second).Build())
	r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
	if err != nil {
		t.Fatal(err)
	}
	if r.Cache != Hit || r.Age < 41*time.Second || r.Age > 43*time.Second {
		t.Fatalf("got %s age %v, want HIT age about 42s", r.Cache, r.Age)
	}
}

func TestNotFoundIsNotCached(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	p := itemPolicy(t, "")
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		if _, err := f.res.Get(ctx, p, []string{"99"}, int64(99)); !errors.Is(err, ErrNotFound) {
			t.Fatalf("read %d: err %v, want ErrNotFound", i, err)
		}
	}
	// NULL from the loader is "not found" too.
	pool.Exec(ctx, "INSERT INTO items VALUES (7, NULL)")
	if _, err := f.res.Get(ctx, p, []string{"7"}, int64(7)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("NULL row: err %v, want ErrNotFound", err)
	}
	if n, _ := f.raw.Do(ctx, f.raw.B().Exists().Key(prefix+"item:99", prefix+"item:7").Build()).AsInt64(); n != 0 {
		t.Fatalf("%d not-found entries cached, want none", n)
	}
}

func TestConcurrentMissesCostOneQuery(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	// The load sleeps so that every reader arrives while it runs.
	p := itemPolicy(t, "SELECT body FROM items, pg_sleep(0.3) WHERE id = $1")
	const readers = 64
	var wg sync.WaitGroup
	bodies := make([][]byte, readers)
	errs := make([]error, readers)
	start := make(chan struct{})
	for i := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			r, err := f.res.Get(context.Background(), p, []string{"2"}, int64(2))
			bodies[i], errs[i] = r.Body, err
		}()
	}
	close(start)
	wg.Wait()
	for i := range readers {
		if errs[i] != nil {
			t.Fatalf("reader %d: %v", i, errs[i])
		}
		if !bytes.Equal(bodies[i], bodies[0]) {
			t.Fatalf("reader %d got %q, reader 0 %q", i, bodies[i], bodies[0])
		}
	}
	if n := f.loader.one.Load(); n != 1 {
		t.Fatalf("%d concurrent misses ran %d queries, want 1", readers, n)
	}
}

func TestCallerCancelDoesNotFailOthers(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	p := itemPolicy(t, "SELECT body FROM items, pg_sleep(0.3) WHERE id = $1")
	ctx, cancel := context.WithCancel(context.Background())
	firstErr := make(chan error, 1)
	go func() {
		_, err := f.res.Get(ctx, p, []string{"4"}, int64(4))
		firstErr <- err
	}()
	time.Sleep(50 * time.Millisecond)
	second := make(chan error, 1)
	go func() {
		_, err := f.res.Get(context.Background(), p, []string{"4"}, int64(4))
		second <- err
	}()
	time.Sleep(50 * time.Millisecond)
	cancel()
	if err := <-firstErr; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled caller: err %v, want context.Canceled", err)
	}
	if err := <-second; err != nil {
		t.Fatalf("the other caller failed with the first one's cancellation: %v", err)
	}
}

func TestGetManyOneMGetOneQuery(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	p := itemPolicy(t, "")
	ctx := context.Background()
	if _, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); err != nil { // item 1 cached
		t.Fatal(err)
	}
	items, state, err := f.res.GetMany(ctx, p, []int64{1, 2, 3, 404})
	if err != nil {
		t.Fatal(err)
	}
	if state.Cache != Miss {
		t.Fatalf("state %s, want MISS (2, 3 and 404 were not cached)", state.Cache)
	}
	if f.loader.many.Load() != 1 {
		t.Fatalf("%d batch queries, want 1", f.loader.many.Load())
	}
	for i, id := range []int64{1, 2, 3} {
		if items[i].ID != id || items[i].Body == nil {
			t.Fatalf("item %d: %+v", i, items[i])
		}
	}
	if items[3].ID != 404 || items[3].Body != nil {
		t.Fatalf("item 404: %+v, want not found", items[3])
	}
	items2, state, err := f.res.GetMany(ctx, p, []int64{3, 2, 1})
	if err != nil {
		t.Fatal(err)
	}
	if state.Cache != Hit || f.loader.many.Load() != 1 {
		t.Fatalf("second batch: state %s after %d queries, want HIT with no new query", state.Cache, f.loader.many.Load())
	}
	if !bytes.Equal(items2[0].Body, items[2].Body) {
		t.Fatalf("cached batch entry differs: %q vs %q", items2[0].Body, items[2].Body)
	}
}

func TestValkeyKilledReadsGoToPostgres(t *testing.T) {
	pool := itemsDB(t)
	srv := testenv.StartRedis(t)
	f := newFixture(t, pool, srv.Addr, "", 200*time.Millisecond)
	p := itemPolicy(t, "")
	ctx := context.Background()
	if r, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); err != nil || r.Cache != Miss {
		t.Fatalf("before the fault: %v %v", r.Cache, err)
	}

	srv.Stop()
	for i := 0; i < 5; i++ {
		r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
		if err != nil {
			t.Fatalf("read %d with Valkey down failed: %v", i, err)
		}
		if r.Cache != Bypass || string(r.Body) != `{"id" : 1, "name" : "item 1"}` {
			t.Fatalf("read %d with Valkey down: %s %q, want BYPASS from PostgreSQL", i, r.Cache, r.Body)
		}
	}
	items, state, err := f.res.GetMany(ctx, p, []int64{1, 2})
	if err != nil || state.Cache != Bypass || items[1].Body == nil {
		t.Fatalf("batch with Valkey down: %v %v %+v", state.Cache, err, items)
	}
	if f.store.Up() {
		t.Fatal("store reports up while Valkey is down")
	}
	if err := f.store.Ping(ctx); err == nil {
		t.Fatal("ping succeeded with Valkey down")
	}

	srv.Start(t) // empty: the kill lost everything
	deadline := time.Now().Add(10 * time.Second)
	for {
		r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
		if err != nil {
			t.Fatal(err)
		}
		if r.Cache == Hit {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no HIT within 10s of Valkey coming back (last %s)", r.Cache)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !f.store.Up() {
		t.Fatal("store reports down after Valkey came back")
	}
}

// TestValkeyKilledFailsFast: a read on a connection Valkey dropped goes to PostgreSQL at once,
// not after valkey.timeout. valkey-go retries a read-only command on a broken connection, with
// back-off, until its deadline: every read in flight when Valkey died (before the breaker opens)
// would wait out the whole timeout. The timeout here is long enough to tell the two apart on a
// loaded machine.
func TestValkeyKilledFailsFast(t *testing.T) {
	const timeout = 4 * time.Second
	pool := itemsDB(t)
	srv := testenv.StartRedis(t)
	f := newFixture(t, pool, srv.Addr, "", timeout)
	p := itemPolicy(t, "")
	ctx := context.Background()
	if r, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); err != nil || r.Cache != Miss {
		t.Fatalf("before the fault: %v %v", r.Cache, err)
	}
	srv.Stop()
	start := time.Now()
	r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
	took := time.Since(start)
	if err != nil || r.Cache != Bypass {
		t.Fatalf("read with Valkey killed: %v %v, want BYPASS", r.Cache, err)
	}
	if took > timeout/2 {
		t.Fatalf("read with Valkey killed took %s: it waited on Valkey (timeout %s) instead of failing over", took, timeout)
	}
}

func TestValkeyUnreachableAtStartThenReconnects(t *testing.T) {
	pool := itemsDB(t)
	addr := testenv.ClosedAddr(t)
	m := NewMetrics(prometheus.NewRegistry())
	store := NewStore(StoreOptions{Addrs: []string{addr}, Timeout: 200 * time.Millisecond, DialTimeout: 200 * time.Millisecond,
		ReconnectMax: 100 * time.Millisecond}, zerolog.Nop(), m)
	defer store.Close()
	if err := store.Connect(); err == nil {
		t.Fatal("connect to a closed port succeeded")
	}
	res := New(Options{QueryTimeout: time.Second}, store, NewPG(pool), zerolog.Nop(), m)
	p := itemPolicy(t, "")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { store.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	r, err := res.Get(ctx, p, []string{"5"}, int64(5))
	if err != nil || r.Cache != Bypass {
		t.Fatalf("with no Valkey: %s %v, want BYPASS", r.Cache, err)
	}
	// Bring a server up on that very address; Run must find it.
	testenv.StartRedisAt(t, addr)
	deadline := time.Now().Add(10 * time.Second)
	for {
		r, err := res.Get(ctx, p, []string{"5"}, int64(5))
		if err != nil {
			t.Fatal(err)
		}
		if r.Cache == Hit {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no HIT within 10s of Valkey appearing (last %s)", r.Cache)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestDatabaseDownAndTimeout(t *testing.T) {
	addr, prefix := testenv.Valkey(t)
	ctx := context.Background()
	downPool, err := pgxpool.New(ctx, "postgres://cachecar:x@"+testenv.ClosedAddr(t)+"/none?sslmode=disable&connect_timeout=1")
	if err != nil {
		t.Fatal(err)
	}
	defer downPool.Close()
	f := newFixture(t, downPool, addr, prefix, time.Second)
	p := itemPolicy(t, "")
	if _, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("database down, nothing cached: err %v, want ErrUnavailable", err)
	}
	// Cached entries keep being served while the database is down.
	f.raw.Do(ctx, f.raw.B().Set().Key(prefix+"item:1").Value(`{"id":1}`).Px(time.Minute).Build())
	if r, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); err != nil || r.Cache != Hit {
		t.Fatalf("database down, entry cached: %s %v, want HIT", r.Cache, err)
	}
	if _, _, err := f.res.GetMany(ctx, p, []int64{1, 2}); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("batch with a miss and the database down: err %v, want ErrUnavailable", err)
	}

	pool := itemsDB(t)
	slow := newFixture(t, pool, addr, prefix, time.Second)
	slow.res.opts.QueryTimeout = 100 * time.Millisecond
	sp := itemPolicy(t, "SELECT body FROM items, pg_sleep(3) WHERE id = $1")
	start := time.Now()
	if _, err := slow.res.Get(ctx, sp, []string{"2"}, int64(2)); !errors.Is(err, ErrTimeout) {
		t.Fatalf("slow query: err %v, want ErrTimeout", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("slow query took %v to give up, want about the 100ms timeout", d)
	}
}
