package sessions

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"
)

// startPostgresOnly runs a store without Valkey (sessions on PostgreSQL alone) over the
// fixture's database.
func (f *fixture) startPostgresOnly(t *testing.T, tweak func(*Options)) (*Store, *prometheus.Registry) {
	t.Helper()
	opts := postgresOnlyOptions()
	if tweak != nil {
		tweak(&opts)
	}
	reg := prometheus.NewRegistry()
	s := New(opts, nil, f.db, zerolog.Nop(), reg)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return s, reg
}

// postgresOnlyOptions are a store's options without Valkey, keeping copies of PostgreSQL's
// answers.
func postgresOnlyOptions() Options {
	return Options{Prefix: "sess:", SentinelKey: "cachecar:sessions:epoch", TTL: 7 * 24 * time.Hour, Table: TableName("", "session"),
		MaxBody: 64 << 10, Timeout: 300 * time.Millisecond, RefreshInterval: 50 * time.Millisecond, PruneInterval: time.Hour,
		DeleteUnknown: true, PostgresCopies: 32 << 20}
}

// newPostgresOnly is a fixture whose own store is stopped, and one store without Valkey over its
// database, keeping copies.
func newPostgresOnly(t *testing.T) (*fixture, *Store) {
	t.Helper()
	f := newFixture(t, nil)
	f.stop()
	a, _ := f.startPostgresOnly(t, nil)
	waitCopies(t, a, "up")
	return f, a
}

// waitCopies waits up to 10 s until s's copies of PostgreSQL's answers are want ("up",
// "standby", "down").
func waitCopies(t *testing.T, s *Store, want string) {
	t.Helper()
	waitState(t, "postgres copies", s.PostgresCopies, want)
}

func putVia(t *testing.T, s *Store, sid string, b []byte) {
	t.Helper()
	sess, err := s.Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Put(context.Background(), sid, sess); err != nil {
		t.Fatalf("put %s: %v", sid, err)
	}
}

// readUntil reads sid through s until ok accepts the answer, for at most within, and fails
// the test otherwise. After ok accepted one, the next reads must be accepted too: an old
// answer must not come back.
func readUntil(t *testing.T, s *Store, sid string, within time.Duration, what string, ok func(body string, err error) bool) {
	t.Helper()
	start := time.Now()
	for {
		b, _, err := s.Get(context.Background(), sid)
		if ok(string(b), err) {
			break
		}
		if time.Since(start) > within {
			t.Fatalf("%s: still %q, %v after %s", what, b, err, within)
		}
		time.Sleep(2 * time.Millisecond)
	}
	for i := 0; i < 20; i++ {
		if b, _, err := s.Get(context.Background(), sid); !ok(string(b), err) {
			t.Fatalf("%s: answered %q, %v again after the change was seen", what, b, err)
		}
	}
}

// TestPostgresCopiesFollowEveryWriter: reads PostgreSQL serves are answered from copies, and a
// change to a row by any writer (another sidecar, connect-pg-simple's statements, psql) is seen
// within a second; a destroyed session does not come back from a copy.
func TestPostgresCopiesFollowEveryWriter(t *testing.T) {
	f := newFixture(t, nil)
	f.stop() // the fixture's store is not used: two sidecars without Valkey
	a, regA := f.startPostgresOnly(t, nil)
	b, _ := f.startPostgresOnly(t, nil)
	waitCopies(t, a, "up")
	waitCopies(t, b, "up")
	ctx := context.Background()
	exp := time.Now().Add(time.Hour)
	putVia(t, b, "s1", body("v1", exp))
	// The first reads may overlap the notification of b's write and keep no copy; after that,
	// every read is answered from the copy.
	readUntil(t, a, "s1", time.Second, "a copy kept", func(string, error) bool { return testutil.ToFloat64(a.m.pgLocal) > 0 })
	before := testutil.ToFloat64(a.m.pgLocal)
	for i := 0; i < 10; i++ {
		if got, from, err := a.Get(ctx, "s1"); err != nil || from != FromPostgres || !strings.Contains(string(got), `"v1"`) {
			t.Fatalf("read %d: %q from %s, %v", i, got, from, err)
		}
	}
	if n := testutil.ToFloat64(a.m.pgLocal) - before; n != 10 {
		t.Fatalf("%v of 10 reads answered from the copy", n)
	}
	is := func(user string) func(string, error) bool {
		return func(b string, err error) bool { return err == nil && strings.Contains(b, `"user":"`+user+`"`) }
	}
	gone := func(_ string, err error) bool { return errors.Is(err, ErrNotFound) }

	// Another sidecar's write.
	putVia(t, b, "s1", body("v2", exp))
	readUntil(t, a, "s1", time.Second, "after another sidecar's write", is("v2"))
	// connect-pg-simple's upsert, run by hand.
	if _, err := f.db.Exec(ctx, `INSERT INTO session (sess, expire, sid) SELECT $1, to_timestamp($2), $3
		ON CONFLICT (sid) DO UPDATE SET sess = $1, expire = to_timestamp($2) RETURNING sid`,
		string(body("v3", exp)), exp.Unix(), "s1"); err != nil {
		t.Fatal(err)
	}
	readUntil(t, a, "s1", time.Second, "after connect-pg-simple's upsert", is("v3"))
	// connect-pg-simple's destroy (logout).
	if _, err := f.db.Exec(ctx, `DELETE FROM session WHERE sid = $1`, "s1"); err != nil {
		t.Fatal(err)
	}
	readUntil(t, a, "s1", time.Second, "after connect-pg-simple's destroy", gone)
	// A statement over many rows (more sids than a notification holds: a whole-table message),
	// and TRUNCATE.
	for i := 0; i < 3; i++ {
		putVia(t, b, "many"+string(rune('a'+i)), body("m", exp))
		if _, _, err := a.Get(ctx, "many"+string(rune('a'+i))); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.db.Exec(ctx, `INSERT INTO session (sid, sess, expire) SELECT 'filler-' || g || repeat('x', 200), '{}', now() + interval '1 hour' FROM generate_series(1, 100) g`); err != nil {
		t.Fatal(err)
	}
	if _, err := f.db.Exec(ctx, `UPDATE session SET sess = '{"user":"bulk"}'`); err != nil {
		t.Fatal(err)
	}
	readUntil(t, a, "manya", time.Second, "after an UPDATE of every row", is("bulk"))
	if _, err := f.db.Exec(ctx, `TRUNCATE session`); err != nil {
		t.Fatal(err)
	}
	readUntil(t, a, "manyb", time.Second, "after TRUNCATE", gone)
	if n, err := testutil.GatherAndCount(regA, "cachecar_session_postgres_local_reads_total"); err != nil || n != 1 {
		t.Fatalf("metric cachecar_session_postgres_local_reads_total: %d series, %v", n, err)
	}
}

// TestPostgresCopiesDroppedWithTheirConnection: a copy is not served once the LISTEN
// connection that keeps it correct is gone (a change then would go unnoticed), and copies come
// back with the connection.
func TestPostgresCopiesDroppedWithTheirConnection(t *testing.T) {
	f, a := newPostgresOnly(t)
	ctx := context.Background()
	exp := time.Now().Add(time.Hour)
	putVia(t, a, "c1", body("v1", exp))
	if _, _, err := a.Get(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	// End the LISTEN connection (the only store running is this test's).
	var n int
	if err := f.db.QueryRow(ctx, `SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
		WHERE application_name = 'cachecar-session-copies' AND datname = current_database()`).Scan(&n); err != nil || n == 0 {
		t.Fatalf("terminate the LISTEN connection: %d, %v", n, err)
	}
	waitCopies(t, a, "down")
	before := testutil.ToFloat64(a.m.pgLocal)
	if _, err := f.db.Exec(ctx, `UPDATE session SET sess = '{"user":"changed-while-deaf"}' WHERE sid = 'c1'`); err != nil {
		t.Fatal(err)
	}
	if got, _, err := a.Get(ctx, "c1"); err != nil || !strings.Contains(string(got), "changed-while-deaf") {
		t.Fatalf("with the LISTEN connection gone: %q, %v", got, err)
	}
	if testutil.ToFloat64(a.m.pgLocal) != before {
		t.Fatal("a copy was served without its LISTEN connection")
	}
	waitCopies(t, a, "up")
	a.Get(ctx, "c1")
	if got, _, err := a.Get(ctx, "c1"); err != nil || !strings.Contains(string(got), "changed-while-deaf") || testutil.ToFloat64(a.m.pgLocal) == before {
		t.Fatalf("copies after the connection came back: %q, %v, copy reads %v (before %v)", got, err, testutil.ToFloat64(a.m.pgLocal), before)
	}
}

// TestPostgresCopiesNeedTheTriggers: without the session table's notify triggers (migrate not
// run, or one disabled), no copy is kept, and reads still work.
func TestPostgresCopiesNeedTheTriggers(t *testing.T) {
	f := newFixture(t, nil)
	f.stop()
	ctx := context.Background()
	if _, err := f.db.Exec(ctx, `ALTER TABLE session DISABLE TRIGGER cachecar_session_notify_del`); err != nil {
		t.Fatal(err)
	}
	a, _ := f.startPostgresOnly(t, nil)
	putVia(t, a, "t1", body("v1", time.Now().Add(time.Hour)))
	time.Sleep(300 * time.Millisecond) // the check ran
	for i := 0; i < 3; i++ {
		if got, _, err := a.Get(ctx, "t1"); err != nil || !strings.Contains(string(got), `"v1"`) {
			t.Fatalf("read without triggers: %q, %v", got, err)
		}
	}
	if a.PostgresCopies() != "down" || testutil.ToFloat64(a.m.pgLocal) != 0 {
		t.Fatalf("copies %q, copy reads %v, with a trigger disabled", a.PostgresCopies(), testutil.ToFloat64(a.m.pgLocal))
	}
	// Enabled again, copies start within the listener's back-off.
	if _, err := f.db.Exec(ctx, `ALTER TABLE session ENABLE ALWAYS TRIGGER cachecar_session_notify_del`); err != nil {
		t.Fatal(err)
	}
	waitCopies(t, a, "up")
	// Disabled while live: the periodic check stops the copies.
	if _, err := f.db.Exec(ctx, `ALTER TABLE session DISABLE TRIGGER cachecar_session_notify_upd`); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(copiesCheckInterval + 3*time.Second)
	for a.PostgresCopies() != "down" {
		if time.Now().After(deadline) {
			t.Fatal("copies still kept after a trigger was disabled")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestPostgresCopyOfOwnWrite: this process's own write drops its copy before it is
// acknowledged, without waiting for the notification (no listener runs here: only the write
// path can drop it).
func TestPostgresCopyOfOwnWrite(t *testing.T) {
	f := newFixture(t, nil)
	f.stop()
	s := New(postgresOnlyOptions(), nil, f.db, zerolog.Nop(), prometheus.NewRegistry())
	// As if the listener listened, armed, and had its probes back, but it hears nothing.
	s.pg.setLive(true)
	s.pg.setArmed(true)
	s.pg.provenAt(time.Now().Add(time.Hour))
	ctx := context.Background()
	exp := time.Now().Add(time.Hour)
	putVia(t, s, "o1", body("v1", exp))
	s.Get(ctx, "o1")
	if _, _, err := s.Get(ctx, "o1"); err != nil || testutil.ToFloat64(s.m.pgLocal) != 1 {
		t.Fatalf("second read not from the copy: %v, copy reads %v", err, testutil.ToFloat64(s.m.pgLocal))
	}
	putVia(t, s, "o1", body("v2", exp))
	if got, _, err := s.Get(ctx, "o1"); err != nil || !strings.Contains(string(got), `"v2"`) {
		t.Fatalf("after its own write: %q, %v", got, err)
	}
	if _, err := s.Delete(ctx, "o1"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Get(ctx, "o1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after its own destroy: %v", err)
	}
	// A copy is never served past its row's expire (whole seconds, as the query compares).
	putVia(t, s, "o2", body("v", time.Now().Add(3*time.Second)))
	s.Get(ctx, "o2")
	if _, _, err := s.Get(ctx, "o2"); err != nil {
		t.Fatal(err)
	}
	later := time.Now().Add(5 * time.Second)
	s.now = func() time.Time { return later }
	if _, _, err := s.Get(ctx, "o2"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("past the row's expire: %v", err)
	}
	s.now = time.Now
}

// TestPostgresCopiesKeepNoOverlappedRead: a read that overlapped a change of its session, a
// drop of every copy or a break of the LISTEN connection keeps no copy; the bound holds.
func TestPostgresCopiesKeepNoOverlappedRead(t *testing.T) {
	c := newPGCopies(1 << 20)
	live := func() { c.setLive(true); c.setArmed(true); c.provenAt(time.Now().Add(time.Hour)) }
	live()
	now := time.Now().Unix()
	exp := float64(now + 60)
	keep := func(sid string, between func()) bool {
		tok := c.begin(sid)
		between()
		c.end(sid, tok, []byte(`{}`), exp, true)
		_, ok := c.get(sid, now)
		return ok
	}
	if !keep("a", func() {}) {
		t.Fatal("a read alone kept no copy")
	}
	if keep("b", func() { c.forget("b") }) {
		t.Fatal("kept a read its session changed during")
	}
	if !keep("c", func() { c.forget("other") }) {
		t.Fatal("another session's change dropped this read")
	}
	if keep("d", c.reset) {
		t.Fatal("kept a read that overlapped a drop of every copy")
	}
	if keep("e", func() { c.setLive(false); live() }) {
		t.Fatal("kept a read that overlapped a break of the LISTEN connection")
	}
	if keep("e2", func() { c.setArmed(false); c.setArmed(true) }) {
		t.Fatal("kept a read that overlapped a disarm (writers stopped notifying)")
	}
	// Two overlapping reads: the change between them stops both.
	t1 := c.begin("f")
	c.forget("f")
	t2 := c.begin("f")
	c.end("f", t1, []byte(`{"old":1}`), exp, true)
	if _, ok := c.get("f", now); ok {
		t.Fatal("kept the read from before the change")
	}
	c.end("f", t2, []byte(`{"new":1}`), exp, true)
	if b, ok := c.get("f", now); ok && string(b) != `{"new":1}` {
		t.Fatalf("kept %s", b)
	}
	if len(c.reads) != 0 {
		t.Fatalf("%d reads still registered", len(c.reads))
	}
	// Not live: nothing served, nothing kept.
	c.setLive(false)
	if keep("g", func() {}) {
		t.Fatal("kept a copy while not live")
	}
	// The bound, under concurrent fills.
	live()
	big := make([]byte, 10<<10)
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				sid := string(rune('A'+w)) + strings.Repeat("x", i%50) + string(rune('0'+i%10))
				c.end(sid, c.begin(sid), big, exp, true)
			}
		}()
	}
	wg.Wait()
	if n, b := c.stats(); b > 1<<20 || n == 0 {
		t.Fatalf("%d copies in %d bytes, bound %d", n, b, 1<<20)
	}
	// An expired copy is not served.
	c.end("h", c.begin("h"), []byte(`{}`), float64(now-1), true)
	if _, ok := c.get("h", now); ok {
		t.Fatal("served an expired copy")
	}
	// Nor a copy whose connection has not proven delivery lately (no probe back).
	c.end("i", c.begin("i"), []byte(`{}`), exp, true)
	if _, ok := c.get("i", now); !ok {
		t.Fatal("no copy kept")
	}
	c.proven = time.Now().Add(-copiesFresh - time.Millisecond)
	if _, ok := c.get("i", now); ok {
		t.Fatal("served a copy without a recent probe back")
	}
}

// TestPostgresCopiesStopWhenTheConnectionFallsSilent: a LISTEN connection that silently stops
// delivering (a partition, a half-open connection after a failover) delivers no probe either:
// copies stop answering within copiesFresh, so a session another writer destroyed meanwhile is
// not served from one, and the connection is given up.
func TestPostgresCopiesStopWhenTheConnectionFallsSilent(t *testing.T) {
	f := newFixture(t, nil)
	f.stop()
	u, err := url.Parse(f.url)
	if err != nil {
		t.Fatal(err)
	}
	proxy := testenv.StartProxy(t, u.Host)
	u.Host = proxy.Addr()
	a, _ := f.startPostgresOnly(t, func(o *Options) {
		o.Listen = func(ctx context.Context) (*pgx.Conn, error) { return pgx.Connect(ctx, u.String()) }
	})
	waitCopies(t, a, "up")
	if proxy.Conns() != 1 {
		t.Fatalf("%d connections through the proxy, want the LISTEN connection only", proxy.Conns())
	}
	ctx := context.Background()
	putVia(t, a, "p1", body("v1", time.Now().Add(time.Hour)))
	readUntil(t, a, "p1", time.Second, "a copy kept", func(string, error) bool { return testutil.ToFloat64(a.m.pgLocal) > 0 })
	proxy.Blackhole()
	if _, err := f.db.Exec(ctx, `DELETE FROM session WHERE sid = 'p1'`); err != nil {
		t.Fatal(err)
	}
	deleted := time.Now()
	readUntil(t, a, "p1", time.Second, "a destroyed session over a silent LISTEN connection", func(_ string, err error) bool { return errors.Is(err, ErrNotFound) })
	if d := time.Since(deleted); d > copiesFresh+200*time.Millisecond {
		t.Fatalf("served from a copy for %s after the DELETE", d)
	}
	waitCopies(t, a, "down")
	proxy.Restore()
	waitCopies(t, a, "up")
}

// TestPostgresCopiesNeedTriggersThatAlwaysFire: a trigger set to fire only in one replication
// role does not fire for ordinary writes, and one left as ENABLE, not ALWAYS, does not fire for
// logical replication's apply: either way, copies stop.
func TestPostgresCopiesNeedTriggersThatAlwaysFire(t *testing.T) {
	f, a := newPostgresOnly(t)
	ctx := context.Background()
	// (Setting session_replication_role, to see them fire as a replica applies changes, takes a
	// superuser; the tests' role is not one.)
	for _, mode := range []string{"ENABLE REPLICA", "ENABLE"} {
		if _, err := f.db.Exec(ctx, `ALTER TABLE session `+mode+` TRIGGER cachecar_session_notify_upd`); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(copiesCheckInterval + 3*time.Second)
		for a.PostgresCopies() != "down" {
			if time.Now().After(deadline) {
				t.Fatalf("copies still kept after %s TRIGGER", mode)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if _, err := f.db.Exec(ctx, `ALTER TABLE session ENABLE ALWAYS TRIGGER cachecar_session_notify_upd`); err != nil {
			t.Fatal(err)
		}
		waitCopies(t, a, "up")
	}
}

// listenNotes LISTENs on the triggers' channel on a connection of its own and returns a
// function that reports whether a notification naming sid arrived within d.
func listenNotes(t *testing.T, f *fixture) func(sid string, d time.Duration) bool {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), f.url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	if _, err := conn.Exec(context.Background(), "LISTEN "+NotifyChannel); err != nil {
		t.Fatal(err)
	}
	return func(sid string, d time.Duration) bool {
		deadline := time.Now().Add(d)
		for {
			ctx, cancel := context.WithDeadline(context.Background(), deadline)
			n, err := conn.WaitForNotification(ctx)
			cancel()
			if err != nil {
				return false
			}
			if strings.Contains(n.Payload, `"`+sid+`"`) {
				return true
			}
		}
	}
}

// TestWritersNotifyOnlyWhileCopiesAreKept: while Valkey answers the reads, no sidecar keeps
// copies of PostgreSQL's answers and writes send no notification (a NOTIFY serializes commits);
// once Valkey is down and a sidecar keeps copies, every write notifies; when Valkey is back,
// writes stop notifying again.
func TestWritersNotifyOnlyWhileCopiesAreKept(t *testing.T) {
	f := newFixture(t, nil)
	heard := listenNotes(t, f)
	waitCopies(t, f.store, "standby")
	exp := time.Now().Add(time.Hour)
	f.put(t, "n1", body("v1", exp))
	if heard("n1", 300*time.Millisecond) {
		t.Fatal("a write notified while Valkey answered the reads")
	}
	f.redis.Pause()
	f.get(t, "n1") // finds Valkey down
	f.waitActive(t, FromPostgres)
	waitCopies(t, f.store, "up")
	f.put(t, "n2", body("v2", exp))
	if !heard("n2", time.Second) {
		t.Fatal("a write did not notify while a sidecar kept copies")
	}
	f.redis.Resume()
	f.waitActive(t, FromValkey)
	waitCopies(t, f.store, "standby")
	heard("", 100*time.Millisecond) // drain
	f.put(t, "n3", body("v3", exp))
	if heard("n3", 300*time.Millisecond) {
		t.Fatal("a write notified after Valkey answered the reads again")
	}
}

// TestArmingWaitsForWritersThatFoundNoReader: a transaction whose trigger ran before any
// sidecar kept copies sent no notification; a sidecar starting to keep copies meanwhile must
// not keep any until that transaction ended, or it could keep the old row and never hear of
// the change.
func TestArmingWaitsForWritersThatFoundNoReader(t *testing.T) {
	f := newFixture(t, nil)
	f.stop()
	ctx := context.Background()
	if _, err := f.db.Exec(ctx, `INSERT INTO session (sid, sess, expire) VALUES ('w1', '{"user":"old"}', now() + interval '1 hour')`); err != nil {
		t.Fatal(err)
	}
	tx, err := f.db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `UPDATE session SET sess = '{"user":"new"}' WHERE sid = 'w1'`); err != nil {
		t.Fatal(err)
	}
	a, _ := f.startPostgresOnly(t, nil)
	waitCopies(t, a, "standby")
	for i := 0; i < 30; i++ { // 1.5 s: the store tries again every second
		if got, _, err := a.Get(ctx, "w1"); err != nil || !strings.Contains(string(got), "old") {
			t.Fatalf("before the writer committed: %q, %v", got, err)
		}
		if st := a.PostgresCopies(); st == "up" {
			t.Fatal("copies kept while a writer that found no reader was still running")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Arming never queues in PostgreSQL's lock manager: other writers are not held up.
	start := time.Now()
	if _, err := f.db.Exec(ctx, `UPDATE session SET expire = expire WHERE sid <> 'w1'`); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 500*time.Millisecond {
		t.Fatalf("another writer waited %s while a sidecar was arming", d)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	waitCopies(t, a, "up")
	readUntil(t, a, "w1", time.Second, "after the writer committed", func(b string, err error) bool { return err == nil && strings.Contains(b, "new") })
}

// stats returns how many copies c holds and their accounted bytes.
func (c *pgCopies) stats() (n int, bytes int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m), c.bytes
}
