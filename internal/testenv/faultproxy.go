package testenv

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"
)

// mode is what the proxy does with the connections it accepts.
type mode int

const (
	forwarding  mode = iota
	cutting          // accept and close at once, like a dead server
	blackholing      // accept, forward nothing, close nothing, like a frozen server
)

// Proxy is a TCP proxy put between the code under test and a real server, to delay, cut or
// swallow the traffic: the network faults a healthy server can't be made to produce.
type Proxy struct {
	ln     net.Listener
	target string
	ctx    context.Context // cancelled by Close, so that a dial to a silent target ends
	cancel context.CancelFunc
	wg     sync.WaitGroup // the accept loop and every goroutine of every link

	mu      sync.Mutex
	mode    mode
	latency time.Duration
	changed chan struct{} // closed and replaced when latency or blackholing changes: wakes held chunks
	links   map[*link]struct{}
	closed  bool
	accepts int // connections accepted, ever
}

// link is one proxied connection.
type link struct {
	client     net.Conn
	server     net.Conn      // nil until the dial returns; stays nil if accepted while blackholing
	done       chan struct{} // closed when the link is closed
	blackholed bool          // guarded by Proxy.mu; never cleared, Restore closes the link instead
}

// StartProxy listens on 127.0.0.1:0 and forwards every accepted connection to target. It is
// closed by t.Cleanup.
func StartProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("fault proxy: listen: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Proxy{ln: ln, target: target, ctx: ctx, cancel: cancel,
		changed: make(chan struct{}), links: make(map[*link]struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// Addr returns the address clients dial instead of the target, "127.0.0.1:port".
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// SetLatency delays every chunk by d before it is forwarded, in both directions, on open and new
// connections alike; 0 removes the delay. A direction forwards one chunk at a time, so data keeps
// its order, and chunks arriving during a delay wait for it too.
func (p *Proxy) SetLatency(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.latency = d
	p.wakeLocked()
}

// Cut closes every open connection and closes new ones as soon as they are accepted, so clients
// see EOF or a reset at once, like a server that died.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mode = cutting
	for l := range p.links {
		p.closeLocked(l)
	}
}

// Blackhole stops forwarding on open connections and accepts new ones without forwarding
// anything, and closes nothing: clients hang until their own timeouts, like a frozen server or
// a network partition. What they send meanwhile is lost.
func (p *Proxy) Blackhole() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mode = blackholing
	for l := range p.links {
		l.blackholed = true
	}
	p.wakeLocked()
}

// Restore forwards new connections normally again. Blackholed connections are closed, so that
// clients reconnect rather than hang on a stream that lost data; cut ones stay closed.
func (p *Proxy) Restore() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.mode = forwarding
	for l := range p.links {
		if l.blackholed {
			p.closeLocked(l)
		}
	}
}

// Conns returns the number of open proxied connections.
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

// Accepted returns the number of connections accepted since the proxy started, refused ones
// (while cutting) included.
func (p *Proxy) Accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepts
}

// Close closes the listener and every connection and waits for the proxy's goroutines to end.
// It is idempotent.
func (p *Proxy) Close() {
	p.mu.Lock()
	if !p.closed {
		p.closed = true
		p.ln.Close()
		p.cancel()
		for l := range p.links {
			p.closeLocked(l)
		}
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return // Close closed the listener
		}
		p.mu.Lock()
		p.accepts++
		if p.closed || p.mode == cutting {
			p.mu.Unlock()
			c.Close()
			continue
		}
		l := &link{client: c, done: make(chan struct{}), blackholed: p.mode == blackholing}
		p.links[l] = struct{}{}
		// Added under mu with closed false, so never after Close started waiting.
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(l)
	}
}

// serve dials the target for l and forwards both ways until either side ends or the proxy
// closes l.
func (p *Proxy) serve(l *link) {
	defer p.wg.Done()
	p.mu.Lock()
	blackholed := l.blackholed
	p.mu.Unlock()
	if blackholed {
		p.pipe(l, l.client, nil) // drops what it reads until the client or Restore closes l
		return
	}
	ctx, cancel := context.WithTimeout(p.ctx, 5*time.Second)
	var d net.Dialer
	server, err := d.DialContext(ctx, "tcp", p.target)
	cancel()
	if err != nil {
		p.closeLink(l) // the client sees EOF, as if the target had refused it
		return
	}
	p.mu.Lock()
	if _, open := p.links[l]; !open { // Cut, Restore or Close got here during the dial
		p.mu.Unlock()
		server.Close()
		return
	}
	l.server = server
	p.wg.Add(1)
	p.mu.Unlock()
	go func() {
		defer p.wg.Done()
		p.pipe(l, server, l.client)
	}()
	p.pipe(l, l.client, server)
}

// pipe copies src to dst one chunk at a time, holding each for the latency, and closes l when
// src ends or a write fails. It drops chunks once l is blackholed (dst is nil only then).
func (p *Proxy) pipe(l *link, src, dst net.Conn) {
	defer p.closeLink(l)
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && p.hold(l, time.Now()) {
			if _, err := dst.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// hold waits until a chunk read at readAt is due and reports whether to forward it: false when
// l is blackholed or closed. It waits on a timer, not under mu, and starts over when the
// settings change, so that a new latency or a Blackhole applies to a chunk already waiting.
func (p *Proxy) hold(l *link, readAt time.Time) bool {
	for {
		p.mu.Lock()
		latency, blackholed, changed := p.latency, l.blackholed, p.changed
		p.mu.Unlock()
		if blackholed {
			return false
		}
		wait := time.Until(readAt.Add(latency))
		if wait <= 0 {
			return true
		}
		timer := time.NewTimer(wait)
		select {
		case <-timer.C:
		case <-changed:
			timer.Stop()
		case <-l.done:
			timer.Stop()
			return false
		}
	}
}

func (p *Proxy) closeLink(l *link) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closeLocked(l)
}

// closeLocked closes both ends of l and forgets it; p.mu must be held. Closing a net.Conn does
// not block, and it unblocks the pipes reading or writing l.
func (p *Proxy) closeLocked(l *link) {
	if _, open := p.links[l]; !open {
		return
	}
	delete(p.links, l)
	close(l.done)
	l.client.Close()
	if l.server != nil {
		l.server.Close()
	}
}

// wakeLocked wakes every held chunk to look at the settings again; p.mu must be held.
func (p *Proxy) wakeLocked() {
	close(p.changed)
	p.changed = make(chan struct{})
}
