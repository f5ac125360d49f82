package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	neturl "net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/jackc/pgx/v5"
	"github.com/valkey-io/valkey-go"
)

// The connections production needs: Valkey over TLS (with a client certificate), as a
// restricted ACL user, passwords from mounted files, and PostgreSQL over verified TLS.

// detailed returns /health/detailed's services.
func detailed(t *testing.T, s *sidecar) map[string]map[string]any {
	t.Helper()
	_, b := get(t, s.health+"/health/detailed")
	var h struct {
		Services map[string]map[string]any
	}
	if err := json.Unmarshal([]byte(b), &h); err != nil {
		t.Fatalf("/health/detailed: %v: %s", err, b)
	}
	return h.Services
}

// waitSessionStore waits until the sessions are served from store (valkey or postgres).
func waitSessionStore(t *testing.T, s *sidecar, store string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if detailed(t, s)["sessions"]["store"] == store {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("sessions never served from %s: %v", store, detailed(t, s)["sessions"])
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// missThenLocalHit reads path until the in-process tier answers: a MISS first, then HITs,
// and cachecar_cache_local_hits_total grows (client tracking works on the connection).
func missThenLocalHit(t *testing.T, s *sidecar, path, policy string) {
	t.Helper()
	if r, b := get(t, s.api+path); r.StatusCode != 200 || r.Header.Get("X-Cache") != "MISS" {
		t.Fatalf("first read of %s: %d %s %s, want a MISS", path, r.StatusCode, r.Header.Get("X-Cache"), b)
	}
	before := faultMetric(t, s, "cachecar_cache_local_hits_total", `policy="`+policy+`"`)
	for i := 0; ; i++ {
		if r, _ := get(t, s.api+path); r.Header.Get("X-Cache") != "HIT" {
			t.Fatalf("read %d of %s: %s, want a HIT", i+2, path, r.Header.Get("X-Cache"))
		}
		if faultMetric(t, s, "cachecar_cache_local_hits_total", `policy="`+policy+`"`) > before {
			return
		}
		if i == 20 {
			t.Fatalf("20 HITs of %s, none from the in-process tier", path)
		}
	}
}

// sessionRoundTrip saves a session through the sidecar and reads it back, both from store.
func sessionRoundTrip(t *testing.T, s *sidecar, sid, store string) {
	t.Helper()
	body := `{"cookie":{"originalMaxAge":null},"user":"` + sid + `"}`
	if r, b := do(t, "PUT", s.api+"/v1/sessions/"+sid, body); r.StatusCode != 204 || r.Header.Get("X-Session-Store") != store {
		t.Fatalf("PUT session %s: %d %s %s, want 204 from %s", sid, r.StatusCode, r.Header.Get("X-Session-Store"), b, store)
	}
	if r, b := get(t, s.api+"/v1/sessions/"+sid); r.StatusCode != 200 || b != body || r.Header.Get("X-Session-Store") != store {
		t.Fatalf("GET session %s: %d %s %q, want it from %s", sid, r.StatusCode, r.Header.Get("X-Session-Store"), b, store)
	}
}

// waitLog waits until the sidecar's log holds every one of subs (it is written every few ms).
func waitLog(t *testing.T, s *sidecar, subs ...string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		all := true
		for _, sub := range subs {
			all = all && strings.Contains(s.out.String(), sub)
		}
		if all {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the log lacks one of %q:\n%s", subs, s.out)
		}
	}
}

func TestValkeyTLS(t *testing.T) {
	url := referenceDB(t)
	certs := testenv.NewCerts(t)
	// The server requires a client certificate signed by the CA (tls-auth-clients yes).
	srv := testenv.StartRedisWith(t, testenv.RedisOptions{TLS: certs, AuthClients: true})
	envWith := func(ns string, more map[string]string) map[string]string {
		env := map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": srv.Addr, "CACHECAR_NAMESPACE": ns,
			"CACHECAR_VALKEY_TLS_ENABLED":   "true",
			"CACHECAR_VALKEY_TLS_CERT_FILE": certs.ClientCert, "CACHECAR_VALKEY_TLS_KEY_FILE": certs.ClientKey}
		for k, v := range more {
			env[k] = v
		}
		return env
	}
	raw, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{srv.Addr}, TLSConfig: certs.ClientTLS(), DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()

	t.Run("verified, with a client certificate", func(t *testing.T) {
		s := startSidecar(t, envWith("verified:", map[string]string{"CACHECAR_VALKEY_TLS_CA_FILE": certs.CAFile}))
		missThenLocalHit(t, s, "/v1/courses/2", "course")
		svc := detailed(t, s)
		if svc["redis"]["status"] != "up" || svc["listener"]["status"] != "up" || svc["cache"]["tier"].(map[string]any)["enabled"] != true {
			t.Fatalf("/health/detailed over TLS: %v", svc)
		}
		waitSessionStore(t, s, "valkey")
		sessionRoundTrip(t, s, "tls1", "valkey")
		// Both clients, the cache's and the sessions', wrote through the TLS server.
		for _, key := range []string{"verified:course:2", "verified:sess:tls1", "verified:cachecar:sessions:epoch"} {
			if n, err := raw.Do(context.Background(), raw.B().Exists().Key(key).Build()).AsInt64(); err != nil || n != 1 {
				t.Fatalf("%s on the TLS server: %d %v", key, n, err)
			}
		}
		waitLog(t, s, `"tls":true`)
		if strings.Contains(s.out.String(), "insecure_skip_verify") {
			t.Fatal("a verified connection logged the insecure_skip_verify warning")
		}
	})

	t.Run("server name", func(t *testing.T) {
		// The address is 127.0.0.1; server_name says which name the certificate must carry.
		s := startSidecar(t, envWith("named:", map[string]string{"CACHECAR_VALKEY_TLS_CA_FILE": certs.CAFile,
			"CACHECAR_VALKEY_TLS_SERVER_NAME": certs.ServerName}))
		missThenLocalHit(t, s, "/v1/courses/3", "course")
	})

	// Connections that fail TLS leave the sidecar serving from PostgreSQL. The listener is off
	// here because with Valkey unreachable it can never go live, and startSidecar waits for it.
	refused := func(t *testing.T, s *sidecar, reason string) {
		t.Helper()
		for i := 0; i < 2; i++ {
			if r, b := get(t, s.api+"/v1/courses/1"); r.StatusCode != 200 || r.Header.Get("X-Cache") != "BYPASS" || !strings.Contains(b, `"id":1`) {
				t.Fatalf("read %d: %d %s %s, want 200 BYPASS from PostgreSQL", i, r.StatusCode, r.Header.Get("X-Cache"), b)
			}
		}
		if svc := detailed(t, s); svc["redis"]["status"] != "down" || svc["database"]["status"] != "up" {
			t.Fatalf("/health/detailed: %v, want redis down and the database up", svc)
		}
		if r, _ := get(t, s.health+"/ready"); r.StatusCode != 200 {
			t.Fatalf("/ready: %d, want 200 (reads work from PostgreSQL)", r.StatusCode)
		}
		waitSessionStore(t, s, "postgres")
		sessionRoundTrip(t, s, "tlsdown", "postgres")
		waitLog(t, s, "valkey unreachable", reason)
	}
	t.Run("server signed by another CA", func(t *testing.T) {
		other := testenv.NewCerts(t)
		s := startSidecar(t, envWith("wrongca:", map[string]string{"CACHECAR_VALKEY_TLS_CA_FILE": other.CAFile,
			"CACHECAR_INVALIDATION_ENABLED": "false"}))
		refused(t, s, "certificate signed by unknown authority")
	})
	t.Run("wrong server name", func(t *testing.T) {
		s := startSidecar(t, envWith("wrongname:", map[string]string{"CACHECAR_VALKEY_TLS_CA_FILE": certs.CAFile,
			"CACHECAR_VALKEY_TLS_SERVER_NAME": "valkey.example", "CACHECAR_INVALIDATION_ENABLED": "false"}))
		refused(t, s, "valkey.example")
	})
	t.Run("no client certificate", func(t *testing.T) {
		s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": srv.Addr, "CACHECAR_NAMESPACE": "nocert:",
			"CACHECAR_VALKEY_TLS_ENABLED": "true", "CACHECAR_VALKEY_TLS_CA_FILE": certs.CAFile, "CACHECAR_INVALIDATION_ENABLED": "false"})
		refused(t, s, "connect valkey")
	})
	t.Run("plain TCP to a TLS port", func(t *testing.T) {
		s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": srv.Addr, "CACHECAR_NAMESPACE": "plain:",
			"CACHECAR_VALKEY_DIAL_TIMEOUT": "300ms", "CACHECAR_INVALIDATION_ENABLED": "false"})
		refused(t, s, "connect valkey")
	})

	t.Run("insecure_skip_verify", func(t *testing.T) {
		// No CA file: the throwaway CA is in no system bundle, so only skipping verification
		// connects, and start-up says that it does.
		s := startSidecar(t, envWith("insecure:", map[string]string{"CACHECAR_VALKEY_TLS_INSECURE_SKIP_VERIFY": "true"}))
		missThenLocalHit(t, s, "/v1/courses/4", "course")
		waitLog(t, s, `"level":"warn"`, "valkey.tls.insecure_skip_verify is true")
	})
}

func TestValkeyACL(t *testing.T) {
	url := referenceDB(t)
	srv := testenv.StartRedis(t)
	ctx := context.Background()
	root, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{srv.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	// Every key cachecar writes (entries, tag sets, leases, refresh companions, sessions, the
	// sessions' epoch sentinel) is under the namespace, so the user may touch nothing else;
	// +@all keeps CLIENT (tracking for the in-process tier), SCAN, UNLINK, EVALSHA and INFO.
	const ns, user, password = "app1:", "cc", "cc-Secret-pw"
	if err := root.Do(ctx, root.B().Arbitrary("ACL", "SETUSER", user, "on", ">"+password, "resetkeys", "~"+ns+"*",
		"resetchannels", "+@all", "-flushall", "-flushdb", "-keys", "-config").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	// A wrong password: reads still answer (from PostgreSQL), and /health/detailed says why
	// Valkey is down without saying more.
	wrong := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": srv.Addr, "CACHECAR_NAMESPACE": ns,
		"CACHECAR_VALKEY_USERNAME": user, "REDIS_PASSWORD": "not-" + password,
		"CACHECAR_INVALIDATION_ENABLED": "false"}) // the listener would wait for Valkey
	if svc := detailed(t, wrong); svc["redis"]["status"] != "down" || svc["redis"]["error"] != "authentication or permission refused" {
		t.Fatalf("/health/detailed with a wrong password: %v", svc["redis"])
	}
	if r, _ := get(t, wrong.api+"/v1/courses/1"); r.StatusCode != 200 || r.Header.Get("X-Cache") != "BYPASS" {
		t.Fatalf("read with a wrong Valkey password: %d %s, want 200 BYPASS", r.StatusCode, r.Header.Get("X-Cache"))
	}
	wrong.stop(t)

	// The user really is restricted: a grant of any of these would make the test prove nothing.
	uc, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{srv.Addr}, Username: user, Password: password, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, cmd := range [][]string{{"FLUSHDB"}, {"FLUSHALL"}, {"KEYS", ns + "*"}, {"CONFIG", "GET", "maxmemory"}, {"SET", "other:1", "x"}, {"GET", "course:1"}} {
		err := uc.Do(ctx, uc.B().Arbitrary(cmd...).Build()).Error()
		if err == nil || !strings.Contains(err.Error(), "NOPERM") {
			t.Fatalf("%v as %s: %v, want NOPERM", cmd, user, err)
		}
	}
	if err := uc.Do(ctx, uc.B().Set().Key(ns+"probe").Value("x").Build()).Error(); err != nil {
		t.Fatalf("SET inside the namespace as %s: %v", user, err)
	}
	uc.Close()
	// From here on, any command of cachecar's that the ACL refuses is in ACL LOG.
	if err := root.Do(ctx, root.B().Arbitrary("ACL", "LOG", "RESET").Build()).Error(); err != nil {
		t.Fatal(err)
	}

	const token = "acl-admin-token-0123456789"
	app := "cachecar-acl-" + testenv.Suffix()
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": srv.Addr, "CACHECAR_NAMESPACE": ns,
		"CACHECAR_VALKEY_USERNAME": user, "REDIS_PASSWORD": password, "CACHECAR_ADMIN_TOKEN": token,
		"CACHECAR_SESSIONS_REFRESH_INTERVAL": "50ms",
		"CACHECAR_INVALIDATION_LISTEN_URL":   testenv.WithParam(url, "application_name", app)},
		"--set", "admin.listen=127.0.0.1:0")
	if l, _ := s.listenerState(t); l != "up" {
		t.Fatalf("listener %q as the ACL user, want up (its resync is SCAN and UNLINK)", l)
	}
	if svc := detailed(t, s); svc["redis"]["status"] != "up" || svc["cache"]["tier"].(map[string]any)["enabled"] != true {
		t.Fatalf("/health/detailed as the ACL user: %v", svc)
	}

	// Reads, with the in-process tier; the list's tag sets and leases are Lua scripts.
	missThenLocalHit(t, s, "/v1/courses/2", "course")
	missThenLocalHit(t, s, "/v1/tenants/1/dispatches?limit=2", "dispatch_list")
	warm(t, s, "/v1/courses?ids=5,6")
	warm(t, s, "/v1/tenants/1/stats")

	// Writes invalidate: one key, and a tag set.
	pool := openPool(t, url)
	mustExec(t, pool, "UPDATE courses SET title = 'Renamed under ACL' WHERE id = 2")
	eventually(t, s, "/v1/courses/2", "course update", func(code int, b string) bool { return code == 200 && strings.Contains(b, "Renamed under ACL") })
	mustExec(t, pool, "UPDATE dispatches SET destination = 'acl.example' WHERE id = (SELECT min(id) FROM dispatches WHERE tenant_id = 1)")
	eventually(t, s, "/v1/tenants/1/dispatches?limit=2", "dispatch update", func(code int, b string) bool { return code == 200 && strings.Contains(b, "acl.example") })

	// A gap: the listener's connection is terminated, and its resync (SCAN MATCH, UNLINK)
	// empties the invalidated policies' entries before the cache serves again.
	warm(t, s, "/v1/courses/3")
	var terminated bool
	if err := pool.QueryRow(ctx, "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = $1", app).Scan(&terminated); err != nil || !terminated {
		t.Fatalf("terminate the listener: %v %v", terminated, err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		l, _ := s.listenerState(t)
		if l == "up" && faultMetric(t, s, "cachecar_invalidation_reconnects_total", "") > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the listener did not resync and come back within 10s")
		}
	}
	if r, _ := get(t, s.api+"/v1/courses/3"); r.Header.Get("X-Cache") != "MISS" {
		t.Fatalf("a pre-gap entry after the resync: %s, want MISS", r.Header.Get("X-Cache"))
	}

	// Sessions.
	waitSessionStore(t, s, "valkey")
	sessionRoundTrip(t, s, "acl1", "valkey")

	// Admin clears: a pattern, everything, and the sessions' keys by name.
	base := "http://" + adminAddr(t, s) + "/api/admin/cache"
	warm(t, s, "/v1/courses/4")
	if resp, out := adminDo(t, "POST", base+"/clear", token, `{"pattern":"course:*"}`); resp.StatusCode != 200 || out["deleted"].(float64) < 1 {
		t.Fatalf("clear course:*: %d %v", resp.StatusCode, out)
	}
	if r, _ := get(t, s.api+"/v1/courses/4"); r.Header.Get("X-Cache") != "MISS" {
		t.Fatalf("read after the clear: %s, want MISS", r.Header.Get("X-Cache"))
	}
	warm(t, s, "/v1/tenants/2")
	if resp, out := adminDo(t, "POST", base+"/clear", token, `{}`); resp.StatusCode != 200 || out["deleted"].(float64) < 1 {
		t.Fatalf("clear {}: %d %v", resp.StatusCode, out)
	}
	if resp, out := adminDo(t, "POST", base+"/clear", token, `{"pattern":"sess:*","include_sessions":true}`); resp.StatusCode != 200 || out["deleted"].(float64) < 1 {
		t.Fatalf("clear sess:*: %d %v", resp.StatusCode, out)
	}
	if resp, st := adminDo(t, "GET", base+"/stats", token, ""); resp.StatusCode != 200 || st["healthy"] != true {
		t.Fatalf("stats as the ACL user: %d %v", resp.StatusCode, st)
	}
	if r, b := get(t, s.api+"/v1/sessions/acl1"); r.StatusCode != 200 || !strings.Contains(b, "acl1") {
		t.Fatalf("session after the clears: %d %s", r.StatusCode, b)
	}

	// Nothing cachecar did was refused, and everything it wrote is under the namespace.
	entries, err := root.Do(ctx, root.B().Arbitrary("ACL", "LOG").Build()).ToArray()
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) > 0 {
		var denied []string
		for _, e := range entries {
			m, _ := e.AsStrMap()
			denied = append(denied, fmt.Sprintf("%s %s (%s)", m["reason"], m["object"], m["context"]))
		}
		t.Fatalf("the ACL refused %d of cachecar's commands: %v", len(entries), denied)
	}
	keys, err := root.Do(ctx, root.B().Arbitrary("KEYS", "*").Build()).AsStrSlice()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if !strings.HasPrefix(k, ns) {
			t.Errorf("key %q outside the namespace %q", k, ns)
		}
	}
	if strings.Contains(s.out.String(), password) {
		t.Fatal("the Valkey password reached the log")
	}
}

// TestPasswordFiles: the database and Valkey passwords come from mounted files, for the pool,
// the listener, the sessions' client and migrate.
func TestPasswordFiles(t *testing.T) {
	url := referenceDB(t)
	ctx := context.Background()
	u, err := neturl.Parse(url)
	if err != nil {
		t.Fatal(err)
	}
	dbPassword, _ := u.User.Password()
	u.User = neturl.User(u.User.Username())
	bare := u.String()
	// Without the password nothing connects (no PGPASSWORD, no passfile, password auth on):
	// otherwise this test would pass whether or not the file is read.
	if c, err := pgx.Connect(ctx, bare); err == nil {
		c.Close(ctx)
		t.Fatal("the test database accepts a connection without a password; the test would prove nothing")
	}
	dir := t.TempDir()
	dbFile, vkFile := filepath.Join(dir, "db-password"), filepath.Join(dir, "valkey-password")
	const vkPassword = "vk-Secret-from-file"
	// As Kubernetes mounts a Secret created from a file: with the trailing newline.
	os.WriteFile(dbFile, []byte(dbPassword+"\n"), 0o600)
	os.WriteFile(vkFile, []byte(vkPassword+"\n"), 0o600)

	srv := testenv.StartRedis(t)
	root, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{srv.Addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := root.Do(ctx, root.B().Arbitrary("CONFIG", "SET", "requirepass", vkPassword).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	root.Close()

	env := map[string]string{"DATABASE_URL": bare, "CACHECAR_DATABASE_PASSWORD_FILE": dbFile,
		"CACHECAR_VALKEY_ADDRS": srv.Addr, "CACHECAR_VALKEY_PASSWORD_FILE": vkFile}
	var out bytes.Buffer
	if err := run(ctx, []string{"migrate"}, envFunc(withChannel(env)), &out, &out); err != nil {
		t.Fatalf("migrate with the password file: %v\n%s", err, &out)
	}
	s := startSidecar(t, env)
	if l, db := s.listenerState(t); l != "up" || db != "up" {
		t.Fatalf("listener %q, database %q, want both up with the password from the file", l, db)
	}
	if r, _ := get(t, s.health+"/ready"); r.StatusCode != 200 {
		t.Fatalf("/ready: %d", r.StatusCode)
	}
	if svc := detailed(t, s); svc["redis"]["status"] != "up" {
		t.Fatalf("redis %v with the password from the file", svc["redis"])
	}
	missThenLocalHit(t, s, "/v1/courses/5", "course")
	mustExec(t, openPool(t, url), "UPDATE courses SET title = 'From the file' WHERE id = 5")
	eventually(t, s, "/v1/courses/5", "course update", func(code int, b string) bool { return code == 200 && strings.Contains(b, "From the file") })
	waitSessionStore(t, s, "valkey")
	sessionRoundTrip(t, s, "pwfile1", "valkey")
	for _, secret := range []string{dbPassword + "@", vkPassword} {
		if strings.Contains(s.out.String(), secret) {
			t.Fatalf("the log holds a password (%q)", secret)
		}
	}

	// check-config names the files and prints neither password.
	out.Reset()
	if err := run(ctx, []string{"check-config"}, envFunc(env), &out, io.Discard); err != nil {
		t.Fatalf("check-config: %v", err)
	}
	if !strings.Contains(out.String(), dbFile) || !strings.Contains(out.String(), vkFile) || strings.Contains(out.String(), vkPassword) {
		t.Fatalf("check-config:\n%s", &out)
	}
}

func TestPostgresTLS(t *testing.T) {
	url := referenceDB(t)
	ctx := context.Background()
	pool := openPool(t, url)
	var ssl, certFile string
	if err := pool.QueryRow(ctx, "SELECT current_setting('ssl'), current_setting('ssl_cert_file')").Scan(&ssl, &certFile); err != nil {
		t.Fatal(err)
	}
	if ssl != "on" {
		if os.Getenv("CI") == "true" {
			t.Fatal("the test PostgreSQL has ssl off (Debian's default is on, with the snakeoil certificate); CI=true, so this fails")
		}
		t.Skip("the test PostgreSQL has ssl off")
	}
	// The server's own certificate is self-signed (Debian's snakeoil, for "localhost"), so it
	// is its own root. When the test process cannot read it (a server on another host), only
	// sslmode=require (encryption, no verification) can be tested.
	mode := "verify-ca"
	if _, err := os.ReadFile(certFile); err != nil {
		t.Logf("cannot read the server's certificate (%v): testing sslmode=require only", err)
		mode = "require"
	}
	app := "cachecar-tls-" + testenv.Suffix()
	tlsURL := testenv.WithParam(testenv.WithParam(url, "sslmode", mode), "application_name", app)
	if mode != "require" {
		tlsURL = testenv.WithParam(tlsURL, "sslrootcert", certFile)
	}
	addr, prefix := testenv.Valkey(t)
	// The triggers notify the channel of the plain URL, which referenceDB migrated with.
	channel := testChannel(url)
	// The pool's and the listener's backends are told apart from other tests' (and from each
	// other) by the application_name of their URLs.
	s := startSidecar(t, map[string]string{"DATABASE_URL": tlsURL, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix,
		"CACHECAR_INVALIDATION_CHANNEL": channel, "CACHECAR_INVALIDATION_LISTEN_URL": testenv.WithParam(tlsURL, "application_name", app+"-listener")})
	if l, db := s.listenerState(t); l != "up" || db != "up" {
		t.Fatalf("listener %q, database %q over sslmode=%s, want both up", l, db, mode)
	}
	missThenLocalHit(t, s, "/v1/courses/6", "course")
	mustExec(t, pool, "UPDATE courses SET title = 'Over TLS' WHERE id = 6")
	eventually(t, s, "/v1/courses/6", "course update", func(code int, b string) bool { return code == 200 && strings.Contains(b, "Over TLS") })
	sessionRoundTrip(t, s, "pgtls1", "valkey")

	// Every backend of this sidecar, its pool's and its listener's, is encrypted.
	var total, encrypted, listeners int
	err := pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE a.application_name = $2)
		FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name IN ($1, $2)`, app, app+"-listener").Scan(&total, &encrypted, &listeners)
	if err != nil {
		t.Fatal(err)
	}
	if total < 2 || encrypted != total || listeners != 1 {
		t.Fatalf("%d backends of the sidecar, %d of them with ssl, %d listening; want at least 2, all with ssl, one listener", total, encrypted, listeners)
	}

	if mode == "require" {
		return
	}
	t.Run("verify-full, wrong server name", func(t *testing.T) {
		// The certificate is for localhost; 127.0.0.1 is not a name it carries.
		bad := testenv.WithParam(tlsURL, "sslmode", "verify-full")
		s := startSidecar(t, map[string]string{"DATABASE_URL": bad, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix + "bad:",
			"CACHECAR_INVALIDATION_CHANNEL": channel})
		r, b := get(t, s.health+"/ready")
		if r.StatusCode != 503 || !strings.Contains(b, "database") {
			t.Fatalf("/ready: %d %s, want 503 naming the database", r.StatusCode, b)
		}
		if r, b := get(t, s.api+"/v1/courses/1"); r.StatusCode != 503 || !strings.Contains(b, "database_unavailable") {
			t.Fatalf("read: %d %s, want 503 database_unavailable", r.StatusCode, b)
		}
		// The log says why, once: the certificate does not carry the URL's host (an IP address here).
		waitLog(t, s, "postgresql unreachable at start-up", "x509: cannot validate certificate for 127.0.0.1")
	})
	t.Run("verify-full, right server name", func(t *testing.T) {
		good := strings.Replace(testenv.WithParam(tlsURL, "sslmode", "verify-full"), "@127.0.0.1:", "@localhost:", 1)
		s := startSidecar(t, map[string]string{"DATABASE_URL": good, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix + "good:",
			"CACHECAR_INVALIDATION_CHANNEL": channel})
		if r, b := get(t, s.health+"/ready"); r.StatusCode != 200 {
			t.Fatalf("/ready over verify-full to localhost: %d %s", r.StatusCode, b)
		}
	})
}
