package main

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/valkey-io/valkey-go"
)

// fillBatch is how many SETs go out in one pipeline (DoMulti), fillWorkers how many pipelines are
// in flight at once: enough that 100,000 keys take well under a second on loopback.
const (
	fillBatch   = 1000
	fillWorkers = 4
)

func connect(o redisOptions) (valkey.Client, error) {
	vk, err := valkey.NewClient(valkey.ClientOption{
		InitAddress: []string{o.addr}, Password: o.password, SelectDB: o.db, DisableCache: true,
		ClientName: "cachecar-bench-clear",
	})
	if err != nil {
		return nil, fmt.Errorf("connect to redis %s: %w", o.addr, err)
	}
	return vk, nil
}

// fill SETs the keys <namespace><prefix>1 .. <namespace><prefix><keys>, each a small JSON value
// with o.ttl, in pipelines of fillBatch from fillWorkers goroutines, and returns how long it
// took. The values are not cachecar's entries: nothing reads them, they are only cleared.
func fill(ctx context.Context, vk valkey.Client, o redisOptions) (time.Duration, error) {
	start := time.Now()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	firsts := make(chan int)
	var (
		wg       sync.WaitGroup
		once     sync.Once
		firstErr error
	)
	for range fillWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmds := make(valkey.Commands, 0, fillBatch)
			var val []byte
			for first := range firsts {
				cmds = cmds[:0]
				for n := first; n < first+fillBatch && n <= o.keys; n++ {
					val = fmt.Appendf(val[:0], `{"id":%d,"tenant_id":%d,"status":"queued","bench":"o"}`, n, n%50+1)
					cmds = append(cmds, vk.B().Set().Key(o.namespace+o.prefix+strconv.Itoa(n)).Value(string(val)).
						ExSeconds(int64(o.ttl/time.Second)).Build())
				}
				for _, r := range vk.DoMulti(ctx, cmds...) {
					if err := r.Error(); err != nil {
						once.Do(func() {
							firstErr = fmt.Errorf("set: %w", err)
							cancel()
						})
						break
					}
				}
			}
		}()
	}
feed:
	for first := 1; first <= o.keys; first += fillBatch {
		select {
		case firsts <- first:
		case <-ctx.Done():
			break feed
		}
	}
	close(firsts)
	wg.Wait()
	if firstErr != nil {
		return 0, firstErr
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}
