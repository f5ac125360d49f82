package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cachecar/cachecar/bench/internal/cpustat"
)

// Default rates of -load, per second over all connections. They are well below the throughput
// of the closed-loop (saturating) wrk rows of h, i and j in bench/run.sh's report on a 2-core
// machine, so that the fixed-rate figures are the latency of a request at that load, not
// queueing at saturation. bench/run.sh passes its own (BENCH_SESSION_GET_RATE,
// BENCH_SESSION_PUT_RATE), with these defaults.
const (
	defaultGetRate = 2000
	defaultPutRate = 500
)

// loadOptions are the -load flags.
type loadOptions struct {
	mode     string // "get" or "put"
	rate     int    // requests per second over all connections
	duration time.Duration
	conns    int
	grace    time.Duration // after -duration: a request not sent by then is counted as not sent
}

// requestTimeout bounds one request of -load, from the dial or the write to the answer's end:
// one that takes longer counts as an error.
const requestTimeout = 10 * time.Second

// loadResult is what one connection did in the timed run.
type loadResult struct {
	lat      []time.Duration // from the scheduled send time to the full response
	svc      []time.Duration // from the actual send to the full response
	late     []time.Duration // actual send minus scheduled send
	queued   int             // requests whose connection was still busy at their scheduled time
	errors   int             // transport errors and timeouts (no answer)
	firstErr error
	notSent  int // scheduled but not sent within -duration + grace
	newConns int // connections opened during the timed run (0: every request reused its connection)
	stores   storeCounts
	statuses map[int]int
	lastDone time.Time
}

// runLoad sends o.rate requests per second for o.duration over o.conns keep-alive connections,
// one goroutine per connection (a rawConn: see rawhttp.go). Request g
// (0, 1, 2, ...) is scheduled at start + g/rate and sent on connection g mod conns, so every
// connection sends every conns/rate seconds. The schedule is open-loop: a request whose
// connection is still busy at its scheduled time is sent as soon as the previous answer is in,
// and its latency is still counted from its scheduled time, so a stall of the server shows in
// every request it delayed (coordinated omission avoided). Each request is a GET or PUT of a sid
// drawn uniformly from PREFIX0..PREFIX<count-1>.
func runLoad(ctx context.Context, stdout io.Writer, o options, lo loadOptions) error {
	n := int(math.Round(float64(lo.rate) * lo.duration.Seconds()))
	if n < 1 {
		return fmt.Errorf("load: -rate %d for -duration %s schedules no request", lo.rate, lo.duration)
	}
	u, err := url.Parse(o.base)
	if err != nil {
		return err
	}
	path := strings.TrimSuffix(u.Path, "/") + "/v1/sessions/"
	sid := func(i int) string { return fmt.Sprintf("%s%d", o.prefix, i) }
	// Requests are built once; the run only picks one.
	gets := make([][]byte, o.count)
	for i := range gets {
		gets[i] = buildRequest(http.MethodGet, u.Host, path+sid(i), nil)
	}
	reqs := gets
	if lo.mode == "put" {
		expires := time.Now().Add(24 * time.Hour).UTC().Format("2006-01-02T15:04:05.000Z")
		reqs = make([][]byte, o.count)
		for i := range reqs {
			reqs[i] = buildRequest(http.MethodPut, u.Host, path+sid(i), Body(i, expires))
		}
	}
	want := map[string]int{"get": http.StatusOK, "put": http.StatusNoContent}[lo.mode]
	conns := make([]*rawConn, lo.conns)
	for c := range conns {
		conns[c] = &rawConn{addr: u.Host}
	}
	defer func() {
		for _, rc := range conns {
			rc.close()
		}
	}()

	// Open every connection with one untimed GET, so that the run measures requests on open
	// keep-alive connections.
	if _, err := each(ctx, lo.conns, lo.conns, func(ctx context.Context, c int) (string, error) {
		st, store, err := conns[c].do(ctx, gets[c%o.count], requestTimeout)
		if err == nil && st != http.StatusOK {
			err = fmt.Errorf("GET %s: status %d, want 200", sid(c%o.count), st)
		}
		return store, err
	}); err != nil {
		return fmt.Errorf("load: opening %d connections: %w", lo.conns, err)
	}
	for _, rc := range conns {
		rc.opened = 0
	}

	interval := func(g int) time.Duration {
		return time.Duration(int64(g) * int64(time.Second) / int64(lo.rate))
	}
	start := time.Now().Add(20 * time.Millisecond)
	cpuBefore, cpuErr := cpustat.Read()
	stopBy := start.Add(lo.duration + lo.grace)
	results := make([]loadResult, lo.conns)
	seed := uint64(time.Now().UnixNano())
	var wg sync.WaitGroup
	for c := range lo.conns {
		wg.Go(func() {
			r := &results[c]
			r.stores, r.statuses = storeCounts{}, map[int]int{}
			rng := rand.New(rand.NewPCG(seed, uint64(c)))
			rc := conns[c]
			defer func() { r.newConns = rc.opened }()
			var prevDone time.Time
			for g := c; g < n; g += lo.conns {
				due := start.Add(interval(g))
				if time.Now().After(stopBy) {
					r.notSent += (n-1-g)/lo.conns + 1
					break
				}
				sleepUntil(ctx, due)
				if ctx.Err() != nil {
					r.notSent += (n-1-g)/lo.conns + 1
					break
				}
				req := reqs[rng.IntN(o.count)]
				sent := time.Now()
				st, store, err := rc.do(ctx, req, requestTimeout)
				done := time.Now()
				if prevDone.After(due) {
					r.queued++
				}
				prevDone = done
				r.lastDone = done
				if err != nil {
					r.errors++
					if r.firstErr == nil {
						r.firstErr = err
					}
					continue
				}
				r.lat = append(r.lat, done.Sub(due))
				r.svc = append(r.svc, done.Sub(sent))
				r.late = append(r.late, sent.Sub(due))
				if store == "" {
					store = "none"
				}
				r.stores[store]++
				r.statuses[st]++
				if st != want && r.firstErr == nil {
					r.firstErr = fmt.Errorf("status %d, want %d", st, want)
				}
			}
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("load: interrupted: %w", err)
	}
	busy := "n/a"
	if cpuAfter, err := cpustat.Read(); cpuErr == nil && err == nil {
		if b, ok := cpustat.BusyPercent(cpuBefore, cpuAfter); ok {
			busy = b
		}
	}
	reportLoad(stdout, lo, n, start, busy, results)
	return nil
}

// reportLoad prints the run in words, then one "sessions: LOAD_RESULT key=value ..." line for
// bench/run.sh.
func reportLoad(w io.Writer, lo loadOptions, n int, start time.Time, busy string, results []loadResult) {
	var lat, svc, late []time.Duration
	stores, statuses := storeCounts{}, map[int]int{}
	errs, notSent, newConns, queued := 0, 0, 0, 0
	var firstErr error
	var last time.Time
	for _, r := range results {
		lat, svc, late = append(lat, r.lat...), append(svc, r.svc...), append(late, r.late...)
		for k, v := range r.stores {
			stores[k] += v
		}
		for k, v := range r.statuses {
			statuses[k] += v
		}
		errs += r.errors
		notSent += r.notSent
		newConns += r.newConns
		queued += r.queued
		if firstErr == nil {
			firstErr = r.firstErr
		}
		if r.lastDone.After(last) {
			last = r.lastDone
		}
	}
	answers := len(lat)
	non2xx := 0
	codes := make([]int, 0, len(statuses))
	for k, v := range statuses {
		codes = append(codes, k)
		if k < 200 || k > 299 {
			non2xx += v
		}
	}
	sort.Ints(codes)
	var st []string
	for _, k := range codes {
		st = append(st, fmt.Sprintf("%d:%d", k, statuses[k]))
	}
	var sc []string
	for _, k := range sortedKeys(stores) {
		sc = append(sc, fmt.Sprintf("%s:%d", k, stores[k]))
	}
	rate := 0.0
	if span := last.Sub(start); span > 0 {
		rate = float64(answers) / span.Seconds()
	}
	q := func(d []time.Duration) map[string]string {
		out := map[string]string{"p50": "n/a", "p90": "n/a", "p99": "n/a", "max": "n/a"}
		if len(d) == 0 {
			return out
		}
		slices.Sort(d)
		for _, k := range []struct {
			name string
			q    float64
		}{{"p50", 0.50}, {"p90", 0.90}, {"p99", 0.99}, {"max", 1}} {
			out[k.name] = fmt.Sprintf("%.3f", ms(quantile(d, k.q)))
		}
		return out
	}
	pl, ps, pt := q(lat), q(svc), q(late)
	fmt.Fprintf(w, "sessions: load %s: %d requests scheduled at %d/s for %s over %d keep-alive connections (%d opened during the run), achieved %.1f/s; answers %d, errors %d, not sent %d, non-2xx %d; X-Session-Store %s; status %s; CPU busy during the run %s%% of all cores (this helper included)\n",
		lo.mode, n, lo.rate, lo.duration, lo.conns, newConns, rate, answers, errs, notSent, non2xx, stores, strings.Join(st, " "), busy)
	fmt.Fprintf(w, "sessions: load %s: latency from the scheduled send to the full answer p50 %s, p90 %s, p99 %s, max %s ms; from the actual send p50 %s, p99 %s ms; sends behind schedule p50 %s, p99 %s, max %s ms; requests whose connection was still busy at their scheduled time: %d\n",
		lo.mode, pl["p50"], pl["p90"], pl["p99"], pl["max"], ps["p50"], ps["p99"], pt["p50"], pt["p99"], pt["max"], queued)
	if firstErr != nil {
		fmt.Fprintf(w, "sessions: load %s: first error: %v\n", lo.mode, firstErr)
	}
	fmt.Fprintf(w, "sessions: LOAD_RESULT mode=%s target_rate=%d rate=%.1f conns=%d duration=%s requests=%d answers=%d errors=%d not_sent=%d non2xx=%d new_conns=%d queued=%d stores=%s statuses=%s p50_ms=%s p90_ms=%s p99_ms=%s max_ms=%s send_p50_ms=%s send_p99_ms=%s behind_p50_ms=%s behind_p99_ms=%s behind_max_ms=%s cpu_busy=%s\n",
		lo.mode, lo.rate, rate, lo.conns, lo.duration, n, answers, errs, notSent, non2xx, newConns, queued,
		orNone(strings.Join(sc, ",")), orNone(strings.Join(st, ",")), pl["p50"], pl["p90"], pl["p99"], pl["max"],
		ps["p50"], ps["p99"], pt["p50"], pt["p99"], pt["max"], busy)
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

func sortedKeys(c storeCounts) []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// quantile is the nearest-rank q-quantile of sorted (not empty).
func quantile(sorted []time.Duration, q float64) time.Duration {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
