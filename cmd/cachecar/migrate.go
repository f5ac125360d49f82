package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/cachecar/cachecar/configs"
	"github.com/cachecar/cachecar/internal/schema"
	"github.com/cachecar/cachecar/internal/scorm/scormgen"
	"github.com/cachecar/cachecar/invalidation"
	"github.com/cachecar/cachecar/sessions"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// migrate applies cachecar's migrations, and the reference schema and demo data when asked.
func migrate(ctx context.Context, cfg *configs.Config, reference, demo bool, stdout io.Writer) error {
	pool, err := newPool(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	pol, err := compilePolicies(cfg)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	spec, err := invalidationSpec(cfg, pol)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	var trig invalidation.InstallReport
	var sessNotify bool
	var sessNotifyErr error
	rep, err := schema.Migrate(ctx, pool, schema.Options{Reference: reference, Demo: demo,
		After: func(ctx context.Context, tx pgx.Tx) error {
			if cfg.Sessions.Enabled {
				// connect-pg-simple's table, if absent (the reference schema has one too).
				if _, err := tx.Exec(ctx, sessions.TableSQL(cfg.Sessions.Schema, cfg.Sessions.Table)); err != nil {
					return fmt.Errorf("session table: %w", err)
				}
				// Its notify triggers, which keep the sidecars' copies of sessions read from
				// PostgreSQL correct whoever writes the table; optional, so a role that may not
				// create them only gets a warning.
				var err error
				sessNotify, err = sessions.InstallNotify(ctx, tx, cfg.Sessions.Schema, cfg.Sessions.Table)
				if errors.Is(err, sessions.ErrNotifyPrivilege) {
					sessNotifyErr, err = err, nil
				}
				if err != nil {
					return fmt.Errorf("session table notify triggers: %w", err)
				}
			}
			var err error
			trig, err = invalidation.Install(ctx, tx, spec)
			return err
		}})
	if invalidation.IsSchemaError(err) {
		return &exitError{code: 2, err: fmt.Errorf("migrate: %w", err)}
	}
	if err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	if rep.Reference {
		fmt.Fprintln(stdout, "reference schema: in place (tables and indexes created where absent)")
	}
	switch {
	case rep.DemoLoaded:
		fmt.Fprintln(stdout, "demo data: loaded")
	case demo:
		fmt.Fprintln(stdout, "demo data: tables already hold data, left as they are")
	}
	if demo {
		names, err := scormgen.WriteDemo(cfg.Manifests.Dir)
		if err != nil {
			return fmt.Errorf("demo SCORM packages: %w", err)
		}
		fmt.Fprintf(stdout, "demo SCORM packages in %s: %s\n", cfg.Manifests.Dir, strings.Join(names, ", "))
	}
	if len(rep.Applied) == 0 {
		fmt.Fprintln(stdout, "migrations: up to date")
	} else {
		fmt.Fprintln(stdout, "migrations applied:", strings.Join(rep.Applied, ", "))
	}
	if cfg.Sessions.Enabled {
		t := sessions.TableName(cfg.Sessions.Schema, cfg.Sessions.Table)
		switch {
		case sessNotifyErr != nil:
			fmt.Fprintf(stdout, "session table: %s present; WARNING: its notify triggers are not installed (%v): session reads PostgreSQL serves keep no in-process copies; have the table's owner run the script of `cachecar migrate --print-sql`\n", t, sessNotifyErr)
		case sessNotify:
			fmt.Fprintf(stdout, "session table: %s present, notify triggers (channel %s) installed\n", t, sessions.NotifyChannel)
		default:
			fmt.Fprintf(stdout, "session table: %s present, notify triggers (channel %s) up to date\n", t, sessions.NotifyChannel)
		}
	}
	if len(trig.Installed) > 0 {
		fmt.Fprintf(stdout, "invalidation triggers (channel %s): %s\n", spec.Channel, strings.Join(trig.Installed, ", "))
	} else {
		fmt.Fprintln(stdout, "invalidation triggers: none (no policy has invalidate_on, or invalidation is disabled)")
	}
	if len(trig.Removed) > 0 {
		fmt.Fprintln(stdout, "invalidation triggers removed from:", strings.Join(trig.Removed, ", "))
	}
	return nil
}

// newPool builds the PostgreSQL pool. It does not connect: the first query does, so that the
// sidecar starts (and reports itself not ready) while PostgreSQL is down.
func newPool(ctx context.Context, cfg *configs.Config) (*pgxpool.Pool, error) {
	pc, err := pgxpool.ParseConfig(cfg.Database.URL)
	if err != nil {
		return nil, fmt.Errorf("database.url: not a valid PostgreSQL URL")
	}
	pc.MaxConns = cfg.Database.MaxConns
	pc.MinConns = min(cfg.Database.MinConns, cfg.Database.MaxConns)
	pc.ConnConfig.ConnectTimeout = cfg.Database.ConnectTimeout
	password, err := cfg.Database.FilePassword()
	if err != nil {
		return nil, &exitError{code: 2, err: err}
	}
	if password != "" {
		pc.ConnConfig.Password = password
	}
	if pc.ConnConfig.RuntimeParams["application_name"] == "" {
		pc.ConnConfig.RuntimeParams["application_name"] = "cachecar"
	}
	if !cfg.Database.SessionPooler {
		// A connection through a transaction pooler breaks the pool's prepared statements and
		// the session locks of migrate and the sessions: refused, with why.
		pc.AfterConnect = func(ctx context.Context, c *pgx.Conn) error {
			// Bounded here: the pool connects under a context no caller's deadline cancels.
			ctx, cancel := context.WithTimeout(ctx, cfg.Database.ConnectTimeout)
			defer cancel()
			return invalidation.CheckDirect(ctx, c, "database.url")
		}
	}
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("database pool: %w", err)
	}
	return pool, nil
}

// printTriggerSQL prints the invalidation triggers' SQL for the configured policies, and the
// session table's notify triggers when sessions are on.
func printTriggerSQL(cfg *configs.Config, stdout io.Writer) error {
	if cfg.Sessions.Enabled {
		fmt.Fprintf(stdout, "-- session table %s (connect-pg-simple's, if absent) and its notify triggers for the sidecars' copies of sessions read from PostgreSQL\n%s;\n%s\n\n",
			sessions.TableName(cfg.Sessions.Schema, cfg.Sessions.Table), sessions.TableSQL(cfg.Sessions.Schema, cfg.Sessions.Table), sessions.NotifySQL(cfg.Sessions.Schema, cfg.Sessions.Table))
	}
	pol, err := compilePolicies(cfg)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	spec, err := invalidationSpec(cfg, pol)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	if len(spec.Rules) == 0 {
		fmt.Fprintln(stdout, "-- no policy has invalidate_on (or invalidation is disabled): no triggers to install")
		return nil
	}
	script, err := invalidation.Script(spec)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	_, err = io.WriteString(stdout, script)
	return err
}
