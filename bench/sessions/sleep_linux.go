package main

import (
	"context"
	"errors"
	"syscall"
	"time"
)

// sleepUntil returns at due (or when ctx ends). It sleeps in nanosleep(2) rather than on a Go
// timer: the Go runtime waits for its timers in epoll_wait, whose timeout is whole
// milliseconds (runtime/netpoll_epoll.go rounds a shorter delay up to 1 ms), so on an otherwise
// idle process a timer due in less than 1 ms can fire up to about 1 ms late. The latency of a
// request counts from its scheduled time, so that lateness would be charged to the server.
// nanosleep(2) is late by the kernel's timer slack (50 us by default) plus the time to get a
// CPU back. Sleeps are cut into 50 ms pieces so that ctx is checked.
func sleepUntil(ctx context.Context, due time.Time) {
	for ctx.Err() == nil {
		d := time.Until(due)
		if d <= 0 {
			return
		}
		ts := syscall.NsecToTimespec(int64(min(d, 50*time.Millisecond)))
		if err := syscall.Nanosleep(&ts, nil); err != nil && !errors.Is(err, syscall.EINTR) {
			// Unexpected: fall back to the runtime's timer.
			t := time.NewTimer(time.Until(due))
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
			}
			return
		}
	}
}
