package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
)

// adminAddr returns the admin port's address from the sidecar's "listening" line.
func adminAddr(t *testing.T, s *sidecar) string {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(s.out.String()))
	for sc.Scan() {
		var line struct{ Message, Admin string }
		if json.Unmarshal(sc.Bytes(), &line) == nil && line.Message == "listening" {
			return line.Admin
		}
	}
	t.Fatal("no listening line")
	return ""
}

func adminDo(t *testing.T, method, url, token, body string) (*http.Response, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest(method, url, strings.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	var out map[string]any
	if err := json.Unmarshal(b.Bytes(), &out); err != nil {
		t.Fatalf("%s %s: %d, not JSON: %q", method, url, resp.StatusCode, b.String())
	}
	return resp, out
}

func TestAdminPortClosedWithoutToken(t *testing.T) {
	url := referenceDB(t)
	addr, prefix := testenv.Valkey(t)
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix},
		"--set", "admin.listen=127.0.0.1:0")
	if a := adminAddr(t, s); a != "" {
		t.Fatalf("admin port listening on %q without a token", a)
	}
	_, b := get(t, s.health+"/health/detailed")
	if !strings.Contains(b, `"admin":{"status":"disabled"`) {
		t.Fatalf("/health/detailed does not say the admin port is off: %s", b)
	}
}

func TestAdminPort(t *testing.T) {
	url := referenceDB(t)
	addr, prefix := testenv.Valkey(t)
	const token = "s3cret-admin-token"
	tokenFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokenFile, []byte(token+"\n"), 0o600)
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix,
		"CACHECAR_ADMIN_TOKEN_FILE": tokenFile, "CACHECAR_ADMIN_CLEAR_RATE": "0.01", "CACHECAR_ADMIN_CLEAR_BURST": "6",
		"CACHECAR_ADMIN_WARM_MAX_IDS": "100"}, "--set", "admin.listen=127.0.0.1:0")
	base := "http://" + adminAddr(t, s) + "/api/admin/cache"

	t.Run("auth", func(t *testing.T) {
		for _, tok := range []string{"", "wrong", token + "x", token[:5]} {
			resp, body := adminDo(t, "GET", base+"/stats", tok, "")
			if resp.StatusCode != 401 || !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer") || body["error"] == nil {
				t.Errorf("token %q: %d %v %v", tok, resp.StatusCode, resp.Header.Get("WWW-Authenticate"), body)
			}
		}
		if _, b := get(t, s.health+"/health/detailed"); !strings.Contains(b, `"admin":{"status":"up"`) {
			t.Errorf("/health/detailed: %s", b)
		}
	})

	for _, id := range []int{1, 2, 3, 4} {
		warm(t, s, fmt.Sprintf("/v1/courses/%d", id))
	}
	t.Run("stats", func(t *testing.T) {
		resp, st := adminDo(t, "GET", base+"/stats", token, "")
		if resp.StatusCode != 200 {
			t.Fatalf("stats: %d %v", resp.StatusCode, st)
		}
		course := st["policies"].(map[string]any)["course"].(map[string]any)
		if course["hits"].(float64) < 4 || course["misses"].(float64) < 4 || course["hitRate"].(float64) <= 0 {
			t.Errorf("course stats %v", course)
		}
		backend := st["backend"].(map[string]any)
		info := st["info"].(map[string]any)
		if st["enabled"] != true || st["healthy"] != true || backend["mode"] != "valkey+tier" || backend["valkey"] != "up" ||
			!strings.Contains(info["stats"].(string), "keyspace_hits") || !strings.Contains(info["keyspace"].(string), "# Keyspace") ||
			st["circuit"].(map[string]any)["valkey"] != "closed" || st["listener"].(map[string]any)["status"] != "up" {
			t.Errorf("stats: %v", st)
		}
		if _, ok := st["memory"].(map[string]any)["maxmemoryPolicy"]; !ok {
			t.Errorf("stats without Valkey's memory: %v", st["memory"])
		}
	})

	t.Run("keys", func(t *testing.T) {
		resp, ki := adminDo(t, "GET", base+"/keys/course:3", token, "")
		if resp.StatusCode != 200 || ki["policy"] != "course" || ki["state"] != "fresh" || ki["size"].(float64) < 10 || ki["ttlMs"].(float64) <= 0 || ki["key"] != "course:3" {
			t.Fatalf("key info: %d %v", resp.StatusCode, ki)
		}
		resp, del := adminDo(t, "DELETE", base+"/keys/course:3", token, "")
		if resp.StatusCode != 200 || del["deleted"] != true {
			t.Fatalf("delete: %d %v", resp.StatusCode, del)
		}
		if resp, _ := adminDo(t, "GET", base+"/keys/course:3", token, ""); resp.StatusCode != 404 {
			t.Fatalf("deleted key: %d", resp.StatusCode)
		}
		if r, _ := get(t, s.api+"/v1/courses/3"); r.Header.Get("X-Cache") != "MISS" {
			t.Fatalf("read after the key's delete: %s", r.Header.Get("X-Cache"))
		}
	})

	// A session, to check that no clear logs anyone out.
	if r, b := do(t, "PUT", s.api+"/v1/sessions/admintest", `{"cookie":{"originalMaxAge":null},"user":7}`); r.StatusCode != 204 {
		t.Fatalf("put session: %d %s", r.StatusCode, b)
	}
	sessionOK := func(what string) {
		t.Helper()
		if r, b := get(t, s.api+"/v1/sessions/admintest"); r.StatusCode != 200 || !strings.Contains(b, `"user":7`) {
			t.Fatalf("%s: session read %d %s", what, r.StatusCode, b)
		}
	}
	sessionOK("before the clears")

	t.Run("clear", func(t *testing.T) {
		warm(t, s, "/v1/courses/1")
		resp, out := adminDo(t, "POST", base+"/clear", token, `{"pattern":"course:*"}`)
		if resp.StatusCode != 200 || out["deleted"].(float64) < 3 {
			t.Fatalf("clear course:*: %d %v", resp.StatusCode, out)
		}
		if r, _ := get(t, s.api+"/v1/courses/1"); r.Header.Get("X-Cache") != "MISS" {
			t.Fatalf("read after the clear: %s", r.Header.Get("X-Cache"))
		}
		// The log is written out every few milliseconds.
		for deadline := time.Now().Add(2 * time.Second); !strings.Contains(s.out.String(), `"audit":"cache_clear"`) || !strings.Contains(s.out.String(), `"pattern":"course:*"`); {
			if time.Now().After(deadline) {
				t.Fatal("no audit line for the clear")
			}
			time.Sleep(5 * time.Millisecond)
		}
		warm(t, s, "/v1/tenants/1")
		resp, out = adminDo(t, "POST", base+"/clear", token, `{}`)
		if resp.StatusCode != 200 || out["deleted"].(float64) < 1 {
			t.Fatalf("clear {}: %d %v", resp.StatusCode, out)
		}
		if r, _ := get(t, s.api+"/v1/tenants/1"); r.Header.Get("X-Cache") != "MISS" {
			t.Fatalf("tenant read after clearing everything: %s", r.Header.Get("X-Cache"))
		}
		sessionOK("after clearing every policy")
		if resp, _ := adminDo(t, "POST", base+"/clear", token, `{"pattern":"sess:*"}`); resp.StatusCode != 400 {
			t.Fatalf("sess:* without include_sessions: %d", resp.StatusCode)
		}
		if resp, out := adminDo(t, "POST", base+"/clear", token, `{"pattern":"sess:*","include_sessions":true}`); resp.StatusCode != 200 || out["deleted"].(float64) < 1 {
			t.Fatalf("sess:* with include_sessions: %d %v", resp.StatusCode, out)
		}
		sessionOK("after clearing the session keys from Valkey")
		if resp, _ := adminDo(t, "POST", base+"/clear", token, `{"pattern":"sess:admintest","include_sessions":true}`); resp.StatusCode != 200 {
			t.Fatalf("one session key with include_sessions: %d", resp.StatusCode)
		}
		sessionOK("after clearing the one session key from Valkey")
	})

	t.Run("warm", func(t *testing.T) {
		resp, out := adminDo(t, "POST", base+"/warm", token, `{"policy":"course","ids":[10,11,12,999999]}`)
		if resp.StatusCode != 200 || out["done"].(float64) != 4 || out["failed"].(float64) != 0 {
			t.Fatalf("warm: %d %v", resp.StatusCode, out)
		}
		if r, _ := get(t, s.api+"/v1/courses/11"); r.Header.Get("X-Cache") != "HIT" {
			t.Fatalf("warmed course: %s", r.Header.Get("X-Cache"))
		}
		resp, out = adminDo(t, "POST", base+"/warm", token, `{"policy":"course"}`)
		if resp.StatusCode != 200 || out["total"].(float64) < 1 || out["done"] != out["total"] {
			t.Fatalf("warm from the warm query: %d %v", resp.StatusCode, out)
		}
	})

	t.Run("bad input", func(t *testing.T) {
		long := strings.Repeat("k", 1025)
		for _, c := range []struct {
			method, path, body string
			status             int
		}{
			{"POST", "/clear", `{"pattern":`, 400},
			{"POST", "/clear", `{"pattern":"course:*","extra":1}`, 400},
			{"POST", "/clear", `{"pattern":"other:*"}`, 400},
			{"POST", "/clear", `{"pattern":"*"}`, 400},
			{"POST", "/clear", `{"pattern":"course:*:x*"}`, 400},
			{"POST", "/clear", `{"pattern":"course:[12]"}`, 400},
			{"POST", "/clear", `{"pattern":"` + long + `"}`, 400},
			{"POST", "/clear", `{"pattern":7}`, 400},
			{"POST", "/clear", `{} {}`, 400},
			{"POST", "/clear", `{}]`, 400},
			{"POST", "/clear", `{"pattern":null}`, 400},
			{"GET", "/keys/cachecar:sessions:epoch", "", 400},
			{"DELETE", "/keys/cachecar:tag:dispatch_list:1", "", 400},
			{"GET", "/keys/" + long, "", 400},
			{"DELETE", "/keys/sess:admintest", "", 400},
			{"POST", "/warm", `{"policy":"course","ids":[` + strings.Repeat("1,", 100) + `1]}`, 413},
			{"POST", "/warm", `{"policy":"nope","ids":[1]}`, 400},
			{"POST", "/warm", `{"policy":"dispatch_list","ids":[1]}`, 400},
			{"POST", "/warm", `{"policy":"course","ids":[-1]}`, 400},
			{"POST", "/warm", `{"policy":"tenant"}`, 400},
			{"GET", "/clear", "", 405},
			{"PUT", "/keys/course:1", "", 405},
			{"DELETE", "/stats", "", 405},
			{"GET", "/nothing", "", 404},
		} {
			resp, out := adminDo(t, c.method, base+c.path, token, c.body)
			if resp.StatusCode != c.status || out["error"] == nil {
				t.Errorf("%s %s %.60s: %d %v, want %d with an error body", c.method, c.path, c.body, resp.StatusCode, out, c.status)
			}
		}
		if strings.Contains(s.out.String(), token) {
			t.Error("the token appears in the log")
		}
	})

	t.Run("rate limit", func(t *testing.T) {
		// Burst 6 at 0.01/s: the three clears above and the ones here run out of it.
		var limited *http.Response
		for i := 0; i < 6 && limited == nil; i++ {
			resp, _ := adminDo(t, "POST", base+"/clear", token, `{"pattern":"tenant:*"}`)
			if resp.StatusCode == 429 {
				limited = resp
			}
		}
		if limited == nil || limited.Header.Get("Retry-After") == "" {
			t.Fatalf("no 429 with Retry-After past the burst: %v", limited)
		}
	})
}

// TestHealthcheckCommand: `cachecar healthcheck` exits 0 against a ready sidecar and 1 when
// nothing answers, for images without a shell or curl.
func TestHealthcheckCommand(t *testing.T) {
	url := referenceDB(t)
	addr, prefix := testenv.Valkey(t)
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix})
	var out, errOut bytes.Buffer
	env := envFunc(map[string]string{"DATABASE_URL": url})
	if err := run(context.Background(), []string{"healthcheck", "--health-listen", strings.TrimPrefix(s.health, "http://")}, env, &out, &errOut); err != nil || !strings.Contains(out.String(), "ready") {
		t.Fatalf("healthcheck of a ready sidecar: %v %q", err, out.String())
	}
	err := run(context.Background(), []string{"healthcheck", "--health-listen", testenv.ClosedAddr(t)}, env, &out, &errOut)
	var ee *exitError
	if !errors.As(err, &ee) || ee.code != 1 {
		t.Fatalf("healthcheck with nothing listening: %v, want exit 1", err)
	}
}

// TestWarmOnStartAndMemoryWarning: admin.warm_on_start warms the course policy's warm_sql ids in
// the background at start-up, and the start-up log reports Valkey's memory settings with a
// warning for a server without maxmemory (the test server has none).
func TestWarmOnStartAndMemoryWarning(t *testing.T) {
	url := referenceDB(t)
	addr, prefix := testenv.Valkey(t)
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix,
		"CACHECAR_ADMIN_WARM_ON_START": "true", "CACHECAR_POLICIES_COURSE_WARM_SQL": "SELECT id FROM courses WHERE id IN (2, 3)"})
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(s.out.String(), `"message":"warm-up finished"`); {
		if time.Now().After(deadline) {
			t.Fatalf("no warm-up within 5s:\n%s", s.out)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, id := range []string{"2", "3"} {
		if r, _ := get(t, s.api+"/v1/courses/"+id); r.Header.Get("X-Cache") != "HIT" {
			t.Errorf("course %s after the start-up warm-up: X-Cache %s, want HIT on the first read", id, r.Header.Get("X-Cache"))
		}
	}
	if r, _ := get(t, s.api+"/v1/courses/4"); r.Header.Get("X-Cache") != "MISS" {
		t.Errorf("course 4 (not in the warm query): %s, want MISS", r.Header.Get("X-Cache"))
	}
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(s.out.String(), "valkey has no maxmemory"); {
		if time.Now().After(deadline) {
			t.Fatalf("no maxmemory warning:\n%s", s.out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// With no cache at all (no Valkey, no tier), the admin port says so (409 no_cache) instead of
// "the cache did not answer", which reads as an outage; stats still answer.
func TestAdminPortWithoutACache(t *testing.T) {
	url := referenceDB(t)
	const token = "s3cret-admin-token"
	s := startSidecar(t, map[string]string{"DATABASE_URL": url, "CACHECAR_VALKEY_ADDRS": "", "CACHECAR_CACHE_TIER_MAX_BYTES": "0",
		"CACHECAR_ADMIN_TOKEN": token}, "--set", "admin.listen=127.0.0.1:0")
	base := "http://" + adminAddr(t, s) + "/api/admin/cache"
	if resp, st := adminDo(t, "GET", base+"/stats", token, ""); resp.StatusCode != 200 || st["enabled"] != false {
		t.Errorf("stats without a cache: %d %v", resp.StatusCode, st)
	}
	for _, c := range []struct{ method, path, body string }{
		{"POST", "/clear", `{"pattern":"course:*"}`},
		{"POST", "/warm", `{"policy":"course","ids":[1]}`},
		{"GET", "/keys/course:1", ""},
		{"DELETE", "/keys/course:1", ""},
	} {
		resp, body := adminDo(t, c.method, base+c.path, token, c.body)
		e, _ := body["error"].(map[string]any)
		if resp.StatusCode != 409 || e["code"] != "no_cache" {
			t.Errorf("%s %s without a cache: %d %v, want 409 no_cache", c.method, c.path, resp.StatusCode, body)
		}
	}
}
