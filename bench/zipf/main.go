// Command zipf is the read-mostly load of scenario n of bench/run.sh: -workers goroutines, each
// with its own keep-alive connection, for -duration, each operation on a course id drawn from a
// Zipf distribution (math/rand/v2, -s 1.1, -v 1: id = first + Zipf(imax = last - first)), so a
// few courses take most of the traffic, as on a real catalogue. A -writes fraction of the
// operations (1%) is `UPDATE courses SET updated_at = now() WHERE id = $1` sent straight to
// PostgreSQL, whose trigger invalidates the course's key; the rest are GET /v1/courses/{id}
// through cachecar.
//
// It counts the reads, the writes, the answers by X-Cache and status, and reads cachecar's
// /metrics (-health) before and after the run: cachecar_db_queries_total over every policy and
// outcome is the PostgreSQL queries cachecar made for the reads. A service without the cache
// makes one query per read, so 1 - queries/reads is the fraction of queries the cache saved.
// The hit rate is HIT answers over reads. Run against a fresh namespace it includes the warm-up
// of the cold cache, which is what a sidecar started on live traffic goes through.
//
// Every line it prints starts with "zipf: "; the last is
//
//	zipf: ZIPF_RESULT reads=N writes=N ... hit_rate=F queries=N fewer_queries=F ...
//
// for bench/run.sh. DATABASE_URL (the environment, so that the password is not in ps) is the
// database cachecar reads; it must be on loopback, since this program writes.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/cachecar/cachecar/bench/internal/ccmetrics"
)

// updateSQL touches a course row: the invalidation triggers fire on any change of it. courses
// has updated_at (internal/schema/reference.sql), as bench/invalidation's UPDATE relies on too.
const updateSQL = `UPDATE courses SET updated_at = now() WHERE id = $1`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "zipf:", err)
		os.Exit(1)
	}
}

type options struct {
	base, health string
	databaseURL  string
	workers      int
	duration     time.Duration
	first, last  int
	s, v         float64
	writes       float64 // fraction of operations that are UPDATEs
	seed         uint64  // 0: a random one
	timeout      time.Duration
}

func parseFlags(args []string, getenv func(string) string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("zipf", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.base, "base", "", "base URL of cachecar's read API, e.g. http://127.0.0.1:8080")
	fs.StringVar(&o.health, "health", "", "base URL of cachecar's health port, for /metrics before and after the run")
	fs.IntVar(&o.workers, "workers", 50, "concurrent workers, one keep-alive connection each")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "how long the workers run")
	fs.IntVar(&o.first, "first", 1, "lowest course id (the most popular)")
	fs.IntVar(&o.last, "last", 5000, "highest course id; every id in first..last must exist")
	fs.Float64Var(&o.s, "s", 1.1, "Zipf exponent s (> 1)")
	fs.Float64Var(&o.v, "v", 1, "Zipf parameter v (>= 1)")
	fs.Float64Var(&o.writes, "writes", 0.01, "fraction of operations that are UPDATEs sent to PostgreSQL (0: reads only, no database needed)")
	fs.Uint64Var(&o.seed, "seed", 0, "random seed (0: a random one, printed)")
	fs.DurationVar(&o.timeout, "timeout", 0, "upper bound of the whole run (0: -duration + 1m)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.base == "" || o.health == "" {
		return o, errors.New("set -base and -health")
	}
	for _, u := range []string{o.base, o.health} {
		if err := checkLoopbackURL(u); err != nil {
			return o, err
		}
	}
	switch {
	case o.workers < 1 || o.duration <= 0:
		return o, errors.New("-workers and -duration must be positive")
	case o.first < 1 || o.last <= o.first:
		return o, fmt.Errorf("bad id range %d..%d", o.first, o.last)
	case o.s <= 1 || o.v < 1:
		return o, errors.New("-s must be > 1 and -v >= 1 (math/rand/v2's Zipf)")
	case o.writes < 0 || o.writes >= 1:
		return o, errors.New("-writes must be in [0, 1)")
	}
	if o.timeout == 0 {
		o.timeout = o.duration + time.Minute
	}
	if o.seed == 0 {
		o.seed = rand.Uint64()
	}
	if o.writes > 0 {
		o.databaseURL = getenv("DATABASE_URL")
		if o.databaseURL == "" {
			return o, errors.New("-writes needs DATABASE_URL")
		}
		cfg, err := pgxpool.ParseConfig(o.databaseURL)
		if err != nil {
			return o, errors.New("DATABASE_URL is not a valid PostgreSQL URL")
		}
		if h := cfg.ConnConfig.Host; !strings.HasPrefix(h, "/") && !isLoopback(h) {
			return o, fmt.Errorf("database host %q is not loopback: this benchmark writes, so it runs only against 127.0.0.1", h)
		}
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
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%q is not a URL", raw)
	}
	if !isLoopback(u.Hostname()) {
		return fmt.Errorf("%q: load goes to loopback only", raw)
	}
	return nil
}

// tally is one worker's counts; the workers' tallies are added up at the end.
type tally struct {
	reads, readErrs             int
	lateReads, lateHits         int // reads sent in the second half of the run, and their HITs
	writes, writeErrs           int
	writesNoRow                 int            // UPDATEs that matched no row (an id outside the table)
	xcache                      map[string]int // answers by X-Cache ("none": absent)
	status                      map[string]int // answers by status
	readLat                     []time.Duration
	idsRead, idsWritten         []bool // by id - first
	firstReadErr, firstWriteErr string
}

func newTally(n int) *tally {
	return &tally{xcache: map[string]int{}, status: map[string]int{}, idsRead: make([]bool, n), idsWritten: make([]bool, n)}
}

func (t *tally) add(o *tally) {
	t.reads += o.reads
	t.readErrs += o.readErrs
	t.lateReads += o.lateReads
	t.lateHits += o.lateHits
	t.writes += o.writes
	t.writeErrs += o.writeErrs
	t.writesNoRow += o.writesNoRow
	for k, v := range o.xcache {
		t.xcache[k] += v
	}
	for k, v := range o.status {
		t.status[k] += v
	}
	t.readLat = append(t.readLat, o.readLat...)
	for i := range o.idsRead {
		t.idsRead[i] = t.idsRead[i] || o.idsRead[i]
		t.idsWritten[i] = t.idsWritten[i] || o.idsWritten[i]
	}
	if t.firstReadErr == "" {
		t.firstReadErr = o.firstReadErr
	}
	if t.firstWriteErr == "" {
		t.firstWriteErr = o.firstWriteErr
	}
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, getenv, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()

	var pool *pgxpool.Pool
	if o.writes > 0 {
		cfg, err := pgxpool.ParseConfig(o.databaseURL)
		if err != nil {
			return errors.New("DATABASE_URL is not a valid PostgreSQL URL")
		}
		// Writes are a small fraction of the operations: a few connections carry them, opened
		// before the run so that no write waits for a connect.
		cfg.MaxConns = int32(min(o.workers, 8))
		cfg.MinConns = cfg.MaxConns
		if pool, err = pgxpool.NewWithConfig(ctx, cfg); err != nil {
			return fmt.Errorf("connect to PostgreSQL: %w", err)
		}
		defer pool.Close()
		if err := pool.Ping(ctx); err != nil {
			return fmt.Errorf("connect to PostgreSQL: %w", err)
		}
	}
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: o.workers, MaxConnsPerHost: o.workers},
	}
	courseURL := strings.TrimSuffix(o.base, "/") + "/v1/courses/"
	before, err := ccmetrics.Scrape(ctx, client, o.health)
	if err != nil {
		return err
	}

	n := o.last - o.first + 1
	imax := uint64(o.last - o.first)
	tallies := make([]*tally, o.workers)
	var wg sync.WaitGroup
	start := time.Now()
	end := start.Add(o.duration)
	// The second half of the run shows the hit rate once the hot ids are cached, next to the
	// whole run's, which includes the cold start.
	half := start.Add(o.duration / 2)
	for w := range o.workers {
		t := newTally(n)
		tallies[w] = t
		wg.Go(func() {
			r := rand.New(rand.NewPCG(o.seed, uint64(w)))
			z := rand.NewZipf(r, o.s, o.v, imax)
			for ctx.Err() == nil && time.Now().Before(end) {
				i := int(z.Uint64())
				id := o.first + i
				if o.writes > 0 && r.Float64() < o.writes {
					t.writes++
					t.idsWritten[i] = true
					tag, err := pool.Exec(ctx, updateSQL, id)
					switch {
					case err != nil:
						t.writeErrs++
						if t.firstWriteErr == "" {
							t.firstWriteErr = err.Error()
						}
					case tag.RowsAffected() == 0:
						t.writesNoRow++
					}
					continue
				}
				t.reads++
				t.idsRead[i] = true
				t0 := time.Now()
				late := !t0.Before(half)
				if late {
					t.lateReads++
				}
				status, xcache, err := get(ctx, client, courseURL+strconv.Itoa(id))
				if err != nil {
					t.readErrs++
					if t.firstReadErr == "" {
						t.firstReadErr = err.Error()
					}
					continue
				}
				t.readLat = append(t.readLat, time.Since(t0))
				t.status[strconv.Itoa(status)]++
				if xcache == "" {
					xcache = "none"
				}
				t.xcache[xcache]++
				if late && xcache == "HIT" {
					t.lateHits++
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("run cut short: %w", err)
	}
	after, err := ccmetrics.Scrape(ctx, client, o.health)
	if err != nil {
		return err
	}
	total := newTally(n)
	for _, t := range tallies {
		total.add(t)
	}
	report(stdout, o, total, after.Sub(before), elapsed)
	return nil
}

// get does one GET and returns the status and X-Cache header; the body is read and dropped so
// that the connection is reused.
func get(ctx context.Context, client *http.Client, url string) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return 0, "", fmt.Errorf("read body: %w", err)
	}
	return resp.StatusCode, resp.Header.Get("X-Cache"), nil
}

func report(w io.Writer, o options, t *tally, d ccmetrics.Snapshot, elapsed time.Duration) {
	count := func(b []bool) (c int) {
		for _, x := range b {
			if x {
				c++
			}
		}
		return c
	}
	ratio := func(a, b float64) string {
		if b <= 0 {
			return "n/a"
		}
		return strconv.FormatFloat(a/b, 'f', 4, 64)
	}
	slices.Sort(t.readLat)
	q := func(p float64) string {
		if len(t.readLat) == 0 {
			return "n/a"
		}
		i := min(len(t.readLat)-1, int(p*float64(len(t.readLat))))
		return strconv.FormatFloat(float64(t.readLat[i])/float64(time.Millisecond), 'f', 3, 64)
	}
	hits := float64(t.xcache["HIT"])
	fewer := "n/a"
	if t.reads > 0 {
		fewer = strconv.FormatFloat(1-d.DBQueries/float64(t.reads), 'f', 4, 64)
	}
	local := "n/a"
	if f, ok := d.LocalFraction(); ok {
		local = strconv.FormatFloat(f, 'f', 4, 64)
	}
	secs := elapsed.Seconds()
	ops := t.reads + t.writes

	fmt.Fprintf(w, "zipf: %d workers for %s (ran %s), course ids %d..%d, Zipf s=%g v=%g, writes %.2f%% of operations, seed %d\n",
		o.workers, o.duration, elapsed.Round(time.Millisecond), o.first, o.last, o.s, o.v, 100*o.writes, o.seed)
	fmt.Fprintf(w, "zipf: %d operations (%.0f/s): %d reads (%.0f/s, %d transport errors), %d writes (%d errors, %d matched no row)\n",
		ops, float64(ops)/secs, t.reads, float64(t.reads)/secs, t.readErrs, t.writes, t.writeErrs, t.writesNoRow)
	fmt.Fprintf(w, "zipf: distinct ids read %d, written %d, of %d\n", count(t.idsRead), count(t.idsWritten), o.last-o.first+1)
	fmt.Fprintf(w, "zipf: answers by X-Cache %s; by status %s\n", fmtCounts(t.xcache), fmtCounts(t.status))
	fmt.Fprintf(w, "zipf: hit rate (HIT / reads) %s, in the second half of the run %s (%d of %d); read latency p50 %s ms, p99 %s ms\n",
		ratio(hits, float64(t.reads)), ratio(float64(t.lateHits), float64(t.lateReads)), t.lateHits, t.lateReads, q(0.50), q(0.99))
	fmt.Fprintf(w, "zipf: cachecar during the run: %.0f PostgreSQL queries (cachecar_db_queries_total), %s fewer than one per read;"+
		" lookups hit %.0f (in-process %.0f, fraction %s), miss %.0f, stale %.0f, bypass %.0f\n",
		d.DBQueries, fewer, d.LookupsHit, d.LocalHits, local, d.LookupsMiss, d.LookupsStale, d.LookupsBypass)
	if t.firstReadErr != "" {
		fmt.Fprintf(w, "zipf: first read error: %s\n", t.firstReadErr)
	}
	if t.firstWriteErr != "" {
		fmt.Fprintf(w, "zipf: first write error: %s\n", t.firstWriteErr)
	}
	non2xx := 0
	for k, v := range t.status {
		if !strings.HasPrefix(k, "2") {
			non2xx += v
		}
	}
	fmt.Fprintf(w, "zipf: ZIPF_RESULT workers=%d duration_s=%.3f reads=%d writes=%d read_errors=%d write_errors=%d non2xx=%d"+
		" hit=%d miss=%d stale=%d bypass=%d hit_rate=%s late_hit_rate=%s queries=%.0f fewer_queries=%s local_fraction=%s"+
		" ops_per_s=%.1f reads_per_s=%.1f p50_ms=%s p99_ms=%s distinct_read=%d distinct_written=%d xcache=%s status=%s\n",
		o.workers, secs, t.reads, t.writes, t.readErrs, t.writeErrs, non2xx,
		t.xcache["HIT"], t.xcache["MISS"], t.xcache["STALE"], t.xcache["BYPASS"], ratio(hits, float64(t.reads)),
		ratio(float64(t.lateHits), float64(t.lateReads)),
		d.DBQueries, fewer, local, float64(ops)/secs, float64(t.reads)/secs, q(0.50), q(0.99),
		count(t.idsRead), count(t.idsWritten), fmtCountsKV(t.xcache), fmtCountsKV(t.status))
}

// fmtCounts formats counts as "A=n B=m", sorted by key.
func fmtCounts(c map[string]int) string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%d", k, c[k]))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, " ")
}

// fmtCountsKV formats counts as "A:n,B:m" (one field of ZIPF_RESULT).
func fmtCountsKV(c map[string]int) string {
	s := strings.ReplaceAll(fmtCounts(c), "=", ":")
	return strings.ReplaceAll(s, " ", ",")
}
