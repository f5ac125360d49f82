// Package httppass runs the bench helpers' passes of GETs: every URL once, a number in flight,
// counting the answers by X-Cache and stopping at the first that is not 200.
package httppass

import (
	"context"
	"fmt"
	"io"
	"iter"
	"net/http"
	"sort"
	"strings"
	"sync"
)

// Counts counts answers by their X-Cache header ("none" when absent).
type Counts map[string]int

func (c Counts) String() string {
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

// Pass requests every URL of urls once, with concurrency requests in flight, and fails on the
// first answer that is not 200 (the error names the URL without trim, a prefix to leave out).
func Pass(ctx context.Context, client *http.Client, urls iter.Seq[string], concurrency int, trim string) (Counts, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	next := make(chan string)
	var (
		mu     sync.Mutex
		counts = Counts{}
		wg     sync.WaitGroup
	)
	for range concurrency {
		wg.Go(func() {
			for u := range next {
				status, xcache, err := Get(ctx, client, u)
				if err == nil && status != http.StatusOK {
					err = fmt.Errorf("%s: status %d", strings.TrimPrefix(u, trim), status)
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
	for u := range urls {
		select {
		case next <- u:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	return counts, context.Cause(ctx)
}

// Get does one GET and returns the status and X-Cache header; the body is read and dropped so
// that the connection is reused.
func Get(ctx context.Context, client *http.Client, url string) (int, string, error) {
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
