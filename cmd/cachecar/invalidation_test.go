package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cachecar/cachecar/configs"
	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/valkey-io/valkey-go"
)

// bound is how long after its commit a write may stay invisible in these tests. The design's
// lag is milliseconds (see make bench); the margin is for -race on two shared cores.
const bound = 500 * time.Millisecond

func openPool(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

func mustExec(t *testing.T, pool *pgxpool.Pool, sql string, args ...any) {
	t.Helper()
	if _, err := pool.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// eventually polls GET path until ok accepts the answer, or fails after the bound.
func eventually(t *testing.T, s *sidecar, path, what string, ok func(code int, body string) bool) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		r, b := get(t, s.api+path)
		if ok(r.StatusCode, b) {
			return time.Since(start)
		}
		if time.Since(start) > bound {
			t.Fatalf("%s: GET %s still answers %d %s (X-Cache %s) %s after the write", what, path, r.StatusCode, b, r.Header.Get("X-Cache"), bound)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// warm reads path until it is a HIT, so that a stale answer would come from the cache.
func warm(t *testing.T, s *sidecar, path string) string {
	t.Helper()
	for i := 0; i < 20; i++ {
		r, b := get(t, s.api+path)
		if r.Header.Get("X-Cache") == "HIT" {
			return b
		}
	}
	t.Fatalf("GET %s never became a HIT", path)
	return ""
}

func TestWritesInvalidate(t *testing.T) {
	url := referenceDB(t)
	addr, prefix := testenv.Valkey(t)
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix})
	pool := openPool(t, url)
	has := func(sub string) func(int, string) bool {
		return func(code int, b string) bool { return code == 200 && strings.Contains(b, sub) }
	}
	lacks := func(sub string) func(int, string) bool {
		return func(code int, b string) bool { return code == 200 && !strings.Contains(b, sub) }
	}
	stat := func(b string, k string) float64 {
		var m map[string]any
		json.Unmarshal([]byte(b), &m)
		f, _ := m[k].(float64)
		return f
	}

	t.Run("update", func(t *testing.T) {
		warm(t, s, "/v1/courses/3")
		warm(t, s, "/v1/courses?ids=3,4")
		mustExec(t, pool, "UPDATE courses SET title = 'Renamed' WHERE id = 3")
		d := eventually(t, s, "/v1/courses/3", "update", has(`"title":"Renamed"`))
		eventually(t, s, "/v1/courses?ids=3,4", "update in a batch", has(`"title":"Renamed"`))
		t.Logf("update visible after %s", d)
	})
	t.Run("delete", func(t *testing.T) {
		warm(t, s, "/v1/courses/5")
		mustExec(t, pool, "DELETE FROM courses WHERE id = 5")
		eventually(t, s, "/v1/courses/5", "delete", func(code int, _ string) bool { return code == 404 })
	})
	t.Run("insert", func(t *testing.T) {
		list := "/v1/tenants/1/dispatches?limit=100"
		before := warm(t, s, "/v1/tenants/1/stats")
		warm(t, s, list)
		var id int64
		if err := pool.QueryRow(context.Background(), `INSERT INTO dispatches (tenant_id, course_id, destination, status)
			VALUES (1, 1, 'new.example', 'active') RETURNING id`).Scan(&id); err != nil {
			t.Fatal(err)
		}
		eventually(t, s, list, "insert in a list", has(`"destination":"new.example"`))
		eventually(t, s, "/v1/tenants/1/stats", "insert in stats", func(code int, b string) bool {
			return code == 200 && stat(b, "active_dispatches") == stat(before, "active_dispatches")+1
		})
		eventually(t, s, "/v1/dispatches/"+strconv.FormatInt(id, 10), "inserted row", has(`"destination":"new.example"`))
	})
	t.Run("tenant move", func(t *testing.T) {
		// Dispatch 1 belongs to tenant 2 (course 1's tenant); move it to tenant 1.
		from, to := "/v1/tenants/2/dispatches?limit=100", "/v1/tenants/1/dispatches?limit=100"
		warm(t, s, from)
		warm(t, s, to)
		warm(t, s, "/v1/dispatches/1")
		sFrom, sTo := warm(t, s, "/v1/tenants/2/stats"), warm(t, s, "/v1/tenants/1/stats")
		mustExec(t, pool, "UPDATE dispatches SET tenant_id = 1, destination = 'moved.example' WHERE id = 1")
		eventually(t, s, from, "the old tenant's list", lacks(`"id":1,`))
		eventually(t, s, to, "the new tenant's list", has(`"destination":"moved.example"`))
		eventually(t, s, "/v1/dispatches/1", "the row", has(`"tenant_id":1`))
		eventually(t, s, "/v1/tenants/2/stats", "the old tenant's stats", func(code int, b string) bool {
			return stat(b, "active_dispatches") == stat(sFrom, "active_dispatches")-1
		})
		eventually(t, s, "/v1/tenants/1/stats", "the new tenant's stats", func(code int, b string) bool {
			return stat(b, "active_dispatches") == stat(sTo, "active_dispatches")+1
		})
	})
	t.Run("tenant", func(t *testing.T) {
		warm(t, s, "/v1/tenants/2")
		mustExec(t, pool, "UPDATE tenants SET plan = 'enterprise' WHERE id = 2")
		eventually(t, s, "/v1/tenants/2", "tenant update", has(`"plan":"enterprise"`))
	})
	_, metrics := get(t, s.health+"/metrics")
	for _, want := range []string{"cachecar_invalidation_listener_up 1", `cachecar_invalidation_notifications_total{outcome="applied"}`,
		"cachecar_invalidation_lag_seconds_bucket", "cachecar_invalidation_keys_deleted_total"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if _, b := get(t, s.health+"/health/detailed"); !strings.Contains(b, `"listener":{"status":"up"`) {
		t.Errorf("/health/detailed: %s", b)
	}
}

// TestGapAfterTerminate ends the listener's backend inside the writing transaction, so the
// write's notification is sent while no listener exists: it is lost. The sidecar must reconnect
// by itself and never serve the pre-gap value after it is back.
func TestGapAfterTerminate(t *testing.T) {
	url := referenceDB(t)
	addr, prefix := testenv.Valkey(t)
	app := "cachecar-listener-" + testenv.Suffix()
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix,
		"CACHECAR_INVALIDATION_LISTEN_URL": testenv.WithParam(url, "application_name", app), "CACHECAR_INVALIDATION_CHANNEL": testChannel(url)})
	pool := openPool(t, url)
	old := warm(t, s, "/v1/courses/2")
	ctx := context.Background()
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "UPDATE courses SET title = 'Written in the gap' WHERE id = 2"); err != nil {
			return err
		}
		var pid int32
		if err := tx.QueryRow(ctx, "SELECT pid FROM pg_stat_activity WHERE application_name = $1", app).Scan(&pid); err != nil {
			return fmt.Errorf("find the listener: %w", err)
		}
		var ok bool
		if err := tx.QueryRow(ctx, "SELECT pg_terminate_backend($1, 5000)", pid).Scan(&ok); err != nil || !ok {
			return fmt.Errorf("terminate the listener: %v %v", ok, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Wait until the listener is back (a reconnect counted, status up again).
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, m := get(t, s.health+"/metrics")
		l, _ := s.listenerState(t)
		if l == "up" && !strings.Contains(m, "cachecar_invalidation_reconnects_total 0") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the listener did not reconnect within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	for i := 0; i < 50; i++ {
		r, b := get(t, s.api+"/v1/courses/2")
		if b == old || !strings.Contains(b, "Written in the gap") {
			t.Fatalf("read %d after the reconnect: %s %s, the pre-gap value", i, r.Header.Get("X-Cache"), b)
		}
	}
	if r, _ := get(t, s.api+"/v1/courses/2"); r.Header.Get("X-Cache") != "HIT" {
		t.Fatalf("after the resync the cache serves again: %s", r.Header.Get("X-Cache"))
	}
}

func TestMigrateTriggersFollowConfig(t *testing.T) {
	url := referenceDB(t) // default policies: triggers on tenants, courses, dispatches
	pool := openPool(t, url)
	triggers := func() map[string]int {
		rows, err := pool.Query(context.Background(), `SELECT c.relname::text, count(*)::int FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
			WHERE g.tgname LIKE 'cachecar\_%' AND g.tgname NOT LIKE 'cachecar\_session\_%' AND c.relnamespace = current_schema()::regnamespace GROUP BY 1`)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]int{}
		for rows.Next() {
			var n string
			var c int
			rows.Scan(&n, &c)
			out[n] = c
		}
		return out
	}
	if got := triggers(); len(got) != 3 || got["tenants"] != 4 || got["courses"] != 4 || got["dispatches"] != 4 {
		t.Fatalf("triggers after migrate: %v", got)
	}
	migrate := func(env map[string]string) (string, error) {
		env["DATABASE_URL"] = url
		var out bytes.Buffer
		err := run(context.Background(), []string{"migrate"}, envFunc(withChannel(env)), &out, &out)
		return out.String(), err
	}
	// Stats also on registrations; tenants no longer watched by anyone.
	out, err := migrate(map[string]string{
		"CACHECAR_POLICIES_TENANT_INVALIDATE_ON":        "none",
		"CACHECAR_POLICIES_DISPATCH_LIST_INVALIDATE_ON": "dispatches(tenant_id=tenant_id)",
		"CACHECAR_POLICIES_TENANT_STATS_INVALIDATE_ON":  "courses(tenant_id=tenant_id) registrations(tenant_id=tenant_id)",
	})
	if err != nil || !strings.Contains(out, "removed from: tenants") {
		t.Fatalf("migrate: %v\n%s", err, out)
	}
	if got := triggers(); len(got) != 3 || got["registrations"] != 4 || got["tenants"] != 0 {
		t.Fatalf("triggers after the change: %v", got)
	}
	// Serving with the old config finds the triggers out of date and says what to do.
	var sout bytes.Buffer
	err = run(context.Background(), []string{"serve", "--listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0"},
		envFunc(withChannel(map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": testenv.ClosedAddr(t)})), &sout, &sout)
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != 2 || !strings.Contains(err.Error(), "cachecar migrate") || !strings.Contains(err.Error(), "tenants") {
		t.Fatalf("serve with outdated triggers: %v", err)
	}
	// A column the table lacks stops migrate, naming the policy and the column.
	out, err = migrate(map[string]string{"CACHECAR_POLICIES_COURSE_INVALIDATE_ON": "courses(id=course_uuid)"})
	if !errors.As(err, &ee) || ee.code != 2 || !strings.Contains(err.Error(), "policy course") || !strings.Contains(err.Error(), `"course_uuid"`) {
		t.Fatalf("migrate with a missing column: %v\n%s", err, out)
	}
	// Disabled: every trigger goes.
	if out, err := migrate(map[string]string{"CACHECAR_INVALIDATION_ENABLED": "false"}); err != nil || len(triggers()) != 0 {
		t.Fatalf("migrate with invalidation disabled: %v %v\n%s", err, triggers(), out)
	}
}

// consistencyRun is the randomized consistency check: writers update random rows while readers
// read through two sidecars sharing one Valkey; it counts reads that returned a version older
// than one committed more than the bound before the read began.
type versions struct {
	mu sync.Mutex
	// commits[id] lists (version, commit time) in commit order.
	commits map[int64][]commit
}

type commit struct {
	v  int64
	at time.Time
}

func (vs *versions) add(id, v int64, at time.Time) {
	vs.mu.Lock()
	vs.commits[id] = append(vs.commits[id], commit{v, at})
	vs.mu.Unlock()
}

// newestBefore is the newest version of id committed before t (0: none recorded).
func (vs *versions) newestBefore(id int64, t time.Time) int64 {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	var v int64
	for _, c := range vs.commits[id] {
		if c.at.Before(t) && c.v > v {
			v = c.v
		}
	}
	return v
}

func TestTwoSidecarsRandomizedConsistency(t *testing.T) {
	duration := 4 * time.Second
	if d, err := time.ParseDuration(os.Getenv("CACHECAR_CONSISTENCY_DURATION")); err == nil && d > 0 {
		duration = d
	}
	url := referenceDB(t)
	pool := openPool(t, url)
	// More rows, with versions the readers can compare: courses.version and dispatches.license_limit.
	mustExec(t, pool, `INSERT INTO courses (tenant_id, title, scorm_package) SELECT 1 + i % 2, 'More ' || i, 'm.zip' FROM generate_series(1, 40) i;
		INSERT INTO dispatches (tenant_id, course_id, destination) SELECT c.tenant_id, c.id, 'more.example' FROM courses c WHERE c.id > 10;
		UPDATE dispatches SET license_limit = 1`)
	var nCourses, nDispatches int64
	pool.QueryRow(context.Background(), "SELECT max(id) FROM courses").Scan(&nCourses)
	pool.QueryRow(context.Background(), "SELECT max(id) FROM dispatches").Scan(&nDispatches)
	addr, prefix := testenv.Valkey(t)
	env := map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix, "CACHECAR_LOG_ACCESS_SAMPLE": "0"}
	sidecars := []*sidecar{startSidecar(t, env), startSidecar(t, env)}

	courseV := &versions{commits: map[int64][]commit{}}
	dispatchV := &versions{commits: map[int64][]commit{}}
	for id := int64(1); id <= nCourses; id++ {
		courseV.add(id, 1, time.Time{})
	}
	ctx, stop := context.WithTimeout(context.Background(), duration)
	defer stop()
	var writes, reads, stale, errs atomic.Int64
	var wg sync.WaitGroup
	for w := 0; w < 3; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				var v int64
				var err error
				if rand.N(2) == 0 {
					id := 1 + rand.Int64N(nCourses)
					err = pool.QueryRow(context.Background(), "UPDATE courses SET version = version + 1 WHERE id = $1 RETURNING version", id).Scan(&v)
					if err == nil {
						courseV.add(id, int64(v), time.Now())
					}
				} else {
					// A status change or a move between tenants, with the version bumped.
					id := 1 + rand.Int64N(nDispatches)
					err = pool.QueryRow(context.Background(), `UPDATE dispatches SET license_limit = license_limit + 1,
						tenant_id = CASE WHEN random() < 0.3 THEN 3 - tenant_id ELSE tenant_id END,
						status = (ARRAY['active','paused'])[1 + floor(random() * 2)::int] WHERE id = $1 RETURNING license_limit`, id).Scan(&v)
					if err == nil {
						dispatchV.add(id, int64(v), time.Now())
					}
				}
				if err != nil && !errors.Is(err, pgx.ErrNoRows) {
					errs.Add(1)
					t.Errorf("write: %v", err)
					return
				}
				writes.Add(1)
				time.Sleep(time.Duration(rand.N(3)) * time.Millisecond)
			}
		}()
	}
	check := func(vs *versions, id, got int64, began time.Time, path, cache string) {
		reads.Add(1)
		if want := vs.newestBefore(id, began.Add(-bound)); got < want {
			stale.Add(1)
			t.Errorf("stale read: GET %s (%s) began %s: id %d version %d, but version %d was committed more than %s before the read",
				path, cache, began.Format("15:04:05.000000"), id, got, want, bound)
		}
	}
	client := &http.Client{Timeout: 10 * time.Second}
	for r := 0; r < 6; r++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				s := sidecars[rand.N(len(sidecars))]
				began := time.Now()
				var path string
				kind := rand.N(3)
				switch kind {
				case 0:
					path = fmt.Sprintf("/v1/courses/%d", 1+rand.Int64N(nCourses))
				case 1:
					path = fmt.Sprintf("/v1/dispatches/%d", 1+rand.Int64N(nDispatches))
				default:
					path = fmt.Sprintf("/v1/tenants/%d/dispatches?limit=100", 1+rand.N(2))
				}
				resp, err := client.Get(s.api + path)
				if err != nil {
					errs.Add(1)
					continue
				}
				var body struct {
					ID           int64 `json:"id"`
					Version      int64 `json:"version"`
					LicenseLimit int64 `json:"license_limit"`
					Items        []struct {
						ID           int64 `json:"id"`
						LicenseLimit int64 `json:"license_limit"`
					} `json:"items"`
				}
				err = json.NewDecoder(resp.Body).Decode(&body)
				resp.Body.Close()
				if resp.StatusCode != 200 || err != nil {
					errs.Add(1)
					t.Errorf("GET %s: %d %v", path, resp.StatusCode, err)
					continue
				}
				switch kind {
				case 0:
					check(courseV, body.ID, body.Version, began, path, resp.Header.Get("X-Cache"))
				case 1:
					check(dispatchV, body.ID, body.LicenseLimit, began, path, resp.Header.Get("X-Cache"))
				default:
					for _, it := range body.Items {
						check(dispatchV, it.ID, it.LicenseLimit, began, path, resp.Header.Get("X-Cache"))
					}
				}
			}
		}()
	}
	wg.Wait()
	time.Sleep(bound)
	// After the writers stop and the bound passes: every cached entry equals PostgreSQL, and so
	// does every read, through either sidecar.
	cfg, err := configs.Load(configs.Source{})
	if err != nil {
		t.Fatal(err)
	}
	// Every read, through either sidecar, equals PostgreSQL (these reads also fill the cache
	// for the comparison below).
	final := 0
	readAll := func(path, sql string, args ...any) {
		var fresh string
		if err := pool.QueryRow(context.Background(), sql, args...).Scan(&fresh); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		for _, s := range sidecars {
			if _, b := get(t, s.api+path); b != fresh {
				stale.Add(1)
				t.Errorf("after the bound, GET %s = %s\n PostgreSQL = %s", path, b, fresh)
			}
			final++
		}
	}
	for id := int64(1); id <= nCourses; id++ {
		readAll(fmt.Sprintf("/v1/courses/%d", id), cfg.Policies.Course.SQL, id)
	}
	for id := int64(1); id <= nDispatches; id++ {
		readAll(fmt.Sprintf("/v1/dispatches/%d", id), cfg.Policies.Dispatch.SQL, id)
	}
	for tenant := int64(1); tenant <= 2; tenant++ {
		readAll(fmt.Sprintf("/v1/tenants/%d/dispatches?limit=100", tenant), cfg.Policies.DispatchList.SQL, tenant, nil, int64(0), int64(100))
	}
	raw, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	keys, err := raw.Do(context.Background(), raw.B().Keys().Pattern(prefix+"*").Build()).AsStrSlice() // a test, not the hot path
	if err != nil {
		t.Fatal(err)
	}
	compared := 0
	for _, k := range keys {
		name := strings.TrimPrefix(k, prefix)
		var sql string
		var args []any
		switch {
		case strings.HasPrefix(name, "course:"):
			id, _ := strconv.ParseInt(strings.TrimPrefix(name, "course:"), 10, 64)
			sql, args = cfg.Policies.Course.SQL, []any{id}
		case strings.HasPrefix(name, "dispatch:"):
			id, _ := strconv.ParseInt(strings.TrimPrefix(name, "dispatch:"), 10, 64)
			sql, args = cfg.Policies.Dispatch.SQL, []any{id}
		case strings.HasPrefix(name, "dispatches:list:"):
			var tenant, after, limit int64
			var status string
			if _, err := fmt.Sscanf(strings.ReplaceAll(strings.TrimPrefix(name, "dispatches:list:"), ":", " "), "%d %s %d %d", &tenant, &status, &after, &limit); err != nil {
				t.Fatalf("list key %s: %v", name, err)
			}
			var st any
			if status != "-" {
				st = status
			}
			sql, args = cfg.Policies.DispatchList.SQL, []any{tenant, st, after, limit}
		default:
			continue // tag sets
		}
		cached, err := raw.Do(context.Background(), raw.B().Get().Key(k).Build()).ToString()
		if valkey.IsValkeyNil(err) {
			continue // expired or deleted since KEYS
		}
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(cached, "\x00cachecar-lease:") {
			// A fill lease, never served (a timed-out lease call can leave one until it
			// expires); what matters is that no entry differs.
			continue
		}
		var fresh string
		if err := pool.QueryRow(context.Background(), sql, args...).Scan(&fresh); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		compared++
		if cached != fresh {
			stale.Add(1)
			t.Errorf("after the bound, Valkey %s = %s\n PostgreSQL = %s", name, cached, fresh)
		}
	}
	perMillion := float64(stale.Load()) / float64(max(reads.Load(), 1)) * 1e6
	fmt.Printf("consistency: duration %s, sidecars 2, writes %d, reads %d, stale reads after the bound (%s) %d (%.1f per million reads), keys compared after the run %d (all equal: %v), final reads %d, errors %d\n",
		duration, writes.Load(), reads.Load(), bound, stale.Load(), perMillion, compared, !t.Failed(), final, errs.Load())
	if writes.Load() < 100 || reads.Load() < 100 || compared < int(nCourses+nDispatches) {
		t.Fatalf("too little happened to prove anything: %d writes, %d reads, %d keys compared", writes.Load(), reads.Load(), compared)
	}
}

// TestPrintSQLAppliedByHand is the operator's path: the script of `migrate --print-sql`, applied
// with a SQL client instead of migrate, is enough for serve to start and invalidate.
func TestPrintSQLAppliedByHand(t *testing.T) {
	url := testenv.PostgresURL(t)
	env := withChannel(map[string]string{"DATABASE_URL": url})
	var out bytes.Buffer
	noTriggers := withChannel(map[string]string{"DATABASE_URL": url, "CACHECAR_INVALIDATION_ENABLED": "false"})
	if err := run(context.Background(), []string{"migrate", "--reference-schema"}, envFunc(noTriggers), &out, &out); err != nil {
		t.Fatalf("migrate: %v\n%s", err, &out)
	}
	out.Reset()
	if err := run(context.Background(), []string{"migrate", "--print-sql"}, envFunc(env), &out, &out); err != nil {
		t.Fatalf("print-sql: %v", err)
	}
	pool := openPool(t, url)
	mustExec(t, pool, out.String())
	mustExec(t, pool, `INSERT INTO tenants (name, slug) VALUES ('Acme', 'acme');
		INSERT INTO courses (tenant_id, title, scorm_package) VALUES (1, 'Before', 'c.zip')`)
	addr, prefix := testenv.Valkey(t)
	env["CACHECAR_VALKEY_ADDRS"], env["CACHECAR_NAMESPACE"] = addr, prefix
	s := startSidecar(t, env)
	if l, _ := s.listenerState(t); l != "up" {
		t.Fatalf("listener %q with hand-applied triggers", l)
	}
	warm(t, s, "/v1/courses/1")
	mustExec(t, pool, "UPDATE courses SET title = 'After' WHERE id = 1")
	eventually(t, s, "/v1/courses/1", "update", func(code int, b string) bool { return strings.Contains(b, `"title":"After"`) })
}
