package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// The session route runs the query cachecar's session store runs, on a quoted, optionally
// schema-qualified table.
func TestSessionQuery(t *testing.T) {
	for table, want := range map[string]string{
		"session":           `SELECT sess::text FROM "session" WHERE sid = $1 AND expire >= to_timestamp($2)`,
		"app.user_sessions": `SELECT sess::text FROM "app"."user_sessions" WHERE sid = $1 AND expire >= to_timestamp($2)`,
		`we"ird`:            `SELECT sess::text FROM "we""ird" WHERE sid = $1 AND expire >= to_timestamp($2)`,
	} {
		if got := sessionQuery(table); got != want {
			t.Errorf("sessionQuery(%q) = %s, want %s", table, got, want)
		}
	}
}

// The PUT route runs connect-pg-simple's upsert on the same table name forms.
func TestSessionUpsert(t *testing.T) {
	want := `INSERT INTO "app"."user_sessions" (sess, expire, sid) SELECT $1::json, to_timestamp($2), $3 ON CONFLICT (sid) DO UPDATE SET sess = $1::json, expire = to_timestamp($2)`
	if got := sessionUpsert("app.user_sessions"); got != want {
		t.Errorf("sessionUpsert = %s, want %s", got, want)
	}
}

// connect-pg-simple's expire: cookie.expires rounded up to the second, else one day from now.
func TestSessionExpire(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	for body, want := range map[string]int64{
		`{"cookie":{"expires":"2026-11-27T00:00:00.001Z"}}`: time.Date(2026, 11, 27, 0, 0, 1, 0, time.UTC).Unix(),
		`{"cookie":{"expires":"2026-11-27T00:00:00.000Z"}}`: time.Date(2026, 11, 27, 0, 0, 0, 0, time.UTC).Unix(),
		`{"cookie":{"originalMaxAge":null}}`:                now.Add(24 * time.Hour).Unix(),
		`{"user":1}`:                                        now.Add(24 * time.Hour).Unix(),
	} {
		got, err := sessionExpire([]byte(body), now)
		if err != nil || got != want {
			t.Errorf("sessionExpire(%s) = %d, %v; want %d", body, got, err, want)
		}
	}
	for _, body := range []string{`[]`, `{"cookie":{"expires":"tomorrow"}}`, `not json`} {
		if _, err := sessionExpire([]byte(body), now); err == nil {
			t.Errorf("sessionExpire(%s): no error", body)
		}
	}
}

// The handler answers 204 after the upsert, with X-Session-Store: postgres, and 400 for a body it
// cannot read an expiry from, without writing.
func TestSessionPutHandler(t *testing.T) {
	db := &fakeExec{}
	now := func() time.Time { return time.Unix(1_000_000, 0) }
	h := sessionPutHandler(db, "UPSERT", time.Second, now)
	mux := http.NewServeMux()
	mux.Handle("PUT /v1/sessions/{sid}", h)
	rec := httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest(http.MethodPut, "/v1/sessions/abc", strings.NewReader(`{"cookie":{}}`)))
	if rec.Code != http.StatusNoContent || rec.Header().Get("X-Session-Store") != "postgres" {
		t.Fatalf("status %d, X-Session-Store %q; want 204, postgres", rec.Code, rec.Header().Get("X-Session-Store"))
	}
	if len(db.calls) != 1 || db.calls[0][0] != `{"cookie":{}}` || db.calls[0][1] != int64(1_000_000+86400) || db.calls[0][2] != "abc" {
		t.Fatalf("upsert args %v", db.calls)
	}
	rec = httptest.NewRecorder()
	mux.ServeHTTP(rec, httptest.NewRequest(http.MethodPut, "/v1/sessions/abc", strings.NewReader(`"x"`)))
	if rec.Code != http.StatusBadRequest || len(db.calls) != 1 {
		t.Fatalf("non-object body: status %d, %d writes; want 400 and no write", rec.Code, len(db.calls))
	}
}

type fakeExec struct{ calls [][]any }

func (f *fakeExec) Exec(_ context.Context, _ string, args ...any) (pgconn.CommandTag, error) {
	f.calls = append(f.calls, args)
	return pgconn.NewCommandTag("INSERT 0 1"), nil
}
