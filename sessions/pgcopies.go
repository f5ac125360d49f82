package sessions

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"

	"github.com/cachecar/cachecar/invalidation"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Copies of sessions read from PostgreSQL.
//
// The reads PostgreSQL answers (Valkey down or not yet reconciled, no Valkey configured, a
// migration from connect-pg-simple) are answered from this process's memory when it holds a
// copy. The copies are kept correct by the session table's triggers (NotifySQL): every
// statement that changes session rows, whoever runs it (cachecar, connect-pg-simple, psql),
// NOTIFYs their sids on NotifyChannel when it commits, and the store's own LISTEN connection
// drops those copies. A copy is served only while that connection has listened without a break
// since before the copy was read, and never past the row's expire; a read that overlapped a
// change of its session (a notification, or this process's own write) keeps no copy.

// NotifyChannel is the channel the session table's triggers notify.
const NotifyChannel = "cachecar_sessions"

// notifyVersion is the "v" of the triggers' messages. A message of another version drops every
// copy: what it names cannot be trusted to be read right.
const notifyVersion = 1

// Trigger and function names NotifySQL installs.
const (
	notifyFunc = "cachecar_session_notify"
)

var notifyTriggers = []string{"cachecar_session_notify_ins", "cachecar_session_notify_upd", "cachecar_session_notify_del", "cachecar_session_notify_trunc"}

// notifyMaxSIDs is the most sids one statement's notifications name; beyond it, one message
// drops every copy.
const notifyMaxSIDs = 10000

// NotifySQL installs (or replaces) the triggers on connect-pg-simple's table that let every
// sidecar keep copies of sessions read from PostgreSQL: one statement-level trigger per
// operation, notifying the sids of the rows the statement changed, as many per message as fit
// in a NOTIFY payload (a whole-table message for TRUNCATE, for more than notifyMaxSIDs rows, and
// for a sid too long for a payload). The triggers fire ALWAYS: also under
// session_replication_role = replica (logical replication's apply, pg_restore), whose writes
// would otherwise go unnoticed. Idempotent.
func NotifySQL(schema, table string) string {
	fn := pgx.Identifier{notifyFunc}.Sanitize()
	if schema != "" {
		fn = pgx.Identifier{schema, notifyFunc}.Sanitize()
	}
	t := TableName(schema, table)
	q := func(s string) string { return pgx.Identifier{s}.Sanitize() }
	return fmt.Sprintf(`CREATE OR REPLACE FUNCTION %[1]s() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
	tbl text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
	head text := '{"v":%[3]d,"t":' || to_json(tbl)::text;
	buf text := '';
	piece text;
	n int := 0;
	r record;
BEGIN
	-- %[10]s
	-- The writers' lock, shared, until this transaction ends: a sidecar arming its copies takes
	-- it exclusively for a moment, and so waits for every writer that found no reader.
	PERFORM pg_advisory_xact_lock_shared(hashtextextended('%[11]s' || tbl, 0));
	-- Sidecars keeping copies hold the readers' lock, shared. Without one, nobody needs the
	-- notifications, and a NOTIFY serializes commits (PostgreSQL holds a lock from the NOTIFY's
	-- queue entry to the end of the commit).
	-- (Taken and released in one expression: a session-level lock left held by a statement
	-- cancelled in between would outlive the transaction.)
	IF (CASE WHEN pg_try_advisory_lock(hashtextextended('%[12]s' || tbl, 0))
		THEN pg_advisory_unlock(hashtextextended('%[12]s' || tbl, 0)) ELSE false END) THEN
		RETURN NULL;
	END IF;
	IF TG_OP = 'TRUNCATE' THEN
		PERFORM pg_notify('%[2]s', head || ',"all":true}');
		RETURN NULL;
	END IF;
	FOR r IN EXECUTE CASE TG_OP
		WHEN 'INSERT' THEN 'SELECT DISTINCT sid FROM cachecar_new'
		WHEN 'DELETE' THEN 'SELECT DISTINCT sid FROM cachecar_old'
		ELSE 'SELECT sid FROM cachecar_old UNION SELECT sid FROM cachecar_new' END
	LOOP
		n := n + 1;
		piece := to_json(r.sid)::text;
		IF n > %[9]d OR octet_length(head) + octet_length(piece) > 7800 THEN
			PERFORM pg_notify('%[2]s', head || ',"all":true}');
			RETURN NULL;
		END IF;
		IF buf <> '' AND octet_length(head) + octet_length(buf) + octet_length(piece) > 7800 THEN
			PERFORM pg_notify('%[2]s', head || ',"s":[' || buf || ']}');
			buf := '';
		END IF;
		buf := CASE WHEN buf = '' THEN piece ELSE buf || ',' || piece END;
	END LOOP;
	IF buf <> '' THEN
		PERFORM pg_notify('%[2]s', head || ',"s":[' || buf || ']}');
	END IF;
	RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS %[5]s ON %[4]s;
CREATE TRIGGER %[5]s AFTER INSERT ON %[4]s REFERENCING NEW TABLE AS cachecar_new FOR EACH STATEMENT EXECUTE FUNCTION %[1]s();
DROP TRIGGER IF EXISTS %[6]s ON %[4]s;
CREATE TRIGGER %[6]s AFTER UPDATE ON %[4]s REFERENCING OLD TABLE AS cachecar_old NEW TABLE AS cachecar_new FOR EACH STATEMENT EXECUTE FUNCTION %[1]s();
DROP TRIGGER IF EXISTS %[7]s ON %[4]s;
CREATE TRIGGER %[7]s AFTER DELETE ON %[4]s REFERENCING OLD TABLE AS cachecar_old FOR EACH STATEMENT EXECUTE FUNCTION %[1]s();
DROP TRIGGER IF EXISTS %[8]s ON %[4]s;
CREATE TRIGGER %[8]s AFTER TRUNCATE ON %[4]s FOR EACH STATEMENT EXECUTE FUNCTION %[1]s();
ALTER TABLE %[4]s ENABLE ALWAYS TRIGGER %[5]s;
ALTER TABLE %[4]s ENABLE ALWAYS TRIGGER %[6]s;
ALTER TABLE %[4]s ENABLE ALWAYS TRIGGER %[7]s;
ALTER TABLE %[4]s ENABLE ALWAYS TRIGGER %[8]s;`,
		fn, NotifyChannel, notifyVersion, t, q(notifyTriggers[0]), q(notifyTriggers[1]), q(notifyTriggers[2]), q(notifyTriggers[3]), notifyMaxSIDs, notifyMarker, writersLockPrefix, readersLockPrefix)
}

// notifyMarker is in the trigger function's body: the function of this version.
const notifyMarker = "cachecar session notify v3"

// The advisory locks between writers and the sidecars keeping copies, keyed by
// hashtextextended(prefix || 'schema.table', 0).
const (
	writersLockPrefix = "cachecar session copies writers "
	readersLockPrefix = "cachecar session copies readers "
)

// ErrNotifyPrivilege: the role migrate runs as may not create triggers on the session table (it
// is not its owner, as when connect-pg-simple's role created it).
var ErrNotifyPrivilege = errors.New("no privilege to install the session table's notify triggers")

// InstallNotify installs NotifySQL's triggers in tx unless those of this version are in place
// (replacing them takes a lock that blocks the table's readers until tx ends). It runs under a
// savepoint: without the privilege it returns ErrNotifyPrivilege and tx goes on, since the
// copies are optional. installed reports whether it (re)installed them.
func InstallNotify(ctx context.Context, tx pgx.Tx, schema, table string) (installed bool, err error) {
	var current bool
	err = tx.QueryRow(ctx, `SELECT count(*) = $3 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
		WHERE t.tgrelid = to_regclass($1) AND t.tgname = ANY($2) AND t.tgenabled = 'A' AND p.prosrc LIKE '%' || $4 || '%'`,
		TableName(schema, table), notifyTriggers, len(notifyTriggers), notifyMarker).Scan(&current)
	if err != nil || current {
		return false, err
	}
	sp, err := tx.Begin(ctx)
	if err != nil {
		return false, err
	}
	if _, err := sp.Exec(ctx, NotifySQL(schema, table)); err != nil {
		sp.Rollback(ctx)
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42501" { // insufficient_privilege, must be owner
			return false, fmt.Errorf("%w: %s", ErrNotifyPrivilege, pgErr.Message)
		}
		return false, err
	}
	return true, sp.Commit(ctx)
}

// pgCopies holds the copies. Safe for concurrent use.
type pgCopies struct {
	max int64 // bytes, roughly: bodies, sids and a fixed overhead per copy

	mu    sync.Mutex
	live  bool   // the LISTEN connection listens, the triggers are in place
	armed bool   // writers notify this process: it holds the readers' lock (NotifySQL)
	gen   uint64 // moves whenever every copy is dropped: reads begun before keep nothing
	// proven is when the last probe that came back through the LISTEN connection was sent:
	// every change committed before it has been applied. Copies answer only while it is
	// within copiesFresh.
	proven time.Time
	bytes  int64
	m      map[string]pgCopy
	reads  map[string]*readMark // reads in flight, by sid
}

type pgCopy struct {
	body   []byte
	expire float64 // the row's expire in Unix seconds, as PostgreSQL compares it
}

// readMark counts the reads of one sid in flight; gen moves when the sid changes meanwhile.
type readMark struct {
	n   int
	gen uint64
}

// readToken is what begin hands a read, for end.
type readToken struct {
	ok        bool
	gen, mgen uint64
}

// copyOverhead is what a copy costs beyond its sid and body: the map entry, the slice header,
// the allocations' rounding (measured: the live heap was 1.1 to 1.3 times the accounted bytes
// with 96).
const copyOverhead = 128

func newPGCopies(maxBytes int64) *pgCopies {
	return &pgCopies{max: maxBytes, m: map[string]pgCopy{}, reads: map[string]*readMark{}}
}

// get returns the copy of sid when copies are live and the row's expire is not before now
// (Unix seconds, rounded up, as the query compares it).
func (c *pgCopies) get(sid string, now int64) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.live || !c.armed || time.Since(c.proven) > copiesFresh {
		return nil, false
	}
	cp, ok := c.m[sid]
	if !ok {
		return nil, false
	}
	if cp.expire < float64(now) {
		c.drop(sid, cp)
		return nil, false
	}
	return cp.body, true
}

// begin registers a read of sid about to be sent to PostgreSQL.
func (c *pgCopies) begin(sid string) readToken {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.live || !c.armed {
		return readToken{}
	}
	mk := c.reads[sid]
	if mk == nil {
		mk = &readMark{}
		c.reads[sid] = mk
	}
	mk.n++
	return readToken{ok: true, gen: c.gen, mgen: mk.gen}
}

// end ends a read begun with tok and keeps its answer (found: the live row's body and expire)
// unless copies stopped being live or the sid changed since it began.
func (c *pgCopies) end(sid string, tok readToken, body []byte, expire float64, found bool) {
	if !tok.ok {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	mk := c.reads[sid]
	if mk == nil { // begin registered it; only end deletes it
		return
	}
	unchanged := mk.gen == tok.mgen
	if mk.n--; mk.n == 0 {
		delete(c.reads, sid)
	}
	if !found || !unchanged || !c.live || !c.armed || c.gen != tok.gen {
		return
	}
	size := int64(len(sid) + len(body) + copyOverhead)
	if size > c.max/4 {
		return
	}
	if old, ok := c.m[sid]; ok {
		c.drop(sid, old)
	}
	// Over the bound, random copies go (a map's order is random): no bookkeeping per read.
	for sid2, cp := range c.m {
		if c.bytes+size <= c.max {
			break
		}
		c.drop(sid2, cp)
	}
	c.m[sid] = pgCopy{body: body, expire: expire}
	c.bytes += size
}

func (c *pgCopies) drop(sid string, cp pgCopy) {
	delete(c.m, sid)
	c.bytes -= int64(len(sid) + len(cp.body) + copyOverhead)
}

// forget drops the copies of sids and keeps none of their reads in flight.
func (c *pgCopies) forget(sids ...string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, sid := range sids {
		if cp, ok := c.m[sid]; ok {
			c.drop(sid, cp)
		}
		if mk := c.reads[sid]; mk != nil {
			mk.gen++
		}
	}
}

// reset drops every copy and keeps none of the reads in flight.
func (c *pgCopies) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.resetLocked()
}

func (c *pgCopies) resetLocked() {
	c.gen++
	c.m = map[string]pgCopy{}
	c.bytes = 0
	for _, mk := range c.reads {
		mk.gen++
	}
}

// setLive says whether the LISTEN connection listens. Any change drops every copy: copies
// from before a break may have missed a notification, and reads begun before copies went
// live may have read a row changed before the connection listened.
func (c *pgCopies) setLive(live bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.live != live {
		c.live = live
		c.armed = false // armed anew on this connection
		c.proven = time.Time{}
		c.resetLocked()
	}
}

// setArmed says whether writers notify this process (it holds the readers' lock, see
// NotifySQL): only then are copies kept and served. Any change drops every copy.
func (c *pgCopies) setArmed(armed bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.armed != armed {
		c.armed = armed
		c.resetLocked()
	}
}

// state is "up" (live and armed), "standby" (live, not armed: Valkey answers the reads) or
// "down".
func (c *pgCopies) state() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.live && c.armed:
		return "up"
	case c.live:
		return "standby"
	}
	return "down"
}

// provenAt records that a probe sent at sent came back.
func (c *pgCopies) provenAt(sent time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if sent.After(c.proven) {
		c.proven = sent
	}
}

// PostgresCopies reports the copies of PostgreSQL's answers for health: "up" while they are
// kept, "standby" while not needed (Valkey answers the reads; writers do not notify), "down"
// while they cannot be kept (LISTEN connection down, triggers missing), "" when turned off.
func (s *Store) PostgresCopies() string {
	if s.pg == nil {
		return ""
	}
	return s.pg.state()
}

// notifyMessage is a trigger's payload.
type notifyMessage struct {
	V   int      `json:"v"`
	T   string   `json:"t"`
	S   []string `json:"s"`
	All bool     `json:"all"`
}

// apply applies one notification payload of table (schema.table, as the triggers name it).
func (c *pgCopies) apply(table, payload string) {
	var msg notifyMessage
	if err := json.Unmarshal([]byte(payload), &msg); err != nil {
		// Not what the triggers send (a hand-run NOTIFY): dropping everything is always safe.
		c.reset()
		return
	}
	if msg.T != table {
		return // another deployment's session table in the same database
	}
	if msg.V != notifyVersion {
		// Another version's trigger on this table: what it names cannot be trusted to be read
		// right.
		c.reset()
		return
	}
	if msg.All {
		c.reset()
		return
	}
	c.forget(msg.S...)
}

// errNoTriggers: the session table lacks NotifySQL's triggers (migrate not run, or they were
// dropped, disabled or set to fire only in some replication role): copies are not kept.
var errNoTriggers = errors.New("the session table's notify triggers are missing, or not enabled ALWAYS (run `cachecar migrate`)")

// checkTriggers returns the table as the triggers name it (schema.table), or errNoTriggers.
func checkTriggers(ctx context.Context, conn *pgx.Conn, table string) (string, error) {
	var name *string
	var n int
	err := conn.QueryRow(ctx, `SELECT n.nspname || '.' || c.relname,
			(SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
			  WHERE t.tgrelid = c.oid AND t.tgname = ANY($2) AND t.tgenabled = 'A' AND p.proname = $3
			    AND p.prosrc LIKE '%' || $4 || '%')
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE c.oid = to_regclass($1)`, table, notifyTriggers, notifyFunc, notifyMarker).Scan(&name, &n)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", fmt.Errorf("session table %s not found", table)
	}
	if err != nil {
		return "", err
	}
	if n != len(notifyTriggers) {
		return "", errNoTriggers
	}
	return *name, nil
}

// Copies' LISTEN connection: how often it re-checks the triggers, how often it sends itself a
// probe and how recent the last one that came back must be for copies to answer (a connection
// that silently stopped delivering, a partition, delivers no probe either), and bounds on
// set-up steps and reconnect back-off.
const (
	copiesCheckInterval = 2 * time.Second
	copiesProbeInterval = 200 * time.Millisecond
	copiesFresh         = 600 * time.Millisecond
	copiesSetupTimeout  = 2 * time.Second
	copiesBackoffMax    = 5 * time.Second
)

// listenCopies keeps the copies' LISTEN connection until ctx ends.
func (s *Store) listenCopies(ctx context.Context) {
	backoff := 100 * time.Millisecond
	warned := false
	for {
		wasLive, err := s.copiesSession(ctx)
		s.pg.setLive(false)
		if ctx.Err() != nil {
			return
		}
		if wasLive {
			backoff = 100 * time.Millisecond
			warned = false
		}
		switch {
		case errors.Is(err, errNoTriggers), errors.As(err, new(*invalidation.PoolerError)):
			if !warned {
				warned = true
				s.log.Warn().Err(err).Msg("session reads from PostgreSQL keep no in-process copies")
			}
			backoff = copiesBackoffMax
		case wasLive:
			s.log.Warn().Err(err).Msg("session copies' LISTEN connection lost; copies dropped until it is back")
		default:
			s.log.Debug().Err(err).Msg("session copies' LISTEN connection")
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff/2 + rand.N(backoff/2+1)):
		}
		backoff = min(backoff*2, copiesBackoffMax)
	}
}

// listenConn opens the copies' LISTEN connection: Options.Listen, else one taken out of the pool.
func (s *Store) listenConn(ctx context.Context) (*pgx.Conn, error) {
	if s.opts.Listen != nil {
		return s.opts.Listen(ctx)
	}
	pc, err := s.db.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	return pc.Hijack(), nil
}

// copiesSession runs one connection for the copies: the pooler and trigger checks, then, while
// PostgreSQL answers session reads, LISTEN (the triggers' channel and one of its own for
// probes), the readers' lock and arming; copies answer while a probe came back lately. It ends
// when the connection fails, a check does, or a probe is late.
func (s *Store) copiesSession(ctx context.Context) (wasLive bool, err error) {
	actx, cancel := context.WithTimeout(ctx, copiesSetupTimeout)
	conn, err := s.listenConn(actx)
	cancel()
	if err != nil {
		return false, err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		conn.Close(cctx)
		select { // a close after a failed query finishes in the background
		case <-conn.PgConn().CleanupDone():
		case <-time.After(2 * time.Second):
		}
	}()
	defer s.pg.setLive(false) // before the close: copies stop the moment the session ends
	probeChannel := fmt.Sprintf("cachecar_probe_%016x", rand.Uint64())
	sctx, cancel := context.WithTimeout(ctx, copiesSetupTimeout)
	// Named for pg_stat_activity: this connection stays open, listening.
	_, err = conn.Exec(sctx, "SET application_name = 'cachecar-session-copies'")
	var table string
	if err == nil {
		// A pooler between cachecar and PostgreSQL (PgBouncer) hands this client's statements
		// to several server sessions: LISTEN and the session-level readers' lock would not stay
		// on one. It fakes the backend's process id, which shows.
		if !s.opts.AllowPooler {
			err = invalidation.CheckDirect(sctx, conn, "invalidation.listen_url")
		}
	}
	if err == nil {
		table, err = checkTriggers(sctx, conn, s.opts.Table)
	}
	cancel()
	if err != nil {
		return false, err
	}
	// Probes are numbered; sent maps those in flight to when they were sent. Copies answer only
	// while one sent within copiesFresh came back (pgCopies.get); one that has not come back
	// after copiesSetupTimeout ends the session.
	var seq uint64
	sent := map[uint64]time.Time{}
	probe := func() error {
		seq++
		pctx, cancel := context.WithTimeout(ctx, copiesSetupTimeout)
		defer cancel()
		sent[seq] = time.Now()
		_, err := conn.Exec(pctx, "SELECT pg_notify($1, $2)", probeChannel, strconv.FormatUint(seq, 10))
		return err
	}
	// Arming: while PostgreSQL answers session reads, this connection holds the readers' lock
	// (shared), so that every writer's trigger from then on notifies. The writers that found no
	// reader before hold the writers' lock (shared) until they end: the ones holding it when the
	// readers' lock was taken are read from pg_locks, and copies are kept only once none of
	// them holds it any more. Nothing here waits in PostgreSQL's lock queue, where a request
	// would hold up every writer queued behind it.
	// It LISTENs only then too: every NOTIFY in the database (the invalidation triggers' too)
	// wakes every listening backend.
	listening, readers, armed := false, false, false
	var pending []string // the virtual transaction ids of those writers
	lockArg := func(prefix string) string { return prefix + table }
	const holders = `SELECT virtualtransaction FROM pg_locks WHERE locktype = 'advisory' AND granted
		AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND objsubid = 1
		AND classid = ((hashtextextended($1, 0) >> 32) & 4294967295)::oid AND objid = (hashtextextended($1, 0) & 4294967295)::oid`
	arm := func() error {
		if !listening {
			if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{NotifyChannel}.Sanitize()+"; LISTEN "+pgx.Identifier{probeChannel}.Sanitize()); err != nil {
				return err
			}
			listening = true
		}
		if !readers {
			var ok bool
			if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock_shared(hashtextextended($1, 0))", lockArg(readersLockPrefix)).Scan(&ok); err != nil || !ok {
				return err // not granted: a writer holds it for an instant; next time
			}
			readers = true
			rows, err := conn.Query(ctx, holders, lockArg(writersLockPrefix))
			if err != nil {
				return err
			}
			if pending, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
				return err
			}
		}
		if len(pending) > 0 {
			rows, err := conn.Query(ctx, holders+" AND virtualtransaction = ANY($2)", lockArg(writersLockPrefix), pending)
			if err != nil {
				return err
			}
			if pending, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil || len(pending) > 0 {
				return err
			}
		}
		armed = true
		s.pg.setArmed(true)
		return nil
	}
	disarm := func() error {
		armed, pending = false, nil
		s.pg.setArmed(false)
		if readers {
			var ok bool
			if err := conn.QueryRow(ctx, "SELECT pg_advisory_unlock_shared(hashtextextended($1, 0))", lockArg(readersLockPrefix)).Scan(&ok); err != nil {
				return err
			}
			if !ok {
				return errors.New("the readers' lock was not held")
			}
			readers = false
		}
		if listening {
			if _, err := conn.Exec(ctx, "UNLISTEN *"); err != nil {
				return err
			}
			listening = false
			// Probes still in flight come back on no channel.
			clear(sent)
		}
		return nil
	}
	s.pg.setLive(true)
	nextCheck := time.Now().Add(copiesCheckInterval)
	nextProbe := time.Now().Add(copiesProbeInterval)
	for {
		wake := nextProbe
		if nextCheck.Before(wake) {
			wake = nextCheck
		}
		wctx, cancel := context.WithDeadline(ctx, wake)
		n, err := conn.WaitForNotification(wctx)
		timedOut := wctx.Err() != nil
		cancel()
		if ctx.Err() != nil {
			return true, nil
		}
		if err != nil && (!timedOut || conn.IsClosed()) {
			return true, err
		}
		if n != nil {
			if n.Channel == probeChannel {
				k, _ := strconv.ParseUint(n.Payload, 10, 64)
				if at, ok := sent[k]; ok {
					// Notifications come in commit order: every change committed before this
					// probe was sent has been applied.
					s.pg.provenAt(at)
					for i := range sent {
						if i <= k {
							delete(sent, i)
						}
					}
				}
			} else {
				s.pg.apply(table, n.Payload)
			}
		}
		now := time.Now()
		wanted := !s.valkeyOK()
		switch {
		case wanted && !armed:
			if err := arm(); err != nil {
				return true, err
			}
		case !wanted && (readers || listening):
			if err := disarm(); err != nil {
				return true, err
			}
		}
		for _, at := range sent {
			if now.Sub(at) > copiesSetupTimeout {
				return true, errors.New("a probe did not come back in time")
			}
		}
		if !now.Before(nextProbe) {
			// Only while PostgreSQL answers reads: while Valkey does, the copies are not read,
			// and every probe wakes every listening backend of the database.
			if wanted {
				if err := probe(); err != nil {
					return true, err
				}
			}
			nextProbe = now.Add(copiesProbeInterval)
		}
		if !now.Before(nextCheck) {
			cctx, cancel := context.WithTimeout(ctx, copiesSetupTimeout)
			t, err := checkTriggers(cctx, conn, s.opts.Table)
			cancel()
			if err == nil && t != table {
				err = errors.New("the session table was renamed")
			}
			if err != nil {
				return true, err
			}
			nextCheck = time.Now().Add(copiesCheckInterval)
		}
	}
}
