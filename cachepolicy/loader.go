package cachepolicy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PG loads entries from PostgreSQL through a pool.
type PG struct{ pool *pgxpool.Pool }

// NewPG returns a loader over pool.
func NewPG(pool *pgxpool.Pool) *PG { return &PG{pool: pool} }

// LoadOne runs sql and returns its single text column. No row, or NULL, is ErrNotFound.
func (l *PG) LoadOne(ctx context.Context, sql string, args ...any) ([]byte, error) {
	var b []byte
	err := l.pool.QueryRow(ctx, sql, args...).Scan(&b)
	if errors.Is(err, pgx.ErrNoRows) || (err == nil && b == nil) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, classify(ctx, err)
	}
	return b, nil
}

// LoadMany runs sql with ids as $1 (bigint[]) and returns the JSON text per id found.
func (l *PG) LoadMany(ctx context.Context, sql string, ids []int64) (map[int64][]byte, error) {
	rows, err := l.pool.Query(ctx, sql, ids)
	if err != nil {
		return nil, classify(ctx, err)
	}
	out := make(map[int64][]byte, len(ids))
	for rows.Next() {
		var id int64
		var b []byte
		if err := rows.Scan(&id, &b); err != nil {
			rows.Close()
			return nil, classify(ctx, err)
		}
		if b != nil {
			out[id] = b
		}
	}
	if err := rows.Err(); err != nil {
		return nil, classify(ctx, err)
	}
	return out, nil
}

// Ping checks that PostgreSQL answers.
func (l *PG) Ping(ctx context.Context) error {
	if err := l.pool.Ping(ctx); err != nil {
		return classify(ctx, err)
	}
	return nil
}

// IDs runs sql (a warm query: one bigint column of ids) and returns at most limit of them.
func (l *PG) IDs(ctx context.Context, sql string, limit int) ([]int64, error) {
	rows, err := l.pool.Query(ctx, sql)
	if err != nil {
		return nil, classify(ctx, err)
	}
	defer rows.Close()
	var ids []int64
	for rows.Next() && len(ids) < limit {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return nil, fmt.Errorf("warm query: %w", err)
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		return nil, classify(ctx, err)
	}
	return ids, nil
}

// DatabaseFailed reports whether err, from a pgx call made under ctx, says PostgreSQL could not be
// reached or did not answer in time, rather than answering (with no row, an SQL error, a failed
// transaction): what counts against the database breaker.
func DatabaseFailed(ctx context.Context, err error) bool {
	if err == nil || errors.Is(err, pgx.ErrNoRows) || errors.Is(err, pgx.ErrTxCommitRollback) {
		return false
	}
	c := classify(ctx, err)
	return errors.Is(c, ErrUnavailable) || errors.Is(c, ErrTimeout)
}

// classify maps a pgx error onto ErrTimeout or ErrUnavailable where it is one, keeping the
// original for the log; other errors (bad SQL in a policy, say) are returned wrapped as they are.
func classify(ctx context.Context, err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case pgErr.Code == "57014": // query_canceled: statement_timeout or our cancel
			return fmt.Errorf("%w: %v", ErrTimeout, err)
		case strings.HasPrefix(pgErr.Code, "57"), strings.HasPrefix(pgErr.Code, "53"), strings.HasPrefix(pgErr.Code, "08"):
			// operator intervention (shutdown), insufficient resources, connection exceptions
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
		return fmt.Errorf("query: %w", err)
	}
	if errors.Is(err, context.DeadlineExceeded) || pgconn.Timeout(err) || ctx.Err() != nil {
		return fmt.Errorf("%w: %v", ErrTimeout, err)
	}
	var connErr *pgconn.ConnectError
	var netErr net.Error
	if errors.As(err, &connErr) || errors.As(err, &netErr) || errors.Is(err, net.ErrClosed) ||
		pgconn.SafeToRetry(err) {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	// Anything else below the SQL layer (EOF from a killed backend, a closed pool) means the
	// database is not usable right now.
	return fmt.Errorf("%w: %v", ErrUnavailable, err)
}
