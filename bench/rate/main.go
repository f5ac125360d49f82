// Command rate sends GETs at a fixed rate (open loop) over keep-alive connections and prints
// their latency, each counted from its scheduled send time: the fixed-rate runs of scenarios a
// and c of bench/run.sh (GET /v1/courses/{id} on random ids, against bench/fixedjson and
// against cachecar's in-process tier).
//
// Request g (0, 1, 2, ...) is due at start + g/rate and goes on connection g mod -conns, so the
// rate is spread evenly and each connection sends every conns/rate seconds (5 ms at 10000/s
// over 50). The schedule does not wait for the server: a request whose connection is still busy
// at its due time goes out as soon as the previous answer is in, and its latency still counts
// from its due time, to the last byte of the answer, so a stall of the server shows in every
// request it delayed (coordinated omission avoided). A request not sent within -grace after the
// schedule's end is counted as not sent, one without an answer within 10 s as an error.
//
// It is wrk-like inside: one goroutine, one epoll set over the connections' sockets, prepared
// requests and answers parsed only for their end, status and one header (loop_linux.go). A
// goroutine per connection, as in bench/sessions -load, took more CPU at 10000/s on 2 shared
// cores and measured a bare server's p99 several times higher (see bench/README.md). Linux
// only.
//
// -path may hold "{id}": each request then picks an id uniformly from -first..-last. The
// answers are counted by status and by the value of -header (X-Cache by default).
//
// -samples FILE writes, after the run, one line per answer: its scheduled send time (Unix
// nanoseconds, wall clock), its latency from then (nanoseconds) and its status, in the order the
// answers came, so that another program can take the quantiles of a part of the run (scenario o:
// the requests due while a clear of the cache ran; see bench/clear).
//
// Every line it prints starts with "rate: "; the last is
//
//	rate: LOAD_RESULT target_rate=N rate=F ... p99_ms=F ... self_cpu_pct=F ncpu=N
//
// for bench/run.sh.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "rate:", err)
		os.Exit(1)
	}
}

// requestTimeout bounds one request, from the dial or the write to the answer's end: one that
// takes longer counts as an error.
const requestTimeout = 10 * time.Second

type options struct {
	addr, path, header string // addr: host:port of -base
	first, last        int
	rate, conns, want  int
	duration, grace    time.Duration
	timeout            time.Duration
	samples            string // -samples: where to write every answer's due time and latency ("": nowhere)
}

// requests is how many requests the schedule holds: rate x duration, rounded.
func (o options) requests() int {
	return int(math.Round(float64(o.rate) * o.duration.Seconds()))
}

// result is a whole run.
type result struct {
	start    time.Time // the first scheduled send
	requests int       // scheduled
	lat      []time.Duration
	due      []time.Time     // each answer's scheduled send time, in the order of lat
	status   []int           // each answer's status, in the order of lat
	svc      []time.Duration // from the actual send to the full answer
	late     []time.Duration // actual send minus scheduled send
	queued   int             // requests whose connection was still busy at their due time
	errors   int             // transport errors, unparsable answers and timeouts (no answer)
	firstErr error           // the first error, or the first status other than -want
	notSent  int             // scheduled but not sent within -duration + -grace
	newConns int             // connections opened during the run (0: every request reused its connection)
	values   map[string]int  // answers by the -header value ("none" when absent)
	statuses map[int]int
	lastDone time.Time // the end of the last answer
	// cpuBusy is the percent of all of the machine's CPU time spent busy during the run (this
	// process included), from /proc/stat, "n/a" when unknown; selfCPU is this process's user
	// and system CPU time during the run (-1: unknown), wall the run's wall time.
	cpuBusy       string
	selfCPU, wall time.Duration
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var o options
	var base string
	fs := flag.NewFlagSet("rate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&base, "base", "", "the server, http://<loopback IP>:<port>")
	fs.StringVar(&o.path, "path", "/v1/courses/{id}", `the path of every GET; "{id}" is replaced by a random id from -first..-last`)
	fs.IntVar(&o.first, "first", 1, "lowest id for {id}")
	fs.IntVar(&o.last, "last", 5000, "highest id for {id}")
	fs.IntVar(&o.rate, "rate", 10000, "requests per second over all connections")
	fs.IntVar(&o.conns, "conns", 50, "keep-alive connections; the rate is spread evenly over them")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "how long the schedule runs")
	fs.DurationVar(&o.grace, "grace", 5*time.Second, "a request not sent by -duration + -grace is counted as not sent")
	fs.StringVar(&o.header, "header", "X-Cache", "answers are counted by this header's value (none when absent)")
	fs.IntVar(&o.want, "want", http.StatusOK, "the status every answer should have (the first other one is printed; non-2xx count as errors in bench/run.sh)")
	fs.DurationVar(&o.timeout, "timeout", time.Minute, "upper bound of the run besides -duration and -grace (opening the connections)")
	fs.StringVar(&o.samples, "samples", "", `after the run, write one line per answer to this file: "<scheduled send, Unix ns> <latency from it, ns> <status>"`)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	u, err := loopbackURL(base)
	if err != nil {
		return err
	}
	o.addr = u.Host
	if o.rate < 1 || o.conns < 1 || o.duration <= 0 || o.grace < 0 {
		return fmt.Errorf("want -rate >= 1, -conns >= 1, -duration > 0 and -grace >= 0 (got %d, %d, %s, %s)",
			o.rate, o.conns, o.duration, o.grace)
	}
	if o.requests() < 1 {
		return fmt.Errorf("-rate %d for -duration %s schedules no request", o.rate, o.duration)
	}
	if !strings.HasPrefix(o.path, "/") {
		return fmt.Errorf("-path %q: want an absolute path", o.path)
	}
	paths := []string{o.path}
	if strings.Contains(o.path, "{id}") {
		if o.first > o.last {
			return fmt.Errorf("-first %d > -last %d", o.first, o.last)
		}
		paths = make([]string, 0, o.last-o.first+1)
		for id := o.first; id <= o.last; id++ {
			paths = append(paths, strings.ReplaceAll(o.path, "{id}", strconv.Itoa(id)))
		}
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout+o.duration+o.grace)
	defer cancel()

	// Requests are built once; the run only picks one.
	prefix := strings.TrimSuffix(u.Path, "/")
	reqs := make([][]byte, len(paths))
	for i, p := range paths {
		reqs[i] = fmt.Appendf(nil, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: cachecar-bench-rate\r\n\r\n", prefix+p, u.Host)
	}
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0))
	res, err := runLoad(ctx, o, reqs, rng.IntN)
	if err != nil {
		return err
	}
	// Before report, which sorts the latencies in place.
	if o.samples != "" {
		if err := writeSamples(o.samples, res); err != nil {
			return err
		}
	}
	report(stdout, o, len(paths) > 1, res)
	return nil
}

// writeSamples writes every answer's scheduled send time (Unix nanoseconds), latency from it
// (nanoseconds) and status to path, one answer a line, in the order the answers came.
func writeSamples(path string, r *result) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("samples: %w", err)
	}
	w := bufio.NewWriterSize(f, 1<<16)
	var line []byte
	for i, d := range r.lat {
		line = strconv.AppendInt(line[:0], r.due[i].UnixNano(), 10)
		line = append(line, ' ')
		line = strconv.AppendInt(line, int64(d), 10)
		line = append(line, ' ')
		line = strconv.AppendInt(line, int64(r.status[i]), 10)
		line = append(line, '\n')
		w.Write(line)
	}
	err = w.Flush()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("samples: %w", err)
	}
	return nil
}

// report prints the run in words, then one "rate: LOAD_RESULT key=value ..." line.
func report(w io.Writer, o options, ids bool, r *result) {
	answers := len(r.lat)
	non2xx := 0
	codes := make([]int, 0, len(r.statuses))
	for k, v := range r.statuses {
		codes = append(codes, k)
		if k < 200 || k > 299 {
			non2xx += v
		}
	}
	sort.Ints(codes)
	st := make([]string, 0, len(codes))
	for _, k := range codes {
		st = append(st, fmt.Sprintf("%d:%d", k, r.statuses[k]))
	}
	values := make([]string, 0, len(r.values))
	for k := range r.values {
		values = append(values, k)
	}
	sort.Strings(values)
	for i, k := range values {
		values[i] = fmt.Sprintf("%s:%d", k, r.values[k])
	}
	rate := 0.0
	if span := r.lastDone.Sub(r.start); span > 0 {
		rate = float64(answers) / span.Seconds()
	}
	// This program's CPU over the run as a percent of one core: what the load generator took
	// from the server on the shared cores.
	self := "n/a"
	if r.selfCPU >= 0 && r.wall > 0 {
		self = fmt.Sprintf("%.1f", 100*r.selfCPU.Seconds()/r.wall.Seconds())
	}
	lat, svc, late := quantiles(r.lat), quantiles(r.svc), quantiles(r.late)
	what := o.path
	if ids {
		what += fmt.Sprintf(" ({id} uniform in %d..%d)", o.first, o.last)
	}
	fmt.Fprintf(w, "rate: GET %s: %d requests scheduled at %d/s for %s over %d keep-alive connections (%d opened during the run), achieved %.1f/s; answers %d, errors %d, not sent %d, non-2xx %d; %s %s; status %s\n",
		what, r.requests, o.rate, o.duration, o.conns, r.newConns, rate, answers, r.errors, r.notSent, non2xx,
		o.header, orNone(strings.Join(values, " ")), orNone(strings.Join(st, " ")))
	fmt.Fprintf(w, "rate: latency from the scheduled send to the full answer p50 %s, p90 %s, p99 %s, max %s ms; from the actual send p50 %s, p99 %s ms; sends behind schedule p50 %s, p99 %s, max %s ms; requests whose connection was still busy at their scheduled time: %d\n",
		lat[0], lat[1], lat[2], lat[3], svc[0], svc[2], late[0], late[2], late[3], r.queued)
	fmt.Fprintf(w, "rate: CPU busy during the run %s%% of all %d cores (this program included); this program used %s%% of one core (%.2f s of CPU in %.2f s)\n",
		r.cpuBusy, runtime.NumCPU(), self, max(r.selfCPU, 0).Seconds(), r.wall.Seconds())
	if r.firstErr != nil {
		fmt.Fprintf(w, "rate: first error: %v\n", r.firstErr)
	}
	fmt.Fprintf(w, "rate: LOAD_RESULT target_rate=%d rate=%.1f conns=%d duration=%s requests=%d answers=%d errors=%d not_sent=%d non2xx=%d new_conns=%d queued=%d header=%s values=%s statuses=%s p50_ms=%s p90_ms=%s p99_ms=%s max_ms=%s send_p50_ms=%s send_p99_ms=%s behind_p50_ms=%s behind_p99_ms=%s behind_max_ms=%s cpu_busy=%s self_cpu_pct=%s ncpu=%d\n",
		o.rate, rate, o.conns, o.duration, r.requests, answers, r.errors, r.notSent, non2xx, r.newConns, r.queued,
		o.header, orNone(strings.Join(values, ",")), orNone(strings.Join(st, ",")), lat[0], lat[1], lat[2], lat[3],
		svc[0], svc[2], late[0], late[2], late[3], r.cpuBusy, self, runtime.NumCPU())
}

// quantiles are p50, p90, p99 and max of d (sorted in place) in milliseconds, nearest rank,
// "n/a" when d is empty.
func quantiles(d []time.Duration) [4]string {
	out := [4]string{"n/a", "n/a", "n/a", "n/a"}
	if len(d) == 0 {
		return out
	}
	slices.Sort(d)
	for k, q := range []float64{0.50, 0.90, 0.99, 1} {
		i := int(math.Ceil(q*float64(len(d)))) - 1
		out[k] = fmt.Sprintf("%.3f", float64(d[min(max(i, 0), len(d)-1)])/float64(time.Millisecond))
	}
	return out
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// loopbackURL parses raw and refuses a URL whose host is not a loopback IP with a port: the
// benchmark loads only this machine.
func loopbackURL(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, err
	}
	ip := net.ParseIP(u.Hostname())
	if u.Scheme != "http" || ip == nil || !ip.IsLoopback() || u.Port() == "" {
		return nil, fmt.Errorf("-base %q: want http://<loopback IP>:<port>", raw)
	}
	return u, nil
}
