package main

import (
	"bytes"
	"context"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
)

func do(t *testing.T, method, url, body string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url, strings.NewReader(body))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp, b.String()
}

// TestSessionsEndToEnd: the session routes through run, with Valkey killed and restarted
// empty in the middle: the saved session is never lost, and Valkey serves again after.
func TestSessionsEndToEnd(t *testing.T) {
	url := referenceDB(t)
	srv := testenv.StartRedis(t)
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": srv.Addr,
		"CACHECAR_SESSIONS_REFRESH_INTERVAL": "50ms"})
	base := s.api + "/v1/sessions/"
	sess := `{"cookie":{"originalMaxAge":3600000,"expires":"` + time.Now().Add(time.Hour).UTC().Format("2006-01-02T15:04:05.000Z") + `","httpOnly":true,"path":"/"},"user":"e2e-secret-value"}`
	waitStore := func(want string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			_, h := get(t, s.health+"/health/detailed")
			if strings.Contains(h, `"sessions":{"status":"up","store":"`+want+`"`) ||
				strings.Contains(h, `"sessions":{"status":"degraded","store":"`+want+`"`) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("sessions never served from %s: %s", want, h)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitStore("valkey")
	if r, b := do(t, "PUT", base+"e2e1", sess); r.StatusCode != 204 || r.Header.Get("X-Session-Store") != "valkey" {
		t.Fatalf("PUT: %d %s %s", r.StatusCode, r.Header.Get("X-Session-Store"), b)
	}
	if r, b := get(t, base+"e2e1"); r.StatusCode != 200 || b != sess || r.Header.Get("X-Session-Store") != "valkey" {
		t.Fatalf("GET: %d %s %q", r.StatusCode, r.Header.Get("X-Session-Store"), b)
	}
	srv.Stop()
	srv.Start(t) // empty
	// Never reported missing, whichever store answers.
	deadline := time.Now().Add(10 * time.Second)
	for {
		r, b := get(t, base+"e2e1")
		if r.StatusCode != 200 || b != sess {
			t.Fatalf("after Valkey restarted empty: %d %s %q", r.StatusCode, r.Header.Get("X-Session-Store"), b)
		}
		if r.Header.Get("X-Session-Store") == "valkey" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Valkey did not serve sessions again within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if r, _ := do(t, "DELETE", base+"e2e1", ""); r.StatusCode != 204 {
		t.Fatalf("DELETE: %d", r.StatusCode)
	}
	if r, _ := get(t, base+"e2e1"); r.StatusCode != 404 {
		t.Fatalf("GET after DELETE: %d", r.StatusCode)
	}
	if r, b := do(t, "PUT", base+"bad%20sid", sess); r.StatusCode != 400 || !strings.Contains(b, "bad_sid") {
		t.Fatalf("bad sid: %d %s", r.StatusCode, b)
	}
	if r, _ := do(t, "PUT", base+"big", `{"x":"`+strings.Repeat("a", 70000)+`"}`); r.StatusCode != 413 {
		t.Fatalf("oversized body: %d", r.StatusCode)
	}
	_, metrics := get(t, s.health+"/metrics")
	for _, want := range []string{`cachecar_session_ops_total{op="put",outcome="ok",store="valkey"}`, `cachecar_session_store_active{store="valkey"} 1`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(s.out.String(), "e2e-secret-value") {
		t.Fatal("a session's contents reached the log")
	}
}

// TestMigrateCreatesConfiguredSessionTable: a table and schema named in the config are created
// as connect-pg-simple's table.sql creates them, and migrate stays idempotent.
func TestMigrateCreatesConfiguredSessionTable(t *testing.T) {
	url := testenv.PostgresURL(t)
	schema := "s_" + testenv.Suffix()
	env := withChannel(map[string]string{"DATABASE_URL": url, "CACHECAR_SESSIONS_TABLE": "user_sessions", "CACHECAR_SESSIONS_SCHEMA": schema})
	for i := 0; i < 2; i++ {
		var out bytes.Buffer
		if err := run(context.Background(), []string{"migrate", "--reference-schema"}, envFunc(env), &out, &out); err != nil {
			t.Fatalf("migrate %d: %v\n%s", i+1, err, &out)
		}
		// The notify triggers are installed once, then left alone (replacing them would lock
		// the table's readers out for the migration).
		if want := []string{"installed", "up to date"}[i]; !strings.Contains(out.String(), "notify triggers (channel cachecar_sessions) "+want) {
			t.Fatalf("migrate %d: want notify triggers %s:\n%s", i+1, want, &out)
		}
	}
	pool := openPool(t, url)
	t.Cleanup(func() { pool.Exec(context.Background(), "DROP SCHEMA "+schema+" CASCADE") })
	var cols string
	err := pool.QueryRow(context.Background(), `SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod), ', ' ORDER BY attnum)
		FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0`, schema+".user_sessions").Scan(&cols)
	if err != nil || cols != "sid character varying, sess json, expire timestamp(6) without time zone" {
		t.Fatalf("columns %q (%v)", cols, err)
	}
	// Its notify triggers, with their function in the same schema.
	var n int
	err = pool.QueryRow(context.Background(), `SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
		WHERE t.tgrelid = to_regclass($1) AND t.tgname LIKE 'cachecar_session_notify_%' AND p.pronamespace = $2::regnamespace`,
		schema+".user_sessions", schema).Scan(&n)
	if err != nil || n != 4 {
		t.Fatalf("notify triggers on the session table: %d (%v)", n, err)
	}
}

// TestSessionsFromPostgresCopiesWhileValkeyIsDown: with Valkey unreachable, session reads are
// answered from the sidecar's copies of PostgreSQL's answers, and a change made straight in the
// table (as connect-pg-simple makes it) is served within a second.
func TestSessionsFromPostgresCopiesWhileValkeyIsDown(t *testing.T) {
	url := referenceDB(t)
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": testenv.ClosedAddr(t), "CACHECAR_INVALIDATION_ENABLED": "false"})
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, h := get(t, s.health+"/health/detailed")
		if strings.Contains(h, `"store":"postgres","postgresCopies":"up"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("copies of PostgreSQL's answers never up: %s", h)
		}
		time.Sleep(20 * time.Millisecond)
	}
	base := s.api + "/v1/sessions/"
	sess := `{"cookie":{"originalMaxAge":null,"expires":null,"httpOnly":true,"path":"/"},"user":"v1"}`
	if r, b := do(t, "PUT", base+"pc1", sess); r.StatusCode != 204 || r.Header.Get("X-Session-Store") != "postgres" {
		t.Fatalf("PUT: %d %s %s", r.StatusCode, r.Header.Get("X-Session-Store"), b)
	}
	copyReads := func() float64 {
		_, m := get(t, s.health+"/metrics")
		for _, line := range strings.Split(m, "\n") {
			if v, ok := strings.CutPrefix(line, "cachecar_session_postgres_local_reads_total "); ok {
				f, _ := strconv.ParseFloat(v, 64)
				return f
			}
		}
		t.Fatal("/metrics lacks cachecar_session_postgres_local_reads_total")
		return 0
	}
	for i := 0; i < 20; i++ {
		if r, b := get(t, base+"pc1"); r.StatusCode != 200 || b != sess || r.Header.Get("X-Session-Store") != "postgres" {
			t.Fatalf("GET %d: %d %s %q", i, r.StatusCode, r.Header.Get("X-Session-Store"), b)
		}
	}
	if n := copyReads(); n < 10 {
		t.Fatalf("%v of 20 reads answered from copies", n)
	}
	pool := openPool(t, url)
	if _, err := pool.Exec(context.Background(), `UPDATE session SET sess = '{"user":"v2"}' WHERE sid = 'pc1'`); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(time.Second)
	for {
		r, b := get(t, base+"pc1")
		if r.StatusCode == 200 && b == `{"user":"v2"}` {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a change made in the table not served within a second: %d %q", r.StatusCode, b)
		}
	}
	if _, err := pool.Exec(context.Background(), `DELETE FROM session WHERE sid = 'pc1'`); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(time.Second)
	for {
		if r, _ := get(t, base+"pc1"); r.StatusCode == 404 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a session deleted in the table still served after a second")
		}
	}
}

// delete_unknown: false alone is how an operator might try to share Valkey with connect-redis
// apps; start-up says that this needs migration: connect-redis.
func TestSessionsDeleteUnknownAloneWarns(t *testing.T) {
	url := referenceDB(t)
	srv := testenv.StartRedis(t)
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": srv.Addr,
		"CACHECAR_SESSIONS_DELETE_UNKNOWN": "false", "CACHECAR_INVALIDATION_ENABLED": "false"})
	waitLog(t, s, `"level":"warn"`, "sessions.delete_unknown is false without sessions.migration")
}
