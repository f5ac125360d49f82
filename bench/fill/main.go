// Command fill fills a cachecar's caches before the memory scenario (m) of bench/run.sh: it
// requests every id of one or more paths, -passes times over, with -concurrency requests in
// flight. The first pass misses and fills Valkey; the second reads every key back from Valkey
// through the in-process tier, which keeps what fits (a key enters the tier when it is read,
// not when it is written), so that after two passes the tier holds as much as its size allows.
//
//	fill -base http://127.0.0.1:8080 -path '/v1/dispatches/{id}=1-200000' -path '/v1/tenants/{id}=1-50'
//
// It fails on the first answer that is not 200. Every line it prints starts with "fill: ".
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"iter"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cachecar/cachecar/bench/internal/httppass"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "fill:", err)
		os.Exit(1)
	}
}

// pathRange is one -path: a pattern with {id} and the ids to put there.
type pathRange struct {
	pattern     string
	first, last int
}

func (p pathRange) String() string { return fmt.Sprintf("%s=%d-%d", p.pattern, p.first, p.last) }

func parsePath(s string) (pathRange, error) {
	pattern, ids, ok := strings.Cut(s, "=")
	if !ok || !strings.HasPrefix(pattern, "/") || strings.Count(pattern, "{id}") != 1 {
		return pathRange{}, fmt.Errorf("-path %q: want /path/{id}=FIRST-LAST", s)
	}
	a, b, ok := strings.Cut(ids, "-")
	first, err1 := strconv.Atoi(a)
	last, err2 := strconv.Atoi(b)
	if !ok || err1 != nil || err2 != nil || first < 1 || last < first {
		return pathRange{}, fmt.Errorf("-path %q: bad id range %q", s, ids)
	}
	return pathRange{pattern: pattern, first: first, last: last}, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("fill", flag.ContinueOnError)
	fs.SetOutput(stderr)
	base := fs.String("base", "", "base URL of cachecar's read API, e.g. http://127.0.0.1:8080")
	var paths []pathRange
	fs.Func("path", "/path/{id}=FIRST-LAST to request for every id in FIRST..LAST (repeatable)", func(s string) error {
		p, err := parsePath(s)
		if err == nil {
			paths = append(paths, p)
		}
		return err
	})
	passes := fs.Int("passes", 2, "times every path is requested")
	concurrency := fs.Int("concurrency", 16, "requests in flight")
	timeout := fs.Duration("timeout", 10*time.Minute, "upper bound of the whole run")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case fs.NArg() > 0:
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	case *base == "" || len(paths) == 0:
		return errors.New("set -base and at least one -path")
	case *passes < 1 || *concurrency < 1:
		return errors.New("-passes and -concurrency must be positive")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: *concurrency},
	}
	prefix := strings.TrimSuffix(*base, "/")
	total := 0
	names := make([]string, len(paths))
	for i, p := range paths {
		total += p.last - p.first + 1
		names[i] = p.String()
	}
	for pass := 1; pass <= *passes; pass++ {
		start := time.Now()
		counts, err := httppass.Pass(ctx, client, urls(prefix, paths), *concurrency, prefix)
		if err != nil {
			return fmt.Errorf("pass %d: %w", pass, err)
		}
		el := time.Since(start)
		fmt.Fprintf(stdout, "fill: pass %d: %d requests (%s) in %s (%.0f/s), X-Cache %s\n",
			pass, total, strings.Join(names, ", "), el.Round(time.Millisecond), float64(total)/el.Seconds(), counts)
	}
	return nil
}

// urls yields the URL of every id of every path.
func urls(prefix string, paths []pathRange) iter.Seq[string] {
	return func(yield func(string) bool) {
		for _, p := range paths {
			for id := p.first; id <= p.last; id++ {
				if !yield(prefix + strings.Replace(p.pattern, "{id}", strconv.Itoa(id), 1)) {
					return
				}
			}
		}
	}
}
