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
	deadline := time.Now().Add(2 * time.Second)
	for out.String() != "one\n" {
		if time.Now().After(deadline) {
			t.Fatalf("a line was not written out within 2s: %q", out.String())
		}
		time.Sleep(time.Millisecond)
	}
}

// An idle writer must not wake up: a sidecar with no requests has nothing to write, and a
// goroutine woken every few milliseconds costs CPU on every pod that runs one.
func TestLogWriterSleepsWhileIdle(t *testing.T) {
	out := &testenv.SyncBuffer{}
	w := newLogWriter(out)
	defer w.Close()
	w.Write([]byte("one\n"))
	deadline := time.Now().Add(2 * time.Second)
	for out.String() != "one\n" {
		if time.Now().After(deadline) {
			t.Fatalf("a line was not written out within 2s: %q", out.String())
		}
		time.Sleep(time.Millisecond)
	}
	before := w.wakes.Load()
	time.Sleep(20 * logFlushEvery)
	if n := w.wakes.Load() - before; n > 1 {
		t.Fatalf("the writer woke %d times in %s with nothing to write", n, 20*logFlushEvery)
	}
	w.Write([]byte("two\n"))
	for out.String() != "one\ntwo\n" {
		if time.Now().After(deadline.Add(2 * time.Second)) {
			t.Fatalf("a line written after an idle spell was not written out: %q", out.String())
		}
		time.Sleep(time.Millisecond)
	}
}
