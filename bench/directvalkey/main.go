// Command directvalkey answers GET /v1/sessions/{sid} with one Valkey GET per request, what an
// app using connect-redis directly does on every request: the floor under cachecar's session
// reads from Valkey (scenario h), measured on the same machine in the same run. With -path
// /v1/courses/{key} it is a bare hand-written cache-aside service's hit, the floor under
// cachecar's hits from Valkey (scenario k); with -database-url too, a missing key is loaded with
// the query cachecar's course loader runs and stored with SET EX: the service's miss (one GET,
// one SELECT, one SET), the floor under cachecar's misses (scenario d).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cachecar/cachecar/bench/internal/benchsrv"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/valkey-io/valkey-go"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "directvalkey:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("directvalkey", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:18082", "address to listen on")
	addr := fs.String("valkey-addr", "127.0.0.1:6379", "Valkey or Redis address")
	path := fs.String("path", "/v1/sessions/{key}", "route served (GET); its {key} wildcard is appended to -key-prefix")
	prefix := fs.String("key-prefix", "sess:", "key prefix: {key} is read from PREFIX+{key} (connect-redis's default is sess:)")
	header := fs.String("header", "X-Session-Store: valkey", `header sent with every answer, "Name: value" (empty: none), as cachecar sends X-Session-Store or X-Cache`)
	timeout := fs.Duration("timeout", 50*time.Millisecond, "timeout of one GET (cachecar's default Valkey timeout)")
	dbURL := fs.String("database-url", "", "PostgreSQL URL: load a missing course key from it and SET it (empty: a missing key is 404)")
	poolSize := fs.Int("pool-size", 16, "pgxpool size with -database-url; the pool opens every connection at start")
	queryTimeout := fs.Duration("query-timeout", 5*time.Second, "timeout of one query with -database-url")
	ttl := fs.Duration("ttl", time.Hour, "TTL of a key stored after a miss")
	missHeader := fs.String("miss-header", "X-Cache: MISS", `header sent with an answer loaded from PostgreSQL, "Name: value"`)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *timeout <= 0 || *queryTimeout <= 0 || *ttl < time.Second {
		return fmt.Errorf("timeout %s, query timeout %s, ttl %s: timeouts must be positive, the ttl at least 1s", *timeout, *queryTimeout, *ttl)
	}
	if !strings.HasPrefix(*path, "/") || !strings.HasSuffix(*path, "/{key}") {
		return fmt.Errorf("path %q: must start with / and end with /{key}", *path)
	}
	hit, err := parseHeader(*header)
	if err != nil {
		return err
	}
	miss, err := parseHeader(*missHeader)
	if err != nil {
		return err
	}
	// No client-side cache: every read is a round trip, as connect-redis makes it.
	vk, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{*addr}, DisableCache: true})
	if err != nil {
		return fmt.Errorf("connect to valkey at %s: %w", *addr, err)
	}
	defer vk.Close()

	var pool *pgxpool.Pool
	if *dbURL != "" {
		if *poolSize < 1 {
			return fmt.Errorf("pool size %d: must be at least 1", *poolSize)
		}
		cfg, err := pgxpool.ParseConfig(*dbURL)
		if err != nil {
			return fmt.Errorf("parse database url: %w", err)
		}
		cfg.MaxConns, cfg.MinConns = int32(*poolSize), int32(*poolSize)
		if pool, err = pgxpool.NewWithConfig(ctx, cfg); err != nil {
			return fmt.Errorf("create pool: %w", err)
		}
		defer pool.Close()
		if err := pool.Ping(ctx); err != nil {
			return fmt.Errorf("ping database: %w", err)
		}
	}

	mux := http.NewServeMux()
	mux.Handle("GET "+*path, getHandler(vk, *prefix, *timeout, hit, loader{pool: pool, timeout: *queryTimeout, ttl: *ttl, header: miss}))

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	fmt.Fprintf(stdout, "directvalkey: listening on %s, GET %s from keys %s{key} on %s\n", ln.Addr(), *path, *prefix, *addr)
	return benchsrv.Serve(ctx, srv, ln)
}

// header is one answer header, Name: value; an empty name sends none.
type header struct{ name, value string }

func parseHeader(s string) (header, error) {
	if s == "" {
		return header{}, nil
	}
	n, v, ok := strings.Cut(s, ":")
	if !ok || strings.TrimSpace(n) == "" {
		return header{}, fmt.Errorf("header %q: want \"Name: value\"", s)
	}
	return header{http.CanonicalHeaderKey(strings.TrimSpace(n)), strings.TrimSpace(v)}, nil
}

// loader loads a missing course key from PostgreSQL (pool nil: it does not).
type loader struct {
	pool    *pgxpool.Pool
	timeout time.Duration
	ttl     time.Duration
	header  header
}

// getHandler reads one key per request and writes its bytes as they are, with the header given
// (cachecar's X-Session-Store or X-Cache), so that the load generators count its answers the
// same way. A missing key is 404, or with a loader, a course loaded and stored.
func getHandler(vk valkey.Client, prefix string, timeout time.Duration, hit header, load loader) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), timeout)
		defer cancel()
		key := prefix + r.PathValue("key")
		body, err := vk.Do(ctx, vk.B().Get().Key(key).Build()).AsBytes()
		switch {
		case valkey.IsValkeyNil(err) && load.pool != nil:
			load.serve(w, r, vk, key, timeout)
			return
		case valkey.IsValkeyNil(err):
			benchsrv.WriteError(w, http.StatusNotFound, "not_found", "no such key")
			return
		case err != nil:
			benchsrv.WriteError(w, http.StatusServiceUnavailable, "valkey_unavailable", "valkey read failed")
			return
		}
		benchsrv.WriteJSON(w, body, hit.name, hit.value)
	})
}

// serve answers a miss of key: the course row as JSON, then SET key EX ttl, as a hand-written
// cache-aside service fills its cache (no lease, no version check).
func (l loader) serve(w http.ResponseWriter, r *http.Request, vk valkey.Client, key string, vkTimeout time.Duration) {
	id, err := strconv.ParseInt(r.PathValue("key"), 10, 64)
	if err != nil || id < 1 {
		benchsrv.WriteError(w, http.StatusBadRequest, "bad_id", "course id must be a positive integer")
		return
	}
	qctx, cancel := context.WithTimeout(r.Context(), l.timeout)
	defer cancel()
	var body []byte
	err = l.pool.QueryRow(qctx, benchsrv.CourseQuery, id).Scan(&body)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		benchsrv.WriteError(w, http.StatusNotFound, "not_found", "course not found")
		return
	case err != nil:
		benchsrv.WriteError(w, http.StatusServiceUnavailable, "database_unavailable", "database query failed")
		return
	}
	vctx, cancel := context.WithTimeout(r.Context(), vkTimeout)
	defer cancel()
	if err := vk.Do(vctx, vk.B().Set().Key(key).Value(valkey.BinaryString(body)).Ex(l.ttl).Build()).Error(); err != nil {
		benchsrv.WriteError(w, http.StatusServiceUnavailable, "valkey_unavailable", "valkey write failed")
		return
	}
	benchsrv.WriteJSON(w, body, l.header.name, l.header.value)
}
