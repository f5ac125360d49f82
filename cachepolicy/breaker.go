package cachepolicy

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// Circuit states, as exported in metrics (the gauge's value) and health (the name).
const (
	CircuitClosed   = 0
	CircuitHalfOpen = 1
	CircuitOpen     = 2
)

// CircuitName names a circuit state for health and stats.
func CircuitName(state int) string {
	switch state {
	case CircuitOpen:
		return "open"
	case CircuitHalfOpen:
		return "half-open"
	}
	return "closed"
}

// Breaker is a circuit breaker: Threshold failures in a row open it, and while it is open callers
// are refused at once instead of waiting on a dead dependency. After a back-off (exponential
// from MinOpen to MaxOpen, with jitter so that a fleet of sidecars does not probe in step) it
// half-opens: one call at a time is let through as a probe; its success closes the breaker, its
// failure opens it again for twice as long. A probe that never reports is replaced after MinOpen.
//
// The closed path is one atomic load: the breaker costs nothing while the dependency is healthy.
type Breaker struct {
	Threshold int
	MinOpen   time.Duration
	MaxOpen   time.Duration
	// OnChange, if set, is called with the new state after every transition, under the
	// breaker's lock (keep it short: a metric, a log line).
	OnChange func(state int)

	state    atomic.Int32
	failures atomic.Int32

	mu      sync.Mutex
	backoff time.Duration
	retryAt time.Time // open: when to half-open
	probeAt time.Time // half-open: when the current probe started (zero: none)
}

// State returns the current state.
func (b *Breaker) State() int { return int(b.state.Load()) }

// Allow reports whether a call may go ahead. Every allowed call must be followed by Success or
// Failure (a half-open breaker waits for its probe's verdict).
func (b *Breaker) Allow() bool {
	if b.state.Load() == CircuitClosed {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	switch b.state.Load() {
	case CircuitClosed:
		return true
	case CircuitOpen:
		if now.Before(b.retryAt) {
			return false
		}
		b.set(CircuitHalfOpen)
		b.probeAt = now
		return true
	default: // half-open: one probe at a time
		if !b.probeAt.IsZero() && now.Sub(b.probeAt) < b.MinOpen {
			return false
		}
		b.probeAt = now
		return true
	}
}

// Success records a call that worked.
func (b *Breaker) Success() {
	if b.state.Load() == CircuitClosed {
		if b.failures.Load() != 0 {
			b.failures.Store(0)
		}
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.state.Load() != CircuitClosed {
		b.failures.Store(0)
		b.backoff = 0
		b.probeAt = time.Time{}
		b.set(CircuitClosed)
	}
}

// Failure records a call that failed.
func (b *Breaker) Failure() {
	if b.state.Load() == CircuitClosed && int(b.failures.Add(1)) < b.Threshold {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	switch b.state.Load() {
	case CircuitClosed:
		if int(b.failures.Load()) >= b.Threshold {
			b.open(b.MinOpen)
		}
	case CircuitHalfOpen:
		b.open(min(max(b.backoff*2, b.MinOpen), b.MaxOpen))
	}
}

// Trip opens the breaker at once, whatever the count: for replies that say the server refuses
// the work outright (out of memory, read-only replica), which the next call would get too.
func (b *Breaker) Trip() {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch b.state.Load() {
	case CircuitClosed:
		b.open(b.MinOpen)
	case CircuitHalfOpen:
		b.open(min(max(b.backoff*2, b.MinOpen), b.MaxOpen))
	}
}

// open opens the breaker for about d (±20%), under b.mu.
func (b *Breaker) open(d time.Duration) {
	b.backoff = d
	jitter := time.Duration(rand.Int64N(int64(d)/5*2+1)) - d/5
	b.retryAt = time.Now().Add(d + jitter)
	b.probeAt = time.Time{}
	b.set(CircuitOpen)
}

func (b *Breaker) set(state int) {
	if int(b.state.Swap(int32(state))) != state && b.OnChange != nil {
		b.OnChange(state)
	}
}
