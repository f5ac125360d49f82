// Command invalidation measures cachecar's invalidation lag: it warms course entries through a
// running cachecar, updates their rows in PostgreSQL at a fixed rate and times each entry's
// deletion from Redis keyspace notifications. See bench/README.md, scenario f.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/valkey-io/valkey-go"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "invalidation:", err)
		os.Exit(1)
	}
}

// options are the command line, validated.
type options struct {
	base           string        // cachecar's read API; empty: only wait for the listener
	health         string        // cachecar's health port; empty: no listener wait, no metrics
	listenerStatus string        // the listener status to wait for on /health/detailed
	waitTimeout    time.Duration // how long to wait for it
	databaseURL    string
	redisAddr      string
	redisPassword  string
	redisDB        int
	namespace      string // cachecar's CACHECAR_NAMESPACE
	keyPrefix      string // the course policy's key up to the id
	channel        string // cachecar's invalidation channel, LISTENed on for the triggers' ts
	first, count   int    // course ids first..first+count-1, each updated once
	last           int    // the highest course id that exists (0: unknown)
	rate           int    // updates per second
	workers        int    // PostgreSQL connections sending the updates
	warmConc       int    // warm-up requests in flight
	warmTimeout    time.Duration
	eventTimeout   time.Duration
	timeout        time.Duration // bounds the whole run
}

func parseFlags(args []string, getenv func(string) string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("invalidation", flag.ContinueOnError)
	fs.SetOutput(stderr)
	redisHost, redisPort := getenv("REDIS_HOST"), getenv("REDIS_PORT")
	if redisHost == "" {
		redisHost = "127.0.0.1"
	}
	if redisPort == "" {
		redisPort = "6379"
	}
	fs.StringVar(&o.base, "base", "", "base URL of cachecar's read API, e.g. http://127.0.0.1:8080 (empty: only wait for the listener)")
	fs.StringVar(&o.health, "health", "", "base URL of cachecar's health port: wait for the listener, read /metrics (empty: neither)")
	fs.StringVar(&o.listenerStatus, "listener-status", "up", `listener status on /health/detailed to wait for ("up"; "disabled" with invalidation off)`)
	fs.DurationVar(&o.waitTimeout, "wait-timeout", 30*time.Second, "how long to wait for -listener-status")
	fs.StringVar(&o.databaseURL, "database-url", getenv("DATABASE_URL"), "PostgreSQL URL of the database cachecar reads (default $DATABASE_URL)")
	fs.StringVar(&o.redisAddr, "redis-addr", net.JoinHostPort(redisHost, redisPort), "host:port of cachecar's Redis/Valkey (default $REDIS_HOST:$REDIS_PORT)")
	fs.StringVar(&o.redisPassword, "redis-password", getenv("REDIS_PASSWORD"), "Redis password (default $REDIS_PASSWORD)")
	fs.IntVar(&o.redisDB, "redis-db", 0, "Redis logical database cachecar uses")
	fs.StringVar(&o.namespace, "namespace", "", "cachecar's key namespace (CACHECAR_NAMESPACE)")
	fs.StringVar(&o.keyPrefix, "key-prefix", "course:", "the course policy's key before the id")
	fs.StringVar(&o.channel, "channel", "cachecar_invalidation", "the channel the triggers NOTIFY (CACHECAR_INVALIDATION_CHANNEL / invalidation.channel): listened on for the trigger's timestamp of each UPDATE")
	fs.IntVar(&o.first, "first", 1, "first course id")
	fs.IntVar(&o.count, "count", 0, "course ids to warm and update, once each (0: rate x duration)")
	fs.IntVar(&o.last, "last", 0, "the highest course id that exists, to refuse a run needing more ids before it starts (0: unchecked)")
	fs.IntVar(&o.rate, "rate", 1000, "updates per second")
	duration := fs.Duration("duration", 5*time.Second, "how long the updates run, with -count 0")
	fs.IntVar(&o.workers, "workers", 8, "PostgreSQL connections sending the updates")
	fs.IntVar(&o.warmConc, "warm-concurrency", 16, "warm-up requests in flight")
	fs.DurationVar(&o.warmTimeout, "warm-timeout", 20*time.Second, "how long the warm-up may take until every id answers HIT")
	fs.DurationVar(&o.eventTimeout, "event-timeout", 2*time.Second, "how long after the last update a deletion may still arrive; later ones are missing")
	fs.DurationVar(&o.timeout, "timeout", 2*time.Minute, "upper bound of the whole run")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.base == "" && o.health == "" {
		return o, errors.New("nothing to do: set -base (measure) or -health (wait for the listener)")
	}
	for _, u := range []string{o.base, o.health} {
		if err := checkLoopbackURL(u); err != nil {
			return o, err
		}
	}
	if o.base == "" {
		return o, nil
	}
	if o.rate < 1 || o.workers < 1 || o.warmConc < 1 || o.first < 1 || o.count < 0 || *duration <= 0 {
		return o, errors.New("-rate, -workers, -warm-concurrency, -first and -duration must be positive, -count not negative")
	}
	if o.count == 0 {
		o.count = int(float64(o.rate) * duration.Seconds())
	}
	if o.count < 1 {
		return o, errors.New("no updates: raise -count, -rate or -duration")
	}
	if o.last > 0 && o.first+o.count-1 > o.last {
		return o, fmt.Errorf("%d updates need as many distinct course ids, but only %d..%d exist: lower -rate or -duration", o.count, o.first, o.last)
	}
	if o.databaseURL == "" {
		return o, errors.New("no database: set -database-url or DATABASE_URL")
	}
	// This run changes rows and the Redis server's notify-keyspace-events: only on this machine.
	cfg, err := pgx.ParseConfig(o.databaseURL)
	if err != nil {
		return o, errors.New("-database-url is not a valid PostgreSQL URL")
	}
	if !strings.HasPrefix(cfg.Host, "/") && !isLoopback(cfg.Host) {
		return o, fmt.Errorf("database host %q is not loopback: this benchmark writes, so it runs only against 127.0.0.1", cfg.Host)
	}
	host, _, err := net.SplitHostPort(o.redisAddr)
	if err != nil || !isLoopback(host) {
		return o, fmt.Errorf("redis address %q is not a loopback host:port: this benchmark changes the server's config", o.redisAddr)
	}
	if o.channel == "" {
		return o, errors.New("-channel must not be empty")
	}
	if o.namespace == "" {
		return o, errors.New("set -namespace to cachecar's (a fresh one per run, so that no other reader refills the keys)")
	}
	return o, nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func checkLoopbackURL(raw string) error {
	if raw == "" {
		return nil
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%q is not a URL", raw)
	}
	if !isLoopback(u.Hostname()) {
		return fmt.Errorf("%q: load goes to loopback only", raw)
	}
	return nil
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, getenv, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: o.warmConc},
	}
	if o.health != "" {
		start := time.Now()
		if err := waitListener(ctx, client, o.health, o.listenerStatus, o.waitTimeout); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "invalidation: listener %s after %s\n", o.listenerStatus, time.Since(start).Round(time.Millisecond))
	}
	if o.base == "" {
		return nil
	}
	return measure(ctx, o, client, stdout)
}

// measure is the benchmark proper: connect, warm, subscribe, update, wait, read the commit
// timestamps, report.
func measure(ctx context.Context, o options, client *http.Client, stdout io.Writer) error {
	// Connections first: a wrong address fails before a minute of warm-up.
	vk, err := valkey.NewClient(valkey.ClientOption{
		InitAddress: []string{o.redisAddr}, Password: o.redisPassword, SelectDB: o.redisDB, DisableCache: true,
	})
	if err != nil {
		return fmt.Errorf("connect to redis: %w", err)
	}
	defer vk.Close()
	conns, err := connectWorkers(ctx, o.databaseURL, o.workers)
	defer func() {
		for _, c := range conns {
			cctx, cancel := context.WithTimeout(context.Background(), time.Second)
			c.Close(cctx)
			cancel()
		}
	}()
	if err != nil {
		return err
	}
	lconn, err := connectListener(ctx, o.databaseURL)
	if err != nil {
		return err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		lconn.Close(cctx)
		cancel()
	}()
	// The notifications of this run's UPDATEs are the ones the workers' sessions send.
	workerPIDs := make(map[uint32]bool, len(conns))
	for _, c := range conns {
		workerPIDs[c.PgConn().PID()] = true
	}

	start := time.Now()
	w, err := warm(ctx, client, o.base, o.first, o.count, o.warmConc, o.warmTimeout)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "invalidation: warmed %d course ids (%d..%d) in %s: first pass X-Cache %s, all HIT after %d more pass(es)",
		o.count, o.first, o.first+o.count-1, time.Since(start).Round(time.Millisecond), w.first, w.passes)
	if w.retried > 0 {
		fmt.Fprintf(stdout, " (%d ids were not HIT on their second read)", w.retried)
	}
	fmt.Fprintln(stdout)
	keys := make([]string, o.count)
	for i := range keys {
		keys[i] = o.namespace + o.keyPrefix + strconv.Itoa(o.first+i)
	}
	// A HIT proves the entry was there a moment ago; the deletion this run waits for needs it
	// there when the update lands.
	if absent, err := countAbsent(ctx, vk, keys); err != nil {
		return err
	} else if absent > 0 {
		return fmt.Errorf("%d of %d warmed keys (%s...) are not in redis: wrong -namespace, -key-prefix or -redis-db?", absent, len(keys), keys[0])
	}

	var before metricsSnapshot
	if o.health != "" {
		if before, err = scrape(ctx, client, o.health); err != nil {
			return err
		}
	}
	prev, now, restore, err := enableKeyspaceEvents(ctx, vk)
	if err != nil {
		return err
	}
	defer func() {
		// Left on, the events cost the shared server a little on every write: say so loudly.
		if err := restore(); err != nil {
			fmt.Fprintf(stdout, "invalidation: WARNING %v\n", err)
		}
	}()
	fmt.Fprintf(stdout, "invalidation: notify-keyspace-events %q -> %q (put back at the end)\n", prev, now)

	rec := newRecorder(o.first, o.count)
	sub, err := subscribe(ctx, vk, o.redisDB, o.namespace+o.keyPrefix, rec)
	if err != nil {
		return err
	}
	defer sub.stop()
	nl, err := listen(ctx, lconn, o.channel, workerPIDs, rec)
	if err != nil {
		return err
	}
	defer nl.stop()

	u, err := sendUpdates(ctx, conns, rec, o.rate)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(o.eventTimeout)
	for (rec.seen.Load() < int64(o.count) || rec.notified.Load() < int64(o.count)) && time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(2 * time.Millisecond)
	}
	sub.stop()
	listenErr := nl.stop()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("interrupted while waiting for deletions: %w", err)
	}
	// After the last UPDATE (each row is written once in a run): the COMMIT of each one.
	ct := readCommitTimes(ctx, conns, rec)
	var after metricsSnapshot
	if o.health != "" {
		// The sidecar observes a notification's lag after its UNLINK returns, a moment after
		// Redis published the event: give it that moment.
		time.Sleep(50 * time.Millisecond)
		if after, err = scrape(ctx, client, o.health); err != nil {
			return err
		}
	}
	report(stdout, o, rec, u, ct, before, after, listenErr)
	return nil
}

// connectWorkers opens n connections and prepares the update on each, so that the first timed
// update of a connection does not also pay for parsing and planning.
func connectWorkers(ctx context.Context, dbURL string, n int) ([]*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dbURL)
	if err != nil {
		return nil, errors.New("parse database url")
	}
	if cfg.RuntimeParams["application_name"] == "" {
		cfg.RuntimeParams["application_name"] = "cachecar-bench-invalidation"
	}
	conns := make([]*pgx.Conn, 0, n)
	for range n {
		c, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			return conns, fmt.Errorf("connect to postgresql: %w", err)
		}
		conns = append(conns, c)
		// Named by its SQL: Exec(updateSQL) then uses this statement.
		if _, err := c.Prepare(ctx, updateSQL, updateSQL); err != nil {
			return conns, fmt.Errorf("prepare update: %w", err)
		}
	}
	return conns, nil
}
