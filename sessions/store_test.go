package sessions

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"
	"github.com/valkey-io/valkey-go"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// tz is a TimeZone far from UTC: connect-pg-simple's expire is a timestamp without time zone,
// written and compared in the connection's TimeZone, and must work there too.
const tz = "Pacific/Auckland"

type fixture struct {
	url   string // the schema's URL, TimeZone included
	db    *pgxpool.Pool
	redis *testenv.Redis
	raw   valkey.Client
	store *Store
	reg   *prometheus.Registry
	stop  func()
}

// newFixture is a schema with connect-pg-simple's table and cachecar's session state, a
// throwaway redis-server, and a running store over both.
func newFixture(t *testing.T, tweak func(*Options)) *fixture {
	t.Helper()
	url := testenv.WithParam(testenv.PostgresURL(t), "timezone", tz)
	db, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(db.Close)
	if _, err := db.Exec(context.Background(), StateSQL+";"+TableSQL("", "session")+";"+NotifySQL("", "session")); err != nil {
		t.Fatal(err)
	}
	r := testenv.StartRedis(t)
	raw, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{r.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(raw.Close)
	f := &fixture{url: url, db: db, redis: r, raw: raw}
	f.store, f.reg, f.stop = f.start(t, tweak)
	// Valkey reconciled and trusted (with ReadPostgres, only reachable: it is never trusted).
	deadline := time.Now().Add(10 * time.Second)
	for !(f.store.up.Load() && (f.store.trusted.Load() || f.store.opts.ReadPostgres)) {
		if time.Now().After(deadline) {
			t.Fatal("the store never trusted Valkey")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return f
}

// start runs a store (a sidecar's) over the fixture's servers.
func (f *fixture) start(t *testing.T, tweak func(*Options)) (*Store, *prometheus.Registry, func()) {
	t.Helper()
	opts := Options{Prefix: "sess:", SentinelKey: "cachecar:sessions:epoch", TTL: 7 * 24 * time.Hour, Table: TableName("", "session"),
		MaxBody: 64 << 10, Timeout: 300 * time.Millisecond, RefreshInterval: 50 * time.Millisecond, PruneInterval: time.Hour, DeleteUnknown: true}
	// Every store keeps tracked copies, as cachecar does by default (sessions.tier_max_bytes),
	// unless tweak sets Local to nil.
	local := cachepolicy.NewLocalCopies(cachepolicy.MinTierSize)
	opts.Local = local
	// And copies of PostgreSQL's answers, unless tweak sets PostgresCopies to 0.
	opts.PostgresCopies = 32 << 20
	if tweak != nil {
		tweak(&opts)
	}
	addr := f.redis.Addr
	dial := func() (valkey.Client, error) {
		o := valkey.ClientOption{InitAddress: []string{addr}, DisableCache: true}
		if opts.Local != nil {
			o = local.Option(o)
		}
		return valkey.NewClient(o)
	}
	reg := prometheus.NewRegistry()
	s := New(opts, dial, f.db, zerolog.Nop(), reg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	var once sync.Once
	stop := func() { once.Do(func() { cancel(); <-done; s.Close() }) }
	t.Cleanup(stop)
	return s, reg, stop
}

func (f *fixture) waitActive(t *testing.T, want string) {
	t.Helper()
	waitActive(t, f.store, want)
}

// waitActive waits up to 10 s until s serves reads from want.
func waitActive(t *testing.T, s *Store, want string) {
	t.Helper()
	waitState(t, "the store answering reads", s.Active, want)
}

// waitState waits up to 10 s until get returns want.
func waitState(t *testing.T, what string, get func() string, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for get() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %q, want %q", what, get(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func body(user string, expires time.Time) []byte {
	exp := "null"
	if !expires.IsZero() {
		exp = `"` + expires.UTC().Format("2006-01-02T15:04:05.000Z") + `"`
	}
	return []byte(fmt.Sprintf(`{"cookie":{"originalMaxAge":null,"expires":%s,"httpOnly":true,"path":"/"},"user":%q}`, exp, user))
}

func (f *fixture) put(t *testing.T, sid string, b []byte) string {
	t.Helper()
	sess, err := f.store.Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	from, err := f.store.Put(context.Background(), sid, sess)
	if err != nil {
		t.Fatalf("put %s: %v", sid, err)
	}
	return from
}

func (f *fixture) get(t *testing.T, sid string) (string, string, error) {
	t.Helper()
	b, from, err := f.store.Get(context.Background(), sid)
	return string(b), from, err
}

func (f *fixture) rawGet(t *testing.T, key string) (string, bool) {
	t.Helper()
	v, err := f.raw.Do(context.Background(), f.raw.B().Get().Key(key).Build()).ToString()
	if valkey.IsValkeyNil(err) {
		return "", false
	}
	if err != nil {
		t.Fatal(err)
	}
	return v, true
}

func TestFormatsMatchTheNodeStores(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	var zone string
	if err := f.db.QueryRow(ctx, "SHOW TimeZone").Scan(&zone); err != nil || zone != tz {
		t.Fatalf("TimeZone %q (%v), want %s", zone, err, tz)
	}
	expires := time.Now().Add(time.Hour).Truncate(time.Millisecond).Add(300 * time.Millisecond)
	b := body("ann", expires)
	if from := f.put(t, "s1", b); from != FromValkey {
		t.Fatalf("put answered by %s", from)
	}
	// Valkey: connect-redis's key, value and TTL.
	if v, ok := f.rawGet(t, "sess:s1"); !ok || v != string(b) {
		t.Fatalf("sess:s1 = %q, want the body as sent", v)
	}
	ttl, _ := f.raw.Do(ctx, f.raw.B().Ttl().Key("sess:s1").Build()).AsInt64()
	if want := int64(time.Until(expires).Seconds()) + 1; ttl < want-2 || ttl > want {
		t.Errorf("TTL %d, want about %d (rounded up)", ttl, want)
	}
	// PostgreSQL: connect-pg-simple's row, expire = ceil(expires) in the connection's TimeZone.
	var stored string
	var same bool
	err := f.db.QueryRow(ctx, `SELECT sess::text, expire = to_timestamp($2)::timestamp FROM session WHERE sid = $1`,
		"s1", (expires.UnixMilli()+999)/1000).Scan(&stored, &same)
	if err != nil || stored != string(b) || !same {
		t.Fatalf("row: %q expire-as-connect-pg-simple=%v err=%v", stored, same, err)
	}
	if got, from, err := f.get(t, "s1"); err != nil || got != string(b) || from != FromValkey {
		t.Fatalf("get: %q from %s, %v", got, from, err)
	}
	// Without cookie.expires: the configured TTL (one week).
	f.put(t, "s2", body("bob", time.Time{}))
	ttl, _ = f.raw.Do(ctx, f.raw.B().Ttl().Key("sess:s2").Build()).AsInt64()
	if ttl < 7*24*3600-5 || ttl > 7*24*3600 {
		t.Errorf("TTL without expires = %d, want one week", ttl)
	}
	// Touch moves the expiry, not the body.
	later := time.Now().Add(48 * time.Hour)
	sess, _ := f.store.Parse(body("someone else", later))
	if _, err := f.store.Touch(ctx, "s2", sess); err != nil {
		t.Fatal(err)
	}
	if v, _ := f.rawGet(t, "sess:s2"); !strings.Contains(v, `"bob"`) {
		t.Fatalf("touch rewrote the body: %s", v)
	}
	var sessText string
	f.db.QueryRow(ctx, `SELECT sess::text FROM session WHERE sid = 's2'`).Scan(&sessText)
	if !strings.Contains(sessText, `"bob"`) {
		t.Fatalf("touch rewrote the row: %s", sessText)
	}
	ttl, _ = f.raw.Do(ctx, f.raw.B().Ttl().Key("sess:s2").Build()).AsInt64()
	if ttl > 48*3600+1 || ttl < 48*3600-5 {
		t.Errorf("TTL after touch = %d, want 48 h", ttl)
	}
	if _, err := f.store.Touch(ctx, "nobody", sess); !errors.Is(err, ErrNotFound) {
		t.Errorf("touch of an absent session: %v", err)
	}
	// Destroy is idempotent and leaves nothing.
	for i := 0; i < 2; i++ {
		if _, err := f.store.Delete(ctx, "s1"); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := f.get(t, "s1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
	if _, ok := f.rawGet(t, "sess:s1"); ok {
		t.Fatal("sess:s1 survived the delete")
	}
	// A cookie that already expired destroys, as connect-redis does.
	f.put(t, "s2", body("bob", time.Now().Add(-time.Minute)))
	if _, _, err := f.get(t, "s2"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after an expired save: %v", err)
	}
}

func TestSurvivesValkeyRestartingEmpty(t *testing.T) {
	f := newFixture(t, nil)
	b := body("ann", time.Now().Add(time.Hour))
	f.put(t, "keep", b)
	f.redis.Stop()
	f.redis.Start(t) // empty: no persistence
	// Whatever the store knows yet, the session is never reported missing.
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, from, err := f.get(t, "keep")
		if err != nil || got != string(b) {
			t.Fatalf("after the restart: %q from %s, %v", got, from, err)
		}
		if from == FromValkey {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Valkey was not reconciled within 10s of coming back")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if v, ok := f.rawGet(t, "sess:keep"); !ok || v != string(b) {
		t.Fatalf("after reconciling, sess:keep = %q", v)
	}
	if n := testutil.ToFloat64(f.store.m.reconciles.WithLabelValues("ok")); n < 1 {
		t.Errorf("reconciles ok = %v", n)
	}
}

func TestValkeyDownThenBack(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	f.put(t, "a", body("v1", time.Now().Add(time.Hour)))
	f.put(t, "gone", body("old", time.Now().Add(time.Hour)))
	f.redis.Pause() // keeps its copies, answers nothing

	// The first call finds out (it may wait for the timeout); after that, no request waits on
	// Valkey: PostgreSQL serves at once.
	f.get(t, "a")
	f.waitActive(t, FromPostgres)
	for i := 0; i < 5; i++ {
		start := time.Now()
		got, from, err := f.get(t, "a")
		if err != nil || from != FromPostgres || !strings.Contains(got, `"v1"`) {
			t.Fatalf("get during the outage: %q from %s, %v", got, from, err)
		}
		if d := time.Since(start); d >= f.store.opts.Timeout {
			t.Fatalf("get during a known outage took %s: it waited on Valkey", d)
		}
	}
	// Saved and destroyed while Valkey is down: acknowledged by PostgreSQL.
	if from := f.put(t, "a", body("v2", time.Now().Add(time.Hour))); from != FromPostgres {
		t.Fatalf("put during the outage answered by %s", from)
	}
	if _, err := f.store.Delete(ctx, "gone"); err != nil {
		t.Fatal(err)
	}

	f.redis.Resume() // back with the old copies of both
	f.waitActive(t, FromValkey)
	if got, from, err := f.get(t, "a"); err != nil || from != FromValkey || !strings.Contains(got, `"v2"`) {
		t.Fatalf("after Valkey came back: %q from %s, %v; want the newer v2", got, from, err)
	}
	if _, _, err := f.get(t, "gone"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the session destroyed during the outage came back: %v", err)
	}
	if _, ok := f.rawGet(t, "sess:gone"); ok {
		t.Fatal("Valkey still holds the destroyed session's old copy")
	}
	if v, _ := f.rawGet(t, "sess:a"); !strings.Contains(v, `"v2"`) {
		t.Fatalf("Valkey holds %s, want v2", v)
	}
}

// TestOtherSidecarSeesMissedWrite: sidecar B's write misses Valkey (B found it down); sidecar A,
// which never saw the outage, must not keep trusting Valkey's old copy.
func TestOtherSidecarSeesMissedWrite(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	f.put(t, "x", body("old", time.Now().Add(time.Hour)))
	b, _, _ := f.start(t, nil)
	deadline := time.Now().Add(10 * time.Second)
	for b.Active() != FromValkey {
		if time.Now().After(deadline) {
			t.Fatal("second store never trusted Valkey")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// B alone loses Valkey (its breaker opens), then destroys the session.
	b.markDown("test", errors.New("partitioned"))
	if _, err := b.Delete(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	// A reads Valkey's copy at most until its next refresh, then never again.
	time.Sleep(3 * f.store.opts.RefreshInterval)
	deadline = time.Now().Add(10 * time.Second)
	for {
		if _, _, err := f.get(t, "x"); errors.Is(err, ErrNotFound) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the other sidecar still serves the destroyed session")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, ok := f.rawGet(t, "sess:x"); ok {
		f.waitActive(t, FromValkey)
		if _, ok := f.rawGet(t, "sess:x"); ok {
			t.Fatal("reconciliation left the destroyed session in Valkey")
		}
	}
}

func TestExpiredNeverServed(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	f.put(t, "short", body("brief", time.Now().Add(1500*time.Millisecond)))
	time.Sleep(2500 * time.Millisecond)
	if _, _, err := f.get(t, "short"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("expired session from Valkey: %v", err)
	}
	// A row that expired (written by an app, never in Valkey) is not served by PostgreSQL.
	if _, err := f.db.Exec(ctx, `INSERT INTO session (sid, sess, expire) VALUES ('old', '{"cookie":{}}', to_timestamp($1))`,
		time.Now().Add(-time.Second).Unix()); err != nil {
		t.Fatal(err)
	}
	f.redis.Pause()
	f.get(t, "old")
	f.waitActive(t, FromPostgres)
	if _, from, err := f.get(t, "old"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("expired row served from %s: %v", from, err)
	}
	if _, err := f.store.Touch(ctx, "old", Session{}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("touch revived an expired row: %v", err)
	}
	f.redis.Resume()
}

func TestReconcileDeletesUnknownSessions(t *testing.T) {
	for _, deleteUnknown := range []bool{true, false} {
		t.Run(fmt.Sprint("delete_unknown=", deleteUnknown), func(t *testing.T) {
			f := newFixture(t, func(o *Options) { o.DeleteUnknown = deleteUnknown })
			ctx := context.Background()
			f.put(t, "known", body("k", time.Now().Add(time.Hour)))
			// A Valkey restored from an old snapshot: a session PostgreSQL no longer has, and a
			// sentinel from another epoch.
			f.raw.Do(ctx, f.raw.B().Set().Key("sess:ghost").Value(`{"cookie":{}}`).Build())
			f.raw.Do(ctx, f.raw.B().Set().Key("cachecar:sessions:epoch").Value("from-an-old-snapshot").Build())
			time.Sleep(2 * f.store.opts.RefreshInterval)
			f.waitActive(t, FromValkey)
			_, ok := f.rawGet(t, "sess:ghost")
			if ok == deleteUnknown {
				t.Fatalf("ghost present=%v with delete_unknown=%v", ok, deleteUnknown)
			}
			if _, ok := f.rawGet(t, "sess:known"); !ok {
				t.Fatal("the reconciliation deleted a known session")
			}
		})
	}
}

// The case the put-back is for, in real time: connect-redis's TTL (whole seconds from the write,
// rounded up) makes the key run out before connect-pg-simple's expire (cookie.expires rounded up
// to the second) whenever cookie.expires lies just past a whole second. A touch in between finds
// the key gone and the row alive; it puts the key back, and the epoch stays.
func TestTouchAtTheEndOfASessionKeepsTrust(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.RefreshInterval = time.Hour })
	ctx := context.Background()
	for attempt := range 3 { // a machine that stalls past the window gets another go
		sid := fmt.Sprintf("ending-%d", attempt)
		// Start just after a whole second (20 to 100 ms: the key's TTL is then 2 s, where the
		// first millisecond would round it up to 3), so that the key runs out early in the
		// second before the row does and the window between them is most of a second.
		for ns := time.Now().Nanosecond(); ns < 20*int(time.Millisecond) || ns > 100*int(time.Millisecond); ns = time.Now().Nanosecond() {
			time.Sleep(time.Millisecond)
		}
		putAt := time.Now()
		whole := putAt.Truncate(time.Second).Add(2 * time.Second)
		b := body("ending", whole.Add(time.Millisecond)) // the row's expire: whole + 1 s
		f.put(t, sid, b)
		keyGone := whole.Add(time.Duration(putAt.Nanosecond())) // the key's TTL is 2 s from the put
		before := f.epoch(t)
		sess, err := f.store.Parse(body("ignored", time.Now().Add(time.Hour)))
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Until(keyGone.Add(150 * time.Millisecond)))
		if _, ok := f.rawGet(t, "sess:"+sid); ok || time.Now().After(whole.Add(850*time.Millisecond)) {
			t.Logf("attempt %d missed the window (key present %v)", attempt, ok)
			continue
		}
		from, err := f.store.Touch(ctx, sid, sess)
		if errors.Is(err, ErrNotFound) && time.Now().After(whole.Add(time.Second)) {
			t.Logf("attempt %d: the touch ran after the row's end", attempt)
			continue
		}
		if err != nil || from != FromValkey {
			t.Fatalf("touch in the session's last second: from %s, %v; want Valkey", from, err)
		}
		if f.epoch(t) != before {
			t.Fatal("a touch in the session's last second moved the epoch")
		}
		if got, from, err := f.get(t, sid); err != nil || got != string(b) || from != FromValkey {
			t.Fatalf("read after the touch: %q from %s, %v; want the session from Valkey", got, from, err)
		}
		return
	}
	t.Fatal("three attempts missed the second between the key's end and the row's")
}

// A reconciliation that deletes the keys PostgreSQL does not know must not delete the key of a
// write still between its Valkey step and its COMMIT (a new session: its row is not visible
// yet). It waits for that write's lock, sees the committed row, and keeps the key; otherwise
// Valkey would be trusted without an acknowledged session.
func TestDeleteUnknownSparesAWriteInFlight(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.RefreshInterval = time.Hour })
	ctx := context.Background()
	sid := "in-flight"
	b := body("new", time.Now().Add(time.Hour))
	// The write, as write runs it: its lock, its row, Valkey, and the COMMIT still to come.
	writer, err := f.db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Rollback(ctx)
	if _, err := writer.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`, f.store.opts.SentinelKey+"|"+sid); err != nil {
		t.Fatal(err)
	}
	if _, err := writer.Exec(ctx, `INSERT INTO `+f.store.opts.Table+` (sess, expire, sid) VALUES ($1::json, now() + interval '1 hour', $2)`, string(b), sid); err != nil {
		t.Fatal(err)
	}
	if err := f.raw.Do(ctx, f.raw.B().Set().Key("sess:"+sid).Value(string(b)).Ex(time.Hour).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	conn, err := f.db.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	var pid uint32
	if err := conn.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := f.store.deleteUnknown(ctx, f.store.client(), conn)
		done <- result{n, err}
	}()
	// Commit only once the reconciliation's connection waits for the write's lock.
	eventually := time.Now().Add(10 * time.Second)
	for {
		var waiting bool
		if err := f.db.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'advisory')`, pid).Scan(&waiting); err != nil {
			t.Fatal(err)
		}
		if waiting {
			break
		}
		select {
		case r := <-done:
			t.Fatalf("the delete of unknown keys did not wait for the write in flight: deleted %d, %v", r.n, r.err)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(eventually) {
			t.Fatal("the delete of unknown keys never waited for the write's lock")
		}
	}
	if err := writer.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	var r result
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the delete of unknown keys did not finish after the write committed")
	}
	if r.err != nil {
		t.Fatal(r.err)
	}
	if got, ok := f.rawGet(t, "sess:"+sid); !ok || got != string(b) {
		t.Fatalf("the key of the committed write after the delete of unknown keys: %q (present %v); want it kept (deleted %d)", got, ok, r.n)
	}
}

func TestPruneOneSidecarAtATime(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	if _, err := f.db.Exec(ctx, `INSERT INTO session (sid, sess, expire)
		SELECT 'e' || i, '{}', to_timestamp($1) FROM generate_series(1, 200) i`, time.Now().Add(-time.Minute).Unix()); err != nil {
		t.Fatal(err)
	}
	f.put(t, "alive", body("a", time.Now().Add(time.Hour)))
	other, otherReg, _ := f.start(t, nil)
	var wg sync.WaitGroup
	for _, s := range []*Store{f.store, other} {
		wg.Add(1)
		go func() { defer wg.Done(); s.prune(ctx) }()
	}
	wg.Wait()
	var left, alive int
	f.db.QueryRow(ctx, `SELECT count(*) FILTER (WHERE sid LIKE 'e%'), count(*) FILTER (WHERE sid = 'alive') FROM session`).Scan(&left, &alive)
	if left != 0 || alive != 1 {
		t.Fatalf("after pruning: %d expired rows left, alive %d", left, alive)
	}
	a := testutil.ToFloat64(f.store.m.pruned)
	b := testutil.ToFloat64(other.m.pruned)
	if a+b != 200 {
		t.Fatalf("pruned %v + %v rows, want 200 in all", a, b)
	}
	_ = otherReg
}

// TestRestartFromSnapshotNotTrusted: Valkey saves a snapshot, then takes writes that all
// succeed (the epoch does not move), then restarts from the snapshot: old copies and the old
// sentinel come back. The new run id must keep it from being trusted until reconciled.
func TestRestartFromSnapshotNotTrusted(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	f.put(t, "logout", body("old", time.Now().Add(time.Hour)))
	f.put(t, "changed", body("v1", time.Now().Add(time.Hour)))
	if err := f.raw.Do(ctx, f.raw.B().Save().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.store.Delete(ctx, "logout"); err != nil {
		t.Fatal(err)
	}
	f.put(t, "changed", body("v2", time.Now().Add(time.Hour)))
	f.put(t, "created", body("new", time.Now().Add(time.Hour)))
	f.redis.Stop()
	time.Sleep(4 * f.store.opts.RefreshInterval)
	f.redis.Start(t) // loads the snapshot
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, from, err := f.get(t, "logout"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("the destroyed session came back from the snapshot (from %s, %v)", from, err)
		}
		if got, from, _ := f.get(t, "changed"); !strings.Contains(got, `"v2"`) {
			t.Fatalf("changed = %s from %s, want v2", got, from)
		}
		if _, from, err := f.get(t, "created"); err != nil {
			t.Fatalf("created lost (from %s): %v", from, err)
		}
		if f.store.Active() == FromValkey {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Valkey not trusted again within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, ok := f.rawGet(t, "sess:logout"); ok {
		t.Fatal("the reconciliation left the snapshot's copy of the destroyed session")
	}
}

// TestTouchWhileDownIsKept: a touch that Valkey missed must not let the key expire there while
// PostgreSQL keeps the session alive.
func TestTouchWhileDownIsKept(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	f.put(t, "t", body("kept", time.Now().Add(2*time.Second)))
	f.redis.Pause()
	f.get(t, "t")
	f.waitActive(t, FromPostgres)
	sess, _ := f.store.Parse(body("ignored", time.Now().Add(time.Hour)))
	if _, err := f.store.Touch(ctx, "t", sess); err != nil {
		t.Fatal(err)
	}
	f.redis.Resume()
	time.Sleep(2500 * time.Millisecond) // past the old TTL
	f.waitActive(t, FromValkey)
	if got, from, err := f.get(t, "t"); err != nil || !strings.Contains(got, `"kept"`) {
		t.Fatalf("touched session after Valkey came back: %q from %s, %v", got, from, err)
	}
}

// While migrating from connect-redis, a session connect-redis wrote lives in Valkey only; a touch
// through cachecar must find it there and move its TTL, as connect-redis's own touch would.
func TestTouchConnectRedisSession(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.DeleteUnknown = false; o.ValkeyOnly = true })
	ctx := context.Background()
	b := body("node", time.Now().Add(time.Hour))
	if err := f.raw.Do(ctx, f.raw.B().Set().Key("sess:cr").Value(string(b)).ExSeconds(3600).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	later, err := f.store.Parse(body("ignored", time.Now().Add(30*time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.store.Touch(ctx, "cr", later); err != nil {
		t.Fatalf("touch of a session connect-redis wrote: %v", err)
	}
	ttl, _ := f.raw.Do(ctx, f.raw.B().Ttl().Key("sess:cr").Build()).AsInt64()
	if ttl < 30*3600-10 || ttl > 30*3600 {
		t.Fatalf("TTL after the touch %d s, want about %d", ttl, 30*3600)
	}
	if v, _ := f.rawGet(t, "sess:cr"); v != string(b) {
		t.Fatalf("the touch rewrote the body: %s", v)
	}
	if _, err := f.store.Touch(ctx, "absent", later); !errors.Is(err, ErrNotFound) {
		t.Fatalf("touch of an absent session: %v, want ErrNotFound", err)
	}
}

// A write that Valkey does not agree with moves the epoch; the sidecar that made it must stop
// trusting Valkey before it acknowledges the write, not at its next check: its next read must not
// report the live session missing. (Here Valkey lost the key and the write's Valkey step reports
// that it could not make Valkey agree, as a touch does when its key was rewritten meanwhile.)
func TestMissedWriteStopsTrustAtOnce(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.RefreshInterval = time.Hour }) // no check until the test is over
	ctx := context.Background()
	b := body("kept", time.Now().Add(time.Hour))
	f.put(t, "lost", b)
	if err := f.raw.Do(ctx, f.raw.B().Del().Key("sess:lost").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	before := f.epoch(t)
	from, err := f.store.write(ctx, "touch", "lost", false, pgStep{
		sql:  `UPDATE ` + f.store.opts.Table + ` SET expire = expire WHERE sid = $1`,
		args: []any{"lost"},
	}, func(context.Context, valkey.Client) (bool, error) { return false, nil })
	if err != nil || from != FromPostgres {
		t.Fatalf("write Valkey disagreed with: from %s, %v; want PostgreSQL", from, err)
	}
	if f.epoch(t) == before {
		t.Fatal("a write Valkey missed left the epoch where it was")
	}
	got, from, err := f.get(t, "lost")
	if err != nil || got != string(b) || from != FromPostgres {
		t.Fatalf("read right after the write: %q from %s, %v; want the session from PostgreSQL", got, from, err)
	}
}

// A touch of a session PostgreSQL has alive and Valkey does not (its key ran out a moment before
// the row, the stores rounding expiry differently; here it is deleted) puts PostgreSQL's copy
// back with the new TTL. It is not a missed write: the epoch stays, and no sidecar stops trusting
// Valkey until a reconciliation has copied every session.
func TestTouchPutsBackWhatValkeyLost(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.RefreshInterval = time.Hour })
	ctx := context.Background()
	b := body("kept", time.Now().Add(time.Minute))
	f.put(t, "gone", b)
	if err := f.raw.Do(ctx, f.raw.B().Del().Key("sess:gone").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	before := f.epoch(t)
	sess, err := f.store.Parse(body("ignored", time.Now().Add(2*time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	if from, err := f.store.Touch(ctx, "gone", sess); err != nil || from != FromValkey {
		t.Fatalf("touch with the key gone from Valkey: from %s, %v; want Valkey (put back)", from, err)
	}
	if got, ok := f.rawGet(t, "sess:gone"); !ok || got != string(b) {
		t.Fatalf("Valkey after the touch: %q (present %v); want the stored bytes %q", got, ok, b)
	}
	ttl, err := f.raw.Do(ctx, f.raw.B().Ttl().Key("sess:gone").Build()).AsInt64()
	if err != nil || ttl < 7190 || ttl > 7200 {
		t.Fatalf("TTL after the touch: %d, %v; want the touch's, about 7200 s", ttl, err)
	}
	if f.epoch(t) != before {
		t.Fatal("the touch moved the epoch: every sidecar would stop trusting Valkey until a reconciliation")
	}
	if n := testutil.ToFloat64(f.store.m.restored); n != 1 {
		t.Fatalf("cachecar_session_restored_total %v, want 1", n)
	}
	if got, from, err := f.get(t, "gone"); err != nil || got != string(b) || from != FromValkey {
		t.Fatalf("read after the touch: %q from %s, %v; want the session from Valkey", got, from, err)
	}
}

// A check that read the epoch before a missed write committed must not trust Valkey after it.
func TestTrustSinceRefusesAfterMissedWrite(t *testing.T) {
	s := New(Options{}, nil, nil, zerolog.Nop(), prometheus.NewRegistry())
	gen := s.trustGen()
	s.distrust() // a write that missed Valkey commits while the check runs
	if s.trustSince(gen) || s.trusted.Load() {
		t.Fatal("a check begun before a missed write trusted Valkey after it")
	}
	if !s.trustSince(s.trustGen()) || !s.trusted.Load() {
		t.Fatal("a check begun after it did not trust Valkey")
	}
}

// While migrating from connect-redis, Valkey decides: a touch of a session connect-redis
// destroyed is a 404 (not a missed write that leaves sessions unreadable until a reconciliation),
// and a touch of a session Valkey alone may hold, with Valkey down, is unavailable, not a 404.
func TestTouchConnectRedisLogoutAndOutage(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.DeleteUnknown = false; o.ValkeyOnly = true; o.RefreshInterval = time.Hour })
	ctx := context.Background()
	f.put(t, "out", body("gone-soon", time.Now().Add(time.Hour)))
	if err := f.raw.Do(ctx, f.raw.B().Del().Key("sess:out").Build()).Error(); err != nil { // connect-redis's destroy
		t.Fatal(err)
	}
	later, err := f.store.Parse(body("ignored", time.Now().Add(2*time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.store.Touch(ctx, "out", later); !errors.Is(err, ErrNotFound) {
		t.Fatalf("touch after a connect-redis logout: %v, want ErrNotFound", err)
	}
	if f.store.Active() != FromValkey {
		t.Fatalf("after the touch the store answers from %s: the touch was taken for a missed write", f.store.Active())
	}
	if _, _, err := f.get(t, "out"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("read after a connect-redis logout: %v, want ErrNotFound", err)
	}

	if err := f.raw.Do(ctx, f.raw.B().Set().Key("sess:only").Value(string(body("node", time.Now().Add(time.Hour)))).ExSeconds(3600).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	f.redis.Stop()
	if _, err := f.store.Touch(ctx, "only", later); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("touch of a Valkey-only session with Valkey down: %v, want ErrUnavailable", err)
	}
}

// epoch is the sessions' epoch in PostgreSQL.
func (f *fixture) epoch(t *testing.T) string {
	t.Helper()
	var e string
	if err := f.db.QueryRow(context.Background(), `SELECT epoch FROM cachecar_session_state WHERE store = $1`,
		f.store.opts.SentinelKey).Scan(&e); err != nil {
		t.Fatal(err)
	}
	return e
}

// Pruning leaves rows locked right now (a reconciliation's copy batch, a write) for its next
// turn instead of waiting for them, so it can neither deadlock with a copy nor hang behind one.
func TestPruneSkipsLockedRows(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	if _, err := f.db.Exec(ctx, `INSERT INTO session (sid, sess, expire)
		SELECT 'x' || i, '{}', to_timestamp($1) FROM generate_series(1, 10) i`, time.Now().Add(-time.Minute).Unix()); err != nil {
		t.Fatal(err)
	}
	tx, err := f.db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `SELECT sid FROM session WHERE sid = 'x1' FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { f.store.prune(ctx); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("pruning waited for a locked row")
	}
	left := func() (n int) {
		f.db.QueryRow(ctx, `SELECT count(*) FROM session WHERE sid LIKE 'x%'`).Scan(&n)
		return n
	}
	if n := left(); n != 1 {
		t.Fatalf("%d expired rows left after pruning, want only the locked one", n)
	}
	tx.Rollback(ctx)
	f.store.prune(ctx)
	if n := left(); n != 0 {
		t.Fatalf("%d expired rows left once unlocked", n)
	}
}

// Ending a migration from connect-redis: PostgreSQL never learned what connect-redis did. While a
// sidecar runs with ValkeyOnly, the others keep Valkey as the source of truth too; once none has
// for MigrationStale, one syncs PostgreSQL from Valkey, so that a reconciliation after that (a
// Valkey restarted empty) brings back neither a session connect-redis destroyed nor loses one it
// created.
func TestEndOfConnectRedisMigrationSyncsPostgres(t *testing.T) {
	const stale = 300 * time.Millisecond
	f := newFixture(t, func(o *Options) {
		o.ValkeyOnly, o.DeleteUnknown, o.MigrationStale = true, false, stale
	})
	ctx := context.Background()
	exp := time.Now().Add(time.Hour)
	kept, destroyed := string(body("kept", exp)), string(body("destroyed", exp))
	changed, created := string(body("changed", exp)), string(body("created", exp))
	f.put(t, "kept", []byte(kept))
	f.put(t, "destroyed", []byte(destroyed))
	f.put(t, "changed", []byte(body("before", exp)))
	// connect-redis, in Valkey alone: a login, a logout, a change.
	for _, cmd := range []valkey.Completed{
		f.raw.B().Set().Key("sess:created").Value(created).ExSeconds(3600).Build(),
		f.raw.B().Del().Key("sess:destroyed").Build(),
		f.raw.B().Set().Key("sess:changed").Value(changed).ExSeconds(3600).Build(),
	} {
		if err := f.raw.Do(ctx, cmd).Error(); err != nil {
			t.Fatal(err)
		}
	}
	flag := func() (n int) {
		f.db.QueryRow(ctx, `SELECT count(*) FROM cachecar_session_state WHERE store = 'cachecar:sessions:epoch|migrating:connect-redis'`).Scan(&n)
		return n
	}
	rowsNow := func() map[string]string {
		out := map[string]string{}
		r, err := f.db.Query(ctx, `SELECT sid, sess::text FROM session WHERE expire >= now()`)
		if err != nil {
			t.Fatal(err)
		}
		for r.Next() {
			var sid, b string
			if err := r.Scan(&sid, &b); err != nil {
				t.Fatal(err)
			}
			out[sid] = b
		}
		return out
	}
	if flag() != 1 {
		t.Fatal("the sidecar migrating from connect-redis set no flag")
	}

	// A sidecar already without the migration, while one still runs with it: Valkey stays the
	// source of truth, so with Valkey down it does not answer from the destroyed session's row.
	other, _, stopOther := f.start(t, func(o *Options) { o.MigrationStale = time.Hour })
	waitActive(t, other, FromValkey)
	if !other.fromRedis.Load() {
		t.Fatal("the second sidecar did not see the migration flag")
	}
	// Valkey answers absent for the session connect-redis destroyed: no row confirms it alive.
	if _, _, err := other.Get(ctx, "destroyed"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("read of a session connect-redis destroyed, migration still running: %v, want not found", err)
	}
	f.redis.Pause()
	waitActive(t, other, FromPostgres) // it noticed Valkey is down
	if _, _, err := other.Get(ctx, "destroyed"); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("read of a session connect-redis destroyed, Valkey down, migration still running: %v, want unavailable", err)
	}
	f.redis.Resume()

	// The migrating sidecar gone, the flag not yet stale for this one: a reconciliation (a write
	// missed Valkey: the epoch moved) copies no row into Valkey and deletes no key.
	f.stop()
	waitActive(t, other, FromValkey)
	before := testutil.ToFloat64(other.m.reconciles.WithLabelValues("ok"))
	if err := pgx.BeginFunc(ctx, f.db, func(tx pgx.Tx) error { return bumpEpoch(ctx, tx, "cachecar:sessions:epoch") }); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); testutil.ToFloat64(other.m.reconciles.WithLabelValues("ok")) == before; {
		if time.Now().After(deadline) {
			t.Fatal("no reconciliation after the epoch moved")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, ok := f.rawGet(t, "sess:destroyed"); ok {
		t.Fatal("the reconciliation copied the destroyed session's row into Valkey")
	}
	if v, ok := f.rawGet(t, "sess:created"); !ok || v != created {
		t.Fatal("the reconciliation deleted the session connect-redis created")
	}
	time.Sleep(3 * stale)
	if flag() != 1 || rowsNow()["destroyed"] != destroyed {
		t.Fatal("PostgreSQL was synced before the flag was stale for this sidecar")
	}
	stopOther()

	// A sidecar for which the flag is stale: PostgreSQL is synced.
	last, _, _ := f.start(t, func(o *Options) { o.MigrationStale = stale })
	for deadline := time.Now().Add(15 * time.Second); flag() != 0; {
		if time.Now().After(deadline) {
			t.Fatal("the migration flag is still there: PostgreSQL was not synced")
		}
		time.Sleep(20 * time.Millisecond)
	}
	want := map[string]string{"kept": kept, "changed": changed, "created": created}
	if rows := rowsNow(); fmt.Sprint(rows) != fmt.Sprint(want) {
		t.Fatalf("rows after the sync:\n%v\nwant\n%v", rows, want)
	}
	var left float64
	f.db.QueryRow(ctx, `SELECT extract(epoch FROM expire::timestamptz - now()) FROM session WHERE sid = 'created'`).Scan(&left)
	if left < 3590 || left > 3610 {
		t.Fatalf("the created session's row expires in %.0f s, want its key's 3600", left)
	}
	if last.fromRedis.Load() {
		t.Fatal("the sidecar still treats Valkey as the source of truth")
	}

	// A Valkey restarted empty is reconciled from PostgreSQL, which now agrees.
	before = testutil.ToFloat64(last.m.reconciles.WithLabelValues("ok"))
	f.redis.Stop()
	f.redis.Start(t)
	for deadline := time.Now().Add(10 * time.Second); testutil.ToFloat64(last.m.reconciles.WithLabelValues("ok")) == before || last.Active() != FromValkey; {
		if time.Now().After(deadline) {
			t.Fatal("Valkey was not reconciled")
		}
		time.Sleep(10 * time.Millisecond)
	}
	for sid, b := range want {
		if got, from, err := last.Get(ctx, sid); err != nil || string(got) != b || from != FromValkey {
			t.Fatalf("%s after the restart: %q from %s, %v", sid, got, from, err)
		}
	}
	if _, _, err := last.Get(ctx, "destroyed"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("the session connect-redis destroyed came back: %v", err)
	}
}

// A sync stops, changing nothing, once what it trusted Valkey for no longer holds: the epoch moved
// (a write missed Valkey) or the sentinel is gone (Valkey restarted empty, or was flushed).
func TestSyncFromValkeyStopsWhenTrustIsLost(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	f.put(t, "a", body("a", time.Now().Add(time.Hour)))
	if err := f.raw.Do(ctx, f.raw.B().Del().Key("sess:a").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	var epoch string
	if err := f.db.QueryRow(ctx, `SELECT epoch FROM cachecar_session_state WHERE store = 'cachecar:sessions:epoch'`).Scan(&epoch); err != nil {
		t.Fatal(err)
	}
	token := *f.store.token.Load()
	runID := strings.TrimPrefix(token, epoch+"|")
	f.stop() // no reconciliation of its own meanwhile; the sync reads Valkey through f.raw
	vk := f.raw
	setSentinel := func(v string) {
		if err := f.raw.Do(ctx, f.raw.B().Set().Key("cachecar:sessions:epoch").Value(v).Build()).Error(); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		name  string
		tr    trusted
		setup func()
	}{
		{"sentinel of another epoch", trusted{epoch: "older", runID: runID}, nil},
		{"another server", trusted{epoch: epoch, runID: "other"}, nil},
		// The sentinel still as trusted, but a write missed Valkey: the epoch moved.
		{"epoch moved", trusted{epoch: epoch, runID: runID}, func() {
			if _, err := f.db.Exec(ctx, `UPDATE cachecar_session_state SET epoch = 'moved' WHERE store = 'cachecar:sessions:epoch'`); err != nil {
				t.Fatal(err)
			}
		}},
		// The sentinel and the epoch as trusted, but another server answers (a failover to a
		// replica that had the same sentinel).
		{"run id changed", trusted{epoch: "moved", runID: "other"}, func() { setSentinel("moved|other") }},
		// Valkey flushed: the sentinel is gone with everything else.
		{"sentinel gone", trusted{epoch: "moved", runID: runID}, func() {
			if err := f.raw.Do(ctx, f.raw.B().Del().Key("cachecar:sessions:epoch").Build()).Error(); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		name, tr := c.name, c.tr
		if c.setup != nil {
			c.setup()
		}
		if _, err := f.db.Exec(ctx, `INSERT INTO cachecar_session_state (store, epoch) VALUES ('cachecar:sessions:epoch|migrating:connect-redis', '1')
			ON CONFLICT (store) DO UPDATE SET epoch = '1'`); err != nil {
			t.Fatal(err)
		}
		if err := f.store.syncFromValkey(ctx, vk, 1, tr); !errors.Is(err, errTrustLost) {
			t.Fatalf("%s: sync returned %v, want errTrustLost", name, err)
		}
		var n int
		f.db.QueryRow(ctx, `SELECT count(*) FROM session WHERE sid = 'a'`).Scan(&n)
		if n != 1 {
			t.Fatalf("%s: the sync deleted a row though Valkey was not trusted", name)
		}
	}
}

// Before the flag could be read, Valkey is the source of truth: a sidecar that starts during a
// migration from connect-redis must not answer from a row first.
func TestFlagUnknownUntilRead(t *testing.T) {
	f := newFixture(t, nil)
	s := New(f.store.opts, func() (valkey.Client, error) { return nil, errors.New("not dialled") }, f.db, zerolog.Nop(), prometheus.NewRegistry())
	if !s.valkeyOnly() {
		t.Fatal("a store that has not read the flag takes PostgreSQL as the truth")
	}
	// A read before Run's first check reads the flag itself: there is none, so PostgreSQL
	// answers (Valkey is not connected).
	b := string(body("ann", time.Now().Add(time.Hour)))
	f.put(t, "early", []byte(b))
	if got, from, err := s.Get(context.Background(), "early"); err != nil || string(got) != b || from != FromPostgres {
		t.Fatalf("read before the first check: %q from %s, %v", got, from, err)
	}
	if s.valkeyOnly() {
		t.Fatal("no flag, and Valkey is still the only truth")
	}
}

// A trusted Valkey holds every live session, but a key can go without a write: evicted under
// memory pressure (here: deleted behind the store's back, as an eviction does), or run out a
// moment before its row. PostgreSQL confirms an absent answer, so the session is not lost.
// While migrating from connect-redis, Valkey is the source of truth and its absent answer stands.
func TestEvictedSessionServedFromPostgres(t *testing.T) {
	for _, valkeyOnly := range []bool{false, true} {
		t.Run(fmt.Sprintf("valkeyOnly=%v", valkeyOnly), func(t *testing.T) {
			f := newFixture(t, func(o *Options) {
				o.ValkeyOnly = valkeyOnly
				o.DeleteUnknown = !valkeyOnly
			})
			ctx := context.Background()
			b := string(body("ann", time.Now().Add(time.Hour)))
			f.put(t, "ev", []byte(b))
			if got, from, err := f.get(t, "ev"); err != nil || got != b || from != FromValkey {
				t.Fatalf("read before the eviction: %q from %s, %v", got, from, err)
			}
			if err := f.raw.Do(ctx, f.raw.B().Del().Key("sess:ev").Build()).Error(); err != nil {
				t.Fatal(err)
			}
			missing := func() float64 { return testutil.ToFloat64(f.store.m.missing) }
			deadline := time.Now().Add(time.Second) // the copy goes with Valkey's invalidation
			for {
				got, from, err := f.get(t, "ev")
				if valkeyOnly {
					if errors.Is(err, ErrNotFound) {
						break
					}
				} else {
					if err != nil {
						t.Fatalf("read after the eviction: %q from %s, %v", got, from, err)
					}
					if from == FromPostgres {
						if got != b {
							t.Fatalf("read after the eviction: %q from PostgreSQL, want %q", got, b)
						}
						break
					}
				}
				if time.Now().After(deadline) {
					t.Fatalf("still %q from %s (%v) a second after the eviction", got, from, err)
				}
				time.Sleep(5 * time.Millisecond)
			}
			if want := map[bool]float64{false: 1, true: 0}[valkeyOnly]; missing() != want {
				t.Fatalf("cachecar_session_valkey_missing_total %v, want %v", missing(), want)
			}
			// A session that never was: absent in both, and not counted.
			if _, from, err := f.get(t, "never"); !errors.Is(err, ErrNotFound) || from != FromValkey {
				t.Fatalf("read of an unknown session: from %s, %v", from, err)
			}
			if want := map[bool]float64{false: 1, true: 0}[valkeyOnly]; missing() != want {
				t.Fatalf("an unknown session counted as missing (%v)", missing())
			}
		})
	}
}

// Keys under the session prefix that are not sessions (not a string, no TTL, not a JSON object)
// are skipped: the sync still ends the migration.
func TestSyncSkipsKeysThatAreNotSessions(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	good := string(body("good", time.Now().Add(time.Hour)))
	for _, cmd := range []valkey.Completed{
		f.raw.B().Set().Key("sess:good").Value(good).ExSeconds(3600).Build(),
		f.raw.B().Hset().Key("sess:hash").FieldValue().FieldValue("a", "b").Build(),
		f.raw.B().Set().Key("sess:forever").Value(`{"cookie":{}}`).Build(),
		f.raw.B().Set().Key("sess:text").Value("not json").ExSeconds(3600).Build(),
	} {
		if err := f.raw.Do(ctx, cmd).Error(); err != nil {
			t.Fatal(err)
		}
	}
	var epoch string
	if err := f.db.QueryRow(ctx, `SELECT epoch FROM cachecar_session_state WHERE store = 'cachecar:sessions:epoch'`).Scan(&epoch); err != nil {
		t.Fatal(err)
	}
	runID := strings.TrimPrefix(*f.store.token.Load(), epoch+"|")
	f.stop()
	if _, err := f.db.Exec(ctx, `INSERT INTO cachecar_session_state (store, epoch) VALUES ('cachecar:sessions:epoch|migrating:connect-redis', '1')`); err != nil {
		t.Fatal(err)
	}
	if err := f.store.syncFromValkey(ctx, f.raw, 1, trusted{epoch: epoch, runID: runID}); err != nil {
		t.Fatalf("sync: %v", err)
	}
	var flags int
	f.db.QueryRow(ctx, `SELECT count(*) FROM cachecar_session_state WHERE store LIKE '%migrating%'`).Scan(&flags)
	if flags != 0 {
		t.Fatal("the flag is still there")
	}
	var sids []string
	r, err := f.db.Query(ctx, `SELECT sid FROM session ORDER BY sid`)
	if err != nil {
		t.Fatal(err)
	}
	if sids, err = pgx.CollectRows(r, pgx.RowTo[string]); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(sids) != "[good]" {
		t.Fatalf("rows after the sync: %v, want [good]", sids)
	}
}

// TestTouchOutcomes: a touch of an unknown session answers ErrNotFound and is counted as
// not_found, not ok; a touch that found the session is ok.
func TestTouchOutcomes(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	f.waitActive(t, FromValkey)
	sess, _ := f.store.Parse(body("x", time.Now().Add(time.Hour)))
	count := func(outcome string) float64 {
		return testutil.ToFloat64(f.store.m.ops.WithLabelValues("touch", FromValkey, outcome)) +
			testutil.ToFloat64(f.store.m.ops.WithLabelValues("touch", FromPostgres, outcome))
	}
	if _, err := f.store.Touch(ctx, "never-existed", sess); !errors.Is(err, ErrNotFound) {
		t.Fatalf("touch of an unknown session: %v, want ErrNotFound", err)
	}
	if ok, nf := count("ok"), count("not_found"); ok != 0 || nf != 1 {
		t.Fatalf("after a touch of an unknown session: ok %v, not_found %v; want 0 and 1", ok, nf)
	}
	f.put(t, "known", body("y", time.Now().Add(time.Hour)))
	if _, err := f.store.Touch(ctx, "known", sess); err != nil {
		t.Fatal(err)
	}
	if ok, nf := count("ok"), count("not_found"); ok != 1 || nf != 1 {
		t.Fatalf("after a touch of a known session: ok %v, not_found %v; want 1 and 1", ok, nf)
	}
}

// TestDatabaseBreaker: with the database breaker open (PostgreSQL failed repeatedly, here or on
// the read path), session writes and PostgreSQL reads fail at once with ErrUnavailable and send
// nothing; and the store's own failures to reach PostgreSQL open it.
func TestDatabaseBreaker(t *testing.T) {
	ctx := context.Background()
	br := &cachepolicy.Breaker{Threshold: 2, MinOpen: time.Hour, MaxOpen: time.Hour}
	f := newFixture(t, func(o *Options) { o.DB = br })
	f.put(t, "kept", body("v1", time.Now().Add(time.Hour)))
	br.Failure()
	br.Failure()
	if br.State() != cachepolicy.CircuitOpen {
		t.Fatalf("breaker state %d after two failures, want open", br.State())
	}
	sess, _ := f.store.Parse(body("v2", time.Now().Add(time.Hour)))
	if _, err := f.store.Put(ctx, "kept", sess); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("put with the circuit open: %v, want ErrUnavailable", err)
	}
	if _, err := f.store.Delete(ctx, "kept"); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("delete with the circuit open: %v, want ErrUnavailable", err)
	}
	var row string
	if err := f.db.QueryRow(ctx, `SELECT sess::text FROM session WHERE sid = 'kept'`).Scan(&row); err != nil || !strings.Contains(row, `"v1"`) {
		t.Fatalf("row after refused writes: %q, %v; want v1 untouched", row, err)
	}
	if _, _, err := f.store.getPostgres(ctx, "kept"); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("PostgreSQL read with the circuit open: %v, want ErrUnavailable", err)
	}

	// A store whose PostgreSQL refuses connections opens its breaker after Threshold writes.
	dead, err := pgxpool.New(ctx, "postgres://nobody@127.0.0.1:1/none?connect_timeout=1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dead.Close)
	br2 := &cachepolicy.Breaker{Threshold: 2, MinOpen: time.Hour, MaxOpen: time.Hour}
	opts := f.store.opts
	opts.DB, opts.Local, opts.PostgresCopies = br2, nil, 0
	s := New(opts, func() (valkey.Client, error) { return nil, errors.New("no valkey in this test") }, dead, zerolog.Nop(), prometheus.NewRegistry())
	t.Cleanup(s.Close)
	for i := range 2 {
		if _, err := s.Put(ctx, fmt.Sprintf("d%d", i), sess); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("put %d to a dead PostgreSQL: %v, want ErrUnavailable", i, err)
		}
	}
	if br2.State() != cachepolicy.CircuitOpen {
		t.Fatalf("breaker state %d after two failed writes, want open", br2.State())
	}
	if _, err := s.Put(ctx, "d2", sess); !errors.Is(err, errCircuitOpen) {
		t.Fatalf("put after the breaker opened: %v, want the circuit-open error", err)
	}
}
