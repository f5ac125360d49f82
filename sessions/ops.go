package sessions

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/valkey-io/valkey-go"
)

// writeTimeout bounds a whole write (the transaction and the Valkey call inside it). A write runs
// to its end even if the client hangs up: a commit the client never hears of must still reach
// Valkey, or be recorded as missed.
const writeTimeout = 10 * time.Second

// errValkeyOnlyDown answers a read or touch that only Valkey can answer while it is down.
var errValkeyOnlyDown = fmt.Errorf("%w: valkey is down and, while migrating from connect-redis, PostgreSQL is not a fallback", ErrUnavailable)

// Get returns the session's JSON as stored and the store that answered. An absent or expired
// session is ErrNotFound.
func (s *Store) Get(ctx context.Context, sid string) ([]byte, string, error) {
	if s.valkeyOK() {
		body, err := s.getValkey(ctx, sid)
		switch {
		case err == nil:
			s.m.ops.WithLabelValues("get", FromValkey, "ok").Inc()
			return body, FromValkey, nil
		case errors.Is(err, ErrNotFound) && s.valkeyOnly():
			// Migrating from connect-redis (or after it, until PostgreSQL is synced), Valkey is
			// the source of truth: a row may be a session connect-redis has since destroyed.
			s.m.ops.WithLabelValues("get", FromValkey, "not_found").Inc()
			return nil, FromValkey, err
		case errors.Is(err, ErrNotFound):
			// A trusted Valkey holds every live session PostgreSQL has, but a key can still go
			// without a write: evicted under memory pressure, or run out a moment before its
			// row (the stores round expiry to the second differently). PostgreSQL, the store
			// of record, confirms within a bound of its own; should it fail or be slow,
			// Valkey's answer stands, as it would while PostgreSQL is down.
			body, err := s.confirm(ctx, sid)
			switch {
			case err == nil:
				s.m.missing.Inc()
				s.m.ops.WithLabelValues("get", FromPostgres, "ok").Inc()
				return body, FromPostgres, nil
			case ctx.Err() != nil:
				return nil, FromValkey, ctx.Err()
			}
			s.m.ops.WithLabelValues("get", FromValkey, "not_found").Inc()
			return nil, FromValkey, ErrNotFound
		case ctx.Err() != nil:
			return nil, FromValkey, ctx.Err()
		}
		// Not trusted after all, or failed: PostgreSQL answers.
	}
	s.knowFlag(ctx)
	if s.valkeyOnly() {
		// During a migration from connect-redis, and after it until PostgreSQL is synced from
		// Valkey, Valkey is the source of truth: a row in PostgreSQL may be a session
		// connect-redis has since destroyed. (Before the flag was first read, that is unknown.)
		s.m.ops.WithLabelValues("get", FromValkey, "error").Inc()
		return nil, FromValkey, errValkeyOnlyDown
	}
	body, err := s.readPostgres(ctx, sid)
	switch {
	case errors.Is(err, ErrNotFound):
		s.m.ops.WithLabelValues("get", FromPostgres, "not_found").Inc()
		return nil, FromPostgres, ErrNotFound
	case err != nil:
		s.m.ops.WithLabelValues("get", FromPostgres, "error").Inc()
		return nil, FromPostgres, err
	}
	s.m.ops.WithLabelValues("get", FromPostgres, "ok").Inc()
	return body, FromPostgres, nil
}

// Confirming a session Valkey answered absent: how long a read waits for PostgreSQL, how long
// the query may run on in the background after that, and how many run at once.
const (
	confirmTimeout      = 250 * time.Millisecond
	confirmQueryTimeout = 5 * time.Second
	confirmSlots        = 8
)

var errConfirmSkipped = errors.New("confirmation skipped: PostgreSQL slow or busy")

// confirm reads sid from PostgreSQL to confirm Valkey's absent answer. Past confirmTimeout, or
// with confirmSlots confirmations already running, it gives up (Valkey's answer stands). A query
// still running then is not cancelled (pgx would close its pooled connection, and a struggling
// PostgreSQL would get a reconnect per unknown session) but left to finish within
// confirmQueryTimeout, holding its slot.
func (s *Store) confirm(ctx context.Context, sid string) ([]byte, error) {
	select {
	case s.confirmSem <- struct{}{}:
	default:
		return nil, errConfirmSkipped
	}
	type result struct {
		body []byte
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		defer func() { <-s.confirmSem }()
		qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), confirmQueryTimeout)
		defer cancel()
		b, _, err := s.getPostgres(qctx, sid)
		ch <- result{b, err}
	}()
	t := time.NewTimer(confirmTimeout)
	defer t.Stop()
	select {
	case r := <-ch:
		return r.body, r.err
	case <-t.C:
		return nil, errConfirmSkipped
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// readPostgres answers a read PostgreSQL serves: from this process's copy when it holds one
// (pgcopies.go), else from PostgreSQL, keeping a copy of the answer.
func (s *Store) readPostgres(ctx context.Context, sid string) ([]byte, error) {
	if s.pg == nil {
		body, _, err := s.getPostgres(ctx, sid)
		return body, err
	}
	if body, ok := s.pg.get(sid, nowUnix(s.now())); ok {
		s.m.pgLocal.Inc()
		return body, nil
	}
	tok := s.pg.begin(sid)
	body, expire, err := s.getPostgres(ctx, sid)
	s.pg.end(sid, tok, body, expire, err == nil)
	return body, err
}

// getPostgres reads a live session from PostgreSQL, and its row's expire in Unix seconds:
// ErrNotFound when there is none, an ErrUnavailable error when PostgreSQL failed.
func (s *Store) getPostgres(ctx context.Context, sid string) ([]byte, float64, error) {
	if !s.dbAllow() {
		return nil, 0, errCircuitOpen
	}
	var body []byte
	var expire float64
	// expire is a timestamp without time zone, read in the connection's TimeZone both in the
	// comparison and in the cast, as connect-pg-simple writes and compares it.
	err := s.db.QueryRow(ctx, `SELECT sess::text, extract(epoch FROM expire::timestamptz)::float8 FROM `+s.opts.Table+` WHERE sid = $1 AND expire >= to_timestamp($2)`,
		sid, nowUnix(s.now())).Scan(&body, &expire)
	s.dbReport(ctx, err)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return nil, 0, ErrNotFound
	case err != nil:
		return nil, 0, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	return body, expire, nil
}

// getValkey reads the session and the sentinel from one moment: from this process's tracked
// copies of both (Options.Local) without a round trip, or in one MGET. It returns ErrNotFound
// for an absent key in a trusted Valkey, and another error when Valkey failed or turned out not
// to be trusted (the caller reads PostgreSQL).
func (s *Store) getValkey(ctx context.Context, sid string) ([]byte, error) {
	key := s.opts.Prefix + sid
	copies := s.opts.Local != nil && s.copiesCurrent()
	if copies {
		if sess, sentinel, ok := s.localPair(key); ok {
			s.m.local.Inc()
			return s.judge(sess, sentinel)
		}
	}
	vctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	vk := s.client()
	var vals []valkey.ValkeyMessage
	var err error
	sent := time.Now()
	if copies {
		// DoCache keeps copies of both keys for the next reads. valkey-go caches an MGET key by
		// key: a key it already held, or was reading for another caller, is answered as it was
		// then, and the others as Valkey has them now, one trip later. Only a reply read
		// whole in this call's own MGET is from one moment; otherwise the pair is taken from
		// the copies (now both held, from one moment), or read again without them.
		vals, err = vk.DoCache(vctx, vk.B().Mget().Key(key, s.opts.SentinelKey).Cache(), localTTL).ToArray()
		if err == nil && len(vals) == 2 && (vals[0].IsCacheHit() || vals[1].IsCacheHit()) {
			if sess, sentinel, ok := s.localPair(key); ok {
				return s.judge(sess, sentinel)
			}
			vals, err = vk.Do(vctx, vk.B().Mget().Key(key, s.opts.SentinelKey).Build()).ToArray()
		}
	} else {
		vals, err = vk.Do(vctx, vk.B().Mget().Key(key, s.opts.SentinelKey).Build()).ToArray()
	}
	if err == nil && len(vals) != 2 {
		err = fmt.Errorf("mget: %d values", len(vals))
	}
	if err != nil {
		if ctx.Err() == nil { // a client hanging up says nothing about Valkey
			s.markDown("get", err)
		}
		return nil, err
	}
	s.heard(sent)
	return s.judge(vals[0], vals[1])
}

// localPair returns the copies of key and of the sentinel if both are held and are from one
// moment: the sentinel's copy is read before and after the session's and must not have changed
// (copies are dropped in the order Valkey's invalidations arrive, and a sentinel never takes an
// old value again), so the session's copy was read while the sentinel had that value.
func (s *Store) localPair(key string) (sess, sentinel valkey.ValkeyMessage, ok bool) {
	before, ok := s.opts.Local.Peek(s.opts.SentinelKey)
	if !ok {
		return sess, sentinel, false
	}
	if sess, ok = s.opts.Local.Peek(key); !ok {
		return sess, sentinel, false
	}
	if sentinel, ok = s.opts.Local.Peek(s.opts.SentinelKey); !ok {
		return sess, sentinel, false
	}
	b, _ := before.ToString()
	a, _ := sentinel.ToString()
	return sess, sentinel, a == b && before.IsNil() == sentinel.IsNil()
}

// judge answers a read from the session's and the sentinel's values, read at one moment.
func (s *Store) judge(sess, sentinelMsg valkey.ValkeyMessage) ([]byte, error) {
	sentinel, _ := sentinelMsg.ToString()
	if sentinel == "" || sentinel != *s.token.Load() {
		// Emptied, restored from a snapshot, failed over, or written past by a sidecar that
		// could not reach it: not trusted until reconciled.
		s.trusted.Store(false)
		s.setActive()
		return nil, errors.New("valkey not reconciled")
	}
	if sess.IsNil() {
		return nil, ErrNotFound
	}
	body, err := sess.AsBytes()
	if err != nil {
		s.markDown("get", err)
		return nil, err
	}
	return body, nil
}

// Put stores the session under sid. A session whose cookie has already expired is destroyed, as
// connect-redis does.
func (s *Store) Put(ctx context.Context, sid string, sess Session) (string, error) {
	now := s.now()
	ttl := s.ttlSeconds(sess, now)
	if ttl <= 0 {
		return s.Delete(ctx, sid)
	}
	expire := s.expireUnix(sess, now)
	return s.write(ctx, "put", sid, false, pgStep{
		// connect-pg-simple's upsert, with its expire.
		sql: `INSERT INTO ` + s.opts.Table + ` (sess, expire, sid) SELECT $1::json, to_timestamp($2), $3
			ON CONFLICT (sid) DO UPDATE SET sess = $1::json, expire = to_timestamp($2)`,
		args: []any{string(sess.Raw), expire, sid},
	}, func(ctx context.Context, vk valkey.Client) (bool, error) {
		return true, vk.Do(ctx, vk.B().Set().Key(s.opts.Prefix+sid).Value(valkey.BinaryString(sess.Raw)).ExSeconds(ttl).Build()).Error()
	})
}

// Delete destroys the session; absent is fine (idempotent).
func (s *Store) Delete(ctx context.Context, sid string) (string, error) {
	from, err := s.write(ctx, "delete", sid, true, pgStep{
		sql:  `DELETE FROM ` + s.opts.Table + ` WHERE sid = $1`,
		args: []any{sid},
	}, func(ctx context.Context, vk valkey.Client) (bool, error) {
		return true, vk.Do(ctx, vk.B().Del().Key(s.opts.Prefix+sid).Build()).Error()
	})
	return from, err
}

// Touch extends the session's expiry from sess's cookie (or the TTL) without rewriting it. It is
// ErrNotFound when the session is not alive (in PostgreSQL; in Valkey too while migrating from
// connect-redis, whose sessions are only there).
func (s *Store) Touch(ctx context.Context, sid string, sess Session) (string, error) {
	now := s.now()
	ttl := s.ttlSeconds(sess, now)
	if ttl <= 0 {
		if _, err := s.Delete(ctx, sid); err != nil {
			return FromPostgres, err
		}
		return FromPostgres, ErrNotFound
	}
	s.knowFlag(ctx)
	var inPG, restored bool
	var row []byte // the session as PostgreSQL has it, when the touch found it alive there
	from, err := s.write(ctx, "touch", sid, false, pgStep{
		sql:       `UPDATE ` + s.opts.Table + ` SET expire = to_timestamp($1) WHERE sid = $2 AND expire >= to_timestamp($3) RETURNING sess::text`,
		args:      []any{s.expireUnix(sess, now), sid, nowUnix(now)},
		returning: []any{&row},
		tell: func(found bool) bool {
			inPG = found
			// While migrating from connect-redis, a session may live in Valkey only.
			return inPG || s.valkeyOnly()
		},
	}, func(ctx context.Context, vk valkey.Client) (bool, error) {
		key := s.opts.Prefix + sid
		n, err := vk.Do(ctx, vk.B().Expire().Key(key).Seconds(ttl).Build()).AsInt64()
		if err == nil && n == 0 && inPG {
			if s.valkeyOnly() {
				// Valkey is the source of truth while migrating from connect-redis: the
				// session is gone (a logout through connect-redis), whatever the row says.
				inPG = false
				return true, nil
			}
			// PostgreSQL has it alive and Valkey does not: its key ran out a moment before
			// the row (the stores round expiry to the second differently, as connect-redis
			// and connect-pg-simple do). PostgreSQL decides, so its copy goes back with the
			// touch's TTL, as a reconciliation would copy it, under this session's lock: no
			// write through a sidecar comes between. NX: should something else have written
			// the key meanwhile (an app writing Valkey directly), the two disagree and Valkey
			// must be reconciled. Should the COMMIT then fail, the write counts as missed, as
			// any write that reached Valkey and not PostgreSQL does.
			err = vk.Do(ctx, vk.B().Set().Key(key).Value(valkey.BinaryString(row)).Nx().ExSeconds(ttl).Build()).Error()
			if valkey.IsValkeyNil(err) {
				return false, nil
			}
			restored = err == nil
			return restored, err
		}
		if err == nil && n == 1 && !inPG && s.valkeyOnly() {
			inPG = true // a connect-redis session: found, and touched where it lives
		}
		return true, err
	})
	if err == nil && restored {
		s.m.restored.Inc()
	}
	if err != nil {
		return from, err
	}
	if !inPG && s.valkeyOnly() && from != FromValkey {
		// The session may live in Valkey only, and Valkey did not answer: as a read would.
		s.m.ops.WithLabelValues("touch", from, "error").Inc()
		return from, errValkeyOnlyDown
	}
	if !inPG {
		s.m.ops.WithLabelValues("touch", from, "not_found").Inc()
		return from, ErrNotFound
	}
	s.m.ops.WithLabelValues("touch", from, "ok").Inc()
	return from, nil
}

// knowFlag reads the connect-redis migration flag when Run's first check has not yet: a request
// that comes before it must know whether PostgreSQL may answer (valkeyOnly).
func (s *Store) knowFlag(ctx context.Context) {
	if s.flagRead.Load() || s.dial == nil || s.opts.ValkeyOnly {
		return
	}
	if _, _, err := s.checkFromRedis(ctx); err != nil {
		s.log.Debug().Err(err).Msg("read the connect-redis migration flag")
	}
}

// pgStep is a write's statement in PostgreSQL. With returning set, the statement returns at most
// one row, scanned into returning. tell reports from the rows the statement affected (or
// returned) whether Valkey should be told at all (nil: always).
type pgStep struct {
	sql       string
	args      []any
	returning []any
	tell      func(found bool) bool
}

// write runs one session write in a PostgreSQL transaction that holds a per-sid lock, applies
// the same change to Valkey inside it, and commits. Valkey writes for one sid therefore land in
// the order their transactions commit. vkWrite reports whether Valkey now agrees with
// PostgreSQL. When Valkey is down, or the call fails, or it disagrees, the same transaction moves
// the epoch (and a destroy leaves a tombstone), so that no sidecar trusts Valkey again before a
// reconciliation. If the transaction itself fails after Valkey was touched, the store stops
// trusting Valkey and records the miss from Run (pendingStale) before it trusts it again.
//
// BEGIN, the lock and the statement go to PostgreSQL in one round trip (a batch: BEGIN opens a
// transaction that outlives the batch's Sync), then Valkey, then COMMIT: two round trips to
// PostgreSQL instead of four.
func (s *Store) write(ctx context.Context, op, sid string, destroy bool, step pgStep,
	vkWrite func(context.Context, valkey.Client) (bool, error)) (string, error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), writeTimeout)
	defer cancel()
	vk := s.client()
	useValkey := vk != nil && s.up.Load() && !s.opts.ReadPostgres
	from := FromPostgres
	touchedValkey, missed := false, false
	if !s.dbAllow() {
		s.m.ops.WithLabelValues(op, FromPostgres, "error").Inc()
		return FromPostgres, errCircuitOpen
	}
	err := s.inTx(ctx, func(conn *pgx.Conn) error {
		b := &pgx.Batch{}
		b.Queue(`BEGIN`)
		b.Queue(`SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`, s.opts.SentinelKey+"|"+sid)
		b.Queue(step.sql, step.args...)
		br := conn.SendBatch(ctx, b)
		_, err := br.Exec()
		if err == nil {
			_, err = br.Exec()
		}
		found := false
		switch {
		case err != nil:
		case step.returning != nil:
			err = br.QueryRow().Scan(step.returning...)
			found = err == nil
			if errors.Is(err, pgx.ErrNoRows) {
				err = nil
			}
		default:
			var tag pgconn.CommandTag
			tag, err = br.Exec()
			found = tag.RowsAffected() > 0
		}
		if cerr := br.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
		tell := step.tell == nil || step.tell(found)
		stale := false
		switch {
		case !s.HasValkey() || s.opts.ReadPostgres:
			// No Valkey, or it is untrusted by the migration marker anyway.
		case !useValkey:
			stale = true
		case tell:
			vctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
			touchedValkey = true
			agrees, err := vkWrite(vctx, vk)
			cancel()
			if s.opts.Local != nil {
				// Whatever the outcome, this process's next read must not find a copy from
				// before the change. Redis sends this connection the invalidation of its own
				// write right after the write's reply; this does not wait for it.
				s.opts.Local.Forget(s.opts.Prefix + sid)
			}
			switch {
			case err != nil:
				s.markDown(op, err)
				stale = true
			case !agrees:
				stale = true
			default:
				from = FromValkey
			}
		}
		missed = stale
		if stale {
			from = FromPostgres
			return s.markStale(ctx, conn, sid, destroy)
		}
		return nil
	})
	s.dbReport(ctx, err)
	if s.pg != nil {
		// Committed or not (a failed COMMIT may still have committed), this process's next
		// read must not find a copy from before the change; the notification of the commit is
		// not waited for.
		s.pg.forget(sid)
	}
	if err != nil {
		if touchedValkey {
			// Valkey may hold a change PostgreSQL does not: stop trusting it here at once, and
			// have Run move the epoch before anyone trusts it again.
			s.pendingStale.Store(true)
			s.distrust()
		}
		s.m.ops.WithLabelValues(op, FromPostgres, "error").Inc()
		return FromPostgres, fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	if missed {
		// Committed with the epoch moved: no sidecar trusts Valkey after its next check, and
		// this one stops now, before the write is acknowledged.
		s.distrust()
	}
	if op != "touch" { // Touch counts its own: found or not is known only after the write
		s.m.ops.WithLabelValues(op, from, "ok").Inc()
	}
	return from, nil
}

// inTx runs fn, which opens a transaction on conn (BEGIN), then commits it; if fn fails or
// the commit does not happen, the transaction is rolled back. A connection left inside a
// transaction (the rollback failed too) is not returned to the pool: pgxpool closes it.
func (s *Store) inTx(ctx context.Context, fn func(*pgx.Conn) error) error {
	c, err := s.db.Acquire(ctx)
	if err != nil {
		return err
	}
	defer c.Release()
	conn := c.Conn()
	err = fn(conn)
	if err == nil {
		var tag pgconn.CommandTag
		tag, err = conn.Exec(ctx, `COMMIT`)
		if err == nil && tag.String() != "COMMIT" {
			err = pgx.ErrTxCommitRollback
		}
	}
	if err != nil && conn.PgConn().TxStatus() != 'I' && !conn.IsClosed() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		_, _ = conn.Exec(rctx, `ROLLBACK`)
		cancel()
	}
	return err
}

// markStale records, in the writing transaction, that Valkey missed a write: a new epoch (no
// sidecar trusts the old sentinel any more) and, for a destroy, a tombstone.
func (s *Store) markStale(ctx context.Context, tx execer, sid string, destroy bool) error {
	if destroy {
		if _, err := tx.Exec(ctx, `INSERT INTO cachecar_session_tombstones (store, sid) VALUES ($1, $2)
			ON CONFLICT (store, sid) DO UPDATE SET destroyed_at = now()`, s.opts.SentinelKey, sid); err != nil {
			return err
		}
	}
	return bumpEpoch(ctx, tx, s.opts.SentinelKey)
}

// execer is a connection or a transaction.
type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// bumpEpoch gives the store keyed key a new epoch.
func bumpEpoch(ctx context.Context, tx execer, key string) error {
	_, err := tx.Exec(ctx, `INSERT INTO cachecar_session_state (store, epoch) VALUES ($1, md5(random()::text || clock_timestamp()::text))
		ON CONFLICT (store) DO UPDATE SET epoch = EXCLUDED.epoch`, key)
	return err
}

// dbAllow asks the database breaker whether PostgreSQL may be called (no breaker: yes).
func (s *Store) dbAllow() bool { return s.opts.DB == nil || s.opts.DB.Allow() }

// dbReport tells the breaker how a call dbAllow let through went: a connection failure or a
// timeout counts against PostgreSQL, anything else (an answer, an SQL error) for it.
func (s *Store) dbReport(ctx context.Context, err error) {
	switch {
	case s.opts.DB == nil:
	case err != nil && errors.Is(ctx.Err(), context.Canceled):
		// The caller hung up: no verdict on PostgreSQL (a half-open breaker replaces a probe
		// that never reports).
	case cachepolicy.DatabaseFailed(ctx, err):
		s.opts.DB.Failure()
	default:
		s.opts.DB.Success()
	}
}
