package sessions

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// EnvNodeStores names the directory of sessions/testdata/node with its node_modules installed
// (make test runs npm ci there when Node.js 20 or later is present).
const EnvNodeStores = "CACHECAR_TEST_NODE_STORES"

// nodeStores drives the real connect-redis and connect-pg-simple through express-session's
// Store API (sessions/testdata/node/store.mjs), against the fixture's servers.
type nodeStores struct {
	dir string
	env []string
}

func newNodeStores(t *testing.T, f *fixture) *nodeStores {
	t.Helper()
	dir := os.Getenv(EnvNodeStores)
	if dir == "" {
		t.Skipf("%s is not set: the rolling-migration test needs Node.js 20+ and `npm ci` in sessions/testdata/node (make test does both when Node.js is installed)", EnvNodeStores)
	}
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "connect-redis")); err != nil {
		t.Fatalf("%s=%s has no node_modules: run npm ci there (%v)", EnvNodeStores, dir, err)
	}
	u, err := url.Parse(f.url)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	schema := q.Get("search_path")
	// node-postgres takes server settings through options; the same TimeZone as cachecar's.
	u.RawQuery = url.Values{"options": {"-c TimeZone=" + tz}}.Encode()
	return &nodeStores{dir: dir, env: append(os.Environ(),
		"REDIS_URL=redis://"+f.redis.Addr, "SESS_PREFIX=sess:", "SESS_TTL=604800",
		"DATABASE_URL="+u.String(), "PG_SCHEMA="+schema, "PG_TABLE=session")}
}

// run performs one operation and returns the session a get found (nil for none).
func (n *nodeStores) run(t *testing.T, store, op, sid string, sess []byte) json.RawMessage {
	t.Helper()
	args := []string{filepath.Join(n.dir, "store.mjs"), store, op, sid}
	if sess != nil {
		args = append(args, string(sess))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", args...)
	cmd.Env = n.env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var res struct {
		OK      bool            `json:"ok"`
		Session json.RawMessage `json:"session"`
		Error   string          `json:"error"`
	}
	if jerr := json.Unmarshal(out, &res); err != nil || jerr != nil || !res.OK {
		t.Fatalf("node %s %s %s: %v %s %s %s", store, op, sid, err, out, res.Error, stderr.String())
	}
	if string(res.Session) == "null" {
		return nil
	}
	return res.Session
}

func jsonEqual(t *testing.T, a, b []byte) bool {
	t.Helper()
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xb, _ := json.Marshal(x)
	yb, _ := json.Marshal(y)
	return bytes.Equal(xb, yb)
}

// TestRollingMigrationFromConnectRedis: some instances use connect-redis on the shared Valkey,
// others cachecar. Every change through either is seen through the other at once.
func TestRollingMigrationFromConnectRedis(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.DeleteUnknown = false; o.ValkeyOnly = true })
	n := newNodeStores(t, f)
	ctx := context.Background()
	exp := time.Now().Add(2 * time.Hour)
	appSession := body("from-node", exp)

	// Created by connect-redis, read by cachecar: the bytes connect-redis wrote.
	n.run(t, "redis", "set", "r1", appSession)
	written, _ := f.rawGet(t, "sess:r1")
	got, from, err := f.get(t, "r1")
	if err != nil || got != written || from != FromValkey {
		t.Fatalf("cachecar read of a connect-redis session: %q from %s, %v; connect-redis wrote %q", got, from, err, written)
	}
	// Created by cachecar, read by connect-redis.
	mine := body("from-cachecar", exp)
	f.put(t, "r2", mine)
	if s := n.run(t, "redis", "get", "r2", nil); !jsonEqual(t, s, mine) {
		t.Fatalf("connect-redis read %s, cachecar wrote %s", s, mine)
	}
	// Changed by connect-redis, read by cachecar.
	changed := body("changed-by-node", exp)
	n.run(t, "redis", "set", "r2", changed)
	if got, _, _ := f.get(t, "r2"); !jsonEqual(t, []byte(got), changed) {
		t.Fatalf("cachecar read %s after connect-redis changed it", got)
	}
	// Destroyed (logout) by connect-redis: gone for cachecar, although cachecar's row is still
	// in PostgreSQL.
	n.run(t, "redis", "destroy", "r2", nil)
	if _, _, err := f.get(t, "r2"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("cachecar after a connect-redis logout: %v", err)
	}
	// Destroyed by cachecar: gone for connect-redis.
	if _, err := f.store.Delete(ctx, "r1"); err != nil {
		t.Fatal(err)
	}
	if s := n.run(t, "redis", "get", "r1", nil); s != nil {
		t.Fatalf("connect-redis still reads %s after cachecar's logout", s)
	}
	// Touched by connect-redis: the TTL moves, the bytes stay.
	f.put(t, "r3", mine)
	before, _ := f.rawGet(t, "sess:r3")
	later := time.Now().Add(30 * time.Hour)
	n.run(t, "redis", "touch", "r3", body("ignored", later))
	after, _ := f.rawGet(t, "sess:r3")
	ttl, _ := f.raw.Do(ctx, f.raw.B().Ttl().Key("sess:r3").Build()).AsInt64()
	if before != after || ttl < 30*3600-10 || ttl > 30*3600 {
		t.Fatalf("after connect-redis touch: body changed %v, TTL %d", before != after, ttl)
	}
}

// TestRollingMigrationFromConnectPgSimple: some instances use connect-pg-simple on the shared
// table, others cachecar (sessions.migration: connect-pg-simple, so it reads PostgreSQL).
func TestRollingMigrationFromConnectPgSimple(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.ReadPostgres = true })
	n := newNodeStores(t, f)
	ctx := context.Background()
	exp := time.Now().Add(2 * time.Hour)
	appSession := body("from-node", exp)

	n.run(t, "pg", "set", "p1", appSession)
	var written string
	f.db.QueryRow(ctx, `SELECT sess::text FROM session WHERE sid = 'p1'`).Scan(&written)
	got, from, err := f.get(t, "p1")
	if err != nil || got != written || from != FromPostgres {
		t.Fatalf("cachecar read of a connect-pg-simple session: %q from %s, %v; it wrote %q", got, from, err, written)
	}
	mine := body("from-cachecar", exp)
	f.put(t, "p2", mine)
	if s := n.run(t, "pg", "get", "p2", nil); !jsonEqual(t, s, mine) {
		t.Fatalf("connect-pg-simple read %s, cachecar wrote %s", s, mine)
	}
	// cachecar holds a copy of p2 (its reads come from memory), and connect-pg-simple's
	// changes still reach it within a second: the table's notify triggers drop the copy.
	waitCopies(t, f.store, "up")
	readUntil(t, f.store, "p2", time.Second, "a copy kept", func(string, error) bool { return testutil.ToFloat64(f.store.m.pgLocal) > 0 })
	changed := body("changed-by-node", exp)
	n.run(t, "pg", "set", "p2", changed)
	readUntil(t, f.store, "p2", time.Second, "after connect-pg-simple changed it", func(got string, err error) bool {
		return err == nil && jsonEqual(t, []byte(got), changed)
	})
	n.run(t, "pg", "destroy", "p2", nil)
	readUntil(t, f.store, "p2", time.Second, "after a connect-pg-simple logout", func(_ string, err error) bool { return errors.Is(err, ErrNotFound) })
	if _, err := f.store.Delete(ctx, "p1"); err != nil {
		t.Fatal(err)
	}
	if s := n.run(t, "pg", "get", "p1", nil); s != nil {
		t.Fatalf("connect-pg-simple still reads %s after cachecar's logout", s)
	}
	// Same cookie, same expire column, whoever wrote it, in a TimeZone far from UTC.
	f.put(t, "p3", body("c", exp))
	n.run(t, "pg", "set", "p4", body("n", exp))
	var same bool
	if err := f.db.QueryRow(ctx, `SELECT (SELECT expire FROM session WHERE sid = 'p3') = (SELECT expire FROM session WHERE sid = 'p4')`).Scan(&same); err != nil || !same {
		t.Fatalf("cachecar's expire differs from connect-pg-simple's for the same cookie (%v)", err)
	}
}
