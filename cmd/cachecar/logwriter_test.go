package main

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
)

func TestLogWriterKeepsEveryLineInOrder(t *testing.T) {
	out := &testenv.SyncBuffer{}
	w := newLogWriter(out)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 5000; i++ {
				w.Write([]byte(`{"line":1}` + "\n"))
			}
		}()
	}
	wg.Wait()
	w.Write([]byte("last\n"))
	w.Close()
	w.Close() // idempotent
	lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(lines) != 20001 || lines[len(lines)-1] != "last" {
		t.Fatalf("%d lines, last %q; want 20001 ending with the last one written", len(lines), lines[len(lines)-1])
	}
}

func TestLogWriterFlushesWithoutClose(t *testing.T) {
	out := &testenv.SyncBuffer{}
	w := newLogWriter(out)
	defer w.Close()
	w.Write([]byte("one\n"))
	waitOut(t, out, "one\n", "a line")
}

// An idle writer must not wake up: a sidecar with no requests has nothing to write, and a
// goroutine woken every few milliseconds costs CPU on every pod that runs one.
func TestLogWriterSleepsWhileIdle(t *testing.T) {
	out := &testenv.SyncBuffer{}
	w := newLogWriter(out)
	defer w.Close()
	w.Write([]byte("one\n"))
	waitOut(t, out, "one\n", "a line")
	before := w.wakes.Load()
	time.Sleep(20 * logFlushEvery)
	if n := w.wakes.Load() - before; n > 1 {
		t.Fatalf("the writer woke %d times in %s with nothing to write", n, 20*logFlushEvery)
	}
	w.Write([]byte("two\n"))
	waitOut(t, out, "one\ntwo\n", "a line written after an idle spell")
}

// waitOut waits up to 2 s for out to hold exactly want.
func waitOut(t *testing.T, out *testenv.SyncBuffer, want, what string) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for out.String() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s was not written out within 2s: %q", what, out.String())
		}
		time.Sleep(time.Millisecond)
	}
}
