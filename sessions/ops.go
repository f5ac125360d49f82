package sessions

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/valkey-io/valkey-go"
)

// Get returns the session's JSON as stored and the store that answered. An absent or expired
// session is ErrNotFound.
func (s *Store) Get(ctx context.Context, sid string) ([]byte, string, error) {
	if s.valkeyOK() {
		body, err := s.getValkey(ctx, sid)
		switch {
		case err == nil:
			s.m.ops.WithLabelValues("get", FromValkey, "ok").Inc()
			return body, FromValkey, nil
		case errors.Is(err, ErrNotFound):
			s.m.ops.WithLabelValues("get", FromValkey, "not_found").Inc()
			return nil, FromValkey, err
		}
		// Not trusted after all, or failed: PostgreSQL answers.
	}
	var body []byte
	err := s.db.QueryRow(ctx, `SELECT sess::text FROM `+s.opts.Table+` WHERE sid = $1 AND expire >= to_timestamp($2)`,
		sid, nowUnix(s.now())).Scan(&body)
	if errors.Is(err, pgx.ErrNoRows) {
		s.m.ops.WithLabelValues("get", FromPostgres, "not_found").Inc()
		return nil, FromPostgres, ErrNotFound
	}
	if err != nil {
		s.m.ops.WithLabelValues("get", FromPostgres, "error").Inc()
		return nil, FromPostgres, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	s.m.ops.WithLabelValues("get", FromPostgres, "ok").Inc()
	return body, FromPostgres, nil
}

// getValkey reads the session and the sentinel in one round trip. It returns ErrNotFound for an
// absent key in a trusted Valkey, and another error when Valkey failed or turned out not to be
// trusted (the caller reads PostgreSQL).
func (s *Store) getValkey(ctx context.Context, sid string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	vk := s.client()
	vals, err := vk.Do(ctx, vk.B().Mget().Key(s.opts.Prefix+sid, s.opts.SentinelKey).Build()).ToArray()
	if err == nil && len(vals) != 2 {
		err = fmt.Errorf("mget: %d values", len(vals))
	}
	if err != nil {
		s.markDown("get", err)
		return nil, err
	}
	sentinel, _ := vals[1].ToString()
	if sentinel == "" || sentinel != *s.epoch.Load() {
		// Emptied, restored from an old snapshot, or written past by a sidecar that could not
		// reach it: not trusted until reconciled.
		s.trusted.Store(false)
		s.setActive()
		return nil, errors.New("valkey not reconciled")
	}
	if vals[0].IsNil() {
		return nil, ErrNotFound
	}
	body, err := vals[0].AsBytes()
	if err != nil {
		s.markDown("get", err)
		return nil, err
	}
	return body, nil
}

// Put stores the session under sid, in PostgreSQL (acknowledged once committed) and in Valkey.
// A session whose cookie has already expired is destroyed, as connect-redis does.
func (s *Store) Put(ctx context.Context, sid string, sess Session) (string, error) {
	now := s.now()
	ttl := s.ttlSeconds(sess, now)
	if ttl <= 0 {
		return s.Delete(ctx, sid)
	}
	expire := s.expireUnix(sess, now)
	return s.write(ctx, "put", sid, func(ctx context.Context, tx pgx.Tx) error {
		// connect-pg-simple's upsert, with its expire.
		_, err := tx.Exec(ctx, `INSERT INTO `+s.opts.Table+` (sess, expire, sid) SELECT $1::json, to_timestamp($2), $3
			ON CONFLICT (sid) DO UPDATE SET sess = $1::json, expire = to_timestamp($2)`, string(sess.Raw), expire, sid)
		return err
	}, false, func(ctx context.Context) error {
		vk := s.client()
		return vk.Do(ctx, vk.B().Set().Key(s.opts.Prefix+sid).Value(valkey.BinaryString(sess.Raw)).ExSeconds(ttl).Build()).Error()
	})
}

// Delete destroys the session; absent is fine (idempotent).
func (s *Store) Delete(ctx context.Context, sid string) (string, error) {
	return s.write(ctx, "delete", sid, func(ctx context.Context, tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `DELETE FROM `+s.opts.Table+` WHERE sid = $1`, sid)
		return err
	}, true, func(ctx context.Context) error {
		vk := s.client()
		return vk.Do(ctx, vk.B().Del().Key(s.opts.Prefix+sid).Build()).Error()
	})
}

// write commits pgWrite, then applies vkWrite to Valkey. When Valkey is down, or the call fails,
// the same transaction (or a second one, after a failure) moves the epoch, so that no sidecar
// trusts Valkey again before a reconciliation, and a destroy leaves a tombstone for it.
func (s *Store) write(ctx context.Context, op, sid string, pgWrite func(context.Context, pgx.Tx) error, destroy bool,
	vkWrite func(context.Context) error) (string, error) {
	useValkey := s.client() != nil && s.up.Load()
	err := pgx.BeginFunc(ctx, s.db, func(tx pgx.Tx) error {
		if err := pgWrite(ctx, tx); err != nil {
			return err
		}
		if !useValkey && s.HasValkey() {
			return s.markStale(ctx, tx, sid, destroy)
		}
		return nil
	})
	if err != nil {
		s.m.ops.WithLabelValues(op, FromPostgres, "error").Inc()
		return FromPostgres, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	if !useValkey {
		s.m.ops.WithLabelValues(op, FromPostgres, "ok").Inc()
		return FromPostgres, nil
	}
	vctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.opts.Timeout)
	err = vkWrite(vctx)
	cancel()
	if err == nil {
		s.m.ops.WithLabelValues(op, FromValkey, "ok").Inc()
		return FromValkey, nil
	}
	s.markDown(op, err)
	// The session is safe in PostgreSQL; Valkey may hold the old value (or the new one: the
	// call may have been applied before it timed out). Either way it must not be trusted.
	if err := pgx.BeginFunc(context.WithoutCancel(ctx), s.db, func(tx pgx.Tx) error {
		return s.markStale(ctx, tx, sid, destroy)
	}); err != nil {
		s.log.Error().Err(err).Msg("could not record a session write Valkey missed; Valkey stays untrusted until the next successful check")
	}
	s.m.ops.WithLabelValues(op, FromPostgres, "ok").Inc()
	return FromPostgres, nil
}

// markStale records, in the writing transaction, that Valkey missed a write: a new epoch (no
// sidecar trusts the old sentinel any more) and, for a destroy, a tombstone.
func (s *Store) markStale(ctx context.Context, tx pgx.Tx, sid string, destroy bool) error {
	if destroy {
		if _, err := tx.Exec(ctx, `INSERT INTO cachecar_session_tombstones (sid) VALUES ($1)
			ON CONFLICT (sid) DO UPDATE SET destroyed_at = now()`, sid); err != nil {
			return err
		}
	}
	_, err := tx.Exec(ctx, `UPDATE cachecar_session_state SET epoch = md5(random()::text || clock_timestamp()::text) WHERE id = 1`)
	return err
}

// Touch extends the session's expiry from sess's cookie (or the TTL) without rewriting it. It is
// ErrNotFound when neither store has the session alive.
func (s *Store) Touch(ctx context.Context, sid string, sess Session) (string, error) {
	now := s.now()
	ttl := s.ttlSeconds(sess, now)
	if ttl <= 0 {
		if _, err := s.Delete(ctx, sid); err != nil {
			return FromPostgres, err
		}
		return FromPostgres, ErrNotFound
	}
	tag, err := s.db.Exec(ctx, `UPDATE `+s.opts.Table+` SET expire = to_timestamp($1) WHERE sid = $2 AND expire >= to_timestamp($3)`,
		s.expireUnix(sess, now), sid, nowUnix(now))
	if err != nil {
		s.m.ops.WithLabelValues("touch", FromPostgres, "error").Inc()
		return FromPostgres, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	inPG := tag.RowsAffected() > 0
	if vk := s.client(); vk != nil && s.up.Load() {
		vctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
		n, err := vk.Do(vctx, vk.B().Expire().Key(s.opts.Prefix+sid).Seconds(ttl).Build()).AsInt64()
		cancel()
		switch {
		case err != nil:
			// The TTL in Valkey is now shorter than PostgreSQL's expire: harmless for
			// freshness (the key would vanish early, and the reconciliation that follows the
			// outage rewrites it from PostgreSQL), so no epoch change is needed.
			s.markDown("touch", err)
		case inPG || (n == 1 && s.trusted.Load()):
			s.m.ops.WithLabelValues("touch", FromValkey, "ok").Inc()
			return FromValkey, nil
		}
	}
	if !inPG {
		s.m.ops.WithLabelValues("touch", FromPostgres, "not_found").Inc()
		return FromPostgres, ErrNotFound
	}
	s.m.ops.WithLabelValues("touch", FromPostgres, "ok").Inc()
	return FromPostgres, nil
}
