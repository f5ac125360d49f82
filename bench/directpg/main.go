// Command directpg answers GET /v1/courses/{id} straight from PostgreSQL with pgxpool: what the
// app does without a cache, the baseline for cachecar's hits and misses. GET /v1/sessions/{sid}
// reads connect-pg-simple's table the same way: what an app using connect-pg-simple does, the
// floor under cachecar's session reads with Valkey down (scenario j). PUT /v1/sessions/{sid}
// runs connect-pg-simple's upsert, one autocommitted statement: the floor under cachecar's
// durable session writes (scenario i).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
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
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "directpg:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("directpg", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:18081", "address to listen on")
	dbURL := fs.String("database-url", getenv("DATABASE_URL"), "PostgreSQL URL (default $DATABASE_URL)")
	poolSize := fs.Int("pool-size", 16, "pgxpool size; the pool opens every connection at start")
	timeout := fs.Duration("query-timeout", 5*time.Second, "timeout of one query")
	table := fs.String("session-table", "session", "connect-pg-simple's table for GET /v1/sessions/{sid}, as [schema.]table")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dbURL == "" {
		return errors.New("no database: set -database-url or DATABASE_URL")
	}
	if *poolSize < 1 {
		return fmt.Errorf("pool size %d: must be at least 1", *poolSize)
	}

	cfg, err := pgxpool.ParseConfig(*dbURL)
	if err != nil {
		return fmt.Errorf("parse database url: %w", err)
	}
	cfg.MaxConns = int32(*poolSize)
	// Open every connection up front so that the first seconds of a run do not pay for dialing.
	cfg.MinConns = int32(*poolSize)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("create pool: %w", err)
	}
	defer pool.Close()
	if err := pool.Ping(ctx); err != nil {
		return fmt.Errorf("ping database: %w", err)
	}

	mux := http.NewServeMux()
	mux.Handle("GET /v1/courses/{id}", courseHandler(pool, *timeout))
	mux.Handle("GET /v1/sessions/{sid}", sessionHandler(pool, sessionQuery(*table), *timeout, time.Now))
	mux.Handle("PUT /v1/sessions/{sid}", sessionPutHandler(pool, sessionUpsert(*table), *timeout, time.Now))

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	fmt.Fprintf(stdout, "directpg: listening on %s, pool size %d\n", ln.Addr(), *poolSize)
	return benchsrv.Serve(ctx, srv, ln)
}

// rowQuerier is the one pool method the handler uses.
type rowQuerier interface {
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// courseHandler loads one course row as JSON on every request.
func courseHandler(db rowQuerier, timeout time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
		if err != nil || id < 1 {
			benchsrv.WriteError(w, http.StatusBadRequest, "bad_id", "course id must be a positive integer")
			return
		}
		answerRow(w, r, db, timeout, "course", "", benchsrv.CourseQuery, id)
	})
}

// answerRow runs query, which returns at most one row of one JSON text column, and answers with
// it (with the header hname: postgres when hname is set), 404 without a row.
func answerRow(w http.ResponseWriter, r *http.Request, db rowQuerier, timeout time.Duration, what, hname, query string, args ...any) {
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	var body []byte
	err := db.QueryRow(ctx, query, args...).Scan(&body)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		benchsrv.WriteError(w, http.StatusNotFound, "not_found", what+" not found")
	case errors.Is(err, context.DeadlineExceeded):
		benchsrv.WriteError(w, http.StatusGatewayTimeout, "timeout", "database query timed out")
	case err != nil:
		benchsrv.WriteError(w, http.StatusServiceUnavailable, "database_unavailable", "database query failed")
	default:
		benchsrv.WriteJSON(w, body, hname, "postgres")
	}
}

// sessionQuery is the query cachecar's session store runs for a read from PostgreSQL, on table
// ([schema.]table, quoted here).
func sessionQuery(table string) string {
	return `SELECT sess::text FROM ` + pgx.Identifier(strings.SplitN(table, ".", 2)).Sanitize() +
		` WHERE sid = $1 AND expire >= to_timestamp($2)`
}

// sessionHandler reads one session row per request, unexpired at now rounded up to the second
// as cachecar rounds it, and writes its JSON as stored with the X-Session-Store header cachecar
// sends, so that bench/sessions counts its answers the same way.
func sessionHandler(db rowQuerier, query string, timeout time.Duration, now func() time.Time) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		nowSec := int64(math.Ceil(float64(now().UnixMilli()) / 1000))
		answerRow(w, r, db, timeout, "session", "X-Session-Store", query, r.PathValue("sid"), nowSec)
	})
}

// sessionUpsert is connect-pg-simple's set on table ([schema.]table, quoted here).
func sessionUpsert(table string) string {
	return `INSERT INTO ` + pgx.Identifier(strings.SplitN(table, ".", 2)).Sanitize() +
		` (sess, expire, sid) SELECT $1::json, to_timestamp($2), $3 ON CONFLICT (sid) DO UPDATE SET sess = $1::json, expire = to_timestamp($2)`
}

// connectPGSimpleTTL is connect-pg-simple's expiry for a session without cookie.expires.
const connectPGSimpleTTL = 24 * time.Hour

// maxSessionBody is cachecar's default sessions.max_body_bytes.
const maxSessionBody = 64 << 10

// execer is the one pool method the PUT handler uses.
type execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// sessionPutHandler stores the request's session as connect-pg-simple does: expire from
// cookie.expires (else now + one day), rounded up to the second, and one upsert in autocommit, so
// the 204 comes after the commit. It answers X-Session-Store: postgres, as cachecar does for a
// write only PostgreSQL took.
func sessionPutHandler(db execer, upsert string, timeout time.Duration, now func() time.Time) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxSessionBody))
		if err != nil {
			benchsrv.WriteError(w, http.StatusRequestEntityTooLarge, "body_too_large", "session body over 64 KiB")
			return
		}
		expire, err := sessionExpire(body, now())
		if err != nil {
			benchsrv.WriteError(w, http.StatusBadRequest, "bad_session", err.Error())
			return
		}
		ctx, cancel := context.WithTimeout(r.Context(), timeout)
		defer cancel()
		_, err = db.Exec(ctx, upsert, string(body), expire, r.PathValue("sid"))
		switch {
		case errors.Is(err, context.DeadlineExceeded):
			benchsrv.WriteError(w, http.StatusGatewayTimeout, "timeout", "database write timed out")
		case err != nil:
			benchsrv.WriteError(w, http.StatusServiceUnavailable, "database_unavailable", "database write failed")
		default:
			w.Header().Set("X-Session-Store", "postgres")
			w.WriteHeader(http.StatusNoContent)
		}
	})
}

// sessionExpire is connect-pg-simple's expire for body, in Unix seconds: cookie.expires rounded
// up to the second, or now + connectPGSimpleTTL.
func sessionExpire(body []byte, now time.Time) (int64, error) {
	var sess struct {
		Cookie struct {
			Expires *string `json:"expires"`
		} `json:"cookie"`
	}
	if err := json.Unmarshal(body, &sess); err != nil {
		return 0, fmt.Errorf("body is not a session object: %v", err)
	}
	at := now.Add(connectPGSimpleTTL)
	if e := sess.Cookie.Expires; e != nil {
		t, err := time.Parse(time.RFC3339Nano, *e)
		if err != nil {
			return 0, fmt.Errorf("cookie.expires %q: %v", *e, err)
		}
		at = t
	}
	return int64(math.Ceil(float64(at.UnixMilli()) / 1000)), nil
}
