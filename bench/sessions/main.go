// Command sessions prepares and checks cachecar's session benchmarks (h, i and j of
// bench/run.sh): it waits until /health/detailed reports the wanted session store, writes a set
// of sessions through PUT /v1/sessions/{sid}, checks a random sample through GET (status 200 and
// the X-Session-Store the run is about), and deletes them again. With -load get or -load put it
// also sends a timed, open-loop load at a fixed rate (-rate, -duration, -conns: see load.go);
// the closed-loop, saturating load of bench/run.sh is wrk's (bench/session_get.lua,
// bench/session_put.lua).
//
// Session ids are PREFIX0 .. PREFIX<count-1>, as the wrk scripts build them.
//
// Steps, in this order, each only when asked for: -store (wait), -put, -verify, -load, -delete.
// Every line it prints starts with "sessions: ".
package main

import (
	"bytes"
	"context"
	"encoding/json"
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
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "sessions:", err)
		os.Exit(1)
	}
}

type options struct {
	base, health, store, prefix string
	count, concurrency, verify  int
	put, del                    bool
	waitTimeout, timeout        time.Duration
	load                        loadOptions
}

var sidRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,256}$`)

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var o options
	fs := flag.NewFlagSet("sessions", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.base, "base", "", "cachecar's read port, e.g. http://127.0.0.1:8080")
	fs.StringVar(&o.health, "health", "", "cachecar's health port, e.g. http://127.0.0.1:8081 (with -store)")
	fs.StringVar(&o.store, "store", "", `session store to wait for on /health/detailed and to require in -verify: "valkey" (sessions up, store valkey) or "postgres" (store postgres while redis is not up: Valkey unreachable)`)
	fs.DurationVar(&o.waitTimeout, "wait-timeout", 30*time.Second, "how long to wait for -store")
	fs.StringVar(&o.prefix, "prefix", "", "session id prefix; ids are PREFIX0..PREFIX<count-1>")
	fs.IntVar(&o.count, "count", 2000, "sessions")
	fs.IntVar(&o.concurrency, "concurrency", 16, "requests in flight for -put and -delete")
	fs.BoolVar(&o.put, "put", false, "PUT every session (a realistic express-session body, cookie expiring a day ahead)")
	fs.IntVar(&o.verify, "verify", 0, "GET this many random sessions of the set and require 200 and, with -store, X-Session-Store: STORE")
	fs.BoolVar(&o.del, "delete", false, "DELETE every session of the set (absent ones too)")
	fs.StringVar(&o.load.mode, "load", "", `"get" or "put": after -verify, send GETs or PUTs of random sessions of the set at a fixed rate (open loop) and print their latency from each request's scheduled send time`)
	fs.IntVar(&o.load.rate, "rate", 0, fmt.Sprintf("-load: requests per second over all connections (default %d for get, %d for put)", defaultGetRate, defaultPutRate))
	fs.DurationVar(&o.load.duration, "duration", 10*time.Second, "-load: how long the schedule runs")
	fs.IntVar(&o.load.conns, "conns", 50, "-load: keep-alive connections, one goroutine each; the rate is spread evenly over them")
	fs.DurationVar(&o.load.grace, "grace", 5*time.Second, "-load: a request not sent by -duration + -grace is counted as not sent")
	fs.DurationVar(&o.timeout, "timeout", 2*time.Minute, "upper bound of the whole run, to which -load adds -duration and -grace")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	for _, u := range []string{o.base, o.health} {
		if err := checkLoopbackURL(u); err != nil {
			return err
		}
	}
	switch o.store {
	case "", "valkey", "postgres":
	default:
		return fmt.Errorf("-store %q: want valkey or postgres", o.store)
	}
	if o.store != "" && o.health == "" && o.verify == 0 {
		return errors.New("-store needs -health (to wait) or -verify (to check)")
	}
	if (o.put || o.verify > 0 || o.del) && (o.base == "" || o.count < 1 || !sidRE.MatchString(o.prefix+fmt.Sprint(o.count-1))) {
		return errors.New("-put, -verify and -delete need -base, -count >= 1 and a -prefix of [A-Za-z0-9_.-]")
	}
	switch o.load.mode {
	case "":
	case "get", "put":
		if o.load.rate == 0 {
			o.load.rate = map[string]int{"get": defaultGetRate, "put": defaultPutRate}[o.load.mode]
		}
		if o.load.rate < 1 || o.load.conns < 1 || o.load.duration <= 0 || o.load.grace < 0 {
			return fmt.Errorf("-load: want -rate >= 1, -conns >= 1, -duration > 0 and -grace >= 0 (got %d, %d, %s, %s)",
				o.load.rate, o.load.conns, o.load.duration, o.load.grace)
		}
		if o.base == "" || o.count < 1 || !sidRE.MatchString(o.prefix+fmt.Sprint(o.count-1)) {
			return errors.New("-load needs -base, -count >= 1 and a -prefix of [A-Za-z0-9_.-]")
		}
	default:
		return fmt.Errorf("-load %q: want get or put", o.load.mode)
	}
	if o.concurrency < 1 {
		return fmt.Errorf("-concurrency %d: must be at least 1", o.concurrency)
	}
	if o.load.mode != "" {
		o.timeout += o.load.duration + o.load.grace
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: o.concurrency, Proxy: nil},
	}

	if o.store != "" && o.health != "" {
		start := time.Now()
		st, err := waitStore(ctx, client, strings.TrimSuffix(o.health, "/")+"/health/detailed", o.store, o.waitTimeout)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "sessions: /health/detailed shows sessions %s, store %s (redis %s) after %s\n",
			st.Sessions.Status, st.Sessions.Store, st.Redis.Status, time.Since(start).Round(time.Millisecond))
	}
	base := strings.TrimSuffix(o.base, "/") + "/v1/sessions/"
	sid := func(i int) string { return fmt.Sprintf("%s%d", o.prefix, i) }

	if o.put {
		start := time.Now()
		expires := time.Now().Add(24 * time.Hour).UTC().Format("2006-01-02T15:04:05.000Z")
		var size counter
		c, err := each(ctx, o.count, o.concurrency, func(ctx context.Context, i int) (string, error) {
			b := Body(i, expires)
			size.add(len(b))
			st, store, err := do(ctx, client, http.MethodPut, base+sid(i), b)
			if err == nil && st != http.StatusNoContent {
				err = fmt.Errorf("PUT %s: status %d, want 204", sid(i), st)
			}
			return store, err
		})
		if err != nil {
			return fmt.Errorf("put: %w", err)
		}
		fmt.Fprintf(stdout, "sessions: put %d sessions (%s0..%s; body %d..%d bytes) in %s, X-Session-Store %s\n",
			o.count, o.prefix, sid(o.count-1), size.min, size.max, time.Since(start).Round(time.Millisecond), c)
	}

	if o.verify > 0 {
		n := min(o.verify, o.count)
		ids := rand.Perm(o.count)[:n]
		start := time.Now()
		c, err := each(ctx, n, o.concurrency, func(ctx context.Context, k int) (string, error) {
			st, store, err := do(ctx, client, http.MethodGet, base+sid(ids[k]), nil)
			if err == nil && st != http.StatusOK {
				err = fmt.Errorf("GET %s: status %d, want 200", sid(ids[k]), st)
			}
			return store, err
		})
		if err != nil {
			return fmt.Errorf("verify: %w", err)
		}
		fmt.Fprintf(stdout, "sessions: verify %d random sessions of the %d: all 200 in %s, X-Session-Store %s\n",
			n, o.count, time.Since(start).Round(time.Millisecond), c)
		if o.store != "" && c[o.store] != n {
			return fmt.Errorf("verify: %d of %d sampled GETs answered X-Session-Store %s (%s)", c[o.store], n, o.store, c)
		}
	}

	if o.load.mode != "" {
		if err := runLoad(ctx, stdout, o, o.load); err != nil {
			return err
		}
	}

	if o.del {
		start := time.Now()
		c, err := each(ctx, o.count, o.concurrency, func(ctx context.Context, i int) (string, error) {
			st, store, err := do(ctx, client, http.MethodDelete, base+sid(i), nil)
			if err == nil && st != http.StatusNoContent {
				err = fmt.Errorf("DELETE %s: status %d, want 204", sid(i), st)
			}
			return store, err
		})
		if err != nil {
			return fmt.Errorf("delete: %w", err)
		}
		fmt.Fprintf(stdout, "sessions: deleted %d sessions in %s, X-Session-Store %s\n",
			o.count, time.Since(start).Round(time.Millisecond), c)
	}
	return nil
}

// Body is session i's express-session JSON (about 400 bytes): a cookie expiring at expires (an
// ISO date, as express-session serialises cookie.expires), a passport user, a profile, a cart.
// bench/session_put.lua builds the same shape.
func Body(i int, expires string) []byte {
	return fmt.Appendf(nil, `{"cookie":{"originalMaxAge":86400000,"expires":%q,"secure":false,"httpOnly":true,"path":"/","sameSite":"lax"},`+
		`"passport":{"user":"u%06d"},"user":{"id":"u%06d","name":"Bench User %d","email":"user%d@example.test","roles":["student"],"tenant":%d},`+
		`"cart":[{"course":%d,"qty":1,"price":4900},{"course":%d,"qty":1,"price":12900}],`+
		`"csrfSecret":"%016x","flash":{},"views":%d}`,
		expires, i, i, i, i, 1+i%10, 1+i%5000, 1+(i*7+13)%5000, uint64(i)*0x9e3779b97f4a7c15, i%50)
}

type counter struct {
	mu       sync.Mutex
	min, max int
}

func (c *counter) add(n int) {
	c.mu.Lock()
	if c.min == 0 || n < c.min {
		c.min = n
	}
	c.max = max(c.max, n)
	c.mu.Unlock()
}

// storeCounts counts answers by X-Session-Store ("none" when absent).
type storeCounts map[string]int

func (c storeCounts) String() string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%d", k, c[k]))
	}
	return strings.Join(parts, " ")
}

// each runs f for 0..n-1 with concurrency calls in flight and counts the stores they return; it
// stops at the first error.
func each(ctx context.Context, n, concurrency int, f func(context.Context, int) (string, error)) (storeCounts, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	work := make(chan int)
	var (
		mu     sync.Mutex
		counts = storeCounts{}
		wg     sync.WaitGroup
	)
	for range concurrency {
		wg.Go(func() {
			for i := range work {
				store, err := f(ctx, i)
				if err != nil {
					cancel(err)
					return
				}
				if store == "" {
					store = "none"
				}
				mu.Lock()
				counts[store]++
				mu.Unlock()
			}
		})
	}
feed:
	for i := 0; i < n; i++ {
		select {
		case work <- i:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return counts, err
	}
	return counts, ctx.Err()
}

// do sends one request and returns its status and X-Session-Store; the body is read and dropped
// so that the connection is reused.
func do(ctx context.Context, client *http.Client, method, u string, body []byte) (int, string, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return 0, "", err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return 0, "", fmt.Errorf("read body: %w", err)
	}
	return resp.StatusCode, resp.Header.Get("X-Session-Store"), nil
}

type service struct {
	Status string `json:"status"`
	Store  string `json:"store"`
}

type detailed struct {
	Sessions service
	Redis    service
}

// waitStore polls /health/detailed until the sessions report want: for valkey, status up and
// store valkey (reconciled); for postgres, store postgres while redis is not up, so that reads
// go to PostgreSQL because Valkey is unreachable, not merely before a first reconciliation.
func waitStore(ctx context.Context, client *http.Client, u, want string, timeout time.Duration) (detailed, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last := "no answer"
	for {
		st, err := readDetailed(ctx, client, u)
		if err == nil {
			ok := st.Sessions.Store == want && st.Sessions.Status != "down" &&
				((want == "valkey" && st.Sessions.Status == "up") || (want == "postgres" && st.Redis.Status != "up"))
			if ok {
				return st, nil
			}
			last = fmt.Sprintf("sessions %q store %q, redis %q", st.Sessions.Status, st.Sessions.Store, st.Redis.Status)
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return st, fmt.Errorf("%s did not show the sessions' store %s within %s (last: %s)", u, want, timeout, last)
		case <-tick.C:
		}
	}
}

// readDetailed reads /health/detailed; it answers 503 with the same body while PostgreSQL is
// down, so any status with a JSON body is taken.
func readDetailed(ctx context.Context, client *http.Client, u string) (detailed, error) {
	var out detailed
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return out, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return out, err
	}
	defer resp.Body.Close()
	var body struct {
		Services map[string]service `json:"services"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return out, fmt.Errorf("status %d: %w", resp.StatusCode, err)
	}
	s, ok := body.Services["sessions"]
	if !ok {
		return out, fmt.Errorf("status %d: no sessions service in the answer", resp.StatusCode)
	}
	out.Sessions, out.Redis = s, body.Services["redis"]
	return out, nil
}

// checkLoopbackURL refuses a URL whose host is not a loopback address: the benchmark loads only
// this machine.
func checkLoopbackURL(raw string) error {
	if raw == "" {
		return nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		return err
	}
	ip := net.ParseIP(u.Hostname())
	if u.Scheme != "http" || ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("%s: want http://<loopback IP>:<port>", raw)
	}
	return nil
}
