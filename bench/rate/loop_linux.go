package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"
	"unsafe"

	"github.com/cachecar/cachecar/bench/internal/cpustat"
)

// sysEpollPwait2 is epoll_pwait2(2) (Linux 5.11+), the same number on every architecture; the
// syscall package predates it. Its timeout is a timespec, where epoll_wait's is whole
// milliseconds: a send due in 300 us would otherwise wait 1 ms.
const sysEpollPwait2 = 441

// maxWait bounds one wait for events, so that the run checks its context, the end of the
// schedule and the requests' timeouts at least that often.
const maxWait = 10 * time.Millisecond

// conn is one keep-alive connection of the loop.
type conn struct {
	fd    int    // -1: closed, dialled again on its next send
	buf   []byte // received, not yet parsed
	busy  bool   // a request is in flight
	due   time.Time
	sent  time.Time
	queue []time.Time // scheduled times of requests that found the connection busy, oldest first
}

// loop is the whole load: one goroutine, one epoll set over every connection's socket, no
// other goroutine and no Go timer. With a goroutine per connection, an answer reaches its
// goroutine through the Go scheduler (another thread woken, often), and a send on a Go timer can
// be late by up to 1 ms (the runtime waits for timers in epoll_wait, whose timeout is whole
// milliseconds); both count in the latency, and on a 2-core machine they made a bare server's
// p99 at 10000/s several times what this loop measures. Here a send waits in epoll_pwait2 with
// a nanosecond timeout, and an answer is read in the wake-up that sees it.
type loop struct {
	o      options
	reqs   [][]byte
	header []byte
	sa     syscall.Sockaddr
	family int
	epfd   int
	conns  []*conn
	events []syscall.EpollEvent
	pwait2 bool // epoll_pwait2 works (else epoll_wait, millisecond timeouts)
	res    *result
	rng    func(n int) int
}

// runLoad opens o.conns connections with one untimed request each, then sends
// rate x duration requests on schedule (see the package doc) and returns what happened.
func runLoad(ctx context.Context, o options, reqs [][]byte, rng func(n int) int) (*result, error) {
	ip, port, err := hostPort(o.addr)
	if err != nil {
		return nil, err
	}
	l := &loop{o: o, reqs: reqs, header: []byte(o.header), events: make([]syscall.EpollEvent, 128), pwait2: true, rng: rng}
	if ip4 := ip.To4(); ip4 != nil {
		l.family, l.sa = syscall.AF_INET, &syscall.SockaddrInet4{Port: port, Addr: [4]byte(ip4)}
	} else {
		l.family, l.sa = syscall.AF_INET6, &syscall.SockaddrInet6{Port: port, Addr: [16]byte(ip.To16())}
	}
	if l.epfd, err = syscall.EpollCreate1(syscall.EPOLL_CLOEXEC); err != nil {
		return nil, fmt.Errorf("epoll_create1: %w", err)
	}
	defer l.close()
	l.conns = make([]*conn, o.conns)
	for i := range l.conns {
		l.conns[i] = &conn{fd: -1, buf: make([]byte, 0, 16<<10)}
		if err := l.dial(i); err != nil {
			return nil, fmt.Errorf("connection %d: %w", i, err)
		}
	}
	if err := l.open(ctx); err != nil {
		return nil, err
	}
	if err := l.run(ctx); err != nil {
		return nil, err
	}
	return l.res, nil
}

func hostPort(addr string) (net.IP, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, 0, err
	}
	ip := net.ParseIP(host)
	port, err := net.LookupPort("tcp", p)
	if ip == nil || err != nil {
		return nil, 0, fmt.Errorf("%s: want <IP>:<port>", addr)
	}
	return ip, port, nil
}

func (l *loop) close() {
	for _, c := range l.conns {
		if c != nil && c.fd >= 0 {
			syscall.Close(c.fd)
			c.fd = -1
		}
	}
	syscall.Close(l.epfd)
}

// dial connects connection i (blocking: on loopback a connect answers at once, and SO_SNDTIMEO
// bounds it) and adds it to the epoll set, non-blocking from then on.
func (l *loop) dial(i int) error {
	fd, err := syscall.Socket(l.family, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	tv := syscall.NsecToTimeval(int64(requestTimeout))
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_SNDTIMEO, &tv); err != nil {
		syscall.Close(fd)
		return fmt.Errorf("SO_SNDTIMEO: %w", err)
	}
	for {
		err = syscall.Connect(fd, l.sa)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		syscall.Close(fd)
		return fmt.Errorf("connect %s: %w", l.o.addr, err)
	}
	// As Go's net package and wrk do: a request goes out in one segment at once.
	if err := syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1); err != nil {
		syscall.Close(fd)
		return fmt.Errorf("TCP_NODELAY: %w", err)
	}
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return err
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: int32(i)}
	if err := syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
		syscall.Close(fd)
		return fmt.Errorf("epoll_ctl: %w", err)
	}
	c := l.conns[i]
	c.fd, c.buf = fd, c.buf[:0]
	return nil
}

// drop closes connection i after an error or an answer that ends it; its next send dials again.
func (l *loop) drop(i int) {
	c := l.conns[i]
	if c.fd >= 0 {
		syscall.Close(c.fd) // also removes it from the epoll set
		c.fd = -1
	}
	c.buf = c.buf[:0]
}

// wait waits for events until d has passed (d <= 0: only what is ready) and returns how many
// are in l.events.
func (l *loop) wait(d time.Duration) (int, error) {
	d = max(min(d, maxWait), 0)
	for {
		var n uintptr
		var errno syscall.Errno
		if l.pwait2 {
			ts := syscall.NsecToTimespec(int64(d))
			n, _, errno = syscall.Syscall6(sysEpollPwait2, uintptr(l.epfd), uintptr(unsafe.Pointer(&l.events[0])),
				uintptr(len(l.events)), uintptr(unsafe.Pointer(&ts)), 0, 0)
			if errno == syscall.ENOSYS {
				l.pwait2 = false
				continue
			}
		} else {
			// Rounded up: an earlier wake-up would only wait again.
			ms := int((d + time.Millisecond - 1) / time.Millisecond)
			m, err := syscall.EpollWait(l.epfd, l.events, ms)
			if err != nil && !errors.As(err, &errno) {
				return 0, fmt.Errorf("epoll_wait: %w", err)
			}
			n = uintptr(max(m, 0))
		}
		switch errno {
		case 0:
			return int(n), nil
		case syscall.EINTR:
			return 0, nil
		default:
			return 0, fmt.Errorf("epoll wait: %w", errno)
		}
	}
}

// send writes a request on connection i (dialling first if it is closed) and marks it busy;
// due is its scheduled time. A failed dial or write counts as an error of that request.
func (l *loop) send(i int, req []byte, due time.Time) bool {
	c := l.conns[i]
	if c.fd < 0 {
		if err := l.dial(i); err != nil {
			l.fail(err)
			return false
		}
		l.res.newConns++
	}
	c.due, c.sent, c.busy = due, time.Now(), true
	// A request is a few hundred bytes: the socket's send buffer takes it whole or the
	// connection is in trouble.
	w, err := syscall.Write(c.fd, req)
	if err == nil && w != len(req) {
		err = fmt.Errorf("short write: %d of %d bytes", w, len(req))
	}
	if err != nil {
		c.busy = false
		l.drop(i)
		l.fail(fmt.Errorf("write: %w", err))
		return false
	}
	return true
}

func (l *loop) fail(err error) {
	l.res.errors++
	if l.res.firstErr == nil {
		l.res.firstErr = err
	}
}

// read takes what connection i has received and parses the answers in it; for each it calls
// done. It returns false when the connection was dropped (closed by the server, an unparsable
// answer, an error), after counting the request in flight, if any, as an error.
func (l *loop) read(i int, done func(i int, a answer)) bool {
	c := l.conns[i]
	var closed error // the read that ended the connection; the answers before it still count
	for {
		if cap(c.buf)-len(c.buf) < 4<<10 {
			c.buf = append(c.buf, make([]byte, cap(c.buf))...)[:len(c.buf)]
		}
		m, err := syscall.Read(c.fd, c.buf[len(c.buf):cap(c.buf)])
		if errors.Is(err, syscall.EAGAIN) {
			break
		}
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil || m == 0 {
			closed = err
			if closed == nil {
				closed = errors.New("connection closed by the server")
			}
			break
		}
		c.buf = c.buf[:len(c.buf)+m]
	}
	for len(c.buf) > 0 {
		a, n, err := parseAnswer(c.buf, l.header)
		if err == nil && n > 0 && !c.busy {
			err = errors.New("answer without a request")
		}
		if err != nil {
			if c.busy {
				c.busy = false
				l.fail(err)
			}
			l.drop(i)
			return false
		}
		if n == 0 {
			break
		}
		c.buf = c.buf[:copy(c.buf, c.buf[n:])]
		c.busy = false
		done(i, a)
		if !a.keep {
			l.drop(i)
			return false
		}
	}
	if closed != nil {
		if c.busy {
			c.busy = false
			l.fail(fmt.Errorf("read: %w", closed))
		}
		l.drop(i)
		return false
	}
	return true
}

// open sends one untimed request on every connection and waits for the answers, so that the
// run measures requests on open keep-alive connections.
func (l *loop) open(ctx context.Context) error {
	l.res = &result{} // send counts into it; replaced before the run
	for i := range l.conns {
		if !l.send(i, l.reqs[i%len(l.reqs)], time.Now()) {
			return fmt.Errorf("opening connection %d: %w", i, l.res.firstErr)
		}
	}
	var failed error
	pending := len(l.conns)
	deadline := time.Now().Add(requestTimeout)
	for pending > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("opening %d connections: %d answers missing after %s", len(l.conns), pending, requestTimeout)
		}
		n, err := l.wait(time.Until(deadline))
		if err != nil {
			return err
		}
		for _, ev := range l.events[:n] {
			i := int(ev.Fd)
			if l.conns[i].fd < 0 {
				continue
			}
			errs := l.res.errors
			l.read(i, func(i int, a answer) {
				pending--
				if a.status != l.o.want && failed == nil {
					failed = fmt.Errorf("connection %d: status %d, want %d", i, a.status, l.o.want)
				}
			})
			if l.res.errors > errs {
				return fmt.Errorf("opening connection %d: %w", i, l.res.firstErr)
			}
		}
	}
	if failed != nil {
		return failed
	}
	// A connection the server closed after its answer is dialled again by its first send.
	return nil
}

// run sends the schedule. Request g (0, 1, 2, ...) is due at start + g/rate on connection
// g mod conns. A connection still busy at a request's due time queues it, and sends it as soon
// as the previous answer is in; its latency counts from its due time all the same. A request
// not sent by duration + grace is counted as not sent; one without an answer after
// requestTimeout is an error (its connection is dropped).
func (l *loop) run(ctx context.Context) error {
	n := l.o.requests()
	res := &result{requests: n, values: map[string]int{}, statuses: map[int]int{}, selfCPU: -1, cpuBusy: "n/a",
		lat: make([]time.Duration, 0, n), svc: make([]time.Duration, 0, n), late: make([]time.Duration, 0, n),
		due: make([]time.Time, 0, n), status: make([]int, 0, n)}
	l.res = res
	nc := len(l.conns)
	start := time.Now().Add(20 * time.Millisecond)
	res.start = start
	due := func(g int) time.Time {
		return start.Add(time.Duration(int64(g) * int64(time.Second) / int64(l.o.rate)))
	}
	stopBy := start.Add(l.o.duration + l.o.grace)
	cpuBefore, cpuErr := cpustat.Read()
	selfBefore, selfErr := selfCPU()
	wallStart := time.Now()

	pick := func() []byte { return l.reqs[l.rng(len(l.reqs))] }
	// next: sends queued requests of connection i while it is free.
	next := func(i int) {
		c := l.conns[i]
		for !c.busy && len(c.queue) > 0 {
			d := c.queue[0]
			c.queue = c.queue[1:]
			l.send(i, pick(), d)
		}
	}
	done := func(i int, a answer) {
		c := l.conns[i]
		now := time.Now()
		res.lastDone = now
		res.lat = append(res.lat, now.Sub(c.due))
		res.due = append(res.due, c.due)
		res.status = append(res.status, a.status)
		res.svc = append(res.svc, now.Sub(c.sent))
		res.late = append(res.late, c.sent.Sub(c.due))
		v := a.value
		if v == "" {
			v = "none"
		}
		res.values[v]++
		res.statuses[a.status]++
		if a.status != l.o.want && res.firstErr == nil {
			res.firstErr = fmt.Errorf("status %d, want %d", a.status, l.o.want)
		}
	}
	g, stopped := 0, false
	lastScan := time.Now()
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("interrupted: %w", err)
		}
		now := time.Now()
		if !stopped && now.After(stopBy) {
			// The rest of the schedule, and what waits for a busy connection, was not sent in time.
			stopped = true
			res.notSent += n - g
			g = n
			for _, c := range l.conns {
				res.notSent += len(c.queue)
				c.queue = nil
			}
		}
		for ; g < n && !due(g).After(now); g++ {
			i := g % nc
			if c := l.conns[i]; c.busy || len(c.queue) > 0 {
				c.queue = append(c.queue, due(g))
				res.queued++
				continue
			}
			l.send(i, pick(), due(g))
		}
		if now.Sub(lastScan) >= maxWait {
			lastScan = now
			for i, c := range l.conns {
				if c.busy && now.Sub(c.sent) > requestTimeout {
					c.busy = false
					l.drop(i)
					l.fail(fmt.Errorf("no answer within %s", requestTimeout))
					next(i)
				}
			}
		}
		inFlight := false
		for _, c := range l.conns {
			if c.busy || len(c.queue) > 0 {
				inFlight = true
				break
			}
		}
		if g >= n && !inFlight {
			break
		}
		wait := maxWait
		if g < n {
			wait = due(g).Sub(now)
		}
		m, err := l.wait(wait)
		if err != nil {
			return err
		}
		for _, ev := range l.events[:m] {
			i := int(ev.Fd)
			if l.conns[i].fd < 0 {
				continue
			}
			l.read(i, done)
			next(i)
		}
	}

	res.wall = time.Since(wallStart)
	if cpuAfter, err := cpustat.Read(); cpuErr == nil && err == nil {
		if busy, ok := cpustat.BusyPercent(cpuBefore, cpuAfter); ok {
			res.cpuBusy = busy
		}
	}
	if selfAfter, err := selfCPU(); selfErr == nil && err == nil {
		res.selfCPU = selfAfter - selfBefore
	}
	return nil
}
