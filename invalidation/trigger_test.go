package invalidation

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/jackc/pgx/v5"
)

// triggerFixture is one test's schema (tenants, courses and cachecar_triggers) with a
// connection that writes and a second one that LISTENs on the test's own channel.
type triggerFixture struct {
	channel string
	db      *pgx.Conn // writes, installs, verifies
	listen  *pgx.Conn // LISTENs on channel
}

// triggerSpec watches courses through two rules whose columns, in the order the rules name
// them, are not sorted (the message must carry the sorted union), and tenants through a rule on
// a text column. Install and Verify never call Target, so the rules have none.
func triggerSpec(channel string, maxRows int) Spec {
	return Spec{Channel: channel, MaxRows: maxRows, Rules: []Rule{
		{Policy: "tenant_courses", Table: "courses", Columns: []string{"tenant_id"}},
		{Policy: "course", Table: "courses", Columns: []string{"id", "tenant_id"}},
		{Policy: "tenant_by_name", Table: "tenants", Columns: []string{"name"}},
		{Policy: "tenant", Table: "tenants", Columns: []string{"id"}},
	}}
}

// installSpec is triggerSpec without the text column, which Install refuses (rules bind ids).
func installSpec(channel string, maxRows int) Spec {
	s := triggerSpec(channel, maxRows)
	s.Rules = slices.DeleteFunc(s.Rules, func(r Rule) bool { return r.Policy == "tenant_by_name" })
	return s
}

// courseCols and tenantCols are the columns the triggers of triggerSpec send.
var (
	courseCols = []string{"id", "tenant_id"}
	tenantCols = []string{"id", "name"}
)

func newTriggerFixture(t *testing.T) *triggerFixture {
	t.Helper()
	url := testenv.PostgresURL(t)
	f := &triggerFixture{channel: "t_" + testenv.Suffix(), db: connectPG(t, url), listen: connectPG(t, url)}
	f.exec(t, `CREATE TABLE tenants (id bigint PRIMARY KEY, name text)`)
	f.exec(t, `CREATE TABLE courses (id bigint PRIMARY KEY, tenant_id bigint, title text)`)
	f.exec(t, BookkeepingSQL)
	if _, err := f.listen.Exec(t.Context(), "LISTEN "+quoteIdent(f.channel)); err != nil {
		t.Fatalf("listen: %v", err)
	}
	return f
}

func connectPG(t *testing.T, url string) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c.Close(ctx)
	})
	return c
}

func (f *triggerFixture) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	if _, err := f.db.Exec(t.Context(), sql, args...); err != nil {
		t.Fatalf("%.200s: %v", sql, err)
	}
}

// install runs Install in a transaction of its own, as migrate does.
func (f *triggerFixture) install(t *testing.T, spec Spec) (InstallReport, error) {
	t.Helper()
	var rep InstallReport
	err := pgx.BeginFunc(t.Context(), f.db, func(tx pgx.Tx) error {
		var err error
		rep, err = Install(t.Context(), tx, spec)
		return err
	})
	return rep, err
}

// mustInstallUnchecked runs the statements of InstallSQL for spec's tables without Install's
// column checks: the trigger tests also send text values (quotes, unicode, rows too big for a
// message), which the generated SQL must handle even though Install only accepts integer ids.
func (f *triggerFixture) mustInstallUnchecked(t *testing.T, spec Spec) {
	t.Helper()
	for table, cols := range spec.tables() {
		for _, stmt := range InstallSQL(table, cols, spec.Channel, spec.MaxRows) {
			f.exec(t, stmt)
		}
	}
}

func (f *triggerFixture) mustInstall(t *testing.T, spec Spec) InstallReport {
	t.Helper()
	rep, err := f.install(t, spec)
	if err != nil {
		t.Fatalf("install: %v", err)
	}
	return rep
}

// notice is one notification the triggers sent.
type notice struct {
	payload string
	Change
}

// drain returns every notification committed before it was called. It sends a marker on the
// channel and reads up to it: notifications are delivered in commit order, so whatever is not
// before the marker was not committed when drain was called. No sleep decides "nothing came".
func (f *triggerFixture) drain(t *testing.T) []notice {
	t.Helper()
	marker := "marker " + testenv.Suffix()
	if _, err := f.listen.Exec(t.Context(), "SELECT pg_notify($1, $2)", f.channel, marker); err != nil {
		t.Fatalf("notify marker: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	var out []notice
	for {
		n, err := f.listen.WaitForNotification(ctx)
		if err != nil {
			t.Fatalf("wait for notifications (%d before the marker so far): %v", len(out), err)
		}
		if n.Channel != f.channel {
			t.Fatalf("notification on channel %q, listening on %q", n.Channel, f.channel)
		}
		if n.Payload == marker {
			return out
		}
		c, err := ParseChange(n.Payload)
		if err != nil {
			t.Fatalf("the trigger sent a payload ParseChange refuses: %v\n%.300s", err, n.Payload)
		}
		checkChange(t, c)
		out = append(out, notice{payload: n.Payload, Change: c})
	}
}

// sent is what a test expects of one notification; the rows may come in any order.
type sent struct {
	table, op string
	all       bool
	rows      [][]string
}

func (s sent) String() string {
	if s.all {
		return s.op + " " + s.table + " (all)"
	}
	return fmt.Sprintf("%s %s %v", s.op, s.table, s.rows)
}

// summarize turns notices into comparable sents, rows sorted, sents sorted.
func summarize(ns []notice) []sent {
	out := make([]sent, 0, len(ns))
	for _, n := range ns {
		rows := slices.Clone(n.Rows)
		slices.SortFunc(rows, func(a, b []string) int { return slices.Compare(a, b) })
		out = append(out, sent{table: n.Table, op: n.Op, all: n.All, rows: rows})
	}
	slices.SortFunc(out, func(a, b sent) int { return strings.Compare(a.String(), b.String()) })
	return out
}

func sameSents(got, want []sent) bool {
	want = slices.Clone(want)
	for i := range want {
		want[i].rows = slices.Clone(want[i].rows)
		slices.SortFunc(want[i].rows, func(a, b []string) int { return slices.Compare(a, b) })
	}
	slices.SortFunc(want, func(a, b sent) int { return strings.Compare(a.String(), b.String()) })
	return slices.EqualFunc(got, want, func(a, b sent) bool {
		return a.table == b.table && a.op == b.op && a.all == b.all &&
			slices.EqualFunc(a.rows, b.rows, slices.Equal)
	})
}

// expectSent fails t unless ns are exactly want (in any order) and each names the columns its
// table's triggers send.
func expectSent(t *testing.T, ns []notice, want ...sent) {
	t.Helper()
	for _, n := range ns {
		cols := map[string][]string{"courses": courseCols, "tenants": tenantCols}[n.Table]
		if !slices.Equal(n.Columns, cols) {
			t.Errorf("%s message names columns %q, want %q", n.Table, n.Columns, cols)
		}
	}
	if got := summarize(ns); !sameSents(got, want) {
		t.Errorf("notifications:\n got %v\nwant %v", got, want)
	}
}

// rowCounts counts each row (values joined by commas) of non-table-wide messages.
func rowCounts(ns []notice) map[string]int {
	out := map[string]int{}
	for _, n := range ns {
		for _, r := range n.Rows {
			out[strings.Join(r, ",")]++
		}
	}
	return out
}

func TestTriggerSendsChangedRows(t *testing.T) {
	f := newTriggerFixture(t)
	f.mustInstallUnchecked(t, triggerSpec(f.channel, 1000))
	name := `O"Brien \ café ü`
	steps := []struct {
		name string
		sql  string
		args []any
		want []sent
	}{
		{"insert", `INSERT INTO courses VALUES (1, 1, 'Go')`, nil,
			[]sent{{table: "courses", op: "INSERT", rows: [][]string{{"1", "1"}}}}},
		{"insert with a null value", `INSERT INTO courses VALUES (2, NULL, 'Rust')`, nil,
			[]sent{{table: "courses", op: "INSERT", rows: [][]string{{"2", ""}}}}},
		{"update moving a course to another tenant names both tenants",
			`UPDATE courses SET tenant_id = 2 WHERE id = 1`, nil,
			[]sent{{table: "courses", op: "UPDATE", rows: [][]string{{"1", "1"}, {"1", "2"}}}}},
		{"update of a column no rule reads names the row once",
			`UPDATE courses SET title = 'Go 2' WHERE id = 1`, nil,
			[]sent{{table: "courses", op: "UPDATE", rows: [][]string{{"1", "2"}}}}},
		{"update of the key names the old and the new key",
			`UPDATE courses SET id = 10 WHERE id = 1`, nil,
			[]sent{{table: "courses", op: "UPDATE", rows: [][]string{{"1", "2"}, {"10", "2"}}}}},
		{"delete", `DELETE FROM courses WHERE id = 10`, nil,
			[]sent{{table: "courses", op: "DELETE", rows: [][]string{{"10", "2"}}}}},
		{"statements changing no row send nothing",
			`UPDATE courses SET title = 'x' WHERE false; DELETE FROM courses WHERE id = 99; INSERT INTO courses SELECT 1, 1, '' WHERE false`,
			nil, nil},
		{"text values arrive as written", `INSERT INTO tenants VALUES (7, $1)`, []any{name},
			[]sent{{table: "tenants", op: "INSERT", rows: [][]string{{"7", name}}}}},
		{"two statements in one transaction send one message each",
			`UPDATE tenants SET name = NULL WHERE id = 7; DELETE FROM courses WHERE id = 2`, nil,
			[]sent{
				{table: "tenants", op: "UPDATE", rows: [][]string{{"7", name}, {"7", ""}}},
				{table: "courses", op: "DELETE", rows: [][]string{{"2", ""}}},
			}},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			before := time.Now()
			f.exec(t, st.sql, st.args...)
			after := time.Now()
			ns := f.drain(t)
			expectSent(t, ns, st.want...)
			// At is the trigger's clock_timestamp(): the database runs on this machine, so it
			// falls within the statement, give or take clock granularity.
			for _, n := range ns {
				if n.At.Before(before.Add(-time.Second)) || n.At.After(after.Add(time.Second)) {
					t.Errorf("message time %v is not within the statement (%v to %v)", n.At, before, after)
				}
			}
		})
	}
}

func TestTriggerNotifiesOnlyOnCommit(t *testing.T) {
	f := newTriggerFixture(t)
	f.mustInstallUnchecked(t, triggerSpec(f.channel, 1000))
	ctx := t.Context()

	tx, err := f.db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO courses VALUES (1, 1, 'Go')`); err != nil {
		t.Fatal(err)
	}
	if ns := f.drain(t); len(ns) != 0 {
		t.Fatalf("notified before commit: %v", summarize(ns))
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	expectSent(t, f.drain(t), sent{table: "courses", op: "INSERT", rows: [][]string{{"1", "1"}}})

	tx, err = f.db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, sql := range []string{`INSERT INTO courses VALUES (2, 1, 'Rust')`, `UPDATE courses SET tenant_id = 3`, `TRUNCATE courses`} {
		if _, err := tx.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if ns := f.drain(t); len(ns) != 0 {
		t.Fatalf("a rolled back transaction notified: %v", summarize(ns))
	}

	// A statement rolled back to a savepoint is not sent; the rest of the transaction is.
	tx, err = f.db.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, sql := range []string{`INSERT INTO courses VALUES (3, 1, 'kept')`, `SAVEPOINT s`,
		`INSERT INTO courses VALUES (4, 1, 'undone')`, `ROLLBACK TO SAVEPOINT s`} {
		if _, err := tx.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	expectSent(t, f.drain(t), sent{table: "courses", op: "INSERT", rows: [][]string{{"3", "1"}}})
}

func TestTriggerChunksLargeStatements(t *testing.T) {
	f := newTriggerFixture(t)
	f.mustInstallUnchecked(t, triggerSpec(f.channel, 10000))
	const n = 3000
	ids := func(tenants ...int) map[string]int {
		m := map[string]int{}
		for i := 1; i <= n; i++ {
			for _, tn := range tenants {
				m[strconv.Itoa(i)+","+strconv.Itoa(tn)] = 1
			}
		}
		return m
	}
	copyRows := func(t *testing.T) {
		rows := make([][]any, n)
		for i := range rows {
			rows[i] = []any{int64(i + 1), int64(1), "copied"}
		}
		got, err := f.db.CopyFrom(t.Context(), pgx.Identifier{"courses"}, []string{"id", "tenant_id", "title"}, pgx.CopyFromRows(rows))
		if err != nil || got != n {
			t.Fatalf("copy: %d rows, %v", got, err)
		}
	}
	steps := []struct {
		name string
		run  func(t *testing.T)
		op   string
		want map[string]int
	}{
		{"insert", func(t *testing.T) {
			f.exec(t, `INSERT INTO courses SELECT i, 1, 'c' || i FROM generate_series(1, $1::int) i`, n)
		}, "INSERT", ids(1)},
		{"update of every row names old and new", func(t *testing.T) { f.exec(t, `UPDATE courses SET tenant_id = 2`) }, "UPDATE", ids(1, 2)},
		{"delete", func(t *testing.T) { f.exec(t, `DELETE FROM courses`) }, "DELETE", ids(2)},
		{"copy", copyRows, "INSERT", ids(1)},
	}
	for _, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			st.run(t)
			ns := f.drain(t)
			if len(ns) < 2 {
				t.Errorf("%d rows came in %d message(s), want several", len(st.want), len(ns))
			}
			for _, m := range ns {
				if len(m.payload) > maxPayload {
					t.Errorf("a message is %d bytes, over %d", len(m.payload), maxPayload)
				}
				if m.Table != "courses" || m.Op != st.op || m.All || !slices.Equal(m.Columns, courseCols) {
					t.Errorf("message %s %s all=%v columns %v, want %s courses naming rows of %v", m.Op, m.Table, m.All, m.Columns, st.op, courseCols)
				}
			}
			got := rowCounts(ns)
			var missing, extra []string
			for k := range st.want {
				if got[k] == 0 {
					missing = append(missing, k)
				}
			}
			for k, c := range got {
				if st.want[k] == 0 || c > 1 {
					extra = append(extra, fmt.Sprintf("%s x%d", k, c))
				}
			}
			if len(missing)+len(extra) > 0 {
				t.Errorf("%d messages named %d distinct rows, want %d: missing %d (e.g. %q), unexpected or repeated %d (e.g. %q)",
					len(ns), len(got), len(st.want), len(missing), missing[:min(5, len(missing))], len(extra), extra[:min(5, len(extra))])
			}
		})
	}
}

func TestTriggerTableWide(t *testing.T) {
	f := newTriggerFixture(t)
	const maxRows = 50
	f.mustInstallUnchecked(t, triggerSpec(f.channel, maxRows))

	// max_rows rows are still named.
	f.exec(t, `INSERT INTO courses SELECT i, 1, '' FROM generate_series(1, $1::int) i`, maxRows)
	ns := f.drain(t)
	if got := rowCounts(ns); len(got) != maxRows || slices.ContainsFunc(ns, func(n notice) bool { return n.All }) {
		t.Errorf("a statement of exactly max_rows rows: %d rows named, %v; want %d rows", len(got), summarize(ns), maxRows)
	}

	courses := func(op string) sent { return sent{table: "courses", op: op, all: true} }
	tests := []struct {
		name string
		sql  string
		args []any
		want []sent
	}{
		{"insert over max_rows", `INSERT INTO courses SELECT i, 1, '' FROM generate_series(1001, 1000 + $1::int) i`, []any{maxRows + 1},
			[]sent{courses("INSERT")}},
		{"update over max_rows", `UPDATE courses SET tenant_id = 2`, nil, []sent{courses("UPDATE")}},
		{"delete over max_rows", `DELETE FROM courses WHERE id > 10`, nil, []sent{courses("DELETE")}},
		{"truncate", `TRUNCATE courses`, nil, []sent{courses("TRUNCATE")}},
		{"truncate of an empty table", `TRUNCATE courses`, nil, []sent{courses("TRUNCATE")}},
		// A value that does not fit one message cannot be named: the table is.
		{"a row too big for a message", `INSERT INTO tenants VALUES (1, repeat('x', 7900))`, nil,
			[]sent{{table: "tenants", op: "INSERT", all: true}}},
		{"a big row that fits a message is named", `INSERT INTO tenants VALUES (2, repeat('é', 3500))`, nil,
			[]sent{{table: "tenants", op: "INSERT", rows: [][]string{{"2", strings.Repeat("é", 3500)}}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f.exec(t, tt.sql, tt.args...)
			ns := f.drain(t)
			expectSent(t, ns, tt.want...)
			for _, n := range ns {
				if len(n.payload) > maxPayload {
					t.Errorf("a message is %d bytes, over %d", len(n.payload), maxPayload)
				}
			}
		})
	}
}

// TestTriggerStatementForms covers the other ways a statement changes rows: upserts, MERGE,
// COPY (in TestTriggerChunksLargeStatements) and foreign-key cascades.
func TestTriggerStatementForms(t *testing.T) {
	f := newTriggerFixture(t)
	f.exec(t, `ALTER TABLE courses ADD FOREIGN KEY (tenant_id) REFERENCES tenants (id) ON DELETE CASCADE`)
	f.exec(t, `INSERT INTO tenants VALUES (1, 'a'), (2, 'b'); INSERT INTO courses VALUES (1, 1, ''), (2, 1, ''), (3, 2, '')`)
	f.mustInstallUnchecked(t, triggerSpec(f.channel, 1000))
	tests := []struct {
		name string
		sql  string
		want []sent
	}{
		{"insert on conflict do update", `INSERT INTO courses VALUES (1, 2, 'x'), (4, 2, 'y')
			ON CONFLICT (id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id`, []sent{
			{table: "courses", op: "INSERT", rows: [][]string{{"4", "2"}}},
			{table: "courses", op: "UPDATE", rows: [][]string{{"1", "1"}, {"1", "2"}}},
		}},
		{"insert on conflict do nothing that inserts nothing", `INSERT INTO courses VALUES (1, 1, 'x') ON CONFLICT DO NOTHING`, nil},
		{"merge", `MERGE INTO courses c USING (VALUES (2, 2), (5, 1)) v (id, tenant_id) ON c.id = v.id
			WHEN MATCHED THEN UPDATE SET tenant_id = v.tenant_id
			WHEN NOT MATCHED THEN INSERT VALUES (v.id, v.tenant_id, 'm')`, []sent{
			{table: "courses", op: "UPDATE", rows: [][]string{{"2", "1"}, {"2", "2"}}},
			{table: "courses", op: "INSERT", rows: [][]string{{"5", "1"}}},
		}},
		{"merge delete", `MERGE INTO courses c USING (VALUES (5)) v (id) ON c.id = v.id WHEN MATCHED THEN DELETE`, []sent{
			{table: "courses", op: "DELETE", rows: [][]string{{"5", "1"}}},
		}},
		{"on delete cascade", `DELETE FROM tenants WHERE id = 2`, []sent{
			{table: "tenants", op: "DELETE", rows: [][]string{{"2", "b"}}},
			{table: "courses", op: "DELETE", rows: [][]string{{"1", "2"}, {"2", "2"}, {"3", "2"}, {"4", "2"}}},
		}},
		{"truncate cascade", `TRUNCATE tenants CASCADE`, []sent{
			{table: "tenants", op: "TRUNCATE", all: true},
			{table: "courses", op: "TRUNCATE", all: true},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f.exec(t, tt.sql)
			expectSent(t, f.drain(t), tt.want...)
		})
	}
}

// installed is a table's row in cachecar_triggers.
type installed struct {
	Table   string
	Columns []string
	Channel string
	MaxRows int
	Version int
}

func (f *triggerFixture) bookkeeping(t *testing.T) []installed {
	t.Helper()
	rows, err := f.db.Query(t.Context(), `SELECT table_name, columns, channel, max_rows, version FROM cachecar_triggers ORDER BY table_name`)
	if err != nil {
		t.Fatalf("read cachecar_triggers: %v", err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowToStructByPos[installed])
	if err != nil {
		t.Fatalf("read cachecar_triggers: %v", err)
	}
	return out
}

// textArray returns the text[] a query returns.
func (f *triggerFixture) textArray(t *testing.T, sql string, args ...any) []string {
	t.Helper()
	var out []string
	if err := f.db.QueryRow(t.Context(), sql, args...).Scan(&out); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return out
}

// triggersOn returns the names of cachecar's triggers on table, sorted.
func (f *triggerFixture) triggersOn(t *testing.T, table string) []string {
	t.Helper()
	return f.textArray(t, `SELECT coalesce(array_agg(tgname::text ORDER BY tgname), '{}') FROM pg_trigger
		WHERE tgrelid = to_regclass($1) AND tgname LIKE 'cachecar%'`, table)
}

// functions returns the names of cachecar's functions in the test's schema, sorted.
func (f *triggerFixture) functions(t *testing.T) []string {
	t.Helper()
	return f.textArray(t, `SELECT coalesce(array_agg(proname::text ORDER BY proname), '{}') FROM pg_proc
		WHERE pronamespace = current_schema()::regnamespace AND proname LIKE 'cachecar%'`)
}

var allTriggers = []string{"cachecar_del", "cachecar_ins", "cachecar_trunc", "cachecar_upd"}

func TestInstallIsIdempotent(t *testing.T) {
	f := newTriggerFixture(t)
	spec := installSpec(f.channel, 100)
	want := []installed{
		{Table: "courses", Columns: courseCols, Channel: f.channel, MaxRows: 100, Version: triggerVersion},
		{Table: "tenants", Columns: []string{"id"}, Channel: f.channel, MaxRows: 100, Version: triggerVersion},
	}
	for i := range 2 {
		rep := f.mustInstall(t, spec)
		if !slices.Equal(rep.Installed, []string{"courses", "tenants"}) || len(rep.Removed) != 0 {
			t.Errorf("install %d reported %+v, want courses and tenants installed, nothing removed", i+1, rep)
		}
		for _, table := range []string{"courses", "tenants"} {
			if got := f.triggersOn(t, table); !slices.Equal(got, allTriggers) {
				t.Errorf("after install %d, %s has triggers %q, want %q", i+1, table, got, allTriggers)
			}
		}
		if got := f.bookkeeping(t); !slices.EqualFunc(got, want, sameInstalled) {
			t.Errorf("after install %d, cachecar_triggers holds %+v, want %+v", i+1, got, want)
		}
		if got, want := f.functions(t), []string{"cachecar_notify_courses", "cachecar_notify_tenants"}; !slices.Equal(got, want) {
			t.Errorf("after install %d, functions %q, want %q", i+1, got, want)
		}
		if err := Verify(t.Context(), f.db, spec); err != nil {
			t.Errorf("verify after install %d: %v", i+1, err)
		}
	}
	// Installed twice, a statement still sends one message, not two.
	f.exec(t, `INSERT INTO courses VALUES (1, 1, '')`)
	expectSent(t, f.drain(t), sent{table: "courses", op: "INSERT", rows: [][]string{{"1", "1"}}})
}

func sameInstalled(a, b installed) bool {
	return a.Table == b.Table && slices.Equal(a.Columns, b.Columns) && a.Channel == b.Channel &&
		a.MaxRows == b.MaxRows && a.Version == b.Version
}

func TestInstallRemovesTablesNoLongerNamed(t *testing.T) {
	f := newTriggerFixture(t)
	full := installSpec(f.channel, 100)
	coursesOnly := Spec{Channel: f.channel, MaxRows: 100, Rules: full.Rules[:2]}
	f.mustInstall(t, full)

	rep := f.mustInstall(t, coursesOnly)
	if !slices.Equal(rep.Installed, []string{"courses"}) || !slices.Equal(rep.Removed, []string{"tenants"}) {
		t.Errorf("install reported %+v, want courses installed and tenants removed", rep)
	}
	if got := f.triggersOn(t, "tenants"); len(got) != 0 {
		t.Errorf("tenants still has triggers %q", got)
	}
	if got := f.triggersOn(t, "courses"); !slices.Equal(got, allTriggers) {
		t.Errorf("courses has triggers %q, want %q", got, allTriggers)
	}
	want := []installed{{Table: "courses", Columns: courseCols, Channel: f.channel, MaxRows: 100, Version: triggerVersion}}
	if got := f.bookkeeping(t); !slices.EqualFunc(got, want, sameInstalled) {
		t.Errorf("cachecar_triggers holds %+v, want %+v", got, want)
	}
	if got := f.functions(t); !slices.Equal(got, []string{"cachecar_notify_courses"}) {
		t.Errorf("functions %q, want only cachecar_notify_courses", got)
	}
	f.exec(t, `INSERT INTO tenants VALUES (1, 'a'); INSERT INTO courses VALUES (1, 1, '')`)
	expectSent(t, f.drain(t), sent{table: "courses", op: "INSERT", rows: [][]string{{"1", "1"}}})
	if err := Verify(t.Context(), f.db, coursesOnly); err != nil {
		t.Errorf("verify: %v", err)
	}

	// A table dropped since it was installed took its triggers with it; removing it must
	// still succeed and forget it.
	f.mustInstall(t, full)
	f.exec(t, `DROP TABLE tenants`)
	rep = f.mustInstall(t, coursesOnly)
	if !slices.Equal(rep.Removed, []string{"tenants"}) {
		t.Errorf("install after DROP TABLE reported %+v, want tenants removed", rep)
	}
	if got := f.bookkeeping(t); !slices.EqualFunc(got, want, sameInstalled) {
		t.Errorf("after DROP TABLE, cachecar_triggers holds %+v, want %+v", got, want)
	}
	if got := f.functions(t); !slices.Equal(got, []string{"cachecar_notify_courses"}) {
		t.Errorf("after DROP TABLE, functions %q, want only cachecar_notify_courses", got)
	}
}

func TestInstallAndVerifyRejectMissingSchema(t *testing.T) {
	tests := []struct {
		name string
		rule Rule
		want []string // in the error message
	}{
		{"missing column", Rule{Policy: "course_owner", Table: "courses", Columns: []string{"tenant_id", "owner_id"}},
			[]string{"policy course_owner:", `"owner_id"`, `"courses"`}},
		{"missing table", Rule{Policy: "lesson", Table: "lessons", Columns: []string{"id"}},
			[]string{"policy lesson:", `"lessons"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newTriggerFixture(t)
			good := installSpec(f.channel, 100)
			bad := good
			bad.Rules = append(slices.Clone(good.Rules), tt.rule)
			check := func(what string, err error) {
				t.Helper()
				if !IsSchemaError(err) {
					t.Fatalf("%s: %v; want a schema error", what, err)
				}
				for _, w := range tt.want {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("%s: %q does not name %s", what, err, w)
					}
				}
			}

			_, err := f.install(t, bad)
			check("install", err)
			if got := f.triggersOn(t, "courses"); len(got) != 0 {
				t.Errorf("a failed install left triggers %q", got)
			}
			if got := f.bookkeeping(t); len(got) != 0 {
				t.Errorf("a failed install left cachecar_triggers rows %+v", got)
			}
			check("verify", Verify(t.Context(), f.db, bad))

			// A failed install over a good one changes nothing.
			f.mustInstall(t, good)
			_, err = f.install(t, bad)
			check("install over a good one", err)
			if err := Verify(t.Context(), f.db, good); err != nil {
				t.Errorf("verify after a failed install: %v", err)
			}
			check("verify after install", Verify(t.Context(), f.db, bad))
		})
	}
}

func TestVerify(t *testing.T) {
	tests := []struct {
		name    string
		install bool
		setup   string            // SQL run after the install
		spec    func(s Spec) Spec // the spec Verify checks, from the installed one
		wantErr string            // "" for success, else part of the schema error
	}{
		{name: "after install", install: true},
		{name: "before install", wantErr: "table courses has no cachecar trigger"},
		{name: "without cachecar's tables", setup: `DROP TABLE cachecar_triggers`, wantErr: "cachecar's tables are missing"},
		{name: "a trigger dropped by hand", install: true, setup: `DROP TRIGGER cachecar_upd ON courses`,
			wantErr: "table courses has 3 of cachecar's 4 triggers enabled"},
		{name: "a trigger disabled", install: true, setup: `ALTER TABLE tenants DISABLE TRIGGER cachecar_trunc`,
			wantErr: "table tenants has 3 of cachecar's 4 triggers enabled"},
		{name: "another channel", install: true, spec: func(s Spec) Spec { s.Channel = "other"; return s },
			wantErr: `notifies channel "t_`},
		{name: "another max_rows", install: true, spec: func(s Spec) Spec { s.MaxRows = 101; return s },
			wantErr: "the trigger on courses has max_rows 100, configured is 101"},
		{name: "another column", install: true, setup: `ALTER TABLE courses ADD COLUMN author_id bigint`, spec: func(s Spec) Spec {
			s.Rules = append(slices.Clone(s.Rules), Rule{Policy: "by_author", Table: "courses", Columns: []string{"author_id"}})
			return s
		}, wantErr: "the trigger on courses sends columns [id tenant_id], the policies need [author_id id tenant_id]"},
		{name: "a column that is not an integer id", install: true, spec: func(s Spec) Spec {
			s.Rules = append(slices.Clone(s.Rules), Rule{Policy: "by_title", Table: "courses", Columns: []string{"title"}})
			return s
		}, wantErr: `policy by_title: column "title" of table "courses" is text; it must be an integer id`},
		{name: "another table", install: true, setup: `CREATE TABLE lessons (id bigint)`, spec: func(s Spec) Spec {
			s.Rules = append(slices.Clone(s.Rules), Rule{Policy: "lesson", Table: "lessons", Columns: []string{"id"}})
			return s
		}, wantErr: "table lessons has no cachecar trigger"},
		{name: "an older trigger version", install: true, setup: `UPDATE cachecar_triggers SET version = 0 WHERE table_name = 'tenants'`,
			wantErr: "the trigger on tenants is version 0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newTriggerFixture(t)
			spec := installSpec(f.channel, 100)
			if tt.install {
				f.mustInstall(t, spec)
			}
			if tt.setup != "" {
				f.exec(t, tt.setup)
			}
			if tt.spec != nil {
				spec = tt.spec(spec)
			}
			err := Verify(t.Context(), f.db, spec)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("verify: %v", err)
			case tt.wantErr == "":
			case !IsSchemaError(err):
				t.Fatalf("verify: %v; want a schema error containing %q", err, tt.wantErr)
			case !strings.Contains(err.Error(), tt.wantErr):
				t.Fatalf("verify: %q does not contain %q", err, tt.wantErr)
			}
		})
	}
}
