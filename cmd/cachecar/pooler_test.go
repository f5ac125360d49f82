package main

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
)

// TestListenURLThroughAPooler: the built sidecar with invalidation.listen_url through a real
// PgBouncer. In transaction pooling (where LISTEN succeeds and nothing arrives) the listener
// reports the error in /health/detailed and reads bypass the cache; in session pooling with
// CACHECAR_DATABASE_SESSION_POOLER=true it listens, and a write is seen through it.
func TestListenURLThroughAPooler(t *testing.T) {
	for _, tc := range []struct {
		mode, allow string
		listening   bool
	}{
		{"transaction", "", false},
		{"session", "true", true},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			url := referenceDB(t)
			addr, prefix := testenv.Valkey(t)
			env := map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix,
				"CACHECAR_INVALIDATION_LISTEN_URL": testenv.StartPgBouncer(t, url, tc.mode)}
			if tc.allow != "" {
				env["CACHECAR_DATABASE_SESSION_POOLER"] = tc.allow
			}
			s := startSidecar(t, env)
			want := `"listener":{"status":"error"`
			if tc.listening {
				want = `"listener":{"status":"up"`
			}
			var body string
			deadline := time.Now().Add(10 * time.Second)
			for {
				_, body = get(t, s.health+"/health/detailed")
				if strings.Contains(body, want) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("/health/detailed never showed %s: %s", want, body)
				}
				time.Sleep(50 * time.Millisecond)
			}
			if !tc.listening {
				if !strings.Contains(body, "pooler") {
					t.Errorf("the listener's error does not say why: %s", body)
				}
				if r, _ := get(t, s.api+"/v1/courses/1"); r.Header.Get("X-Cache") != "BYPASS" {
					t.Errorf("read with the listener refused: X-Cache %q, want BYPASS", r.Header.Get("X-Cache"))
				}
				return
			}
			warm(t, s, "/v1/courses/1")
			pool := openPool(t, url)
			mustExec(t, pool, "UPDATE courses SET title = 'through the pooler' WHERE id = 1")
			eventually(t, s, "/v1/courses/1", "the update through a session pooler", func(code int, b string) bool {
				return code == 200 && strings.Contains(b, `"title":"through the pooler"`)
			})
		})
	}
}

// TestDatabaseURLThroughATransactionPooler: with database.url through a transaction-pooling
// PgBouncer (where the pool's prepared statements fail under concurrent reads), every
// connection is refused with why: reads answer 503 and /health/detailed names the pooler; serve
// with its start-up trigger check (Valkey on) and migrate stop with the reason.
func TestDatabaseURLThroughATransactionPooler(t *testing.T) {
	url := referenceDB(t)
	through := testenv.StartPgBouncer(t, url, "transaction")
	s := startSidecar(t, map[string]string{"DATABASE_URL": through, "CACHECAR_INVALIDATION_CHANNEL": testChannel(url),
		"CACHECAR_VALKEY_ADDRS": "", "CACHECAR_CACHE_TIER_MAX_BYTES": "0"})
	r, b := get(t, s.api+"/v1/courses/1")
	if r.StatusCode != 503 {
		t.Errorf("read through a transaction pooler: %d %s, want 503", r.StatusCode, b)
	}
	_, h := get(t, s.health+"/health/detailed")
	if !strings.Contains(h, `"database":{"status":"down"`) || !strings.Contains(h, "connection pooler") {
		t.Errorf("/health/detailed does not name the pooler: %s", h)
	}
	// With Valkey, serve checks the triggers at start-up: PostgreSQL can be asked, so the
	// configuration problem stops it with the reason (exit 2), as a wrong schema does.
	var sout strings.Builder
	err := run(context.Background(), []string{"serve", "--listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0"},
		envFunc(map[string]string{"DATABASE_URL": through, "CACHECAR_INVALIDATION_CHANNEL": testChannel(url), "CACHECAR_VALKEY_ADDRS": testenv.ClosedAddr(t)}), &sout, &sout)
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != 2 || !strings.HasPrefix(err.Error(), "database.url goes through a connection pooler") {
		t.Errorf("serve through a transaction pooler with Valkey: %v", err)
	}
	var out strings.Builder
	err = run(context.Background(), []string{"migrate"}, envFunc(map[string]string{"DATABASE_URL": through, "CACHECAR_INVALIDATION_CHANNEL": testChannel(url)}), &out, &out)
	if err == nil || !strings.Contains(err.Error()+out.String(), "database.session_pooler") {
		t.Errorf("migrate through a transaction pooler: %v\n%s", err, out.String())
	}
}

// TestDatabaseURLThroughASessionPooler: with database.session_pooler, everything goes through a
// session-pooling PgBouncer (the pool, the listener, the session copies): reads are cached and
// a write is seen.
func TestDatabaseURLThroughASessionPooler(t *testing.T) {
	url := referenceDB(t)
	addr, prefix := testenv.Valkey(t)
	through := testenv.StartPgBouncer(t, url, "session")
	s := startSidecar(t, map[string]string{"DATABASE_URL": through, "CACHECAR_INVALIDATION_CHANNEL": testChannel(url),
		"CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix, "CACHECAR_DATABASE_SESSION_POOLER": "true"})
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, h := get(t, s.health+"/health/detailed")
		if strings.Contains(h, `"database":{"status":"up"`) && strings.Contains(h, `"listener":{"status":"up"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("never up through a session pooler: %s", h)
		}
		time.Sleep(50 * time.Millisecond)
	}
	warm(t, s, "/v1/courses/2")
	mustExec(t, openPool(t, url), "UPDATE courses SET title = 'via session pooling' WHERE id = 2")
	eventually(t, s, "/v1/courses/2", "the update", func(code int, b string) bool {
		return code == 200 && strings.Contains(b, `"title":"via session pooling"`)
	})
}
