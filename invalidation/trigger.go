package invalidation

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// triggerVersion is recorded with every installed trigger. Raise it (and payloadVersion, when
// the message changes) whenever the generated SQL changes, so that Verify sends operators to
// migrate instead of the listener misreading an old trigger.
const triggerVersion = 1

// Trigger names on every table cachecar watches: one per event, since a trigger with transition
// tables may have only one event.
var triggerNames = []string{"cachecar_ins", "cachecar_upd", "cachecar_del", "cachecar_trunc"}

// querier is what Install and Verify need of a connection or transaction.
type querier interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// BookkeepingSQL creates the table that records which tables carry cachecar's triggers, so that
// migrate can remove the triggers of tables no longer configured. It is a migration of
// internal/schema.
const BookkeepingSQL = `CREATE TABLE IF NOT EXISTS cachecar_triggers (
	table_name   text        PRIMARY KEY,
	columns      text[]      NOT NULL,
	channel      text        NOT NULL,
	max_rows     integer     NOT NULL,
	version      integer     NOT NULL,
	installed_at timestamptz NOT NULL DEFAULT now()
)`

// InstallReport says what Install changed.
type InstallReport struct {
	Installed []string // tables whose triggers were (re)created
	Removed   []string // tables whose triggers were dropped
}

// Install creates or replaces the trigger function and triggers of every table spec's rules
// name, and drops cachecar's triggers from tables no longer named. It runs inside the caller's
// transaction (migrate holds an advisory lock), so a failure changes nothing. A table or column
// a rule names that does not exist is an error naming the policy.
func Install(ctx context.Context, tx querier, spec Spec) (InstallReport, error) {
	var rep InstallReport
	if err := spec.Check(); err != nil {
		return rep, err
	}
	if err := checkColumns(ctx, tx, spec); err != nil {
		return rep, err
	}
	tables := spec.tables()
	names := make([]string, 0, len(tables))
	for t := range tables {
		names = append(names, t)
	}
	sort.Strings(names)
	for _, t := range names {
		for _, stmt := range InstallSQL(t, tables[t], spec.Channel, spec.MaxRows) {
			if _, err := tx.Exec(ctx, stmt); err != nil {
				return rep, fmt.Errorf("install trigger on %s: %w", t, err)
			}
		}
		_, err := tx.Exec(ctx, `INSERT INTO cachecar_triggers (table_name, columns, channel, max_rows, version)
			VALUES ($1, $2, $3, $4, $5)
			ON CONFLICT (table_name) DO UPDATE SET columns = EXCLUDED.columns, channel = EXCLUDED.channel,
				max_rows = EXCLUDED.max_rows, version = EXCLUDED.version, installed_at = now()`,
			t, tables[t], spec.Channel, spec.MaxRows, triggerVersion)
		if err != nil {
			return rep, fmt.Errorf("record trigger on %s: %w", t, err)
		}
		rep.Installed = append(rep.Installed, t)
	}
	installed, err := installedTables(ctx, tx)
	if err != nil {
		return rep, err
	}
	for _, t := range installed {
		if _, ok := tables[t.name]; ok {
			continue
		}
		for _, stmt := range RemoveSQL(t.name) {
			if _, err := tx.Exec(ctx, stmt); err != nil {
				return rep, fmt.Errorf("remove trigger on %s: %w", t.name, err)
			}
		}
		if _, err := tx.Exec(ctx, "DELETE FROM cachecar_triggers WHERE table_name = $1", t.name); err != nil {
			return rep, fmt.Errorf("remove trigger on %s: %w", t.name, err)
		}
		rep.Removed = append(rep.Removed, t.name)
	}
	return rep, nil
}

// Verify checks that every table spec names exists with its columns and carries the current
// triggers with spec's channel and row limit. The listener runs it on every connect: without
// the triggers no notification would ever come, and the cache would be silently stale.
func Verify(ctx context.Context, q querier, spec Spec) error {
	if err := checkColumns(ctx, q, spec); err != nil {
		return err
	}
	installed, err := installedTables(ctx, q)
	if err != nil {
		return err
	}
	byName := map[string]installedTable{}
	for _, t := range installed {
		byName[t.name] = t
	}
	var problems []string
	tables := spec.tables()
	names := make([]string, 0, len(tables))
	for t := range tables {
		names = append(names, t)
	}
	sort.Strings(names)
	for _, t := range names {
		got, ok := byName[t]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("table %s has no cachecar trigger", t))
			continue
		case got.version != triggerVersion:
			problems = append(problems, fmt.Sprintf("the trigger on %s is version %d, this cachecar needs %d", t, got.version, triggerVersion))
		case got.channel != spec.Channel:
			problems = append(problems, fmt.Sprintf("the trigger on %s notifies channel %q, configured is %q", t, got.channel, spec.Channel))
		case got.maxRows != spec.MaxRows:
			problems = append(problems, fmt.Sprintf("the trigger on %s has max_rows %d, configured is %d", t, got.maxRows, spec.MaxRows))
		case !slices.Equal(got.columns, tables[t]):
			problems = append(problems, fmt.Sprintf("the trigger on %s sends columns %v, the policies need %v", t, got.columns, tables[t]))
		}
		var n int
		err := q.QueryRow(ctx, `SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = ANY($2) AND tgenabled <> 'D'`,
			quoteIdent(t), triggerNames).Scan(&n)
		if err != nil {
			return fmt.Errorf("read triggers of %s: %w", t, err)
		}
		if n != len(triggerNames) {
			problems = append(problems, fmt.Sprintf("table %s has %d of cachecar's %d triggers enabled", t, n, len(triggerNames)))
		}
	}
	if len(problems) > 0 {
		return &SchemaError{Problems: append(problems, "run `cachecar migrate` with this configuration")}
	}
	return nil
}

// SchemaError lists what is wrong with the tables and triggers invalidation relies on.
type SchemaError struct{ Problems []string }

func (e *SchemaError) Error() string { return "invalidation: " + strings.Join(e.Problems, "; ") }

// IsSchemaError reports whether err is a *SchemaError or a *PoolerError: a configuration or
// migration problem, not an outage.
func IsSchemaError(err error) bool {
	var se *SchemaError
	var pe *PoolerError
	return errors.As(err, &se) || errors.As(err, &pe)
}

// checkColumns reports every rule whose table or column does not exist, or whose column is not
// an integer: rules bind id placeholders, and any other type would either never match a key or
// make messages the listener cannot read.
func checkColumns(ctx context.Context, q querier, spec Spec) error {
	var problems []string
	cols := map[string]map[string]string{} // table -> column -> type; empty: table absent
	for _, r := range spec.Rules {
		have, seen := cols[r.Table]
		if !seen {
			rows, err := q.Query(ctx, `SELECT attname::text, atttypid::regtype::text FROM pg_attribute
				WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped`, quoteIdent(r.Table))
			if err != nil {
				return fmt.Errorf("read columns of %s: %w", r.Table, err)
			}
			have = map[string]string{}
			var name, typ string
			_, err = pgx.ForEachRow(rows, []any{&name, &typ}, func() error { have[name] = typ; return nil })
			if err != nil {
				return fmt.Errorf("read columns of %s: %w", r.Table, err)
			}
			cols[r.Table] = have
		}
		if len(have) == 0 {
			problems = append(problems, fmt.Sprintf("policy %s: table %q does not exist (or has no columns) in the search_path", r.Policy, r.Table))
			continue
		}
		for _, c := range r.Columns {
			typ, ok := have[c]
			switch {
			case !ok:
				problems = append(problems, fmt.Sprintf("policy %s: table %q has no column %q", r.Policy, r.Table, c))
			case typ != "bigint" && typ != "integer" && typ != "smallint":
				problems = append(problems, fmt.Sprintf("policy %s: column %q of table %q is %s; it must be an integer id (smallint, integer or bigint)", r.Policy, c, r.Table, typ))
			}
		}
	}
	if len(problems) > 0 {
		return &SchemaError{Problems: problems}
	}
	return nil
}

type installedTable struct {
	name    string
	columns []string
	channel string
	maxRows int
	version int
}

func installedTables(ctx context.Context, q querier) ([]installedTable, error) {
	var exists bool
	if err := q.QueryRow(ctx, "SELECT to_regclass('cachecar_triggers') IS NOT NULL").Scan(&exists); err != nil {
		return nil, fmt.Errorf("read installed triggers: %w", err)
	}
	if !exists {
		return nil, &SchemaError{Problems: []string{"cachecar's tables are missing"}}
	}
	rows, err := q.Query(ctx, "SELECT table_name, columns, channel, max_rows, version FROM cachecar_triggers ORDER BY table_name")
	if err != nil {
		return nil, fmt.Errorf("read installed triggers: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (installedTable, error) {
		var t installedTable
		err := row.Scan(&t.name, &t.columns, &t.channel, &t.maxRows, &t.version)
		return t, err
	})
	if err != nil {
		return nil, fmt.Errorf("read installed triggers: %w", err)
	}
	return out, nil
}

func quoteIdent(s string) string { return pgx.Identifier{s}.Sanitize() }

// functionName is the trigger function of table. Table names are at most 63 bytes, like the
// function's; a long name is cut and given a hash, so two tables never share a function.
func functionName(table string) string {
	name := "cachecar_notify_" + table
	if len(name) <= 63 {
		return name
	}
	var h uint32 = 2166136261
	for i := 0; i < len(table); i++ {
		h = (h ^ uint32(table[i])) * 16777619
	}
	return fmt.Sprintf("%s_%08x", name[:54], h)
}

// InstallSQL returns the statements that install table's trigger function and triggers: what
// migrate runs, and what an operator who applies migrations by hand runs (README). table,
// columns and channel must be plain lower-case identifiers (config validation makes them so).
//
// The triggers are statement-level with transition tables: one statement that changes n rows
// costs one trigger call, not n. The function sends the distinct key columns of the old and new
// rows, chunked into messages under PostgreSQL's 8000-byte payload limit; beyond maxRows rows
// (or for TRUNCATE) it sends one table-wide message instead, so that a bulk statement never
// floods the notification queue. The timestamp is clock_timestamp(), in microseconds, for the
// lag metric. NOTIFY is transactional: nothing is sent unless the transaction commits.
func InstallSQL(table string, columns []string, channel string, maxRows int) []string {
	fn := quoteIdent(functionName(table))
	tbl := quoteIdent(table)
	quoted := make([]string, len(columns))
	names := make([]string, len(columns))
	for i, c := range columns {
		quoted[i] = quoteIdent(c)
		names[i] = `"` + c + `"`
	}
	rowExpr := "json_build_array(" + strings.Join(quoted, ", ") + ")::text"
	head := fmt.Sprintf(`{"v":%d,"t":"%s","op":"`, payloadVersion, table)
	cols := `,"c":[` + strings.Join(names, ",") + `]`
	// The function names no table, so a fixed search_path keeps a role's own search_path (or a
	// look-alike function in another schema) from changing what it calls.
	fnSQL := fmt.Sprintf(`CREATE OR REPLACE FUNCTION %[1]s() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $cachecar$
-- Installed by cachecar migrate (trigger version %[2]d): notifies %[3]s of changed rows of %[4]s.
DECLARE
	head  text := '%[5]s' || TG_OP || '","ts":' || (extract(epoch FROM clock_timestamp()) * 1000000)::bigint || '%[6]s';
	n     bigint;
	keys  text[];
	k     text;
	chunk text := '';
BEGIN
	IF TG_OP = 'TRUNCATE' THEN
		PERFORM pg_notify('%[3]s', head || ',"all":true}');
		RETURN NULL;
	ELSIF TG_OP = 'INSERT' THEN
		SELECT count(*) INTO n FROM new_rows;
	ELSE
		SELECT count(*) INTO n FROM old_rows;
	END IF;
	IF n = 0 THEN
		RETURN NULL;
	END IF;
	IF n > %[7]d THEN
		PERFORM pg_notify('%[3]s', head || ',"all":true}');
		RETURN NULL;
	END IF;
	IF TG_OP = 'INSERT' THEN
		keys := ARRAY(SELECT DISTINCT %[8]s FROM new_rows);
	ELSIF TG_OP = 'DELETE' THEN
		keys := ARRAY(SELECT DISTINCT %[8]s FROM old_rows);
	ELSE
		keys := ARRAY(SELECT %[8]s FROM old_rows UNION SELECT %[8]s FROM new_rows);
	END IF;
	FOREACH k IN ARRAY keys LOOP
		IF octet_length(head) + octet_length(k) + 16 > %[9]d THEN
			-- One row's values do not fit a message: name the whole table instead.
			PERFORM pg_notify('%[3]s', head || ',"all":true}');
			RETURN NULL;
		END IF;
		IF chunk <> '' AND octet_length(head) + octet_length(chunk) + octet_length(k) + 16 > %[9]d THEN
			PERFORM pg_notify('%[3]s', head || ',"r":[' || chunk || ']}');
			chunk := '';
		END IF;
		chunk := CASE WHEN chunk = '' THEN k ELSE chunk || ',' || k END;
	END LOOP;
	PERFORM pg_notify('%[3]s', head || ',"r":[' || chunk || ']}');
	RETURN NULL;
END
$cachecar$`, fn, triggerVersion, channel, table, head, cols, maxRows, rowExpr, maxPayload)
	stmts := []string{fnSQL}
	for _, name := range triggerNames {
		stmts = append(stmts, fmt.Sprintf("DROP TRIGGER IF EXISTS %s ON %s", name, tbl))
	}
	stmts = append(stmts,
		fmt.Sprintf("CREATE TRIGGER cachecar_ins AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()", tbl, fn),
		fmt.Sprintf("CREATE TRIGGER cachecar_upd AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()", tbl, fn),
		fmt.Sprintf("CREATE TRIGGER cachecar_del AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()", tbl, fn),
		fmt.Sprintf("CREATE TRIGGER cachecar_trunc AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()", tbl, fn),
	)
	// ALWAYS: the triggers fire also under session_replication_role = replica (pg_restore
	// --disable-triggers is the exception it cannot see) and for rows applied by logical
	// replication: the cache must hear of those writes too.
	for _, name := range triggerNames {
		stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s ENABLE ALWAYS TRIGGER %s", tbl, name))
	}
	return stmts
}

// Script returns, as one SQL script, what Install does for spec: for operators who apply
// migrations themselves (cachecar migrate --print-sql). It does not remove triggers from tables
// spec no longer names; RemoveSQL gives those statements.
func Script(spec Spec) (string, error) {
	if err := spec.Check(); err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "-- cachecar invalidation triggers (trigger version %d), channel %s, max_rows %d.\n", triggerVersion, spec.Channel, spec.MaxRows)
	b.WriteString("-- Run as a role that owns the tables, with the search_path cachecar's database.url uses.\n")
	b.WriteString("BEGIN;\n\n")
	b.WriteString(BookkeepingSQL + ";\n")
	tables := spec.tables()
	names := make([]string, 0, len(tables))
	for t := range tables {
		names = append(names, t)
	}
	sort.Strings(names)
	for _, t := range names {
		fmt.Fprintf(&b, "\n-- %s: columns %s\n", t, strings.Join(tables[t], ", "))
		for _, stmt := range InstallSQL(t, tables[t], spec.Channel, spec.MaxRows) {
			b.WriteString(stmt + ";\n")
		}
		fmt.Fprintf(&b, `INSERT INTO cachecar_triggers (table_name, columns, channel, max_rows, version)
	VALUES ('%s', ARRAY['%s'], '%s', %d, %d)
	ON CONFLICT (table_name) DO UPDATE SET columns = EXCLUDED.columns, channel = EXCLUDED.channel,
		max_rows = EXCLUDED.max_rows, version = EXCLUDED.version, installed_at = now();
`, t, strings.Join(tables[t], "', '"), spec.Channel, spec.MaxRows, triggerVersion)
	}
	b.WriteString("\nCOMMIT;\n")
	return b.String(), nil
}

// identRE is what InstallSQL embeds unquoted in string literals and JSON: a plain lower-case
// identifier (configs enforces the same rule; this keeps the exported functions safe on their
// own).
var identRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

// Check reports a channel, table or column name that is not a plain lower-case identifier, or a
// row limit below 1.
func (s Spec) Check() error {
	var problems []string
	if !identRE.MatchString(s.Channel) {
		problems = append(problems, fmt.Sprintf("channel %q is not a lower-case identifier", s.Channel))
	}
	if s.MaxRows < 1 {
		problems = append(problems, "max_rows must be at least 1")
	}
	for _, r := range s.Rules {
		if !identRE.MatchString(r.Table) {
			problems = append(problems, fmt.Sprintf("policy %s: table %q is not a lower-case identifier", r.Policy, r.Table))
		}
		for _, c := range r.Columns {
			if !identRE.MatchString(c) {
				problems = append(problems, fmt.Sprintf("policy %s: column %q is not a lower-case identifier", r.Policy, c))
			}
		}
	}
	if len(problems) > 0 {
		return &SchemaError{Problems: problems}
	}
	return nil
}

// RemoveSQL returns the statements that remove cachecar's triggers and function from table. A
// table that no longer exists took its triggers with it.
func RemoveSQL(table string) []string {
	tbl := quoteIdent(table)
	var stmts []string
	for _, name := range triggerNames {
		stmts = append(stmts, fmt.Sprintf(
			"DO $cachecar$ BEGIN IF to_regclass('%s') IS NOT NULL THEN DROP TRIGGER IF EXISTS %s ON %s; END IF; END $cachecar$",
			strings.ReplaceAll(tbl, "'", "''"), name, tbl))
	}
	return append(stmts, fmt.Sprintf("DROP FUNCTION IF EXISTS %s()", quoteIdent(functionName(table))))
}
