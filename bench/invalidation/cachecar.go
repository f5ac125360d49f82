package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// waitListener polls health's /health/detailed until the invalidation listener reports want.
// Until the listener is live, cachecar answers course reads with X-Cache: BYPASS: warming
// before that would fill nothing.
func waitListener(ctx context.Context, client *http.Client, health, want string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	url := strings.TrimSuffix(health, "/") + "/health/detailed"
	last := "no answer"
	for {
		status, err := listenerStatus(ctx, client, url)
		if err == nil && status == want {
			return nil
		}
		if err != nil {
			last = err.Error()
		} else {
			last = "listener " + status
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("listener not %s after %s (last: %s)", want, timeout, last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func listenerStatus(ctx context.Context, client *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var body struct {
		Services map[string]struct {
			Status string `json:"status"`
		} `json:"services"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		return "", fmt.Errorf("/health/detailed: status %d, %v", resp.StatusCode, err)
	}
	l, ok := body.Services["listener"]
	if !ok {
		return "", fmt.Errorf("/health/detailed: status %d, no listener", resp.StatusCode)
	}
	return l.Status, nil
}

// warmResult says how the warm-up went: the X-Cache answers of the first pass, how many more
// passes it took until every id answered HIT, and how many ids needed more than one of them.
type warmResult struct {
	first   cacheCounts
	passes  int
	retried int
}

// warmRetryWait is the pause between passes after the second. An id that is still not a HIT
// after a second read usually holds a fill lease nobody will fill (a lease or fill call that
// timed out in cachecar): reads of it answer MISS until the lease expires, query_timeout + 1 s
// after it was taken (6 s by default).
const warmRetryWait = 250 * time.Millisecond

// warm requests every id once, then requests the ids that did not answer HIT again until all do
// or timeout passes.
func warm(ctx context.Context, client *http.Client, base string, first, count, conc int, timeout time.Duration) (warmResult, error) {
	url := strings.TrimSuffix(base, "/") + "/v1/courses/"
	ids := make([]int, count)
	for i := range ids {
		ids[i] = first + i
	}
	var res warmResult
	deadline := time.Now().Add(timeout)
	for pass := 0; len(ids) > 0; pass++ {
		if pass >= 2 {
			if time.Now().Add(warmRetryWait).After(deadline) {
				return res, fmt.Errorf("warm: %d ids (e.g. %d) still not HIT after %d passes in %s", len(ids), ids[0], pass, timeout)
			}
			if pass == 2 {
				res.retried = len(ids)
			}
			select {
			case <-time.After(warmRetryWait):
			case <-ctx.Done():
				return res, ctx.Err()
			}
		}
		counts, notHit, err := getAll(ctx, client, url, ids, conc)
		if err != nil {
			return res, fmt.Errorf("warm: %w", err)
		}
		if pass == 0 {
			res.first = counts
		} else {
			res.passes = pass
		}
		ids = notHit
	}
	return res, nil
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

// getAll requests url+id for every id with conc requests in flight. It fails on the first
// answer that is not 200, and returns the ids whose answer was not a HIT.
func getAll(ctx context.Context, client *http.Client, url string, ids []int, conc int) (cacheCounts, []int, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	feed := make(chan int)
	var (
		mu     sync.Mutex
		counts = cacheCounts{}
		notHit []int
		wg     sync.WaitGroup
	)
	for range conc {
		wg.Go(func() {
			for id := range feed {
				xcache, err := getCourse(ctx, client, url+strconv.Itoa(id))
				if err != nil {
					cancel(fmt.Errorf("course %d: %w", id, err))
					return
				}
				mu.Lock()
				counts[xcache]++
				if xcache != "HIT" {
					notHit = append(notHit, id)
				}
				mu.Unlock()
			}
		})
	}
send:
	for _, id := range ids {
		select {
		case feed <- id:
		case <-ctx.Done():
			break send
		}
	}
	close(feed)
	wg.Wait()
	if ctx.Err() != nil {
		return counts, nil, context.Cause(ctx)
	}
	sort.Ints(notHit)
	return counts, notHit, nil
}

func getCourse(ctx context.Context, client *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	// Read to the end so that the connection is reused.
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return "", fmt.Errorf("read body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %d", resp.StatusCode)
	}
	x := resp.Header.Get("X-Cache")
	if x == "" {
		x = "none"
	}
	return x, nil
}

// metricsSnapshot is what this run reads of cachecar's /metrics: the lag histogram's count and
// two of its buckets, and the listener's reconnects (each one resyncs, deleting every key).
type metricsSnapshot struct {
	lagCount, le2ms, le10ms, reconnects float64
	found                               bool
}

func scrape(ctx context.Context, client *http.Client, health string) (metricsSnapshot, error) {
	var m metricsSnapshot
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(health, "/")+"/metrics", nil)
	if err != nil {
		return m, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return m, fmt.Errorf("scrape /metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return m, fmt.Errorf("scrape /metrics: status %d", resp.StatusCode)
	}
	// The text format's sample lines are "name{labels} value"; the few read here need no parser.
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			continue
		}
		switch name {
		case "cachecar_invalidation_lag_seconds_count":
			m.lagCount, m.found = v, true
		case `cachecar_invalidation_lag_seconds_bucket{le="0.002"}`:
			m.le2ms = v
		case `cachecar_invalidation_lag_seconds_bucket{le="0.01"}`:
			m.le10ms = v
		case "cachecar_invalidation_reconnects_total":
			m.reconnects = v
		}
	}
	if err := sc.Err(); err != nil {
		return m, fmt.Errorf("scrape /metrics: %w", err)
	}
	return m, nil
}
