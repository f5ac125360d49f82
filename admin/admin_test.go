package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

func realDB(t *testing.T) Pinger {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), testenv.PostgresURL(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return cachepolicy.NewPG(pool)
}

func do(t *testing.T, h http.Handler, path string) (int, map[string]any) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	var body map[string]any
	if path != "/metrics" {
		if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
			t.Fatalf("%s: not JSON: %q", path, rec.Body.String())
		}
		if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
			t.Fatalf("%s: Content-Type %q", path, ct)
		}
	}
	return rec.Code, body
}

func TestReadinessFollowsLifecycle(t *testing.T) {
	h := NewHealth(HealthOptions{CheckTimeout: time.Second, CacheEnabled: true}, realDB(t), nil, prometheus.NewRegistry())
	handler := h.Handler()
	for _, tc := range []struct {
		state  int32
		code   int
		reason string
	}{
		{Starting, 503, "starting"},
		{Serving, 200, ""},
		{Draining, 503, "draining"},
	} {
		h.SetState(tc.state)
		code, body := do(t, handler, "/ready")
		if code != tc.code || (tc.reason != "" && body["reason"] != tc.reason) {
			t.Fatalf("state %d: /ready %d %v, want %d %q", tc.state, code, body, tc.code, tc.reason)
		}
		// Liveness never depends on the lifecycle or on dependencies.
		if code, body := do(t, handler, "/health"); code != 200 || body["status"] != "ok" {
			t.Fatalf("state %d: /health %d %v", tc.state, code, body)
		}
	}
}

func TestDetailedShapes(t *testing.T) {
	addr, _ := testenv.Valkey(t)
	m := cachepolicy.NewMetrics(prometheus.NewRegistry())
	up := cachepolicy.NewStore(cachepolicy.StoreOptions{Addrs: []string{addr}, Timeout: time.Second, DialTimeout: time.Second, ReconnectMax: time.Second}, zerolog.Nop(), m)
	if err := up.Connect(); err != nil {
		t.Fatal(err)
	}
	defer up.Close()
	down := cachepolicy.NewStore(cachepolicy.StoreOptions{Addrs: []string{testenv.ClosedAddr(t)}, Timeout: time.Second, DialTimeout: time.Second, ReconnectMax: time.Second}, zerolog.Nop(), m)
	db := realDB(t)
	downPool, _ := pgxpool.New(context.Background(), "postgres://x:y@"+testenv.ClosedAddr(t)+"/z?sslmode=disable")
	defer downPool.Close()
	dbDown := cachepolicy.NewPG(downPool)

	for _, tc := range []struct {
		name          string
		db, valkey    Pinger
		cacheEnabled  bool
		code          int
		status, redis string
		cache         string
	}{
		{"all up", db, up, true, 200, "healthy", "up", "up"},
		{"valkey down", db, down, true, 200, "degraded", "down", "degraded"},
		{"no valkey configured", db, nil, true, 200, "healthy", "disabled", "disabled"},
		{"cache disabled", db, nil, false, 200, "healthy", "disabled", "disabled"},
		{"database down", dbDown, up, true, 503, "unhealthy", "up", "up"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var vk Pinger
			if tc.valkey != nil {
				vk = tc.valkey
			}
			h := NewHealth(HealthOptions{CheckTimeout: time.Second, CacheEnabled: tc.cacheEnabled}, tc.db, vk, prometheus.NewRegistry())
			code, body := do(t, h.Handler(), "/health/detailed")
			services, _ := body["services"].(map[string]any)
			redis, _ := services["redis"].(map[string]any)
			cache, _ := services["cache"].(map[string]any)
			database, _ := services["database"].(map[string]any)
			if code != tc.code || body["status"] != tc.status || redis["status"] != tc.redis || cache["status"] != tc.cache {
				t.Fatalf("got %d %v", code, body)
			}
			if _, ok := database["responseTime"].(float64); !ok {
				t.Fatalf("database.responseTime missing: %v", database)
			}
			if _, err := time.Parse(time.RFC3339, body["timestamp"].(string)); err != nil {
				t.Fatalf("timestamp: %v", err)
			}
			if _, ok := body["uptime"].(float64); !ok {
				t.Fatalf("uptime missing: %v", body)
			}
		})
	}
}

func TestUnknownRouteAndMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "cachecar_test_total", Help: "test"})
	reg.MustRegister(c)
	c.Inc()
	h := NewHealth(HealthOptions{CheckTimeout: time.Second}, realDB(t), nil, reg).Handler()
	if code, body := do(t, h, "/nope"); code != 404 || body["error"] == nil {
		t.Fatalf("unknown route: %d %v", code, body)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 || !strings.Contains(rec.Body.String(), "cachecar_test_total 1") {
		t.Fatalf("/metrics: %d %s", rec.Code, rec.Body.String())
	}
}

// serve serves one request; target is sent as the raw request-target. header is name, value
// pairs.
func serve(h http.Handler, method, target string, header ...string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, target, nil)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

// wantError checks the status and the one error shape, {"error":{"code","message"}}.
func wantError(t *testing.T, rec *httptest.ResponseRecorder, what string, status int, code string) {
	t.Helper()
	var body struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	if rec.Code != status {
		t.Errorf("%s: status %d, want %d (%s)", what, rec.Code, status, rec.Body)
		return
	}
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("%s: Content-Type %q", what, ct)
	}
	if loc := rec.Header().Get("Location"); loc != "" {
		t.Errorf("%s: Location %q: want no redirect", what, loc)
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Error.Code != code || body.Error.Message == "" {
		t.Errorf("%s: body %q, want the error shape with code %q", what, rec.Body, code)
	}
}

func TestHealthWrongMethods(t *testing.T) {
	h := NewHealth(HealthOptions{CheckTimeout: time.Second, Pprof: true}, realDB(t), nil, prometheus.NewRegistry()).Handler()
	for _, path := range []string{"/health", "/health/detailed", "/ready", "/metrics", "/debug/pprof/", "/debug/pprof/heap", "/debug/pprof/symbol"} {
		for _, method := range []string{"POST", "PUT", "DELETE", "PATCH", "OPTIONS"} {
			rec := serve(h, method, path)
			wantError(t, rec, method+" "+path, http.StatusMethodNotAllowed, "method_not_allowed")
			if allow := rec.Header().Get("Allow"); allow != "GET, HEAD" {
				t.Errorf("%s %s: Allow %q, want \"GET, HEAD\"", method, path, allow)
			}
		}
	}
}

// TestUncleanTargetsAnswerJSON: ServeMux would redirect a path with an empty, . or .. segment
// to its cleaned form and answer the request-target * with a bare 400; both ports answer them
// in JSON instead (the admin port once the token is checked).
func TestUncleanTargetsAnswerJSON(t *testing.T) {
	const token = "tok-0123456789abcdef"
	health := NewHealth(HealthOptions{CheckTimeout: time.Second}, realDB(t), nil, prometheus.NewRegistry()).Handler()
	admin := NewAdmin(AdminOptions{Token: token, ClearRate: 1, ClearBurst: 1}, nil, nil, zerolog.Nop()).Handler()
	auth := []string{"Authorization", "Bearer " + token}
	for _, tt := range []struct {
		port           string
		h              http.Handler
		method, target string
		status         int
		code           string
	}{
		{"health", health, "GET", "//health", 404, "no_route"},
		{"health", health, "GET", "/ready/../health", 404, "no_route"},
		{"health", health, "GET", "/./metrics", 404, "no_route"},
		{"health", health, "POST", "/health/../health", 404, "no_route"},
		{"health", health, "GET", "*", 400, "bad_request"},
		{"admin", admin, "GET", "/api/admin/cache//stats", 404, "no_route"},
		{"admin", admin, "GET", "/api/admin/cache/keys/../stats", 404, "no_route"},
		{"admin", admin, "DELETE", "/api/admin/cache/keys/course:1/..", 404, "no_route"},
		{"admin", admin, "GET", "*", 400, "bad_request"},
	} {
		wantError(t, serve(tt.h, tt.method, tt.target, auth...), tt.port+" "+tt.method+" "+tt.target, tt.status, tt.code)
	}
	// The keys route without a key is the missing key's 400, not ServeMux's redirect to
	// /api/admin/cache/keys/.
	for _, method := range []string{"GET", "DELETE"} {
		for _, target := range []string{"/api/admin/cache/keys", "/api/admin/cache/keys/"} {
			wantError(t, serve(admin, method, target, auth...), "admin "+method+" "+target, 400, "bad_key")
		}
	}
	rec := serve(admin, "POST", "/api/admin/cache/keys", auth...)
	wantError(t, rec, "admin POST /api/admin/cache/keys", 405, "method_not_allowed")
	if allow := rec.Header().Get("Allow"); allow != "GET, DELETE" {
		t.Errorf("admin POST /api/admin/cache/keys: Allow %q", allow)
	}
	// Without the token the admin port says nothing about its routes.
	wantError(t, serve(admin, "GET", "/api/admin/cache//stats"), "admin without a token", 401, "unauthorized")
}

// TestFailureClass: /health/detailed tells a refused password from a server that does not answer,
// without any of the error's details.
func TestFailureClass(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want string
	}{
		{errors.New("WRONGPASS invalid username-password pair or user is disabled."), "authentication or permission refused"},
		{errors.New("NOAUTH Authentication required."), "authentication or permission refused"},
		{fmt.Errorf("connect: %w", &pgconn.PgError{Code: "28P01", Message: "password authentication failed for user \"app\""}), "authentication or permission refused"},
		{errors.New("tls: failed to verify certificate: x509: certificate signed by unknown authority"), "TLS handshake failed"},
		{errors.New("dial tcp 10.0.0.7:6379: connect: connection refused"), "unreachable"},
		{&pgconn.PgError{Code: "57P03", Message: "the database system is starting up"}, "unreachable"},
		{errors.New("valkey circuit open after: valkey fill: OOM command not allowed when used memory > 'maxmemory'."), "out of memory: writes refused (maxmemory reached)"},
		{errors.New("valkey ping: READONLY You can't write against a read only replica."), "read-only: writes refused (a replica)"},
		{errors.New("valkey circuit open after: valkey get: context deadline exceeded"), "circuit open after repeated failures (see the log)"},
	} {
		if got := failureClass(tt.err); got != tt.want {
			t.Errorf("failureClass(%v) = %q, want %q", tt.err, got, tt.want)
		}
		if got := failureClass(tt.err); strings.Contains(got, "10.0.0.7") || strings.Contains(got, "app") {
			t.Errorf("failureClass(%v) leaks details: %q", tt.err, got)
		}
	}
}

// fakeSessions is a session store for /health/detailed: its active store and migration.
type fakeSessions struct{ active, migration string }

func (f fakeSessions) Active() string    { return f.active }
func (f fakeSessions) HasValkey() bool   { return true }
func (f fakeSessions) Migration() string { return f.migration }

// Sessions served from PostgreSQL are degraded, except while migrating from connect-pg-simple,
// where PostgreSQL serves them by design: an alert on degraded must not fire for the whole
// migration.
func TestDetailedSessionsMigration(t *testing.T) {
	db := realDB(t)
	for _, tc := range []struct {
		sess           fakeSessions
		status, health string
	}{
		{fakeSessions{"valkey", ""}, "up", "healthy"},
		{fakeSessions{"postgres", ""}, "degraded", "degraded"},
		{fakeSessions{"postgres", "connect-pg-simple"}, "up", "healthy"},
		{fakeSessions{"postgres", "connect-redis"}, "degraded", "degraded"},
	} {
		h := NewHealth(HealthOptions{CheckTimeout: time.Second, Sessions: tc.sess}, db, nil, prometheus.NewRegistry())
		_, body := do(t, h.Handler(), "/health/detailed")
		services, _ := body["services"].(map[string]any)
		sess, _ := services["sessions"].(map[string]any)
		if sess["status"] != tc.status || body["status"] != tc.health || sess["store"] != tc.sess.active {
			t.Errorf("%+v: sessions %v, overall %v; want sessions %s, overall %s", tc.sess, sess, body["status"], tc.status, tc.health)
		}
		if mg, _ := sess["migration"].(string); mg != tc.sess.migration {
			t.Errorf("%+v: migration %q in %v", tc.sess, mg, sess)
		}
	}
}
