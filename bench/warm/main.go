// Command warm waits for a server to be ready, then requests every course id once so that a
// benchmark of cache hits starts with a full cache, and checks that a second pass hits.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
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
	warmed, err := pass(ctx, client, url, *first, *last, *concurrency)
	if err != nil {
		return fmt.Errorf("warm pass: %w", err)
	}
	fmt.Fprintf(stdout, "warm: %d ids (%d..%d) in %s, X-Cache %s\n",
		*last-*first+1, *first, *last, time.Since(start).Round(time.Millisecond), warmed)
	if !*verify {
		return nil
	}
	checked, err := pass(ctx, client, url, *first, *last, *concurrency)
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
		status, _, err := get(ctx, client, url)
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

// cacheCounts counts answers by their X-Cache header ("none" when absent).
type cacheCounts map[string]int

func (c cacheCounts) String() string {
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

// pass requests every id in first..last once, with concurrency requests in flight, and fails on
// the first answer that is not 200.
func pass(ctx context.Context, client *http.Client, url string, first, last, concurrency int) (cacheCounts, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	ids := make(chan int)
	var (
		mu     sync.Mutex
		counts = cacheCounts{}
		wg     sync.WaitGroup
	)
	for range concurrency {
		wg.Go(func() {
			for id := range ids {
				status, xcache, err := get(ctx, client, fmt.Sprintf("%s%d", url, id))
				if err == nil && status != http.StatusOK {
					err = fmt.Errorf("course %d: status %d", id, status)
				}
				if err != nil {
					cancel(err)
					return
				}
				if xcache == "" {
					xcache = "none"
				}
				mu.Lock()
				counts[xcache]++
				mu.Unlock()
			}
		})
	}
feed:
	for id := first; id <= last; id++ {
		select {
		case ids <- id:
		case <-ctx.Done():
			break feed
		}
	}
	close(ids)
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return counts, err
	}
	if err := ctx.Err(); err != nil {
		return counts, err
	}
	return counts, nil
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
