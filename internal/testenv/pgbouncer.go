package testenv

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// EnvPgBouncer is the path of the pgbouncer binary, for tests of cachecar behind a pooler.
const EnvPgBouncer = "CACHECAR_TEST_PGBOUNCER"

// StartPgBouncer starts a throwaway PgBouncer on a free loopback port in front of the database
// dbURL names, with pool_mode mode ("session" or "transaction"), and returns a URL to the same
// database through it (same user and password; dbURL's search_path, as PostgresURL sets it, is
// set by PgBouncer on each server connection it opens, since it refuses that startup parameter,
// and no reset query undoes it). It
// is stopped when the test ends. Without the binary the test skips, or fails under CI=true.
func StartPgBouncer(t testing.TB, dbURL, mode string) string {
	t.Helper()
	bin := os.Getenv(EnvPgBouncer)
	if bin == "" {
		for _, p := range []string{"pgbouncer", "/usr/sbin/pgbouncer"} {
			if found, err := exec.LookPath(p); err == nil {
				bin = found
				break
			}
		}
	}
	if bin == "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s: not set and no pgbouncer found; CI=true, so this fails instead of skipping (make test installs it)", EnvPgBouncer)
		}
		t.Skipf("%s not set and no pgbouncer found; run the tests with `make test`", EnvPgBouncer)
	}
	cfg, err := pgx.ParseConfig(dbURL)
	if err != nil {
		t.Fatalf("pgbouncer: parse %s: %v", dbURL, err)
	}
	addr := ClosedAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	dir := t.TempDir()
	// PgBouncer refuses to run as root: as root it runs as nobody, which gets its directory and
	// files (0700, 0600: they hold the password) and may only pass through the directories above.
	var args []string
	uid, gid := -1, -1
	if os.Geteuid() == 0 {
		u, err := user.Lookup("nobody")
		if err != nil {
			t.Fatalf("pgbouncer: running as root and no user nobody to run it as: %v", err)
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
		args = append(args, "-u", "nobody")
		// The test's own directories only, up to (not including) the system's temporary one.
		for d := filepath.Dir(dir); strings.HasPrefix(d, os.TempDir()+string(filepath.Separator)); d = filepath.Dir(d) {
			if err := os.Chmod(d, 0o711); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	quote := func(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
	db := fmt.Sprintf("host=%s port=%d dbname=%s user=%s password=%s", cfg.Host, cfg.Port, cfg.Database, cfg.User, quote(cfg.Password))
	if sp := cfg.RuntimeParams["search_path"]; sp != "" {
		db += " connect_query=" + quote("SET search_path = "+sp)
	}
	ini := fmt.Sprintf(`[databases]
%s = %s
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %s
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = %s
default_pool_size = 40
server_reset_query = DEALLOCATE ALL; UNLISTEN *; SELECT pg_advisory_unlock_all()
`, cfg.Database, db, port, filepath.Join(dir, "users.txt"), mode)
	// Clients are trusted (loopback, the test's lifetime); the server login's password is in the
	// [databases] line, so the auth file needs the user alone.
	for name, body := range map[string]string{
		"pgbouncer.ini": ini,
		"users.txt":     `"` + strings.ReplaceAll(cfg.User, `"`, `""`) + `" ""` + "\n",
	} {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		if uid >= 0 {
			if err := os.Chown(path, uid, gid); err != nil {
				t.Fatal(err)
			}
		}
	}
	var out SyncBuffer
	cmd := exec.Command(bin, append(args, filepath.Join(dir, "pgbouncer.ini"))...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pgbouncer: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	through := fmt.Sprintf("postgres://%s@%s/%s?sslmode=disable", cfg.User, addr, cfg.Database)
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := pgx.Connect(ctx, through)
		if err == nil {
			err = c.Ping(ctx)
			c.Close(ctx)
		}
		cancel()
		if err == nil {
			return through
		}
		select {
		case <-exited:
			t.Fatalf("pgbouncer exited: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("pgbouncer on %s did not answer: %v\n%s", addr, err, out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}
