package proxy

import (
	"context"
	"testing"
	"time"
)

// TestInflightWait: wait returns at once with nothing in flight, times out while a request is
// in, returns once it is out, and a request that begins while wait waits is fine.
func TestInflightWait(t *testing.T) {
	var f inflight
	if !f.wait(context.Background()) {
		t.Fatal("wait with nothing in flight: false")
	}
	f.begin()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	if f.wait(ctx) {
		t.Fatal("wait with a request in flight: true before it ended")
	}
	cancel()
	done := make(chan bool, 1)
	go func() { done <- f.wait(context.Background()) }()
	time.Sleep(20 * time.Millisecond)
	f.begin() // a late request, while wait waits
	f.end()
	f.end()
	select {
	case ok := <-done:
		if !ok {
			t.Fatal("wait: false after every request ended")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("wait did not return after every request ended")
	}
}
