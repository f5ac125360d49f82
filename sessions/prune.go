package sessions

import (
	"context"
)

// prune deletes expired rows (connect-pg-simple's pruning query, skipping rows locked now) and
// old tombstones, under an advisory lock so that one sidecar at a time does it.
func (s *Store) prune(ctx context.Context) {
	conn, err := s.db.Acquire(ctx)
	if err != nil {
		return
	}
	defer conn.Release()
	var locked bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, int64(pruneLock)).Scan(&locked); err != nil || !locked {
		return
	}
	defer conn.Exec(context.WithoutCancel(ctx), `SELECT pg_advisory_unlock($1)`, int64(pruneLock))
	// connect-pg-simple's pruning, except that rows locked right now are left for the next turn:
	// a reconciliation copies rows under FOR UPDATE in sid order, and a DELETE taking the same
	// rows in another order could deadlock with it (and a write's row lock would hold it up).
	tag, err := conn.Exec(ctx, `DELETE FROM `+s.opts.Table+` WHERE sid IN (
		SELECT sid FROM `+s.opts.Table+` WHERE expire < to_timestamp($1) FOR UPDATE SKIP LOCKED)`, nowUnix(s.now()))
	if err != nil {
		s.log.Warn().Err(err).Msg("prune expired sessions")
		return
	}
	s.m.pruned.Add(float64(tag.RowsAffected()))
	conn.Exec(ctx, `DELETE FROM cachecar_session_tombstones WHERE store = $1 AND destroyed_at < now() - interval '30 days'`, s.opts.SentinelKey)
	s.log.Info().Int64("rows", tag.RowsAffected()).Msg("pruned expired sessions")
}
