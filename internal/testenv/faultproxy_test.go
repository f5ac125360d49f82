package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// startEcho starts a TCP server that writes back what it reads; it stops when the test ends.
func startEcho(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  = map[net.Conn]struct{}{}
		closed bool
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				mu.Unlock()
				c.Close()
				return
			}
			conns[c] = struct{}{}
			wg.Add(1)
			mu.Unlock()
			go func() {
				defer wg.Done()
				io.Copy(c, c)
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip sends msg and expects it back.
func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read: %v", err)
	}
	if string(got) != msg {
		t.Fatalf("echo = %q, want %q", got, msg)
	}
}

// readErr reads from c for at most wait and returns the error.
func readErr(c net.Conn, wait time.Duration) error {
	c.SetReadDeadline(time.Now().Add(wait))
	_, err := c.Read(make([]byte, 1))
	return err
}

// wantClosed fails unless c reads EOF or a reset well before a 5s deadline.
func wantClosed(t *testing.T, c net.Conn) {
	t.Helper()
	err := readErr(c, 5*time.Second)
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read = %v, want EOF or reset", err)
	}
}

func wantConns(t *testing.T, p *Proxy, want int) {
	t.Helper()
	// Conns lags a client's dial: the kernel completes the handshake before the proxy accepts.
	for deadline := time.Now().Add(5 * time.Second); p.Conns() != want; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("Conns = %d, want %d", p.Conns(), want)
		}
	}
}

func TestProxyForwards(t *testing.T) {
	p := StartProxy(t, startEcho(t))
	a, b := dial(t, p.Addr()), dial(t, p.Addr())
	roundTrip(t, a, "hello")
	roundTrip(t, b, "world")
	roundTrip(t, a, "again")
	wantConns(t, p, 2)
	a.Close()
	wantConns(t, p, 1)
}

func TestProxyLatency(t *testing.T) {
	p := StartProxy(t, startEcho(t))
	c := dial(t, p.Addr())
	roundTrip(t, c, "warm") // opened before SetLatency: the latency applies to it too

	const latency = 50 * time.Millisecond
	p.SetLatency(latency)
	start := time.Now()
	roundTrip(t, c, "ping")
	// Both directions wait, and a timer never fires early: a lower bound that can't flake.
	if got := time.Since(start); got < 2*latency {
		t.Errorf("round trip took %v with latency %v, want at least %v", got, latency, 2*latency)
	}

	var want bytes.Buffer
	for i := range 20 {
		msg := fmt.Sprintf("%02d,", i)
		want.WriteString(msg)
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, want.Len())
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatal(err)
	}
	if string(got) != want.String() {
		t.Errorf("echo under latency = %q, want %q", got, want.String())
	}

	p.SetLatency(0)
	roundTrip(t, dial(t, p.Addr()), "fast again")
}

func TestProxyCut(t *testing.T) {
	p := StartProxy(t, startEcho(t))
	c := dial(t, p.Addr())
	roundTrip(t, c, "hello")
	p.Cut()
	wantClosed(t, c)
	if n := p.Conns(); n != 0 {
		t.Errorf("Conns after Cut = %d, want 0", n)
	}
	// The listener stays open, so the dial succeeds and the first read sees the close.
	wantClosed(t, dial(t, p.Addr()))
}

func TestProxyBlackhole(t *testing.T) {
	p := StartProxy(t, startEcho(t))
	old := dial(t, p.Addr())
	roundTrip(t, old, "hello")
	p.Blackhole()
	for name, c := range map[string]net.Conn{"open": old, "new": dial(t, p.Addr())} {
		if _, err := c.Write([]byte("lost")); err != nil {
			t.Fatalf("%s conn: write: %v", name, err)
		}
		if err := readErr(c, 200*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("%s conn: read = %v, want a timeout", name, err)
		}
	}
	wantConns(t, p, 2) // hanging, not closed
}

func TestProxyRestore(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault func(*Proxy)
	}{
		{"after Cut", (*Proxy).Cut},
		{"after Blackhole", (*Proxy).Blackhole},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := StartProxy(t, startEcho(t))
			old := dial(t, p.Addr())
			roundTrip(t, old, "hello")
			tc.fault(p)
			p.Restore()
			wantClosed(t, old)
			roundTrip(t, dial(t, p.Addr()), "back")
			wantConns(t, p, 1)
		})
	}
}

func TestProxyCloseLeavesNoGoroutines(t *testing.T) {
	// Registered first, so it runs last: after the proxies' and the echo server's cleanups.
	ignore := goleak.IgnoreCurrent()
	t.Cleanup(func() { goleak.VerifyNone(t, ignore) })
	echo := startEcho(t)

	held := StartProxy(t, echo) // a chunk waiting out an hour of latency
	c := dial(t, held.Addr())
	roundTrip(t, c, "hello")
	held.SetLatency(time.Hour)
	c.Write([]byte("held"))

	swallowing := StartProxy(t, echo) // one open link blackholed, one accepted while blackholed
	roundTrip(t, dial(t, swallowing.Addr()), "hello")
	swallowing.Blackhole()
	dial(t, swallowing.Addr()).Write([]byte("lost"))
	wantConns(t, swallowing, 2)

	for _, p := range []*Proxy{held, swallowing} {
		p.Close()
		p.Close() // idempotent
		if n := p.Conns(); n != 0 {
			t.Errorf("Conns after Close = %d, want 0", n)
		}
	}
	wantClosed(t, c)
}
