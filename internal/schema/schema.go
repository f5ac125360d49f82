// Package schema applies cachecar's migrations, and on request the platform's reference schema
// and its demo data.
package schema

import (
	"context"
	_ "embed"
	"fmt"

	"github.com/cachecar/cachecar/invalidation"
	"github.com/cachecar/cachecar/sessions"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

//go:embed reference.sql
var referenceSQL string

//go:embed demo.sql
var demoSQL string

// lockID is the advisory lock that serialises concurrent migrate runs (several sidecars starting
// at once). Its value is arbitrary but fixed.
const lockID = 0x636163686563 // "cachec"

// Migration is one versioned change to what cachecar itself keeps in the database.
type Migration struct {
	Version int
	Name    string
	SQL     string
}

// Migrations are cachecar's own, applied in order, each once and recorded in
// cachecar_schema_migrations. The invalidation triggers themselves depend on the configured
// policies, so Options.After installs them on every run; the table that records them is here.
var Migrations = []Migration{
	{Version: 1, Name: "invalidation trigger bookkeeping", SQL: invalidation.BookkeepingSQL},
	{Version: 2, Name: "session store epoch and tombstones", SQL: sessions.StateSQL},
}

// Options says what Migrate does besides cachecar's own migrations.
type Options struct {
	// Reference creates the platform's reference schema (tables IF NOT EXISTS).
	Reference bool
	// Demo loads demo data when the tenants table is empty. Implies Reference.
	Demo bool
	// After, when set, runs last, under the same advisory lock, in one transaction: the
	// invalidation triggers, which depend on the configuration.
	After func(ctx context.Context, tx pgx.Tx) error
}

// Report says what Migrate did.
type Report struct {
	Applied    []string // migrations applied now
	Reference  bool     // the reference schema was ensured
	DemoLoaded bool     // demo data was loaded now (false: tables already had data)
}

// Migrate applies, under an advisory lock, the reference schema and demo data if asked, then
// every pending migration. It is idempotent.
func Migrate(ctx context.Context, pool *pgxpool.Pool, opts Options) (Report, error) {
	var rep Report
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return rep, fmt.Errorf("connect: %w", err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", int64(lockID)); err != nil {
		return rep, fmt.Errorf("take migrate lock: %w", err)
	}
	defer conn.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock($1)", int64(lockID))

	if opts.Reference || opts.Demo {
		if _, err := conn.Exec(ctx, referenceSQL); err != nil {
			return rep, fmt.Errorf("reference schema: %w", err)
		}
		rep.Reference = true
	}
	if opts.Demo {
		var n int64
		if err := conn.QueryRow(ctx, "SELECT count(*) FROM (SELECT 1 FROM tenants LIMIT 1) t").Scan(&n); err != nil {
			return rep, fmt.Errorf("count tenants: %w", err)
		}
		if n == 0 {
			err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
				_, err := tx.Exec(ctx, demoSQL)
				return err
			})
			if err != nil {
				return rep, fmt.Errorf("demo data: %w", err)
			}
			// Outside the transaction (VACUUM cannot run in one): sets the visibility map, so
			// that the stats aggregate's index-only scan reads no heap pages from the start
			// rather than once autovacuum gets to the table.
			if _, err := conn.Exec(ctx, "VACUUM (ANALYZE) registrations"); err != nil {
				return rep, fmt.Errorf("demo data: vacuum registrations: %w", err)
			}
			rep.DemoLoaded = true
		}
	}

	if _, err := conn.Exec(ctx, `CREATE TABLE IF NOT EXISTS cachecar_schema_migrations (
		version    integer PRIMARY KEY,
		name       text        NOT NULL,
		applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return rep, fmt.Errorf("migrations table: %w", err)
	}
	for _, m := range Migrations {
		var done bool
		if err := conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM cachecar_schema_migrations WHERE version = $1)", m.Version).Scan(&done); err != nil {
			return rep, fmt.Errorf("read migration %d: %w", m.Version, err)
		}
		if done {
			continue
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, m.SQL); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, "INSERT INTO cachecar_schema_migrations (version, name) VALUES ($1, $2)", m.Version, m.Name)
			return err
		})
		if err != nil {
			return rep, fmt.Errorf("migration %d (%s): %w", m.Version, m.Name, err)
		}
		rep.Applied = append(rep.Applied, fmt.Sprintf("%d %s", m.Version, m.Name))
	}
	if opts.After != nil {
		if err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error { return opts.After(ctx, tx) }); err != nil {
			return rep, err
		}
	}
	return rep, nil
}
