package cachepolicy

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// blockingLoader answers nothing until its context ends, then fails as the PostgreSQL loader
// does when its context is cancelled (a timeout).
type blockingLoader struct{ started chan struct{} }

func (l blockingLoader) LoadOne(ctx context.Context, _ string, _ ...any) ([]byte, error) {
	l.started <- struct{}{}
	<-ctx.Done()
	return nil, fmt.Errorf("%w: %v", ErrTimeout, ctx.Err())
}

func (l blockingLoader) LoadMany(ctx context.Context, _ string, _ []int64) (map[int64][]byte, error) {
	_, err := l.LoadOne(ctx, "")
	return nil, err
}

// TestCloseCancelsLoadsInFlight: Close (a shutdown past its timeout) cuts the loads readers wait
// on, at once, with ErrClosed, and their end says nothing against the database: no failure for
// the breaker, no timeout counted. Close may be called again.
func TestCloseCancelsLoadsInFlight(t *testing.T) {
	m := NewMetrics(prometheus.NewRegistry())
	l := blockingLoader{started: make(chan struct{}, 8)}
	r := New(Options{QueryTimeout: time.Minute}, NewMemoryStore(MinTierSize, zerolog.Nop(), m), l, zerolog.Nop(), m)
	p, err := NewPolicy("item", "item:{id}", []string{"id"}, time.Minute, `^[1-9][0-9]{0,18}$`, "SELECT 1 WHERE $1 > 0", "SELECT 1")
	if err != nil {
		t.Fatal(err)
	}
	const readers = dbBreakerThreshold + 1
	errs := make(chan error, readers)
	for i := range readers {
		go func() {
			_, err := r.Get(context.Background(), p, []string{fmt.Sprint(i + 1)}, int64(i+1))
			errs <- err
		}()
	}
	for range readers {
		<-l.started
	}
	start := time.Now()
	r.Close()
	for range readers {
		select {
		case err := <-errs:
			if !errors.Is(err, ErrClosed) || errors.Is(err, ErrTimeout) {
				t.Errorf("a read cut by Close: %v, want ErrClosed and not a timeout", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a read still waits 5 s after Close")
		}
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("reads ended %s after Close", d)
	}
	if st := r.DatabaseCircuit(); st != CircuitClosed {
		t.Errorf("database circuit %s after %d loads cut by Close, want closed", CircuitName(st), readers)
	}
	r.Close()
}

// TestProbeDatabaseClosesAnIdleBreaker: a sidecar that gets no reads after an outage still closes
// its database breaker once PostgreSQL answers, and keeps it open while PostgreSQL does not.
func TestProbeDatabaseClosesAnIdleBreaker(t *testing.T) {
	m := NewMetrics(prometheus.NewRegistry())
	r := New(Options{QueryTimeout: time.Second}, NewMemoryStore(MinTierSize, zerolog.Nop(), m), blockingLoader{}, zerolog.Nop(), m)
	for range dbBreakerThreshold {
		r.db.Failure()
	}
	if r.DatabaseCircuit() != CircuitOpen {
		t.Fatalf("circuit %s after %d failures, want open", CircuitName(r.DatabaseCircuit()), dbBreakerThreshold)
	}
	var up atomic.Bool
	var pings atomic.Int64
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		r.ProbeDatabase(ctx, func(context.Context) error {
			pings.Add(1)
			if up.Load() {
				return nil
			}
			return errors.New("connection refused")
		})
		close(done)
	}()
	defer func() { cancel(); <-done }()
	// Down: probes fail and the circuit stays open (or half-open while one runs).
	for pings.Load() < 2 {
		time.Sleep(10 * time.Millisecond)
	}
	if r.DatabaseCircuit() == CircuitClosed {
		t.Fatal("circuit closed while every probe failed")
	}
	up.Store(true)
	deadline := time.Now().Add(10 * time.Second) // the back-off has doubled at most a few times
	for r.DatabaseCircuit() != CircuitClosed {
		if time.Now().After(deadline) {
			t.Fatalf("circuit %s 10 s after PostgreSQL answered again, with no reads", CircuitName(r.DatabaseCircuit()))
		}
		time.Sleep(20 * time.Millisecond)
	}
}
