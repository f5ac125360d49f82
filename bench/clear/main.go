// Command clear puts many keys into one of cachecar's key spaces straight into Redis and clears
// them through cachecar's admin port, recording when each clear ran, so that the latency of a
// read load running meanwhile can be taken over the clears alone: scenario o of bench/run.sh
// (issue 7: a clear of 100,000 keys keeps the read path's p99 within 2x of its idle value).
//
// It has three modes:
//
//   - -fill: SETs the keys <namespace><prefix>1 .. <namespace><prefix><keys> (a small JSON value
//     each, with -ttl), pipelined over one valkey-go client, without going through cachecar.
//   - -for D: after -after, clears -pattern through POST /api/admin/cache/clear (bearer token
//     from -token-file, never on the command line), then, while another round fits in D from its
//     start, fills the keys again, waits -settle, and clears again. Each clear's start and end
//     (Unix nanoseconds, wall clock, taken just before the request and just after its answer)
//     go to -windows, one clear a line. The fills are not in the windows: only the clears are
//     measured.
//   - -analyze: reads bench/rate's -samples file and -windows, and prints the latency quantiles
//     of the requests whose scheduled send time falls inside a clear, and of the others.
//
// Every line it prints starts with "clear: "; the last is a FILL_RESULT, CLEAR_RESULT or
// WINDOW_RESULT line of key=value fields for bench/run.sh.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "clear:", err)
		os.Exit(1)
	}
}

// options are the command line, validated.
type options struct {
	fill     bool          // -fill mode
	span     time.Duration // -for: the clear loop's span (0: not that mode)
	analyze  bool          // -analyze mode
	redis    redisOptions  // -fill and -for
	admin    string        // cachecar's admin port, http://<loopback IP>:<port>
	token    string        // read from -token-file
	pattern  string        // the clear's pattern, without the namespace
	after    time.Duration // before the first clear
	settle   time.Duration // between a fill and the clear after it
	windows  string        // the clears' windows: written by -for, read by -analyze
	samples  string        // bench/rate's -samples file, read by -analyze
	deadline time.Duration // bounds the whole run
}

// redisOptions say where the keys go and what they are.
type redisOptions struct {
	addr, password string
	db             int
	namespace      string        // cachecar's CACHECAR_NAMESPACE
	prefix         string        // the key space's literal prefix, e.g. "dispatch:"
	keys           int           // keys <namespace><prefix>1 .. <namespace><prefix><keys>
	ttl            time.Duration // each key's TTL, in case nothing clears it
}

func parseFlags(args []string, getenv func(string) string, stderr io.Writer) (options, error) {
	var o options
	var tokenFile string
	fs := flag.NewFlagSet("clear", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.BoolVar(&o.fill, "fill", false, "put the keys into Redis and exit")
	fs.DurationVar(&o.span, "for", 0, "clear, then fill and clear again while another round fits in this span from the start")
	fs.BoolVar(&o.analyze, "analyze", false, "read -samples and -windows and print the latency of the requests due during a clear")
	host, port := getenv("REDIS_HOST"), getenv("REDIS_PORT")
	if host == "" {
		host = "127.0.0.1"
	}
	if port == "" {
		port = "6379"
	}
	fs.StringVar(&o.redis.addr, "redis-addr", net.JoinHostPort(host, port), "host:port of cachecar's Redis/Valkey (default $REDIS_HOST:$REDIS_PORT)")
	fs.StringVar(&o.redis.password, "redis-password", getenv("REDIS_PASSWORD"), "Redis password (default $REDIS_PASSWORD)")
	fs.IntVar(&o.redis.db, "redis-db", 0, "Redis logical database cachecar uses")
	fs.StringVar(&o.redis.namespace, "namespace", "", "cachecar's namespace (CACHECAR_NAMESPACE), e.g. bench:1a2b:")
	fs.StringVar(&o.redis.prefix, "prefix", "dispatch:", "the key space's prefix: keys are <namespace><prefix><n>")
	fs.IntVar(&o.redis.keys, "keys", 100000, "how many keys: n from 1 to this")
	fs.DurationVar(&o.redis.ttl, "ttl", 10*time.Minute, "each key's TTL")
	fs.StringVar(&o.admin, "admin", "", "cachecar's admin port, http://<loopback IP>:<port>")
	fs.StringVar(&tokenFile, "token-file", "", "file holding the admin port's bearer token")
	fs.StringVar(&o.pattern, "pattern", "", "the clear's pattern, without the namespace (default <prefix>*)")
	fs.DurationVar(&o.after, "after", 500*time.Millisecond, "-for: wait this long before the first clear (the read load's start)")
	fs.DurationVar(&o.settle, "settle", 500*time.Millisecond, "-for: wait this long after a fill before its clear")
	fs.StringVar(&o.windows, "windows", "", "the clears' windows, one \"<start Unix ns> <end Unix ns>\" a line: written by -for, read by -analyze")
	fs.StringVar(&o.samples, "samples", "", "-analyze: bench/rate's -samples file")
	fs.DurationVar(&o.deadline, "timeout", 5*time.Minute, "upper bound of the whole run")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	modes := 0
	for _, on := range []bool{o.fill, o.span > 0, o.analyze} {
		if on {
			modes++
		}
	}
	if modes != 1 || o.span < 0 {
		return o, errors.New("want exactly one of -fill, -for <positive duration> and -analyze")
	}
	if o.pattern == "" {
		o.pattern = o.redis.prefix + "*"
	}
	switch {
	case o.analyze:
		if o.samples == "" || o.windows == "" {
			return o, errors.New("-analyze needs -samples and -windows")
		}
		return o, nil
	case o.redis.keys < 1 || o.redis.prefix == "" || o.redis.ttl < time.Second:
		return o, fmt.Errorf("want -keys >= 1, a -prefix and -ttl >= 1s (got %d, %q, %s)", o.redis.keys, o.redis.prefix, o.redis.ttl)
	case o.fill:
		return o, nil
	}
	if o.windows == "" {
		return o, errors.New("-for needs -windows")
	}
	if !loopbackURL(o.admin) {
		return o, fmt.Errorf("-admin %q: want http://<loopback IP>:<port>", o.admin)
	}
	if tokenFile == "" {
		return o, errors.New("-for needs -token-file")
	}
	b, err := os.ReadFile(tokenFile)
	if err != nil {
		return o, fmt.Errorf("token file: %w", err)
	}
	if o.token = strings.TrimSpace(string(b)); o.token == "" {
		return o, fmt.Errorf("token file %s is empty", tokenFile)
	}
	return o, nil
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, getenv, stderr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, o.deadline+o.span)
	defer cancel()
	switch {
	case o.analyze:
		return analyzeFiles(o.samples, o.windows, stdout)
	case o.fill:
		vk, err := connect(o.redis)
		if err != nil {
			return err
		}
		defer vk.Close()
		took, err := fill(ctx, vk, o.redis)
		if err != nil {
			return err
		}
		// A clear's SCAN walks every key of the database, not only the pattern's.
		dbsize, err := vk.Do(ctx, vk.B().Dbsize().Build()).AsInt64()
		if err != nil {
			return fmt.Errorf("dbsize: %w", err)
		}
		fmt.Fprintf(stdout, "clear: filled %d keys %s1..%d (TTL %s) in %.0f ms (%.0f keys/s); the database holds %d keys\n",
			o.redis.keys, o.redis.namespace+o.redis.prefix, o.redis.keys, o.redis.ttl, ms(took), float64(o.redis.keys)/took.Seconds(), dbsize)
		fmt.Fprintf(stdout, "clear: FILL_RESULT keys=%d fill_ms=%.1f dbsize=%d\n", o.redis.keys, ms(took), dbsize)
		return nil
	default:
		vk, err := connect(o.redis)
		if err != nil {
			return err
		}
		defer vk.Close()
		return clearLoop(ctx, o, vk, stdout)
	}
}

// loopbackURL reports whether raw is http://<loopback IP>:<port>: the benchmark loads only this
// machine.
func loopbackURL(raw string) bool {
	u, err := url.Parse(raw)
	if err != nil {
		return false
	}
	ip := net.ParseIP(u.Hostname())
	return u.Scheme == "http" && ip != nil && ip.IsLoopback() && u.Port() != ""
}

// ms is d in milliseconds.
func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
