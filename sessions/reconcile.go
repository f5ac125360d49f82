package sessions

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/valkey-io/valkey-go"
)

// Advisory locks: one sidecar reconciles, one prunes, at a time. Arbitrary fixed values.
const (
	reconcileLock = 0x636373726563 // "ccsrec"
	pruneLock     = 0x63637370726e // "ccsprn"
)

// Run keeps the store in shape until ctx ends: every RefreshInterval it re-reads the epoch,
// checks (or, while down, probes) Valkey and reconciles it when it is not trusted; every
// PruneInterval, jittered, it deletes expired rows.
func (s *Store) Run(ctx context.Context) error {
	// Pruning runs on its own: a long DELETE must not hold up the checks, which bound how long
	// a missed write, or a Valkey that stopped answering, goes unnoticed.
	pruned := make(chan struct{})
	go func() {
		defer close(pruned)
		prune := time.NewTimer(jitter(s.opts.PruneInterval))
		defer prune.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-prune.C:
				s.prune(ctx)
				prune.Reset(jitter(s.opts.PruneInterval))
			}
		}
	}()
	defer func() { <-pruned }()
	if s.pg != nil {
		listened := make(chan struct{})
		go func() {
			defer close(listened)
			s.listenCopies(ctx)
		}()
		defer func() { <-listened }()
	}
	defer s.bg.Wait() // a sync in progress (migration.go) ends with ctx
	tick := time.NewTicker(s.opts.RefreshInterval)
	defer tick.Stop()
	s.refresh(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			s.refresh(ctx)
		}
	}
}

func jitter(d time.Duration) time.Duration {
	return d - d/10 + rand.N(d/5+1)
}

// refresh re-reads the epoch and decides whether Valkey is trusted.
func (s *Store) refresh(ctx context.Context) {
	qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	gen := s.trustGen() // before the epoch is read: see trustSince
	if s.pendingStale.Swap(false) {
		// A write failed after it touched Valkey: move the epoch before anything else. (Swapped
		// first, so that a write failing meanwhile sets it again for the next check.)
		if err := pgx.BeginFunc(qctx, s.db, func(tx pgx.Tx) error { return bumpEpoch(qctx, tx, s.opts.SentinelKey) }); err != nil {
			s.pendingStale.Store(true)
			s.log.Debug().Err(err).Msg("record a missed session write")
			return
		}
	}
	if s.dial == nil {
		return
	}
	// Before Valkey: while it is down, reads from PostgreSQL need to know whether a migration
	// from connect-redis left PostgreSQL behind.
	flagAt, flagAge, err := s.checkFromRedis(qctx)
	if err != nil {
		// Whether Valkey or PostgreSQL is the truth is unknown: decide nothing this time.
		s.log.Debug().Err(err).Msg("read the connect-redis migration flag")
		return
	}
	vk := s.client()
	if vk == nil {
		c, err := s.dial()
		if err != nil {
			s.log.Debug().Err(err).Msg("valkey unreachable for sessions")
			return
		}
		s.vk.Store(&vkBox{c})
		vk = c
	}
	vctx, vcancel := context.WithTimeout(ctx, s.opts.Timeout*4)
	sent := time.Now()
	res := vk.DoMulti(vctx, vk.B().Get().Key(s.opts.SentinelKey).Build(), vk.B().Info().Section("server").Build())
	vcancel()
	sentinel, err := res[0].ToString()
	if err != nil && !valkey.IsValkeyNil(err) {
		s.markDown("probe", err)
		return
	}
	runID, err := parseRunID(res[1])
	if err != nil {
		s.markDown("probe", err)
		return
	}
	s.heard(sent)
	// The epoch is read after the sentinel, never before: a write that missed Valkey while
	// this check waited on it (a paused server answers late) moved the epoch, and must be seen.
	epoch, err := s.readEpoch(qctx)
	if err != nil {
		// PostgreSQL down: no write can succeed anywhere, so no write can miss Valkey, and a
		// trusted Valkey stays right. Reads go on; writes fail with 503.
		s.log.Debug().Err(err).Msg("read session epoch")
		return
	}
	if !s.up.Swap(true) {
		s.log.Info().Msg("valkey answers again; sessions move back to it once reconciled")
	}
	if s.opts.ReadPostgres {
		// Migrating from connect-pg-simple: nobody may trust Valkey until a sidecar without
		// this mode has reconciled it.
		s.trusted.Store(false)
		s.setActive()
		if sentinel != pgMigrationMarker {
			c, cancel := context.WithTimeout(ctx, s.opts.Timeout*4)
			if err := vk.Do(c, vk.B().Set().Key(s.opts.SentinelKey).Value(pgMigrationMarker).Build()).Error(); err != nil {
				s.markDown("sentinel", err)
			}
			cancel()
		}
		return
	}
	token := epoch + "|" + runID
	s.token.Store(&token)
	if sentinel == token {
		if s.trustSince(gen) && flagAt > 0 && flagAge > s.migrationStale() && time.Now().After(s.syncAfter) && s.syncing.CompareAndSwap(false, true) {
			// No sidecar has run with ValkeyOnly for a while: the migration from connect-redis
			// is over, and PostgreSQL learns from the trusted Valkey what connect-redis did. On
			// a goroutine of its own, so that the checks go on meanwhile.
			tr := trusted{epoch: epoch, runID: runID}
			s.bg.Add(1)
			s.syncAfter = time.Now().Add(10 * time.Second) // the next try, should this one fail
			go func() {
				defer s.bg.Done()
				defer s.syncing.Store(false)
				if err := s.syncFromValkey(ctx, vk, flagAt, tr); err != nil {
					s.log.Warn().Err(err).Msg("sync PostgreSQL from Valkey after the migration from connect-redis stopped; it starts over once Valkey is trusted, at the earliest in 10 s")
				}
			}()
		}
		return
	}
	s.trusted.Store(false)
	s.setActive()
	if err := s.reconcile(ctx, vk, epoch, runID, sentinel == pgMigrationMarker); err != nil {
		s.m.reconciles.WithLabelValues("error").Inc()
		s.log.Warn().Err(err).Msg("session reconciliation failed; retrying")
	}
}

// readEpoch returns the store's epoch, creating it the first time. A plain read otherwise: this
// runs every RefreshInterval on every sidecar and must not write.
func (s *Store) readEpoch(ctx context.Context) (string, error) {
	var epoch string
	err := s.db.QueryRow(ctx, `SELECT epoch FROM cachecar_session_state WHERE store = $1`, s.opts.SentinelKey).Scan(&epoch)
	if !errors.Is(err, pgx.ErrNoRows) {
		return epoch, err
	}
	err = s.db.QueryRow(ctx, `INSERT INTO cachecar_session_state (store, epoch) VALUES ($1, md5(random()::text || clock_timestamp()::text))
		ON CONFLICT (store) DO UPDATE SET epoch = cachecar_session_state.epoch RETURNING epoch`, s.opts.SentinelKey).Scan(&epoch)
	return epoch, err
}

// parseRunID reads run_id from an INFO server answer.
func parseRunID(r valkey.ValkeyResult) (string, error) {
	info, err := r.ToString()
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "run_id:"); ok {
			return v, nil
		}
	}
	return "", errors.New("valkey INFO server has no run_id")
}

// reconcile makes Valkey hold what PostgreSQL holds, then trusts it: tombstoned keys deleted,
// every live row copied (row-locked while copied, so a concurrent write lands after the copy),
// keys PostgreSQL does not know deleted (DeleteUnknown), then a new epoch set in Valkey and, by
// compare-and-set against the epoch it started from, in PostgreSQL. A write that missed Valkey
// meanwhile changed the epoch, the compare-and-set fails, and the next refresh starts over.
func (s *Store) reconcile(ctx context.Context, vk valkey.Client, oldEpoch, runID string, afterPgMigration bool) error {
	conn, err := s.db.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	var locked bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, int64(reconcileLock)).Scan(&locked); err != nil {
		return err
	}
	if !locked {
		return nil // the sidecar holding it will set the sentinel; the next refresh sees it
	}
	defer conn.Exec(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, int64(reconcileLock))
	// Another sidecar may have finished a reconciliation while this one waited: start from the
	// epoch as it is now. A missed write of this process that committed before this read is
	// covered by the copy below, so the count of missed writes restarts here too.
	gen := s.trustGen()
	if err := conn.QueryRow(ctx, `SELECT epoch FROM cachecar_session_state WHERE store = $1`, s.opts.SentinelKey).Scan(&oldEpoch); err != nil {
		return err
	}
	start := s.now()
	var b [16]byte
	if _, err := crand.Read(b[:]); err != nil {
		return err
	}
	newEpoch := hex.EncodeToString(b[:])
	vctx := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(ctx, 10*s.opts.Timeout+time.Second)
	}

	c, cancel := vctx()
	err = vk.Do(c, vk.B().Set().Key(s.opts.SentinelKey).Value("reconciling:"+newEpoch).Build()).Error()
	cancel()
	if err != nil {
		return fmt.Errorf("sentinel: %w", err)
	}

	// Tombstones: sessions destroyed while Valkey could not be told.
	rows, err := conn.Query(ctx, `SELECT sid, destroyed_at FROM cachecar_session_tombstones WHERE store = $1`, s.opts.SentinelKey)
	if err != nil {
		return err
	}
	var sids []string
	var ats []time.Time
	for rows.Next() {
		var sid string
		var at time.Time
		if err := rows.Scan(&sid, &at); err != nil {
			rows.Close()
			return err
		}
		sids, ats = append(sids, sid), append(ats, at)
	}
	if err := rows.Err(); err != nil {
		return err
	}
	for i := 0; i < len(sids); i += 500 {
		batch := sids[i:min(i+500, len(sids))]
		keys := make([]string, len(batch))
		for j, sid := range batch {
			keys[j] = s.opts.Prefix + sid
		}
		c, cancel := vctx()
		err := vk.Do(c, vk.B().Del().Key(keys...).Build()).Error()
		cancel()
		if err != nil {
			return fmt.Errorf("delete tombstoned: %w", err)
		}
		if _, err := conn.Exec(ctx, `DELETE FROM cachecar_session_tombstones t USING unnest($1::text[], $2::timestamptz[]) AS u(sid, at)
			WHERE t.store = $3 AND t.sid = u.sid AND t.destroyed_at = u.at`, batch, ats[i:min(i+500, len(sids))], s.opts.SentinelKey); err != nil {
			return err
		}
	}

	// Every live row, in sid order, 500 at a time, each batch row-locked while it is copied.
	// Not while migrating from connect-redis: there a row may be a session connect-redis has
	// destroyed, and Valkey is the source of truth.
	copied := 0
	after := ""
	for !s.valkeyOnly() {
		n := 0
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			rows, err := tx.Query(ctx, `SELECT sid, sess::text,
					ceil(extract(epoch FROM expire::timestamptz) - extract(epoch FROM clock_timestamp()))::bigint
				FROM `+s.opts.Table+` WHERE sid > $1 AND expire >= to_timestamp($2) ORDER BY sid LIMIT 500 FOR UPDATE`,
				after, nowUnix(s.now()))
			if err != nil {
				return err
			}
			var cmds valkey.Commands
			for rows.Next() {
				var sid, body string
				var ttl int64
				if err := rows.Scan(&sid, &body, &ttl); err != nil {
					rows.Close()
					return err
				}
				n++
				after = sid
				if ttl > 0 {
					cmds = append(cmds, vk.B().Set().Key(s.opts.Prefix+sid).Value(body).ExSeconds(ttl).Build())
				}
			}
			if err := rows.Err(); err != nil {
				return err
			}
			if len(cmds) == 0 {
				return nil
			}
			c, cancel := vctx()
			defer cancel()
			for _, r := range vk.DoMulti(c, cmds...) {
				if err := r.Error(); err != nil {
					return fmt.Errorf("copy: %w", err)
				}
			}
			copied += len(cmds)
			return nil
		})
		if err != nil {
			return err
		}
		if n < 500 {
			break
		}
	}

	deleted := 0
	// Not while Valkey is the source of truth (a connect-redis migration, or its end before the
	// sync): there keys without rows are sessions connect-redis created.
	if (s.opts.DeleteUnknown && !s.valkeyOnly()) || afterPgMigration {
		if deleted, err = s.deleteUnknown(ctx, vk, conn); err != nil {
			return err
		}
	}

	c, cancel = vctx()
	token := newEpoch + "|" + runID
	err = vk.Do(c, vk.B().Set().Key(s.opts.SentinelKey).Value(token).Build()).Error()
	cancel()
	if err != nil {
		return fmt.Errorf("sentinel: %w", err)
	}
	tag, err := conn.Exec(ctx, `UPDATE cachecar_session_state SET epoch = $1 WHERE store = $3 AND epoch = $2`, newEpoch, oldEpoch, s.opts.SentinelKey)
	if err != nil {
		return err
	}
	if tag.RowsAffected() == 0 {
		return errors.New("a write missed Valkey during the reconciliation; starting over")
	}
	s.token.Store(&token)
	if !s.trustSince(gen) {
		// A write of this process missed Valkey after the epoch was read; the next check
		// finds the epoch moved and reconciles again.
		return errors.New("a write missed Valkey during the reconciliation; starting over")
	}
	s.m.reconciles.WithLabelValues("ok").Inc()
	s.log.Info().Int("copied", copied).Int("tombstones", len(sids)).Int("deleted_unknown", deleted).
		Dur("took", s.now().Sub(start)).Msg("sessions reconciled; valkey serves them again")
	return nil
}

// deleteUnknown deletes session keys in Valkey whose rows PostgreSQL does not have (alive).
// A key whose row is not visible may belong to a write between its Valkey step and its COMMIT
// (a new session: its row is not committed yet), so the keys found unknown are checked again,
// and deleted, under those sessions' write locks: each such write has committed by then (its row
// is seen and the key kept), and a later one waits for the delete and writes after it.
func (s *Store) deleteUnknown(ctx context.Context, vk valkey.Client, conn pgConn) (int, error) {
	deleted := 0
	err := s.scanSessions(ctx, vk, 1000, func(sids []string) error {
		unknown, err := s.unknownSIDs(ctx, conn, sids, false)
		if err != nil || len(unknown) == 0 {
			return err
		}
		n, err := s.deleteLocked(ctx, vk, conn, unknown)
		deleted += n
		return err
	})
	return deleted, err
}

// scanSessions walks Valkey's session keys with SCAN, count at a time, and passes each
// non-empty batch's sids (the keys without the prefix) to fn, stopping at fn's first error.
func (s *Store) scanSessions(ctx context.Context, vk valkey.Client, count int64, fn func(sids []string) error) error {
	var cursor uint64
	for {
		c, cancel := context.WithTimeout(ctx, 10*s.opts.Timeout+time.Second)
		e, err := vk.Do(c, vk.B().Scan().Cursor(cursor).Match(globEscape(s.opts.Prefix)+"*").Count(count).Build()).AsScanEntry()
		cancel()
		if err != nil {
			return fmt.Errorf("scan: %w", err)
		}
		if len(e.Elements) > 0 {
			sids := make([]string, 0, len(e.Elements))
			for _, k := range e.Elements {
				sids = append(sids, strings.TrimPrefix(k, s.opts.Prefix))
			}
			if err := fn(sids); err != nil {
				return err
			}
		}
		if cursor = e.Cursor; cursor == 0 {
			return nil
		}
	}
}

// unknownSIDs returns those of sids whose rows PostgreSQL does not have alive; with lock, it
// first takes each one's write lock (held until q's transaction ends).
func (s *Store) unknownSIDs(ctx context.Context, q pgConn, sids []string, lock bool) ([]string, error) {
	sql := `SELECT sid FROM ` + s.opts.Table + ` WHERE sid = ANY($1) AND expire >= to_timestamp($2)`
	if lock {
		// The same lock as write's, one per session, in sid order. A write holds one lock at a
		// time, so the order only keeps two reconciliations (which the reconcile lock already
		// serialises) from deadlocking.
		if _, err := q.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($2 || '|' || u.sid, 0))
			FROM (SELECT unnest($1::text[]) AS sid ORDER BY 1) u`, sids, s.opts.SentinelKey); err != nil {
			return nil, err
		}
	}
	rows, err := q.Query(ctx, sql, sids, nowUnix(s.now()))
	if err != nil {
		return nil, err
	}
	alive, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, err
	}
	known := make(map[string]bool, len(alive))
	for _, sid := range alive {
		known[sid] = true
	}
	var unknown []string
	for _, sid := range sids {
		if !known[sid] {
			unknown = append(unknown, sid)
		}
	}
	return unknown, nil
}

// deleteLocked checks sids again under their write locks, in a transaction of its own, and
// deletes the keys of those still unknown before it releases the locks.
func (s *Store) deleteLocked(ctx context.Context, vk valkey.Client, conn pgConn, sids []string) (int, error) {
	deleted := 0
	err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		unknown, err := s.unknownSIDs(ctx, tx, sids, true)
		if err != nil || len(unknown) == 0 {
			return err
		}
		keys := make([]string, len(unknown))
		for i, sid := range unknown {
			keys[i] = s.opts.Prefix + sid
		}
		c, cancel := context.WithTimeout(ctx, 10*s.opts.Timeout+time.Second)
		n, err := vk.Do(c, vk.B().Del().Key(keys...).Build()).AsInt64()
		cancel()
		deleted = int(n)
		return err
	})
	return deleted, err
}

// pgConn is a pooled connection or a transaction.
type pgConn interface {
	Begin(ctx context.Context) (pgx.Tx, error)
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// globEscape escapes the glob characters of s for SCAN MATCH.
func globEscape(s string) string {
	var b strings.Builder
	for _, c := range s {
		if strings.ContainsRune(`*?[]\`, c) {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	return b.String()
}
