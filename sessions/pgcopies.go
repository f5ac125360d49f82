package sessions

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
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

// NotifySQL installs (or replaces) the triggers on connect-pg-simple's table that let every
// sidecar keep copies of sessions read from PostgreSQL: one statement-level trigger per
// operation, notifying the sids of the rows the statement changed (a whole-table message when
// they do not fit in a NOTIFY payload, and for TRUNCATE). Idempotent.
func NotifySQL(schema, table string) string {
	fn := pgx.Identifier{notifyFunc}.Sanitize()
	if schema != "" {
		fn = pgx.Identifier{schema, notifyFunc}.Sanitize()
	}
	t := TableName(schema, table)
	q := func(s string) string { return pgx.Identifier{s}.Sanitize() }
	return fmt.Sprintf(`CREATE OR REPLACE FUNCTION %[1]s() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
	ids text;
	tbl text := to_json(TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME)::text;
BEGIN
	IF TG_OP = 'INSERT' THEN
		SELECT json_agg(DISTINCT sid)::text INTO ids FROM cachecar_new;
	ELSIF TG_OP = 'UPDATE' THEN
		SELECT json_agg(DISTINCT sid)::text INTO ids FROM (SELECT sid FROM cachecar_old UNION SELECT sid FROM cachecar_new) u;
	ELSIF TG_OP = 'DELETE' THEN
		SELECT json_agg(DISTINCT sid)::text INTO ids FROM cachecar_old;
	END IF;
	IF TG_OP <> 'TRUNCATE' AND ids IS NULL THEN
		RETURN NULL; -- no row changed
	END IF;
	IF TG_OP = 'TRUNCATE' OR octet_length(ids) > 7800 THEN
		PERFORM pg_notify('%[2]s', '{"v":%[3]d,"t":' || tbl || ',"all":true}');
	ELSE
		PERFORM pg_notify('%[2]s', '{"v":%[3]d,"t":' || tbl || ',"s":' || ids || '}');
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
CREATE TRIGGER %[8]s AFTER TRUNCATE ON %[4]s FOR EACH STATEMENT EXECUTE FUNCTION %[1]s();`,
		fn, NotifyChannel, notifyVersion, t, q(notifyTriggers[0]), q(notifyTriggers[1]), q(notifyTriggers[2]), q(notifyTriggers[3]))
}

// pgCopies holds the copies. Safe for concurrent use.
type pgCopies struct {
	max int64 // bytes, roughly: bodies, sids and a fixed overhead per copy

	mu    sync.Mutex
	live  bool   // the LISTEN connection listens, the triggers are in place
	gen   uint64 // moves whenever every copy is dropped: reads begun before keep nothing
	bytes int64
	m     map[string]pgCopy
	reads map[string]*readMark // reads in flight, by sid
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

const copyOverhead = 96

func newPGCopies(maxBytes int64) *pgCopies {
	return &pgCopies{max: maxBytes, m: map[string]pgCopy{}, reads: map[string]*readMark{}}
}

// get returns the copy of sid when copies are live and the row's expire is not before now
// (Unix seconds, rounded up, as the query compares it).
func (c *pgCopies) get(sid string, now int64) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.live {
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
	if !c.live {
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
	if mk == nil { // dropped by reset: keep nothing
		return
	}
	unchanged := mk.gen == tok.mgen
	if mk.n--; mk.n == 0 {
		delete(c.reads, sid)
	}
	if !found || !unchanged || !c.live || c.gen != tok.gen {
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
		c.resetLocked()
	}
}

func (c *pgCopies) isLive() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.live
}

// PostgresCopies reports the copies of PostgreSQL's answers for health: "up" while they are
// kept, "down" while not (LISTEN connection down, triggers missing), "" when turned off.
func (s *Store) PostgresCopies() string {
	switch {
	case s.pg == nil:
		return ""
	case s.pg.isLive():
		return "up"
	}
	return "down"
}

func (c *pgCopies) stats() (n int, bytes int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.m), c.bytes
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
	if err := json.Unmarshal([]byte(payload), &msg); err != nil || msg.V != notifyVersion {
		// Not what these triggers send (a hand-run NOTIFY, or another version's trigger):
		// dropping everything is always safe.
		c.reset()
		return
	}
	if msg.T != table {
		return // another deployment's session table in the same database
	}
	if msg.All {
		c.reset()
		return
	}
	c.forget(msg.S...)
}

// errNoTriggers: the session table lacks NotifySQL's triggers (migrate not run, or they were
// dropped or disabled): copies are not kept.
var errNoTriggers = errors.New("the session table's notify triggers are missing or disabled (run `cachecar migrate`)")

// checkTriggers returns the table as the triggers name it (schema.table), or errNoTriggers.
func checkTriggers(ctx context.Context, conn *pgx.Conn, table string) (string, error) {
	var name *string
	var n int
	err := conn.QueryRow(ctx, `SELECT n.nspname || '.' || c.relname,
			(SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
			  WHERE t.tgrelid = c.oid AND t.tgname = ANY($2) AND t.tgenabled <> 'D' AND p.proname = $3)
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE c.oid = to_regclass($1)`, table, notifyTriggers, notifyFunc).Scan(&name, &n)
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

// Copies' LISTEN connection: how often it re-checks the triggers (which also proves the
// connection alive), and bounds on set-up steps and reconnect back-off.
const (
	copiesCheckInterval = 2 * time.Second
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
		}
		switch {
		case errors.Is(err, errNoTriggers):
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

// copiesSession runs one LISTEN connection, taken out of the pool: LISTEN first, then the
// trigger check, then copies go live until the connection fails or a check does.
func (s *Store) copiesSession(ctx context.Context) (wasLive bool, err error) {
	actx, cancel := context.WithTimeout(ctx, copiesSetupTimeout)
	pc, err := s.db.Acquire(actx)
	cancel()
	if err != nil {
		return false, err
	}
	conn := pc.Hijack()
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		conn.Close(cctx)
	}()
	defer s.pg.setLive(false) // before the close: copies stop the moment the session ends
	sctx, cancel := context.WithTimeout(ctx, copiesSetupTimeout)
	// Named for pg_stat_activity: this connection stays open, listening.
	_, err = conn.Exec(sctx, "SET application_name = 'cachecar-session-copies'; LISTEN "+pgx.Identifier{NotifyChannel}.Sanitize())
	var table string
	if err == nil {
		table, err = checkTriggers(sctx, conn, s.opts.Table)
	}
	cancel()
	if err != nil {
		return false, err
	}
	s.pg.setLive(true)
	next := time.Now().Add(copiesCheckInterval)
	for {
		wctx, cancel := context.WithDeadline(ctx, next)
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
			s.pg.apply(table, n.Payload)
		}
		if !time.Now().Before(next) {
			cctx, cancel := context.WithTimeout(ctx, copiesSetupTimeout)
			_, err := checkTriggers(cctx, conn, s.opts.Table)
			cancel()
			if err != nil {
				return true, err
			}
			next = time.Now().Add(copiesCheckInterval)
		}
	}
}
