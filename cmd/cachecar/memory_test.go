package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
)

// TestMemoryCacheWithoutValkey runs a sidecar with no Valkey configured: it caches in its own
// memory, and the invalidation listener keeps that memory correct, tag sets included.
func TestMemoryCacheWithoutValkey(t *testing.T) {
	url := referenceDB(t)
	s := startSidecar(t, map[string]string{"DATABASE_URL": url}, "--set", "valkey.addrs=")
	pool := openPool(t, url)
	has := func(sub string) func(int, string) bool {
		return func(code int, b string) bool { return code == 200 && strings.Contains(b, sub) }
	}

	r, _ := get(t, s.api+"/v1/courses/3")
	if r.Header.Get("X-Cache") != "MISS" {
		t.Fatalf("first read X-Cache %q, want MISS", r.Header.Get("X-Cache"))
	}
	warm(t, s, "/v1/courses/3")
	mustExec(t, pool, "UPDATE courses SET title = 'Renamed in memory' WHERE id = 3")
	eventually(t, s, "/v1/courses/3", "update", has(`"title":"Renamed in memory"`))

	// A tenant's dispatch lists are found through a tag set, kept in memory too.
	list := "/v1/tenants/1/dispatches?limit=100"
	warm(t, s, list)
	mustExec(t, pool, `INSERT INTO dispatches (tenant_id, course_id, destination, status) VALUES (1, 1, 'mem.example', 'active')`)
	eventually(t, s, list, "insert in a list", has(`"destination":"mem.example"`))

	// A 404 is cached, and the INSERT of that id removes it.
	const absent = "/v1/courses/900001"
	if r, _ := get(t, s.api+absent); r.StatusCode != 404 {
		t.Fatalf("absent course: %d", r.StatusCode)
	}
	if r, _ := get(t, s.api+absent); r.StatusCode != 404 || r.Header.Get("X-Cache") != "HIT" {
		t.Fatalf("absent course again: %d X-Cache %q, want a cached 404 (HIT)", r.StatusCode, r.Header.Get("X-Cache"))
	}
	mustExec(t, pool, `INSERT INTO courses (id, tenant_id, title, scorm_package) VALUES (900001, 1, 'Now here', 'n.zip')`)
	eventually(t, s, absent, "insert of a cached 404", has(`"title":"Now here"`))

	// No Valkey: cachecar_valkey_up says so, as the alert rules expect (README, Deploy).
	if up := faultMetric(t, s, "cachecar_valkey_up", ""); up != 0 {
		t.Errorf("cachecar_valkey_up %v without Valkey, want 0", up)
	}

	_, b := get(t, s.health+"/health/detailed")
	var h struct {
		Status   string
		Services map[string]struct {
			Status string
			Tier   *struct {
				Enabled  bool
				Entries  uint64
				MaxBytes uint64
			}
		}
	}
	if err := json.Unmarshal([]byte(b), &h); err != nil {
		t.Fatal(err)
	}
	c := h.Services["cache"]
	if h.Status != "healthy" || c.Status != "up" || h.Services["redis"].Status != "disabled" || c.Tier == nil || !c.Tier.Enabled || c.Tier.Entries == 0 || c.Tier.MaxBytes < 64<<20 {
		t.Errorf("/health/detailed: %s", b)
	}
	var n int
	if err := pool.QueryRow(context.Background(), "SELECT count(*) FROM courses WHERE id = 900001").Scan(&n); err != nil || n != 1 {
		t.Fatalf("inserted row: %d %v", n, err)
	}
}
