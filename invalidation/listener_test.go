package invalidation

import (
	"context"
	"errors"
	"fmt"
	neturl "net/url"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// recordingCache is a Cache that records what the listener asks of it. Invalidate can be made
// to fail, to stand for a Valkey outage in the middle of a session.
type recordingCache struct {
	mu          sync.Mutex
	live        bool
	liveChanges []bool
	calls       []invalidateCall
	resyncs     int
	failNext    int
	serverID    string
	serverErr   error
	changed     chan struct{}
}

type invalidateCall struct{ keys, tags []string }

func newRecordingCache() *recordingCache { return &recordingCache{changed: make(chan struct{}, 1000)} }

func (c *recordingCache) note() {
	select {
	case c.changed <- struct{}{}:
	default:
	}
}

func (c *recordingCache) Invalidate(ctx context.Context, keys, tags []string) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.note()
	if c.failNext > 0 {
		c.failNext--
		return 0, errors.New("valkey down")
	}
	k := append([]string(nil), keys...)
	g := append([]string(nil), tags...)
	sort.Strings(k)
	sort.Strings(g)
	c.calls = append(c.calls, invalidateCall{k, g})
	return len(keys) + len(tags), nil
}

func (c *recordingCache) Resync(ctx context.Context) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.note()
	if c.live {
		// The listener must stop serving before it deletes: entries read during a resync
		// could be the stale ones it is about to delete.
		panic("Resync while live")
	}
	c.resyncs++
	return 0, nil
}

func (c *recordingCache) ServerID(ctx context.Context) (string, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.serverID, c.serverErr
}

func (c *recordingCache) SetLive(live bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	defer c.note()
	c.live = live
	c.liveChanges = append(c.liveChanges, live)
}

// waitFor polls cond (under the cache's lock) until it holds or 10 s pass.
func (c *recordingCache) waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		c.mu.Lock()
		ok := cond()
		c.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-c.changed:
		case <-time.After(20 * time.Millisecond):
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// listenerFixture is a test schema with tenants and courses, the triggers of spec installed,
// and a running listener over a recording cache.
type listenerFixture struct {
	url, app string
	db       *pgx.Conn
	cache    *recordingCache
	l        *Listener
	stop     func()
}

// testSpec has one rule naming a key (course:{id}) and one naming a tag (the course's tenant).
func testSpec(channel string) Spec {
	return Spec{Channel: channel, MaxRows: 1000, Rules: []Rule{
		{Policy: "course", Table: "courses", Columns: []string{"id"}, Target: func(v []string) (string, bool, bool) {
			if v[0] == "" || v[0] == "*" {
				return "", false, false
			}
			return "course:" + v[0], false, true
		}},
		{Policy: "course_list", Table: "courses", Columns: []string{"tenant_id"}, Target: func(v []string) (string, bool, bool) {
			return "tag:" + v[0], true, v[0] != ""
		}},
	}}
}

func startListener(t *testing.T, spec func(channel string) Spec, install bool) *listenerFixture {
	t.Helper()
	return startListenerWith(t, spec, install, nil)
}

// startListenerWith is startListener with the listener's options changed by opts (given the
// test database's URL) before it starts.
func startListenerWith(t *testing.T, spec func(channel string) Spec, install bool, opts func(url string, o *Options)) *listenerFixture {
	t.Helper()
	ctx := context.Background()
	app := "cachecar-test-" + testenv.Suffix()
	url := testenv.WithParam(testenv.PostgresURL(t), "application_name", app)
	db, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close(context.Background()) })
	if _, err := db.Exec(ctx, `CREATE TABLE courses (id bigint PRIMARY KEY, tenant_id bigint, title text NOT NULL);
		INSERT INTO courses VALUES (1, 1, 'one'), (2, 1, 'two'), (3, 2, 'three');`+BookkeepingSQL); err != nil {
		t.Fatal(err)
	}
	s := spec("c_" + testenv.Suffix())
	if install {
		if err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error { _, err := Install(ctx, tx, s); return err }); err != nil {
			t.Fatal(err)
		}
	}
	f := &listenerFixture{url: url, app: app, db: db, cache: newRecordingCache()}
	o := Options{URL: url, ConnectTimeout: 2 * time.Second, ReconnectMax: 200 * time.Millisecond,
		PingInterval: time.Second, CacheTimeout: time.Second, ResyncTimeout: 5 * time.Second}
	if opts != nil {
		opts(url, &o)
	}
	f.l = New(o, s, f.cache, zerolog.Nop(), prometheus.NewRegistry())
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { f.l.Run(rctx); close(done) }()
	f.stop = func() { cancel(); <-done }
	t.Cleanup(f.stop)
	return f
}

func (f *listenerFixture) waitLive(t *testing.T) {
	t.Helper()
	f.cache.waitFor(t, "the listener to go live", func() bool { return f.cache.live })
}

func (f *listenerFixture) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	if _, err := f.db.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func TestListenerAppliesChanges(t *testing.T) {
	f := startListener(t, testSpec, true)
	f.waitLive(t)
	f.cache.mu.Lock()
	if f.cache.resyncs != 1 || !slices.Equal(f.cache.liveChanges, []bool{false, true}) {
		t.Fatalf("on connect: %d resyncs, live changes %v; want one resync between not live and live", f.cache.resyncs, f.cache.liveChanges)
	}
	f.cache.mu.Unlock()

	tests := []struct {
		sql  string
		want invalidateCall
	}{
		{"UPDATE courses SET title = 'uno' WHERE id = 1", invalidateCall{[]string{"course:1"}, []string{"tag:1"}}},
		// Moving a course to another tenant makes both tenants' lists stale.
		{"UPDATE courses SET tenant_id = 2 WHERE id = 2", invalidateCall{[]string{"course:2"}, []string{"tag:1", "tag:2"}}},
		{"INSERT INTO courses VALUES (4, 3, 'four')", invalidateCall{[]string{"course:4"}, []string{"tag:3"}}},
		{"DELETE FROM courses WHERE id = 3", invalidateCall{[]string{"course:3"}, []string{"tag:2"}}},
		// One statement, several rows: one call, no repeats.
		{"UPDATE courses SET title = title || '!' WHERE id IN (1, 2)", invalidateCall{[]string{"course:1", "course:2"}, []string{"tag:1", "tag:2"}}},
		// NULL values name no key.
		{"INSERT INTO courses VALUES (5, NULL, 'orphan')", invalidateCall{[]string{"course:5"}, nil}},
	}
	for i, tt := range tests {
		f.exec(t, tt.sql)
		f.cache.waitFor(t, tt.sql, func() bool { return len(f.cache.calls) > i })
		f.cache.mu.Lock()
		got := f.cache.calls[i]
		f.cache.mu.Unlock()
		if !slices.Equal(got.keys, tt.want.keys) || !slices.Equal(got.tags, tt.want.tags) {
			t.Errorf("%s: invalidated keys %v tags %v, want %v %v", tt.sql, got.keys, got.tags, tt.want.keys, tt.want.tags)
		}
	}
	if n := testutil.ToFloat64(f.l.m.notes.WithLabelValues("applied")); n != float64(len(tests)) {
		t.Errorf("applied notifications = %v, want %d", n, len(tests))
	}
	if n := testutil.CollectAndCount(f.l.m.lag); n != 1 {
		t.Errorf("lag histogram series = %d", n)
	}
	if st := f.l.Status(); st.State != StateLive || st.LastNotification.IsZero() {
		t.Errorf("status %+v, want live with a last notification", st)
	}
}

func TestListenerIgnoresForeignAndMalformed(t *testing.T) {
	f := startListener(t, testSpec, true)
	f.waitLive(t)
	ch := f.l.spec.Channel
	bad := []string{
		"garbage",
		`{"v":2,"t":"courses","op":"UPDATE","ts":1,"c":["id"],"r":[[1]]}`,
		`{"v":1,"t":"courses","op":"DROP","ts":1,"c":["id"],"r":[[1]]}`,
	}
	for _, p := range bad {
		f.exec(t, "SELECT pg_notify($1, $2)", ch, p)
	}
	// A well-formed message for a table no policy uses, and one whose values are no valid id:
	// neither may delete anything.
	f.exec(t, "SELECT pg_notify($1, $2)", ch, `{"v":1,"t":"lessons","op":"UPDATE","ts":1,"c":["id"],"r":[[1]]}`)
	f.exec(t, "SELECT pg_notify($1, $2)", ch, `{"v":1,"t":"courses","op":"UPDATE","ts":1,"c":["id","tenant_id"],"r":[["*",null]]}`)
	// A real change after them proves the listener is still working, and that they came first.
	f.exec(t, "UPDATE courses SET title = 'x' WHERE id = 1")
	f.cache.waitFor(t, "the real change", func() bool { return len(f.cache.calls) > 0 })
	f.cache.mu.Lock()
	calls := append([]invalidateCall(nil), f.cache.calls...)
	f.cache.mu.Unlock()
	if len(calls) != 1 || !slices.Equal(calls[0].keys, []string{"course:1"}) {
		t.Fatalf("invalidations %v, want only the real change's course:1", calls)
	}
	if n := testutil.ToFloat64(f.l.m.notes.WithLabelValues("malformed")); n != float64(len(bad)) {
		t.Errorf("malformed = %v, want %d", n, len(bad))
	}
	if n := testutil.ToFloat64(f.l.m.notes.WithLabelValues("foreign")); n != 1 {
		t.Errorf("foreign = %v, want 1", n)
	}
	if st := f.l.Status(); st.State != StateLive || st.Reconnects != 0 {
		t.Errorf("status %+v: bad payloads must not end the session", st)
	}
}

// terminate ends the listener's backend from the server side, as an operator or a failover
// would, and returns once it has exited.
func (f *listenerFixture) terminate(t *testing.T, extraSQL string) {
	t.Helper()
	ctx := context.Background()
	err := pgx.BeginFunc(ctx, f.db, func(tx pgx.Tx) error {
		if extraSQL != "" {
			if _, err := tx.Exec(ctx, extraSQL); err != nil {
				return err
			}
		}
		rows, err := tx.Query(ctx, `SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()`, f.app)
		if err != nil {
			return err
		}
		pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
		if err != nil {
			return err
		}
		if len(pids) != 1 {
			return fmt.Errorf("found %d listener backends, want 1", len(pids))
		}
		var ok bool
		if err := tx.QueryRow(ctx, "SELECT pg_terminate_backend($1, 5000)", pids[0]).Scan(&ok); err != nil || !ok {
			return fmt.Errorf("terminate listener: %v %v", ok, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestListenerGapAfterTerminate(t *testing.T) {
	f := startListener(t, testSpec, true)
	f.waitLive(t)
	// The update commits after the listener's backend is gone (pg_terminate_backend waits for
	// it to exit), so its notification is lost: only the resync can cover it.
	f.terminate(t, "UPDATE courses SET title = 'in the gap' WHERE id = 1")
	f.cache.waitFor(t, "a resync and live again", func() bool {
		return f.cache.resyncs == 2 && f.cache.live
	})
	f.cache.mu.Lock()
	changes := append([]bool(nil), f.cache.liveChanges...)
	calls := len(f.cache.calls)
	f.cache.mu.Unlock()
	// connect: not live, resync, live; gap: not live (at once), resync, live again.
	trues := 0
	for _, c := range changes {
		if c {
			trues++
		}
	}
	if len(changes) < 5 || !slices.Equal(changes[:3], []bool{false, true, false}) || !changes[len(changes)-1] || trues != 2 {
		t.Errorf("live changes %v", changes)
	}
	// The gap's notification may still reach the new session: PostgreSQL starts a new listener
	// at the queue position of the database's other listeners, so it can deliver a transaction
	// committed just before the LISTEN. Either way the resync above covered it, which is what
	// this test is about.
	if calls > 1 {
		t.Errorf("%d invalidations for one write", calls)
	}
	if st := f.l.Status(); st.Reconnects != 1 || testutil.ToFloat64(f.l.m.reconnects) != 1 {
		t.Errorf("reconnects: status %d, metric %v; want 1", st.Reconnects, testutil.ToFloat64(f.l.m.reconnects))
	}
	// And it listens again.
	f.exec(t, "UPDATE courses SET title = 'after' WHERE id = 2")
	f.cache.waitFor(t, "the change after the gap", func() bool {
		for _, c := range f.cache.calls[calls:] {
			if slices.Equal(c.keys, []string{"course:2"}) {
				return true
			}
		}
		return false
	})
}

func TestListenerCacheFailureIsAGap(t *testing.T) {
	f := startListener(t, testSpec, true)
	f.waitLive(t)
	f.cache.mu.Lock()
	f.cache.failNext = 1
	f.cache.mu.Unlock()
	f.exec(t, "UPDATE courses SET title = 'lost' WHERE id = 1")
	// The failed delete may have left a stale entry: the listener must resync before serving.
	f.cache.waitFor(t, "a resync after the failed invalidation", func() bool { return f.cache.resyncs == 2 && f.cache.live })
	f.exec(t, "UPDATE courses SET title = 'kept' WHERE id = 1")
	f.cache.waitFor(t, "the next change applied", func() bool { return len(f.cache.calls) == 1 })
}

// A well-formed message of a watched table that lacks the columns the rules need (a trigger
// installed for another configuration) cannot be applied: it is a gap, not something to skip.
func TestListenerUnmappableMessageIsAGap(t *testing.T) {
	f := startListener(t, testSpec, true)
	f.waitLive(t)
	f.exec(t, "SELECT pg_notify($1, $2)", f.l.spec.Channel, `{"v":1,"t":"courses","op":"UPDATE","ts":1,"c":["title"],"r":[["x"]]}`)
	f.cache.waitFor(t, "a resync", func() bool { return f.cache.resyncs == 2 && f.cache.live })
	if n := testutil.ToFloat64(f.l.m.notes.WithLabelValues("malformed")); n != 1 {
		t.Errorf("malformed = %v, want 1", n)
	}
}

// The cache server restarting (a new identity) during a session is a gap too.
func TestListenerCacheServerChangeIsAGap(t *testing.T) {
	f := startListener(t, testSpec, true)
	f.waitLive(t)
	f.cache.mu.Lock()
	f.cache.serverID = "restarted"
	f.cache.mu.Unlock()
	f.cache.waitFor(t, "a resync after the server changed", func() bool { return f.cache.resyncs == 2 && f.cache.live })
}

// Triggers disabled behind a live listener's back are noticed at the next check, and the
// listener stops letting the cache serve.
func TestListenerNoticesDisabledTrigger(t *testing.T) {
	f := startListener(t, testSpec, true)
	f.waitLive(t)
	f.exec(t, "ALTER TABLE courses DISABLE TRIGGER cachecar_upd")
	f.cache.waitFor(t, "the cache to stop serving", func() bool { return !f.cache.live })
	deadline := time.Now().Add(5 * time.Second)
	for f.l.Status().State != StateError {
		if time.Now().After(deadline) {
			t.Fatalf("status %+v, want error", f.l.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestListenerTableWide(t *testing.T) {
	f := startListener(t, testSpec, true)
	f.waitLive(t)
	f.exec(t, "TRUNCATE courses")
	f.cache.waitFor(t, "a resync for TRUNCATE", func() bool { return f.cache.resyncs == 2 && f.cache.live })
	if n := testutil.ToFloat64(f.l.m.resyncs.WithLabelValues("table_wide")); n != 1 {
		t.Errorf("table-wide resyncs = %v", n)
	}
	if st := f.l.Status(); st.Reconnects != 0 {
		t.Errorf("a table-wide message must not end the session: %+v", st)
	}
}

func TestListenerSchemaErrorNeverLive(t *testing.T) {
	missing := func(ch string) Spec {
		s := testSpec(ch)
		s.Rules = append(s.Rules, Rule{Policy: "broken", Table: "courses", Columns: []string{"owner_id"},
			Target: func(v []string) (string, bool, bool) { return "x:" + v[0], false, true }})
		return s
	}
	f := startListener(t, missing, false)
	f.wantNeverLive(t, 5*time.Second, "without its triggers", "broken", "owner_id")
}

// wantNeverLive waits up to wait for the listener's error state, then checks that its error
// names every one of names and that it never let the cache serve nor resynced it (why says
// in what circumstance).
func (f *listenerFixture) wantNeverLive(t *testing.T, wait time.Duration, why string, names ...string) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for f.l.Status().State != StateError {
		if time.Now().After(deadline) {
			t.Fatalf("status %+v, want error", f.l.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	st := f.l.Status()
	for _, want := range names {
		if !strings.Contains(st.Error, want) {
			t.Errorf("status error %q does not name %q", st.Error, want)
		}
	}
	f.cache.mu.Lock()
	defer f.cache.mu.Unlock()
	if slices.Contains(f.cache.liveChanges, true) || f.cache.resyncs != 0 {
		t.Errorf("went live (%v) or resynced (%d) %s", f.cache.liveChanges, f.cache.resyncs, why)
	}
}

// TestListenerWaitsForTheCacheServer: while the cache server is unreachable, the listener opens
// no PostgreSQL connection (one per attempt, from every sidecar, for as long as Valkey is down,
// would be a reconnect storm on the database); once it answers, the listener connects and goes
// live.
func TestListenerWaitsForTheCacheServer(t *testing.T) {
	ctx := context.Background()
	url := testenv.PostgresURL(t)
	db, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close(context.Background()) })
	s := testSpec("c_" + testenv.Suffix())
	if _, err := db.Exec(ctx, `CREATE TABLE courses (id bigint PRIMARY KEY, tenant_id bigint, title text NOT NULL);`+BookkeepingSQL); err != nil {
		t.Fatal(err)
	}
	if err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error { _, err := Install(ctx, tx, s); return err }); err != nil {
		t.Fatal(err)
	}
	u, err := neturl.Parse(url)
	if err != nil {
		t.Fatal(err)
	}
	proxy := testenv.StartProxy(t, u.Host)
	u.Host = proxy.Addr()
	cache := newRecordingCache()
	cache.serverErr = errors.New("valkey down")
	l := New(Options{URL: u.String(), ConnectTimeout: 2 * time.Second, ReconnectMax: 50 * time.Millisecond,
		PingInterval: time.Second, CacheTimeout: time.Second, ResyncTimeout: 5 * time.Second},
		s, cache, zerolog.Nop(), prometheus.NewRegistry())
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { l.Run(rctx); close(done) }()
	defer func() { cancel(); <-done }()
	deadline := time.Now().Add(5 * time.Second)
	for l.Status().Reconnects < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("the listener did not retry: %+v", l.Status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := proxy.Accepted(); n != 0 {
		t.Fatalf("%d PostgreSQL connections opened while the cache server was unreachable", n)
	}
	if st := l.Status(); st.Error != "cache server unreachable" {
		t.Fatalf("status %+v", st)
	}
	cache.mu.Lock()
	cache.serverErr = nil
	cache.mu.Unlock()
	cache.waitFor(t, "the listener to go live", func() bool { return cache.live })
	if proxy.Accepted() == 0 {
		t.Fatal("live without a PostgreSQL connection")
	}
}
