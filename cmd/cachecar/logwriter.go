package main

import (
	"io"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// logWriter takes log lines off the request path: Write copies the line into a buffer, and one
// goroutine writes the buffer out logFlushEvery after its first line, or at once when it passes
// logFlushAt bytes. Under load that is one write(2) for hundreds of access-log lines instead of
// one per request, and a request never waits on stdout (a slow log collector, a full pipe). An
// idle sidecar has nothing buffered, and the goroutine sleeps until the next line instead of
// waking every logFlushEvery. Close writes what is left; a crash loses at most logFlushEvery of
// lines.
type logWriter struct {
	out io.Writer

	mu      sync.Mutex
	buf     []byte
	dropped atomic.Int64  // lines there was no room for
	more    chan struct{} // a line went into an empty buffer
	full    chan struct{} // the buffer passed logFlushAt
	done    chan struct{}
	stopped chan struct{}
	once    sync.Once
	wakes   atomic.Int64 // times the goroutine woke up (tests)
}

const (
	logFlushEvery = 5 * time.Millisecond
	logFlushAt    = 64 << 10
	// logMaxBuffer bounds the buffer while out is slower than the log: lines past it are
	// dropped and counted in a line of their own, rather than growing memory without end.
	logMaxBuffer = 8 << 20
)

func newLogWriter(out io.Writer) *logWriter {
	w := &logWriter{out: out, more: make(chan struct{}, 1), full: make(chan struct{}, 1),
		done: make(chan struct{}), stopped: make(chan struct{})}
	go w.loop()
	return w
}

func (w *logWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	first := len(w.buf) == 0
	if len(w.buf)+len(p) <= logMaxBuffer {
		w.buf = append(w.buf, p...)
	} else {
		w.dropped.Add(1)
	}
	full := len(w.buf) >= logFlushAt
	w.mu.Unlock()
	if first {
		wake(w.more)
	}
	if full {
		wake(w.full)
	}
	return len(p), nil
}

// wake wakes the goroutine waiting on c, or leaves a wake-up it will find.
func wake(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// loop sleeps until a line comes, gives the lines after it logFlushEvery (less if the buffer
// fills) to join it, and writes them all out. A wake-up left over from lines an earlier flush
// already wrote costs one empty flush.
func (w *logWriter) loop() {
	defer close(w.stopped)
	t := time.NewTimer(logFlushEvery)
	t.Stop()
	var spare []byte
	for {
		select {
		case <-w.done:
			w.flush(&spare)
			return
		case <-w.more:
		case <-w.full:
		}
		w.wakes.Add(1)
		t.Reset(logFlushEvery)
		select {
		case <-w.done:
			w.flush(&spare)
			return
		case <-t.C:
		case <-w.full:
			t.Stop()
		}
		w.flush(&spare)
	}
}

// flush swaps the buffer with spare and writes it out without holding the lock.
func (w *logWriter) flush(spare *[]byte) {
	w.mu.Lock()
	b := w.buf
	w.buf = (*spare)[:0]
	w.mu.Unlock()
	if n := w.dropped.Swap(0); n > 0 {
		b = append(b, `{"level":"warn","message":"log lines dropped: stdout is slower than the log","dropped":`...)
		b = append(b, []byte(itoa(n))...)
		b = append(b, "}\n"...)
	}
	if len(b) > 0 {
		w.out.Write(b)
	}
	if cap(b) > 4*logFlushAt {
		b = nil // after a burst, do not keep a big buffer for good
	}
	*spare = b
}

// Close writes out what is buffered and stops the goroutine; it is idempotent.
func (w *logWriter) Close() {
	w.once.Do(func() { close(w.done) })
	<-w.stopped
}
