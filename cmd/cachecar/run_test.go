package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/configs"
	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// envFunc is a getenv over m that, as main's configs.Getenv does, reads a variable present with
// the empty string as configs.EmptyEnv.
func envFunc(m map[string]string) func(string) string {
	return func(k string) string {
		if v, ok := m[k]; ok && v == "" {
			return configs.EmptyEnv
		}
		return m[k]
	}
}

// sidecar is one cachecar started through run, as main would, on :0 ports.
type sidecar struct {
	api, health string
	out         *testenv.SyncBuffer
	cancel      context.CancelFunc
	done        chan error
}

// testChannel is the NOTIFY channel of the test database url: tests share one database (each in
// its own schema) and NOTIFY channels are database-wide, so each schema's triggers and
// sidecars get their own channel.
func testChannel(url string) string {
	h := fnv.New64a()
	h.Write([]byte(url))
	return fmt.Sprintf("t_%x", h.Sum64())
}

// withChannel returns env with the invalidation channel of its DATABASE_URL, unless set.
func withChannel(env map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range env {
		out[k] = v
	}
	if out["CACHECAR_INVALIDATION_CHANNEL"] == "" && out["DATABASE_URL"] != "" {
		out["CACHECAR_INVALIDATION_CHANNEL"] = testChannel(out["DATABASE_URL"])
	}
	return out
}

func startSidecar(t *testing.T, env map[string]string, extra ...string) *sidecar {
	t.Helper()
	env = withChannel(env)
	ctx, cancel := context.WithCancel(context.Background())
	s := &sidecar{out: &testenv.SyncBuffer{}, cancel: cancel, done: make(chan error, 1)}
	args := append([]string{"serve", "--listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0"}, extra...)
	go func() { s.done <- run(ctx, args, envFunc(env), s.out, s.out) }()
	t.Cleanup(func() { s.stop(t) })
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		sc := bufio.NewScanner(strings.NewReader(s.out.String()))
		for sc.Scan() {
			var line struct{ Message, API, Health string }
			if json.Unmarshal(sc.Bytes(), &line) == nil && line.Message == "listening" {
				s.api, s.health = "http://"+line.API, "http://"+line.Health
				s.waitListener(t, 10*time.Second)
				return s
			}
		}
		select {
		case err := <-s.done:
			t.Fatalf("run returned before listening: %v\n%s", err, s.out)
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("no listening line within 15s:\n%s", s.out)
	return nil
}

// listenerState returns the invalidation listener's and the database's status from
// /health/detailed.
func (s *sidecar) listenerState(t *testing.T) (listener, database string) {
	t.Helper()
	resp, err := http.Get(s.health + "/health/detailed")
	if err != nil {
		t.Fatalf("health: %v", err)
	}
	defer resp.Body.Close()
	var h struct {
		Services map[string]struct{ Status string }
	}
	if err := json.NewDecoder(resp.Body).Decode(&h); err != nil {
		t.Fatalf("health: %v", err)
	}
	return h.Services["listener"].Status, h.Services["database"].Status
}

// waitListener waits until the invalidation listener is live (cached reads are served), unless
// it is disabled or cannot start because the database is down.
func (s *sidecar) waitListener(t *testing.T, max time.Duration) {
	t.Helper()
	deadline := time.Now().Add(max)
	for {
		l, db := s.listenerState(t)
		if l == "up" || l == "disabled" || l == "error" || db != "up" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("invalidation listener not live within %s (status %q)\n%s", max, l, s.out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (s *sidecar) stop(t *testing.T) {
	t.Helper()
	if s.cancel == nil {
		return
	}
	s.cancel()
	s.cancel = nil
	select {
	case err := <-s.done:
		if err != nil {
			t.Errorf("run returned %v on shutdown, want nil", err)
		}
	case <-time.After(20 * time.Second):
		t.Error("run did not return within 20s of shutdown")
	}
}

func get(t *testing.T, url string, hdr ...string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// referenceDB returns a URL to a fresh schema holding the reference schema and a few rows.
func referenceDB(t *testing.T) string {
	t.Helper()
	url := testenv.PostgresURL(t)
	var out bytes.Buffer
	if err := run(context.Background(), []string{"migrate", "--reference-schema"}, envFunc(withChannel(map[string]string{"DATABASE_URL": url})), &out, &out); err != nil {
		t.Fatalf("migrate: %v\n%s", err, &out)
	}
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	_, err = pool.Exec(context.Background(), `
		INSERT INTO tenants (name, slug) VALUES ('Acme', 'acme'), ('Globex', 'globex');
		INSERT INTO courses (tenant_id, title, scorm_package, status) SELECT 1 + i % 2, 'Course ' || i, 'c.zip', 'published' FROM generate_series(1, 10) i;
		INSERT INTO dispatches (tenant_id, course_id, destination, status) SELECT c.tenant_id, c.id, 'org.example', 'active' FROM courses c;
		INSERT INTO registrations (tenant_id, dispatch_id, course_id, learner_id, status, score)
		  SELECT d.tenant_id, d.id, d.course_id, 'l' || i, CASE WHEN i % 2 = 0 THEN 'passed' ELSE 'incomplete' END, CASE WHEN i % 2 = 0 THEN 80 END
		  FROM dispatches d, generate_series(1, 3) i;`)
	if err != nil {
		t.Fatal(err)
	}
	return url
}

func TestServeMissThenHitAndHealth(t *testing.T) {
	url := referenceDB(t)
	addr, prefix := testenv.Valkey(t)
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix})

	r1, b1 := get(t, s.api+"/v1/courses/3")
	r2, b2 := get(t, s.api+"/v1/courses/3")
	if r1.StatusCode != 200 || r1.Header.Get("X-Cache") != "MISS" || r2.Header.Get("X-Cache") != "HIT" || b1 != b2 {
		t.Fatalf("course twice: %d %s then %d %s; bodies equal: %v", r1.StatusCode, r1.Header.Get("X-Cache"), r2.StatusCode, r2.Header.Get("X-Cache"), b1 == b2)
	}
	if !strings.Contains(b1, `"title":"Course 3"`) {
		t.Fatalf("course body %s", b1)
	}
	r3, _ := get(t, s.api+"/v1/courses/3", "If-None-Match", r2.Header.Get("ETag"))
	if r3.StatusCode != http.StatusNotModified {
		t.Fatalf("If-None-Match: %d, want 304", r3.StatusCode)
	}
	for _, path := range []string{"/v1/tenants/1", "/v1/tenants/1/stats", "/v1/tenants/1/dispatches?limit=2", "/v1/dispatches/1", "/v1/courses?ids=1,2,999"} {
		if r, b := get(t, s.api+path); r.StatusCode != 200 || !json.Valid([]byte(b)) {
			t.Fatalf("GET %s: %d %s", path, r.StatusCode, b)
		}
	}
	_, stats := get(t, s.api+"/v1/tenants/1/stats")
	var st map[string]any
	json.Unmarshal([]byte(stats), &st)
	for _, k := range []string{"courses", "active_dispatches", "registrations", "completions", "completion_rate", "average_score", "registrations_last_7_days"} {
		if _, ok := st[k]; !ok {
			t.Fatalf("stats lack %q: %s", k, stats)
		}
	}
	if st["courses"] != float64(5) || st["registrations"] != float64(15) {
		t.Fatalf("stats for tenant 1: %s, want 5 courses and 15 registrations", stats)
	}
	type page struct {
		Items     []map[string]any `json:"items"`
		NextAfter *float64         `json:"next_after"`
	}
	getPage := func(path string) (page, string) {
		_, b := get(t, s.api+path)
		var p page
		json.Unmarshal([]byte(b), &p)
		return p, b
	}
	first, list := getPage("/v1/tenants/1/dispatches?limit=2")
	if len(first.Items) != 2 || first.NextAfter == nil {
		t.Fatalf("first page: %s", list)
	}
	after := int64(*first.NextAfter)
	if p, b := getPage(fmt.Sprintf("/v1/tenants/1/dispatches?limit=100&after=%d", after)); len(p.Items) != 3 || p.NextAfter != nil {
		t.Fatalf("second page: %s, want the other 3 dispatches and no next_after", b)
	}
	// A last page that is exactly full has no next_after either: nothing follows it.
	if p, b := getPage(fmt.Sprintf("/v1/tenants/1/dispatches?limit=3&after=%d", after)); len(p.Items) != 3 || p.NextAfter != nil {
		t.Fatalf("full last page: %s, want 3 dispatches and no next_after", b)
	}
	if r, b := get(t, s.api+"/v1/tenants/999/dispatches"); r.StatusCode != 404 {
		t.Fatalf("dispatches of a missing tenant: %d %s", r.StatusCode, b)
	}

	r, b := get(t, s.health+"/health")
	var live struct {
		Status    string
		Timestamp string
		Uptime    float64
	}
	if json.Unmarshal([]byte(b), &live); r.StatusCode != 200 || live.Status != "ok" || live.Timestamp == "" {
		t.Fatalf("/health: %d %s", r.StatusCode, b)
	}
	if _, err := time.Parse(time.RFC3339, live.Timestamp); err != nil {
		t.Fatalf("/health timestamp %q is not RFC 3339", live.Timestamp)
	}
	// healthy once every service is up: the sessions' store trusts Valkey after its first check
	// and reconciliation, which may end after the listener went live.
	for deadline := time.Now().Add(10 * time.Second); ; {
		r, b := get(t, s.health+"/health/detailed")
		if r.StatusCode == 200 && strings.Contains(b, `"status":"healthy"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/health/detailed not healthy within 10s: %d %s", r.StatusCode, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if r, _ := get(t, s.health+"/ready"); r.StatusCode != 200 {
		t.Fatalf("/ready: %d", r.StatusCode)
	}
	_, metrics := get(t, s.health+"/metrics")
	for _, want := range []string{
		`cachecar_http_requests_total{cache="HIT",code="200",route="GET /v1/courses/{id}"}`,
		`cachecar_http_request_duration_seconds_bucket`,
		`cachecar_db_queries_total{outcome="ok",policy="course"}`,
		`cachecar_db_query_duration_seconds_bucket`,
		`go_goroutines`,
	} {
		if !strings.Contains(metrics, want) {
			t.Fatalf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(metrics, "/v1/courses/3") {
		t.Fatal("/metrics has a label with a raw id")
	}
	// One access-log line per request, with the request id echoed to the client.
	rid := "test-request-42"
	get(t, s.api+"/v1/courses/3", "X-Request-Id", rid)
	time.Sleep(50 * time.Millisecond)
	var logged bool
	for _, line := range strings.Split(s.out.String(), "\n") {
		if strings.Contains(line, rid) {
			logged = strings.Contains(line, `"route":"GET /v1/courses/{id}"`) && strings.Contains(line, `"cache":"HIT"`) &&
				strings.Contains(line, `"status":200`) && strings.Contains(line, `"duration_ms"`)
		}
	}
	if !logged {
		t.Fatalf("no access-log line with request id, route, status, cache:\n%s", s.out)
	}
	if strings.Contains(s.out.String(), "cachecar:cachecar@") || strings.Contains(s.out.String(), "Course 3") {
		t.Fatal("the log holds a password or a cached value")
	}
}

func TestServeValkeyKilledThenBack(t *testing.T) {
	url := referenceDB(t)
	srv := testenv.StartRedis(t)
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": srv.Addr, "CACHECAR_VALKEY_TIMEOUT": "250ms"})
	get(t, s.api+"/v1/courses/1")
	if r, _ := get(t, s.api+"/v1/courses/1"); r.Header.Get("X-Cache") != "HIT" {
		t.Fatalf("before the fault: %s", r.Header.Get("X-Cache"))
	}
	srv.Stop()
	// The in-process tier may answer until the client has seen its connection break (which
	// empties the tier); from then on reads go to PostgreSQL. Every answer is a 200 either way.
	for start := time.Now(); ; {
		r, b := get(t, s.api+"/v1/courses/1")
		if r.StatusCode != 200 || !strings.Contains(b, `"id":1`) {
			t.Fatalf("Valkey down: %d %s %s, want 200", r.StatusCode, r.Header.Get("X-Cache"), b)
		}
		if r.Header.Get("X-Cache") == "BYPASS" {
			break
		}
		if time.Since(start) > 2*time.Second {
			t.Fatalf("Valkey down for 2s: still X-Cache %s, want BYPASS from PostgreSQL", r.Header.Get("X-Cache"))
		}
		time.Sleep(5 * time.Millisecond)
	}
	if r, b := get(t, s.health+"/health/detailed"); r.StatusCode != 200 || !strings.Contains(b, `"status":"degraded"`) ||
		!strings.Contains(b, `"redis":{"status":"down"`) {
		t.Fatalf("/health/detailed with Valkey down: %d %s", r.StatusCode, b)
	}
	if r, _ := get(t, s.health+"/ready"); r.StatusCode != 200 {
		t.Fatalf("/ready with only Valkey down: %d, want 200 (reads still work)", r.StatusCode)
	}
	if r, _ := get(t, s.health+"/health"); r.StatusCode != 200 {
		t.Fatalf("/health with Valkey down: %d", r.StatusCode)
	}
	srv.Start(t)
	deadline := time.Now().Add(10 * time.Second)
	for {
		get(t, s.api+"/v1/courses/1")
		if r, _ := get(t, s.api+"/v1/courses/1"); r.Header.Get("X-Cache") == "HIT" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no HIT within 10s of Valkey coming back")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Sessions move back to Valkey once it is reconciled (within a refresh interval or two).
	for {
		_, b := get(t, s.health+"/health/detailed")
		if strings.Contains(b, `"status":"healthy"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/health/detailed after Valkey came back: %s", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestServeStartsWithEverythingDown(t *testing.T) {
	s := startSidecar(t, map[string]string{
		"DATABASE_URL":          "postgres://cachecar:secret@" + testenv.ClosedAddr(t) + "/x?sslmode=disable",
		"CACHECAR_VALKEY_ADDRS": testenv.ClosedAddr(t),
	})
	if r, _ := get(t, s.health+"/health"); r.StatusCode != 200 {
		t.Fatalf("/health with everything down: %d, want 200 (liveness is the process)", r.StatusCode)
	}
	if r, _ := get(t, s.health+"/ready"); r.StatusCode != 503 {
		t.Fatalf("/ready with PostgreSQL down: %d, want 503", r.StatusCode)
	}
	r, b := get(t, s.health+"/health/detailed")
	if r.StatusCode != 503 || !strings.Contains(b, `"status":"unhealthy"`) {
		t.Fatalf("/health/detailed: %d %s", r.StatusCode, b)
	}
	r, b = get(t, s.api+"/v1/courses/1")
	if r.StatusCode != 503 || !strings.Contains(b, `"code":"database_unavailable"`) || r.Header.Get("Retry-After") == "" {
		t.Fatalf("read with everything down: %d %s, want 503 database_unavailable", r.StatusCode, b)
	}
	if strings.Contains(s.out.String(), "secret") {
		t.Fatal("the database password reached the log")
	}
}

// TestShutdownCutsRequestsPastTheTimeout: a request still running at server.shutdown_timeout
// is cut (its load cancelled, its connection closed) rather than holding the process up, and its
// access-log line is still written.
func TestShutdownCutsRequestsPastTheTimeout(t *testing.T) {
	url := referenceDB(t)
	s := startSidecar(t, map[string]string{
		"DATABASE_URL":                       url,
		"CACHECAR_VALKEY_ADDRS":              "",
		"CACHECAR_SERVER_SHUTDOWN_TIMEOUT":   "300ms",
		"CACHECAR_POLICIES_TENANT_STATS_SQL": "SELECT json_build_object('slow', $1::bigint)::text FROM pg_sleep(4)",
	})
	got := make(chan error, 1)
	go func() {
		resp, err := http.Get(s.api + "/v1/tenants/1/stats")
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		got <- err
	}()
	time.Sleep(300 * time.Millisecond) // the load is in pg_sleep
	start := time.Now()
	s.cancel() // SIGTERM
	s.cancel = nil
	select {
	case err := <-s.done:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatalf("run still running 3 s after SIGTERM, with a 300ms shutdown timeout and a 4 s load:\n%s", s.out)
	}
	if d := time.Since(start); d > 2500*time.Millisecond {
		t.Errorf("shutdown took %s", d)
	}
	<-got
	var stats, stopped bool
	sc := bufio.NewScanner(strings.NewReader(s.out.String()))
	for sc.Scan() {
		var line struct{ Message, Route string }
		if json.Unmarshal(sc.Bytes(), &line) != nil {
			continue
		}
		switch {
		case line.Message == "request" && line.Route == "GET /v1/tenants/{id}/stats":
			stats = true
		case line.Message == "stopped":
			stopped = stats // the access line came before the end
		}
	}
	if !stats || !stopped {
		t.Fatalf("want the cut request's access-log line before \"stopped\" (line %v, before %v):\n%s", stats, stopped, s.out)
	}
}

func TestShutdownFinishesInFlightRequests(t *testing.T) {
	url := referenceDB(t)
	s := startSidecar(t, map[string]string{
		"DATABASE_URL":                       url,
		"CACHECAR_VALKEY_ADDRS":              "",
		"CACHECAR_POLICIES_TENANT_STATS_SQL": "SELECT json_build_object('slow', $1::bigint)::text FROM pg_sleep(0.5)",
	})
	type result struct {
		code int
		err  error
	}
	got := make(chan result, 1)
	go func() {
		resp, err := http.Get(s.api + "/v1/tenants/1/stats")
		if err != nil {
			got <- result{err: err}
			return
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		got <- result{code: resp.StatusCode}
	}()
	time.Sleep(150 * time.Millisecond)
	s.stop(t) // SIGTERM: run's context ends
	r := <-got
	if r.err != nil || r.code != 200 {
		t.Fatalf("in-flight request during shutdown: %d %v, want 200", r.code, r.err)
	}
	if _, err := http.Get(s.api + "/v1/tenants/1"); err == nil {
		t.Fatal("the read API still accepts connections after shutdown")
	}
}

func TestCheckConfig(t *testing.T) {
	t.Run("prints effective config redacted", func(t *testing.T) {
		var out, errOut bytes.Buffer
		env := map[string]string{"DATABASE_URL": "postgres://app:hunter2@db:5432/app", "REDIS_PASSWORD": "redispw", "ADMIN_TOKEN": "tok-123-0123456789ab", "REDIS_HOST": "cache"}
		if err := run(context.Background(), []string{"check-config"}, envFunc(env), &out, &errOut); err != nil {
			t.Fatalf("check-config: %v %s", err, &errOut)
		}
		for _, secret := range []string{"hunter2", "redispw", "tok-123-0123456789ab"} {
			if strings.Contains(out.String(), secret) {
				t.Fatalf("check-config printed secret %q:\n%s", secret, &out)
			}
		}
		for _, want := range []string{"cache:6379", "postgres://app:<redacted>@db:5432/app", "course:{id}"} {
			if !strings.Contains(out.String(), want) {
				t.Fatalf("check-config output lacks %q:\n%s", want, &out)
			}
		}
		// The output is a config file once the secrets come back, here from the environment.
		f := t.TempDir() + "/effective.yaml"
		os.WriteFile(f, out.Bytes(), 0o600)
		if err := run(context.Background(), []string{"check-config", "--config", f}, envFunc(env), io.Discard, io.Discard); err != nil {
			t.Fatalf("check-config output does not load back with the secrets in the environment: %v", err)
		}
		// As it is, its placeholders are refused: "<redacted-admin-token>" would open the admin
		// port to anyone who guesses it.
		var probs bytes.Buffer
		err := run(context.Background(), []string{"check-config", "--config", f}, envFunc(nil), io.Discard, &probs)
		if code := exitCode(err, &probs); code != 2 {
			t.Fatalf("check-config of its own output without the secrets: exit %d, want 2 (%v)", code, err)
		}
		for _, want := range []string{"admin.token", "valkey.password", "database.url", "placeholder"} {
			if !strings.Contains(probs.String(), want) {
				t.Errorf("problems lack %q:\n%s", want, &probs)
			}
		}
	})
	t.Run("lists every problem and exits 2", func(t *testing.T) {
		f := t.TempDir() + "/bad.yaml"
		os.WriteFile(f, []byte("server:\n  listen: nowhere\n  bogus: 1\nvalkey:\n  timeout: soon\n"), 0o600)
		var errOut bytes.Buffer
		err := run(context.Background(), []string{"check-config", "--config", f}, envFunc(map[string]string{"CACHE_TTL_DEFAULT": "abc"}), io.Discard, &errOut)
		if code := exitCode(err, &errOut); code != 2 {
			t.Fatalf("exit code %d, want 2 (err %v)", code, err)
		}
		for _, want := range []string{"server.bogus", "server.listen", "timeout", "CACHE_TTL_DEFAULT"} {
			if !strings.Contains(errOut.String(), want) {
				t.Fatalf("problem list lacks %q:\n%s", want, &errOut)
			}
		}
	})
	t.Run("not YAML", func(t *testing.T) {
		f := t.TempDir() + "/bad.yaml"
		os.WriteFile(f, []byte("server: [unclosed\n\t- {"), 0o600)
		var errOut bytes.Buffer
		err := run(context.Background(), []string{"serve", "--config", f}, envFunc(nil), io.Discard, &errOut)
		if code := exitCode(err, &errOut); code != 2 || !strings.Contains(errOut.String(), "not valid YAML") {
			t.Fatalf("exit %d: %s", code, &errOut)
		}
	})
}

func TestMigrateIsIdempotent(t *testing.T) {
	url := testenv.PostgresURL(t)
	env := envFunc(map[string]string{"DATABASE_URL": url})
	for i := 0; i < 2; i++ {
		var out bytes.Buffer
		if err := run(context.Background(), []string{"migrate", "--reference-schema"}, env, &out, &out); err != nil {
			t.Fatalf("migrate run %d: %v\n%s", i+1, err, &out)
		}
	}
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	var n int
	err = pool.QueryRow(context.Background(), `SELECT count(*) FROM information_schema.tables
		WHERE table_schema = current_schema() AND table_name IN ('tenants','courses','dispatches','registrations','session','cachecar_schema_migrations')`).Scan(&n)
	if err != nil || n != 6 {
		t.Fatalf("%d of 6 tables after migrate (%v)", n, err)
	}
}

func TestMigrateDemoData(t *testing.T) {
	if testing.Short() {
		t.Skip("loads a million rows")
	}
	url := testenv.PostgresURL(t)
	var out bytes.Buffer
	env := envFunc(map[string]string{"DATABASE_URL": url})
	if err := run(context.Background(), []string{"migrate", "--demo-data"}, env, &out, &out); err != nil {
		t.Fatalf("migrate --demo-data: %v\n%s", err, &out)
	}
	if !strings.Contains(out.String(), "demo data: loaded") {
		t.Fatalf("first run: %s", &out)
	}
	out.Reset()
	if err := run(context.Background(), []string{"migrate", "--demo-data"}, env, &out, &out); err != nil || !strings.Contains(out.String(), "already hold data") {
		t.Fatalf("second run must leave the data alone: %v %s", err, &out)
	}
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	for table, want := range map[string]int64{"tenants": 50, "courses": 5000, "dispatches": 200000, "registrations": 1000000} {
		var n int64
		if err := pool.QueryRow(context.Background(), "SELECT count(*) FROM "+table).Scan(&n); err != nil || n != want {
			t.Fatalf("%s: %d rows (%v), want %d", table, n, err, want)
		}
	}
	var mismatched int64
	pool.QueryRow(context.Background(), `SELECT count(*) FROM dispatches d JOIN courses c ON c.id = d.course_id WHERE c.tenant_id <> d.tenant_id`).Scan(&mismatched)
	if mismatched != 0 {
		t.Fatalf("%d dispatches belong to another tenant than their course", mismatched)
	}
	// The stats aggregate reads a tenant's registrations from the covering index alone, from
	// the first read: the load vacuums the table, so no heap page is fetched.
	rows, err := pool.Query(context.Background(), `EXPLAIN (ANALYZE, COSTS OFF) SELECT count(*),
		count(*) FILTER (WHERE status IN ('completed', 'passed')), avg(score),
		count(*) FILTER (WHERE created_at >= now() - interval '7 days') FROM registrations WHERE tenant_id = 7`)
	if err != nil {
		t.Fatal(err)
	}
	plan, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Join(plan, "\n")
	if !strings.Contains(text, "Index Only Scan using registrations_tenant_stats_idx") || !strings.Contains(text, "Heap Fetches: 0") {
		t.Fatalf("the stats aggregate over registrations is not an index-only scan without heap fetches:\n%s", text)
	}
}

func TestCommandLineErrors(t *testing.T) {
	for _, args := range [][]string{{"frobnicate"}, {"serve", "extra"}, {"serve", "--nope"}, {"serve", "--demo-data"}} {
		var errOut bytes.Buffer
		err := run(context.Background(), args, envFunc(nil), io.Discard, &errOut)
		var ee *exitError
		if !errors.As(err, &ee) || ee.code != 2 {
			t.Fatalf("%v: err %v, want exit 2", args, err)
		}
	}
	var out bytes.Buffer
	if err := run(context.Background(), []string{"version"}, envFunc(nil), &out, io.Discard); err != nil || !strings.HasPrefix(out.String(), "cachecar ") {
		t.Fatalf("version: %v %q", err, &out)
	}
}
