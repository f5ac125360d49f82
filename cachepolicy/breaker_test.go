package cachepolicy

import (
	"slices"
	"sync"
	"testing"
	"time"
)

// stateLog records a breaker's OnChange calls, and checks that each reports the state the
// breaker is in.
type stateLog struct {
	mu     sync.Mutex
	states []int
	bad    []string
}

func (l *stateLog) get() []int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.states)
}

func newTestBreaker(threshold int, minOpen, maxOpen time.Duration) (*Breaker, *stateLog) {
	l := &stateLog{}
	b := &Breaker{Threshold: threshold, MinOpen: minOpen, MaxOpen: maxOpen}
	b.OnChange = func(state int) {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.states = append(l.states, state)
		if got := b.State(); got != state {
			l.bad = append(l.bad, CircuitName(state)+" reported while State() is "+CircuitName(got))
		}
	}
	return b, l
}

func (l *stateLog) check(t *testing.T, want ...int) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.bad) > 0 {
		t.Errorf("OnChange: %v", l.bad)
	}
	if !slices.Equal(l.states, want) {
		t.Fatalf("OnChange states %v, want %v", stateNames(l.states), stateNames(want))
	}
}

func stateNames(states []int) []string {
	out := make([]string, len(states))
	for i, s := range states {
		out[i] = CircuitName(s)
	}
	return out
}

// breakerRetryAt is when an open breaker half-opens.
func breakerRetryAt(b *Breaker) time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.retryAt
}

func breakerBackoff(b *Breaker) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.backoff
}

// failOpen records the failure that opens b for about d, and checks that it opened for d
// (±20% jitter). It returns the instants taken before and after the failure.
func failOpen(t *testing.T, b *Breaker, d time.Duration) (before, after time.Time) {
	t.Helper()
	before = time.Now()
	b.Failure()
	after = time.Now()
	if s := b.State(); s != CircuitOpen {
		t.Fatalf("state %s after the failure, want open", CircuitName(s))
	}
	if got := breakerBackoff(b); got != d {
		t.Fatalf("back-off %v, want %v", got, d)
	}
	at := breakerRetryAt(b)
	if lo, hi := before.Add(d-d/5), after.Add(d+d/5); at.Before(lo) || at.After(hi) {
		t.Fatalf("opened until %v after the failure, want %v ±20%%", at.Sub(before), d)
	}
	return before, after
}

// awaitProbe polls Allow until it lets a probe through, and checks from the outside that the
// breaker refused every call for at least 80% of d and let one through by 120% of d after the
// failure that opened it (the bounds follow from the instants taken around each call, so they
// hold however slowly the test runs).
func awaitProbe(t *testing.T, b *Breaker, before, after time.Time, d time.Duration) {
	t.Helper()
	deadline := after.Add(d + d/5 + 2*time.Second)
	var lastRefused time.Time
	for {
		start := time.Now()
		if b.Allow() {
			if end := time.Now(); end.Sub(before) < d-d/5 {
				t.Fatalf("probe let through %v after opening, want at least %v", end.Sub(before), d-d/5)
			}
			break
		}
		lastRefused = start
		if start.After(deadline) {
			t.Fatalf("no probe let through within %v of opening for %v", deadline.Sub(before), d)
		}
		time.Sleep(time.Millisecond)
	}
	if !lastRefused.IsZero() && lastRefused.Sub(after) > d+d/5 {
		t.Fatalf("still refused %v after opening for %v: more than 20%% jitter", lastRefused.Sub(after), d)
	}
	if s := b.State(); s != CircuitHalfOpen {
		t.Fatalf("state %s after the probe was let through, want half-open", CircuitName(s))
	}
}

func TestBreakerOpensAfterThresholdFailuresInARow(t *testing.T) {
	b, log := newTestBreaker(3, time.Hour, time.Hour)
	for i := 0; i < 2; i++ {
		b.Failure()
		if !b.Allow() || b.State() != CircuitClosed {
			t.Fatalf("after %d failures: state %s, want closed and allowing", i+1, CircuitName(b.State()))
		}
	}
	// A success between failures resets the count: these are not in a row.
	b.Success()
	b.Failure()
	b.Failure()
	if !b.Allow() || b.State() != CircuitClosed {
		t.Fatalf("2 failures, a success, 2 failures: state %s, want closed", CircuitName(b.State()))
	}
	log.check(t)
	failOpen(t, b, time.Hour)
	for i := 0; i < 10; i++ {
		if b.Allow() {
			t.Fatalf("call %d allowed by an open breaker", i)
		}
	}
	// Failures reported while open (calls let through before it opened) change nothing.
	at := breakerRetryAt(b)
	b.Failure()
	if b.State() != CircuitOpen || !breakerRetryAt(b).Equal(at) {
		t.Fatalf("a late failure moved an open breaker: state %s", CircuitName(b.State()))
	}
	log.check(t, CircuitOpen)
}

func TestBreakerThresholdOne(t *testing.T) {
	b, log := newTestBreaker(1, time.Hour, time.Hour)
	if !b.Allow() {
		t.Fatal("a new breaker refused a call")
	}
	failOpen(t, b, time.Hour)
	if b.Allow() {
		t.Fatal("allowed after the one failure of its threshold")
	}
	log.check(t, CircuitOpen)
}

func TestBreakerProbeLifecycle(t *testing.T) {
	const minOpen, maxOpen = 40 * time.Millisecond, 100 * time.Millisecond
	b, log := newTestBreaker(2, minOpen, maxOpen)
	b.Failure()
	before, after := failOpen(t, b, minOpen)
	awaitProbe(t, b, before, after, minOpen)
	log.check(t, CircuitOpen, CircuitHalfOpen)

	// Exactly one probe at a time: every concurrent caller is refused while it is outstanding.
	var wg sync.WaitGroup
	var mu sync.Mutex
	allowed := 0
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if b.Allow() {
				mu.Lock()
				allowed++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if allowed != 0 {
		t.Fatalf("%d more calls let through while the probe is outstanding, want 0", allowed)
	}

	// Each failed probe opens it again for twice as long, up to MaxOpen.
	want := []int{CircuitOpen, CircuitHalfOpen}
	for _, d := range []time.Duration{2 * minOpen, maxOpen, maxOpen} {
		before, after := failOpen(t, b, d)
		if b.Allow() {
			t.Fatalf("allowed right after a failed probe (back-off %v)", d)
		}
		awaitProbe(t, b, before, after, d)
		want = append(want, CircuitOpen, CircuitHalfOpen)
		log.check(t, want...)
	}

	// A probe that works closes it, and the back-off starts again from MinOpen.
	b.Success()
	want = append(want, CircuitClosed)
	log.check(t, want...)
	if b.State() != CircuitClosed || !b.Allow() {
		t.Fatalf("state %s after a good probe, want closed", CircuitName(b.State()))
	}
	b.Failure() // one failure of two: the count was reset when it closed
	if b.State() != CircuitClosed {
		t.Fatal("opened by one failure after closing: the failure count was not reset")
	}
	failOpen(t, b, minOpen)
	log.check(t, append(want, CircuitOpen)...)
}

func TestBreakerStuckProbeIsReplacedAfterMinOpen(t *testing.T) {
	const minOpen = 50 * time.Millisecond
	b, log := newTestBreaker(1, minOpen, time.Second)
	before, after := failOpen(t, b, minOpen)
	probeStart := time.Now()
	awaitProbe(t, b, before, after, minOpen)
	// The probe never reports. Calls are refused until MinOpen after it was let through, then
	// one replacement probe goes ahead.
	deadline := time.Now().Add(2 * time.Second)
	for !b.Allow() {
		if time.Now().After(deadline) {
			t.Fatal("a probe that never reported was not replaced within 2s")
		}
		time.Sleep(time.Millisecond)
	}
	if d := time.Since(probeStart); d < minOpen {
		t.Fatalf("replacement probe let through %v after the first, want at least MinOpen %v", d, minOpen)
	}
	if b.State() != CircuitHalfOpen {
		t.Fatalf("state %s with a replacement probe, want half-open", CircuitName(b.State()))
	}
	if b.Allow() {
		t.Fatal("a second call let through beside the replacement probe")
	}
	b.Success()
	if b.State() != CircuitClosed {
		t.Fatalf("state %s after the replacement probe worked, want closed", CircuitName(b.State()))
	}
	log.check(t, CircuitOpen, CircuitHalfOpen, CircuitClosed)
}

// TestBreakerJitterSpreadsRetries: breakers opened at once half-open at different times, all
// within ±20% of the back-off.
func TestBreakerJitterSpreadsRetries(t *testing.T) {
	const d = time.Second
	var lo, hi time.Duration
	for i := range 200 {
		b := &Breaker{Threshold: 1, MinOpen: d, MaxOpen: d}
		before := time.Now()
		b.Failure()
		after := time.Now()
		at := breakerRetryAt(b)
		if at.Before(before.Add(d-d/5)) || at.After(after.Add(d+d/5)) {
			t.Fatalf("opened for %v, want %v ±20%%", at.Sub(before), d)
		}
		off := at.Sub(before)
		if i == 0 || off < lo {
			lo = off
		}
		if i == 0 || off > hi {
			hi = off
		}
	}
	// 200 uniform draws over a 400ms range all within 40ms of each other: no jitter.
	if hi-lo < d/10 {
		t.Fatalf("open periods span only %v over 200 breakers: the retries are not jittered", hi-lo)
	}
}
