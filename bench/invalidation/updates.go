package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// updateSQL changes a course row without changing what it means; each UPDATE is its own
// transaction (autocommit), so its trigger's notification goes out at its commit.
const updateSQL = `UPDATE courses SET updated_at = now() WHERE id = $1`

// updateRun is what sendUpdates did.
type updateRun struct {
	start    time.Duration // the schedule's start, since the recorder's base
	interval time.Duration // between scheduled updates
	errors   int64         // updates that failed or matched no row
	firstErr error
}

// sendUpdates updates course first+i at start+i*interval for every i, from one goroutine per
// connection. The schedule is open-loop: when the connections fall behind, the next updates go
// out as soon as one is free, so the rate is caught up and the delay shows in the lag instead
// of being hidden by a slower schedule.
func sendUpdates(ctx context.Context, conns []*pgx.Conn, rec *recorder, rate int) (updateRun, error) {
	run := updateRun{interval: time.Second / time.Duration(rate)}
	n := len(rec.sent)
	jobs := make(chan int, len(conns))
	var (
		wg       sync.WaitGroup
		errs     atomic.Int64
		errOnce  sync.Once
		firstErr error
	)
	for _, c := range conns {
		wg.Go(func() {
			for i := range jobs {
				rec.sent[i].Store(rec.now())
				tag, err := c.Exec(ctx, updateSQL, rec.first+i)
				rec.done[i].Store(rec.now())
				if err == nil && tag.RowsAffected() != 1 {
					err = fmt.Errorf("course %d: %d rows updated, want 1", rec.first+i, tag.RowsAffected())
				}
				if err != nil {
					errs.Add(1)
					errOnce.Do(func() { firstErr = err })
				}
			}
		})
	}
	run.start = time.Duration(rec.now())
	for i := 0; i < n && ctx.Err() == nil; i++ {
		due := run.start + time.Duration(i)*run.interval
		if d := due - time.Duration(rec.now()); d > 0 {
			time.Sleep(d)
		}
		select {
		case jobs <- i:
		case <-ctx.Done():
		}
	}
	close(jobs)
	wg.Wait()
	run.errors, run.firstErr = errs.Load(), firstErr
	if err := ctx.Err(); err != nil {
		return run, fmt.Errorf("interrupted while updating: %w", err)
	}
	return run, nil
}
