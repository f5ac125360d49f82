// Command warm waits for a server to be ready, then requests every course id once so that a
// benchmark of cache hits starts with a full cache, and checks that a second pass hits.
package main

import (
	"context"
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
		fmt.Fprintln(os.Stderr, "warm:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("warm", flag.ContinueOnError)
	fs.SetOutput(stderr)
	waitURL := fs.String("wait", "", "URL to poll until it answers 200 before anything else (empty: do not wait)")
	waitTimeout := fs.Duration("wait-timeout", 30*time.Second, "how long to wait for -wait to answer 200")
	base := fs.String("base", "", "base URL of the course API, e.g. http://127.0.0.1:8080 (empty: only wait)")
	first := fs.Int("first", 1, "first course id")
	last := fs.Int("last", 5000, "last course id")
	concurrency := fs.Int("concurrency", 8, "requests in flight")
	verify := fs.Bool("verify", false, "request every id a second time and require X-Cache: HIT")
	minHit := fs.Float64("min-hit", 1.0, "with -verify, the lowest acceptable fraction of HIT answers")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *base != "" && (*first < 1 || *last < *first) {
		return fmt.Errorf("bad id range %d..%d", *first, *last)
	}
	if *concurrency < 1 {
		return fmt.Errorf("concurrency %d: must be at least 1", *concurrency)
	}

	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{MaxIdleConnsPerHost: *concurrency},
	}
	if *waitURL != "" {
		start := time.Now()
		if err := waitReady(ctx, client, *waitURL, *waitTimeout); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "warm: %s ready after %s\n", *waitURL, time.Since(start).Round(time.Millisecond))
	}
	if *base == "" {
		return nil
	}

	url := strings.TrimSuffix(*base, "/") + "/v1/courses/"
	start := time.Now()
	warmed, err := httppass.Pass(ctx, client, courses(url, *first, *last), *concurrency, url)
	if err != nil {
		return fmt.Errorf("warm pass: %w", err)
	}
	fmt.Fprintf(stdout, "warm: %d ids (%d..%d) in %s, X-Cache %s\n",
		*last-*first+1, *first, *last, time.Since(start).Round(time.Millisecond), warmed)
	if !*verify {
		return nil
	}
	checked, err := httppass.Pass(ctx, client, courses(url, *first, *last), *concurrency, url)
	if err != nil {
		return fmt.Errorf("verify pass: %w", err)
	}
	total := *last - *first + 1
	hit := float64(checked["HIT"]) / float64(total)
	fmt.Fprintf(stdout, "warm: verify pass X-Cache %s, hit fraction %.4f\n", checked, hit)
	if hit < *minHit {
		return fmt.Errorf("verify pass: hit fraction %.4f is below %.4f", hit, *minHit)
	}
	return nil
}

// waitReady polls url until it answers 200, ctx is done or timeout passes.
func waitReady(ctx context.Context, client *http.Client, url string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last := "no answer"
	for {
		status, _, err := httppass.Get(ctx, client, url)
		switch {
		case err == nil && status == http.StatusOK:
			return nil
		case err == nil:
			last = fmt.Sprintf("status %d", status)
		default:
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s not ready after %s (last: %s)", url, timeout, last)
		case <-tick.C:
		}
	}
}

// courses yields the URL of every course id in first..last.
func courses(url string, first, last int) iter.Seq[string] {
	return func(yield func(string) bool) {
		for id := first; id <= last && yield(url+strconv.Itoa(id)); id++ {
		}
	}
}
