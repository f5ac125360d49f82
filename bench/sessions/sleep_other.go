//go:build !linux

package main

import (
	"context"
	"time"
)

// sleepUntil returns at due (or when ctx ends), on a Go timer: elsewhere than on Linux it may
// wake up to about 1 ms late, and that lateness counts in the latency (see sleep_linux.go).
func sleepUntil(ctx context.Context, due time.Time) {
	t := time.NewTimer(time.Until(due))
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}
