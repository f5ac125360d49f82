// Package testenv resolves the real servers integration tests run against: the environment
// first (what `make test` sets), else Docker through dockertest, else skip, and under CI=true
// fail instead of skipping.
package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/valkey-io/valkey-go"
)

// Environment variables the Makefile sets for tests.
const (
	EnvDatabaseURL = "CACHECAR_TEST_DATABASE_URL" // a database the tests may create schemas in
	EnvValkeyAddr  = "CACHECAR_TEST_VALKEY_ADDR"  // host:port of a shared Valkey/Redis server
	EnvRedisServer = "CACHECAR_TEST_REDIS_SERVER" // path of redis-server, for throwaway servers
)

// missing skips the test, or fails it when CI=true: in CI a missing server is a broken set-up,
// not a reason to pass.
func missing(t testing.TB, what string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s: not set and no Docker engine answers; CI=true, so this fails instead of skipping", what)
	}
	t.Skipf("%s not set and no Docker engine answers; run the tests with `make test`", what)
}

// Suffix returns a random lower-case hex string for names that must not collide.
func Suffix() string {
	var b [6]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// PostgresURL returns a URL to the test database whose search_path is a fresh schema of this
// test, dropped when the test ends. Tables the test creates without a schema land in it.
func PostgresURL(t testing.TB) string {
	t.Helper()
	base := os.Getenv(EnvDatabaseURL)
	if base == "" {
		base = dockerPostgres(t)
	}
	if base == "" {
		missing(t, EnvDatabaseURL)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatalf("connect to test PostgreSQL (%s): %v", EnvDatabaseURL, err)
	}
	defer conn.Close(ctx)
	schema := "t_" + Suffix()
	if _, err := conn.Exec(ctx, "CREATE SCHEMA "+schema); err != nil {
		t.Fatalf("create test schema: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, base)
		if err != nil {
			t.Logf("drop test schema %s: %v", schema, err)
			return
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, "DROP SCHEMA "+schema+" CASCADE"); err != nil {
			t.Logf("drop test schema %s: %v", schema, err)
		}
	})
	return WithParam(base, "search_path", schema)
}

// WithParam returns the URL with a query parameter set (pgx passes unknown ones to the server
// as run-time parameters).
func WithParam(rawURL, key, value string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		panic(fmt.Sprintf("testenv: bad URL: %v", err))
	}
	q := u.Query()
	q.Set(key, value)
	u.RawQuery = q.Encode()
	return u.String()
}

// ClosedAddr returns a loopback address on which nothing listens.
func ClosedAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// Valkey returns the shared test server's address and a key prefix of this test; keys under the
// prefix are deleted when the test ends.
func Valkey(t testing.TB) (addr, prefix string) {
	t.Helper()
	addr = os.Getenv(EnvValkeyAddr)
	if addr == "" {
		addr = dockerValkey(t)
	}
	if addr == "" {
		missing(t, EnvValkeyAddr)
	}
	c, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatalf("connect to test Valkey (%s=%s): %v", EnvValkeyAddr, addr, err)
	}
	prefix = "test:" + Suffix() + ":"
	t.Cleanup(func() {
		defer c.Close()
		ctx := context.Background()
		var cursor uint64
		for {
			e, err := c.Do(ctx, c.B().Scan().Cursor(cursor).Match(prefix+"*").Count(1000).Build()).AsScanEntry()
			if err != nil {
				t.Logf("clean test keys: %v", err)
				return
			}
			if len(e.Elements) > 0 {
				c.Do(ctx, c.B().Unlink().Key(e.Elements...).Build())
			}
			if cursor = e.Cursor; cursor == 0 {
				return
			}
		}
	})
	return addr, prefix
}

// Redis is a throwaway redis-server owned by one test, for tests that stop and restart it.
type Redis struct {
	Addr string
	bin  string
	port int
	dir  string // its working directory: where SAVE writes and a restart reads the snapshot
	mu   sync.Mutex
	cmd  *exec.Cmd
}

// StartRedis starts a throwaway redis-server on a free loopback port; it is killed when the
// test ends.
func StartRedis(t testing.TB) *Redis {
	t.Helper()
	return StartRedisAt(t, ClosedAddr(t))
}

// Start starts the server (again) on its port and waits until it answers.
func (r *Redis) Start(t testing.TB) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd != nil {
		return
	}
	// No automatic snapshots; a test that wants one sends SAVE, and a restart loads it from dir.
	cmd := exec.Command(r.bin, "--port", strconv.Itoa(r.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning", "--dir", r.dir)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	r.cmd = cmd
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", r.Addr, 100*time.Millisecond)
		if err == nil {
			c.Write([]byte("PING\r\n"))
			buf := make([]byte, 7)
			c.SetReadDeadline(time.Now().Add(time.Second))
			n, _ := c.Read(buf)
			c.Close()
			if string(buf[:n]) == "+PONG\r\n" {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("redis-server on %s did not answer PING", r.Addr)
}

// Stop kills the server (SIGKILL: a crash, not a clean shutdown) and waits for it to exit.
func (r *Redis) Stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd == nil {
		return
	}
	r.cmd.Process.Signal(syscall.SIGCONT) // a paused process dies on SIGKILL too, but say so
	r.cmd.Process.Kill()
	r.cmd.Wait()
	r.cmd = nil
}

// Pause freezes the server (SIGSTOP): it keeps its data and its connections, and answers
// nothing until Resume, like a server behind a network partition.
func (r *Redis) Pause() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd != nil {
		r.cmd.Process.Signal(syscall.SIGSTOP)
	}
}

// Resume thaws a paused server (SIGCONT), with the data it had.
func (r *Redis) Resume() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd != nil {
		r.cmd.Process.Signal(syscall.SIGCONT)
	}
}

// StartRedisAt starts a throwaway redis-server on addr (a loopback address from ClosedAddr).
func StartRedisAt(t testing.TB, addr string) *Redis {
	t.Helper()
	bin := os.Getenv(EnvRedisServer)
	if bin == "" {
		if p, err := exec.LookPath("redis-server"); err == nil {
			bin = p
		}
	}
	if bin == "" {
		missing(t, EnvRedisServer)
	}
	_, portText, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	port, _ := strconv.Atoi(portText)
	r := &Redis{Addr: addr, bin: bin, port: port, dir: t.TempDir()}
	r.Start(t)
	t.Cleanup(r.Stop)
	return r
}
