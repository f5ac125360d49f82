package sessions

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/valkey-io/valkey-go"
)

// Ending a migration from connect-redis. While it runs, connect-redis writes Valkey alone: the
// sessions it creates have no row, and the rows of the sessions it destroys stay alive. Once
// sessions.migration is back to "", PostgreSQL would decide again: a reconciliation would copy
// the destroyed sessions back into Valkey and delete the created ones. So every sidecar running
// with ValkeyOnly keeps a flag in cachecar_session_state (its value: when it was last set, Unix
// ms). A sidecar without ValkeyOnly that finds the flag keeps Valkey as the source of truth, as
// ValkeyOnly does; once no sidecar has set the flag for MigrationStale, one of them (the
// reconciliation lock) syncs PostgreSQL from a trusted Valkey, under each session's write lock,
// and removes the flag: every session key gets its row (its body and the key's expiry), and
// every live row without a key is deleted.

// defaultMigrationStale is Options.MigrationStale's default.
const defaultMigrationStale = 30 * time.Second

// fromRedisKey is the flag's row in cachecar_session_state.
func (s *Store) fromRedisKey() string { return s.opts.SentinelKey + "|migrating:connect-redis" }

func (s *Store) migrationStale() time.Duration {
	if s.opts.MigrationStale > 0 {
		return s.opts.MigrationStale
	}
	return defaultMigrationStale
}

// valkeyOnly reports whether Valkey is the source of truth: migrating from connect-redis, after
// such a migration until PostgreSQL is synced from Valkey, or (with Valkey configured) before the
// flag could be read at all.
func (s *Store) valkeyOnly() bool {
	return s.opts.ValkeyOnly || s.fromRedis.Load() || (s.dial != nil && !s.opts.ReadPostgres && !s.flagRead.Load())
}

// checkFromRedis sets the flag (ValkeyOnly, at most every MigrationStale/6) or reads it (the
// others). For a flag it read, it returns its value and how long ago it was set; flagAt 0 means
// there is none. Times are PostgreSQL's clock, the one every sidecar shares.
func (s *Store) checkFromRedis(ctx context.Context) (flagAt int64, age time.Duration, err error) {
	if s.opts.ValkeyOnly {
		now := time.Now()
		if now.Sub(s.flagSet) < s.migrationStale()/6 {
			return 0, 0, nil
		}
		if _, err := s.db.Exec(ctx, `INSERT INTO cachecar_session_state (store, epoch)
			VALUES ($1, (extract(epoch FROM clock_timestamp()) * 1000)::bigint::text)
			ON CONFLICT (store) DO UPDATE SET epoch = EXCLUDED.epoch`, s.fromRedisKey()); err != nil {
			return 0, 0, err
		}
		s.flagSet = now
		return 0, 0, nil
	}
	if s.opts.ReadPostgres {
		// Migrating from connect-pg-simple: PostgreSQL answers every read anyway.
		s.flagRead.Store(true)
		return 0, 0, nil
	}
	var v string
	var now int64
	err = s.db.QueryRow(ctx, `SELECT epoch, (extract(epoch FROM clock_timestamp()) * 1000)::bigint
		FROM cachecar_session_state WHERE store = $1`, s.fromRedisKey()).Scan(&v, &now)
	if errors.Is(err, pgx.ErrNoRows) {
		s.setFromRedis(false)
		s.flagRead.Store(true)
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, err
	}
	s.setFromRedis(true)
	s.flagRead.Store(true)
	at, err := strconv.ParseInt(v, 10, 64)
	if err != nil || at <= 0 {
		return 0, 0, nil // not a flag this code set: never ends by itself
	}
	return at, time.Duration(now-at) * time.Millisecond, nil
}

// trusted is what a sync trusted Valkey for: the epoch in PostgreSQL and the sentinel (the epoch
// and the server's run id) it matched.
type trusted struct{ epoch, runID string }

// errTrustLost stops a sync: Valkey's data or the epoch changed since it was trusted (a restart,
// a failover, a flush, or a write that missed Valkey), so what it reads may not be the truth.
var errTrustLost = errors.New("valkey is no longer trusted")

// syncFromValkey makes PostgreSQL hold what the trusted Valkey holds, then removes the flag set
// at flagAt (only if no sidecar set it again meanwhile, and the epoch did not move). Every batch
// checks, under its sessions' write locks, that the epoch is still tr.epoch and that Valkey still
// holds the sentinel and run id it was trusted for, and stops with errTrustLost otherwise. It
// runs under the reconciliation lock; without it (another sidecar syncs or reconciles) it does
// nothing.
func (s *Store) syncFromValkey(ctx context.Context, vk valkey.Client, flagAt int64, tr trusted) error {
	conn, err := s.db.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	var locked bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, int64(reconcileLock)).Scan(&locked); err != nil || !locked {
		return err
	}
	defer conn.Exec(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, int64(reconcileLock))
	start := time.Now()
	// Another sidecar may have ended the migration while this one waited for the lock: then
	// PostgreSQL is the truth already, and a sync now would delete what it rescues (rows of keys
	// Valkey lost).
	var still bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM cachecar_session_state WHERE store = $1 AND epoch = $2)`,
		s.fromRedisKey(), strconv.FormatInt(flagAt, 10)).Scan(&still); err != nil || !still {
		return err
	}

	// Every session key: its row, under its write lock, from the value and PTTL read under it.
	written, skipped := 0, 0
	err = s.scanSessions(ctx, vk, 500, func(keys []string) error {
		sids := make([]string, 0, len(keys))
		for _, sid := range keys {
			if CheckSID(sid) == nil {
				sids = append(sids, sid)
			}
		}
		w, sk, err := s.syncKeys(ctx, vk, conn, sids, tr)
		written, skipped = written+w, skipped+sk
		return err
	})
	if err != nil {
		return err
	}

	// Every live row without a key: a session connect-redis destroyed.
	deleted := 0
	after := ""
	for {
		rows, err := conn.Query(ctx, `SELECT sid FROM `+s.opts.Table+` WHERE sid > $1 AND expire >= to_timestamp($2) ORDER BY sid LIMIT 500`,
			after, nowUnix(s.now()))
		if err != nil {
			return err
		}
		sids, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return err
		}
		if len(sids) == 0 {
			break
		}
		after = sids[len(sids)-1]
		n, err := s.deleteKeyless(ctx, vk, conn, sids, tr)
		deleted += n
		if err != nil {
			return err
		}
	}

	tag, err := conn.Exec(ctx, `DELETE FROM cachecar_session_state WHERE store = $1 AND epoch = $2
		AND EXISTS (SELECT 1 FROM cachecar_session_state WHERE store = $3 AND epoch = $4)`,
		s.fromRedisKey(), strconv.FormatInt(flagAt, 10), s.opts.SentinelKey, tr.epoch)
	if err != nil {
		return err
	}
	ev := s.log.Info().Int("written", written).Int("skipped", skipped).Int("deleted", deleted).Dur("took", time.Since(start))
	if tag.RowsAffected() == 1 {
		s.setFromRedis(false)
		ev.Msg("migration from connect-redis ended: PostgreSQL synced from Valkey")
	} else {
		ev.Msg("PostgreSQL synced from Valkey, but the migration flag was set again or the epoch moved: the migration from connect-redis goes on")
	}
	return nil
}

// setFromRedis records whether a migration from connect-redis left PostgreSQL behind Valkey.
// Either way it changes, copies of PostgreSQL's answers go: kept before, they may be of rows
// connect-redis has since changed in Valkey alone; read during, one that began before the flag
// was known may be; after, the sync's own notifications may still be on their way.
func (s *Store) setFromRedis(v bool) {
	if s.fromRedis.Swap(v) != v && s.pg != nil {
		s.pg.reset()
	}
}

// checkTrust fails with errTrustLost unless, in tx (holding the batch's write locks), the epoch
// is still tr.epoch, and sentinel and info (Valkey's answers to GET sentinel and INFO server,
// sent with the batch's reads) still match tr.
func (s *Store) checkTrust(ctx context.Context, tx pgx.Tx, tr trusted, sentinel, info valkey.ValkeyResult) error {
	var epoch string
	if err := tx.QueryRow(ctx, `SELECT epoch FROM cachecar_session_state WHERE store = $1`, s.opts.SentinelKey).Scan(&epoch); err != nil {
		return err
	}
	v, err := sentinel.ToString()
	if err != nil && !valkey.IsValkeyNil(err) {
		return err
	}
	runID, err := parseRunID(info)
	if err != nil {
		return err
	}
	if epoch != tr.epoch || v != tr.epoch+"|"+tr.runID || runID != tr.runID {
		return errTrustLost
	}
	return nil
}

// lockSIDs takes the write locks of sids (as write takes one), in sid order, until tx ends.
func (s *Store) lockSIDs(ctx context.Context, tx pgx.Tx, sids []string) error {
	_, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($2 || '|' || u.sid, 0))
		FROM (SELECT unnest($1::text[]) AS sid ORDER BY 1) u`, sids, s.opts.SentinelKey)
	return err
}

// lockedBatch runs fn in a transaction holding the write locks of sids, with Valkey's answers to
// reads(sid) for every sid in order (flattened), read in one pipeline that ends with the sentinel
// and the run id. The reads run before those, in order on one connection: only if they, and the
// epoch read under the locks, still match tr did nothing reset Valkey (or miss it) before the
// reads ran; otherwise it stops with errTrustLost before fn.
func (s *Store) lockedBatch(ctx context.Context, vk valkey.Client, conn pgConn, sids []string, tr trusted,
	reads func(sid string) []valkey.Completed, fn func(tx pgx.Tx, res []valkey.ValkeyResult) error) error {
	return pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if err := s.lockSIDs(ctx, tx, sids); err != nil {
			return err
		}
		var cmds valkey.Commands
		for _, sid := range sids {
			cmds = append(cmds, reads(sid)...)
		}
		cmds = append(cmds, vk.B().Get().Key(s.opts.SentinelKey).Build(), vk.B().Info().Section("server").Build())
		c, cancel := context.WithTimeout(ctx, 10*s.opts.Timeout+time.Second)
		res := vk.DoMulti(c, cmds...)
		cancel()
		if err := s.checkTrust(ctx, tx, tr, res[len(res)-2], res[len(res)-1]); err != nil {
			return err
		}
		return fn(tx, res[:len(res)-2])
	})
}

// syncKeys writes the rows of sids from their keys, under their write locks. A key that is not a
// string, has no TTL or holds no JSON object is skipped and counted.
func (s *Store) syncKeys(ctx context.Context, vk valkey.Client, conn pgConn, sids []string, tr trusted) (written, skipped int, err error) {
	reads := func(sid string) []valkey.Completed {
		return []valkey.Completed{vk.B().Get().Key(s.opts.Prefix + sid).Build(), vk.B().Pttl().Key(s.opts.Prefix + sid).Build()}
	}
	err = s.lockedBatch(ctx, vk, conn, sids, tr, reads, func(tx pgx.Tx, res []valkey.ValkeyResult) error {
		now := time.Now()
		var upSIDs, bodies []string
		var expires []int64
		for i, sid := range sids {
			body, err := res[2*i].ToString()
			if valkey.IsValkeyNil(err) {
				continue // gone meanwhile
			}
			var verr *valkey.ValkeyError
			if errors.As(err, &verr) {
				skipped++ // not a string (WRONGTYPE): not a session a store wrote
				continue
			}
			if err != nil {
				return fmt.Errorf("get %s: %w", sid, err)
			}
			pttl, err := res[2*i+1].AsInt64()
			if err != nil {
				return fmt.Errorf("pttl %s: %w", sid, err)
			}
			if pttl <= 0 || !utf8.ValidString(body) || !json.Valid([]byte(body)) || !strings.HasPrefix(strings.TrimSpace(body), "{") {
				skipped++ // expiring now, or no TTL (not written by a session store), or not JSON
				continue
			}
			upSIDs, bodies = append(upSIDs, sid), append(bodies, body)
			// connect-pg-simple's expire is whole seconds, rounded up.
			expires = append(expires, (now.UnixMilli()+pttl+999)/1000)
		}
		if len(upSIDs) == 0 {
			return nil
		}
		_, err := tx.Exec(ctx, `INSERT INTO `+s.opts.Table+` (sess, expire, sid)
			SELECT u.sess::json, to_timestamp(u.expire), u.sid FROM unnest($1::text[], $2::bigint[], $3::text[]) AS u(sess, expire, sid)
			ON CONFLICT (sid) DO UPDATE SET sess = EXCLUDED.sess, expire = EXCLUDED.expire`, bodies, expires, upSIDs)
		written = len(upSIDs)
		return err
	})
	return written, skipped, err
}

// deleteKeyless deletes the rows of sids whose keys Valkey does not have, under their write
// locks.
func (s *Store) deleteKeyless(ctx context.Context, vk valkey.Client, conn pgConn, sids []string, tr trusted) (int, error) {
	deleted := 0
	reads := func(sid string) []valkey.Completed {
		return []valkey.Completed{vk.B().Exists().Key(s.opts.Prefix + sid).Build()}
	}
	err := s.lockedBatch(ctx, vk, conn, sids, tr, reads, func(tx pgx.Tx, res []valkey.ValkeyResult) error {
		var gone []string
		for i, sid := range sids {
			n, err := res[i].AsInt64()
			if err != nil {
				return fmt.Errorf("exists %s: %w", sid, err)
			}
			if n == 0 {
				gone = append(gone, sid)
			}
		}
		if len(gone) == 0 {
			return nil
		}
		tag, err := tx.Exec(ctx, `DELETE FROM `+s.opts.Table+` WHERE sid = ANY($1)`, gone)
		deleted = int(tag.RowsAffected())
		return err
	})
	return deleted, err
}
