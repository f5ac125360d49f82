package main

import (
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
)

// TestListenURLThroughAPooler: the built sidecar with invalidation.listen_url through a real
// PgBouncer. In transaction pooling (where LISTEN succeeds and nothing arrives) the listener
// reports the error in /health/detailed and reads bypass the cache; in session pooling with
// CACHECAR_INVALIDATION_ALLOW_POOLER=true it listens, and a write is seen through it.
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
				env["CACHECAR_INVALIDATION_ALLOW_POOLER"] = tc.allow
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
