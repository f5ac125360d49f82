package cachepolicy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/valkey-io/valkey-go"
)

// errNotConnected: the store has no Valkey connection yet (unreachable at start-up).
var errNotConnected = errors.New("valkey not connected")

// errMiss: the key is not in Valkey.
var errMiss = errors.New("cache miss")

// StoreOptions configures the Valkey store. Zero durations are not valid; cmd passes the
// configured (always positive) values.
type StoreOptions struct {
	Addrs    []string
	Username string
	Password string
	DB       int
	// TLS, when set, is the TLS configuration of every connection; nil connects in plain TCP.
	TLS *tls.Config
	// Timeout bounds every call; past it the read treats Valkey as unavailable.
	Timeout time.Duration
	// DialTimeout bounds one connection attempt.
	DialTimeout time.Duration
	// ReconnectMax caps the back-off between attempts while Valkey was unreachable at start-up.
	// Once connected, valkey-go reconnects by itself on the next call.
	ReconnectMax time.Duration
	// MaxFlushDelay is valkey-go's: how long the writer may wait to batch concurrent commands
	// into one write. 0 flushes at once.
	MaxFlushDelay time.Duration
	// TierSize is the in-process tier's memory in bytes; 0 runs without it. At least
	// MinTierSize.
	TierSize int
	// Breaker opens after this many failed calls in a row (BreakerThreshold), stays open from
	// BreakerMinOpen, doubling up to BreakerMaxOpen while its probes fail.
	BreakerThreshold int
	BreakerMinOpen   time.Duration
	BreakerMaxOpen   time.Duration
	// ProbeKey, when set, is the key Ping writes (with a short expiry) instead of sending PING:
	// a server that answers reads but refuses writes (OOM, READONLY) then fails the check.
	ProbeKey string
}

// probeTTL is how long the key of a write probe lives.
const probeTTL = 10 * time.Second

// MinTierSize is the smallest in-process tier: fastcache's 512 buckets of 64 KiB chunks.
const MinTierSize = 32 << 20

// tierTTL bounds how long the in-process tier keeps a copy whatever the server's TTL says; the
// server's TTL (read with the value) and its invalidation messages normally end it first.
const tierTTL = time.Hour

// tierPingGap is how long the tracked connection may receive nothing before valkey-go PINGs it:
// a connection that stopped delivering is closed, and its copies dropped, within about
// 2 x tierPingGap + 20 x Timeout.
const tierPingGap = time.Second

// errCircuitOpen: the breaker is open; the call was not made.
var errCircuitOpen = errors.New("valkey circuit open")

// Store is the shared cache tier in Valkey/Redis. It is safe for concurrent use. While it has
// no connection, or Valkey fails, its calls fail fast and the resolver reads PostgreSQL.
type Store struct {
	opts   StoreOptions
	log    zerolog.Logger
	m      *Metrics
	client atomic.Pointer[clientBox]
	// dialErr is the last failed connect's error, for the calls made while not connected;
	// openErr what the calls the breaker refuses return: errCircuitOpen with the last failed
	// call's error, made once per failure rather than per refused call.
	dialErr atomic.Pointer[error]
	openErr atomic.Pointer[error]
	up      atomic.Bool
	cb      *Breaker
	tier    tierStats
	tierOn  atomic.Bool // the connected client caches in process
	mem     *memStore   // set: no Valkey, the cache is this process's memory alone
}

// NewMemoryStore returns a store without Valkey: a bounded cache in this process's memory
// (size bytes, at least MinTierSize), with the same leases and tag sets as the Valkey store, for
// a single sidecar. Invalidations apply to it as they do to Valkey.
func NewMemoryStore(size int, log zerolog.Logger, m *Metrics) *Store {
	s := NewStore(StoreOptions{TierSize: size}, log, m)
	s.mem = newMemStore(size)
	s.tierOn.Store(true)
	m.tierOn.Set(1)
	s.up.Store(true) // usable; cachecar_valkey_up stays 0: there is no Valkey
	return s
}

// Memory reports whether the store is the process's memory alone (no Valkey).
func (s *Store) Memory() bool { return s.mem != nil }

type clientBox struct{ c valkey.Client }

// NewStore returns a store that is not yet connected. It starts no goroutines; call Connect
// and Run.
func NewStore(opts StoreOptions, log zerolog.Logger, m *Metrics) *Store {
	s := &Store{opts: opts, log: log, m: m}
	s.cb = &Breaker{Threshold: max(opts.BreakerThreshold, 1), MinOpen: opts.BreakerMinOpen, MaxOpen: opts.BreakerMaxOpen,
		OnChange: func(state int) {
			m.circuit.Set(float64(state))
			m.circuitChanges.WithLabelValues(CircuitName(state)).Inc()
			if state == CircuitOpen {
				log.Warn().Msg("valkey circuit open: reads go to PostgreSQL")
			} else if state == CircuitClosed {
				log.Info().Msg("valkey circuit closed: the cache serves again")
			}
		}}
	if s.cb.MinOpen <= 0 {
		s.cb.MinOpen = time.Second
	}
	s.cb.MaxOpen = max(s.cb.MaxOpen, s.cb.MinOpen)
	return s
}

// Circuit returns the breaker's state (CircuitClosed, CircuitHalfOpen, CircuitOpen).
func (s *Store) Circuit() int { return s.cb.State() }

// Tier reports whether the in-process tier is on, and what it holds.
func (s *Store) Tier() (bool, TierStats) {
	if s.mem != nil {
		return true, s.mem.stats()
	}
	return s.tierOn.Load(), s.tier.read()
}

// RetryDelay is the RetryDelay of cachecar's Valkey clients. valkey-go retries a read-only
// command that failed while its caller's context is still live, by default with back-off until
// the deadline. That suits one case: a read that joined another reader's load of the same key
// (DoCache's flight) and got that reader's context error, with its own context and the
// connection fine; it is retried at once (at most twice). Any other failure (a dropped or
// refused connection, a timeout) is not retried: with Valkey gone every read in flight would
// wait out valkey.timeout before going to PostgreSQL. The breaker and the fallback to
// PostgreSQL are the retry.
func RetryDelay(attempts int, _ valkey.Completed, err error) time.Duration {
	if attempts <= 2 && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)) {
		return 0
	}
	return -1
}

// Connect makes one connection attempt, bounded by the dial timeout. With a tier size set, it
// asks for client tracking; a server that cannot track (RESP2 only, or CLIENT refused by ACL)
// is used without the in-process tier, and the log says so.
func (s *Store) Connect() error {
	if s.mem != nil || s.client.Load() != nil {
		return nil
	}
	opt := valkey.ClientOption{
		InitAddress:      s.opts.Addrs,
		Username:         s.opts.Username,
		Password:         s.opts.Password,
		SelectDB:         s.opts.DB,
		DisableCache:     true,
		RetryDelay:       RetryDelay,
		Dialer:           net.Dialer{Timeout: s.opts.DialTimeout, KeepAlive: 30 * time.Second},
		TLSConfig:        s.opts.TLS,
		ConnWriteTimeout: s.opts.Timeout * 20,
		ClientName:       "cachecar",
		MaxFlushDelay:    s.opts.MaxFlushDelay,
	}
	var c valkey.Client
	var err error
	tier := false
	if s.opts.TierSize > 0 {
		// Every pipelined connection gets its own store. One connection (auto-pipelined, so
		// concurrent calls still share writes) keeps one store: a hit is one lookup, and the
		// whole tier size is one bound.
		c, err = valkey.NewClient(trackedOption(opt, s.opts.TierSize, &s.tier))
		tier = err == nil
		if errors.Is(err, valkey.ErrNoCache) {
			s.log.Warn().Err(err).Msg("valkey does not support client tracking (RESP3 CLIENT TRACKING): running without the in-process tier")
			c, err = valkey.NewClient(opt)
		}
	} else {
		c, err = valkey.NewClient(opt)
	}
	if err != nil {
		s.setUp(false)
		s.dialErr.Store(&err)
		return fmt.Errorf("connect valkey %v: %w", s.opts.Addrs, err)
	}
	s.tierOn.Store(tier)
	if tier {
		s.m.tierOn.Set(1)
	}
	s.client.Store(&clientBox{c})
	s.dialErr.Store(nil)
	s.m.valkeyConns.Inc()
	s.setUp(true)
	return nil
}

// Run keeps trying to connect, with exponential back-off and jitter, while the store has no
// connection, then waits for ctx to end and closes the client.
func (s *Store) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for s.mem == nil && s.client.Load() == nil {
		wait := backoff/2 + rand.N(backoff/2+1)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		if err := s.Connect(); err != nil {
			s.log.Warn().Err(err).Dur("retry_in", backoff).Msg("valkey unreachable; reads go to PostgreSQL")
			backoff = min(backoff*2, s.opts.ReconnectMax)
			continue
		}
		s.log.Info().Strs("addrs", s.opts.Addrs).Msg("valkey connected")
	}
	<-ctx.Done()
	s.Close()
	return nil
}

// Close closes the client; it is idempotent.
func (s *Store) Close() {
	if b := s.client.Swap(nil); b != nil {
		b.c.Close()
	}
}

// Up reports whether the last Valkey call succeeded.
func (s *Store) Up() bool { return s.up.Load() }

func (s *Store) setUp(v bool) {
	s.up.Store(v)
	if v {
		s.m.valkeyUp.Set(1)
	} else {
		s.m.valkeyUp.Set(0)
	}
}

// get returns the client for one call, or errNotConnected, or errCircuitOpen while the breaker
// refuses calls. Every call it allows reports its end with ok or fail.
func (s *Store) get() (valkey.Client, error) {
	b := s.client.Load()
	if b == nil {
		return nil, s.notConnected()
	}
	if !s.cb.Allow() {
		if e := s.openErr.Load(); e != nil {
			return nil, *e // why it opened (an OOM reply, a timeout), for health to tell
		}
		return nil, errCircuitOpen
	}
	return b.c, nil
}

// getAlways is get for the invalidation listener's calls (deletes, resyncs, the server check),
// which the breaker never refuses: they are few, bounded by the listener's own timeout, and
// must not fail just because reads stopped trying. Their outcome still counts, so a resync that
// works closes the breaker at once.
func (s *Store) getAlways() (valkey.Client, error) {
	b := s.client.Load()
	if b == nil {
		return nil, s.notConnected()
	}
	return b.c, nil
}

// notConnected is errNotConnected, with why the last connect failed (WRONGPASS, a TLS error)
// when one did.
func (s *Store) notConnected() error {
	if e := s.dialErr.Load(); e != nil {
		return fmt.Errorf("%w: %w", errNotConnected, *e)
	}
	return errNotConnected
}

// fail records a failed call of op and returns err wrapped. A call its own caller gave up on
// (the client hung up) says nothing about Valkey and does not count against the breaker.
func (s *Store) fail(op string, err error) error {
	if errors.Is(err, context.Canceled) {
		return fmt.Errorf("valkey %s: %w", op, err)
	}
	s.m.valkeyErrs.WithLabelValues(op).Inc()
	s.setUp(false)
	open := fmt.Errorf("%w after: %w", errCircuitOpen, err)
	s.openErr.Store(&open)
	if refused(err) {
		s.cb.Trip()
	} else {
		s.cb.Failure()
	}
	return fmt.Errorf("valkey %s: %w", op, err)
}

// refused reports a reply by which the server refuses writes for now: OOM (maxmemory reached
// under noeviction) or READONLY (a replica, or a primary demoted by a failover). Reads between
// them would succeed and keep resetting a failure count, so these open the breaker at once:
// reads go to PostgreSQL until a probe finds the server writable again.
func refused(err error) bool {
	ve, ok := valkey.IsValkeyErr(err)
	if !ok {
		return false
	}
	msg := ve.Error()
	return strings.HasPrefix(msg, "OOM") || strings.HasPrefix(msg, "READONLY")
}

// okAlways records a listener call (see getAlways) that worked: it closes an open breaker only
// if it was as fast as a read's call must be, so that a slow Valkey answering the listener's few
// calls does not flap the breaker that keeps reads off it.
func (s *Store) okAlways(start time.Time) {
	if time.Since(start) <= s.opts.Timeout || s.cb.State() == CircuitClosed {
		s.ok()
		return
	}
	if !s.up.Load() {
		s.setUp(true)
	}
}

func (s *Store) ok() {
	s.cb.Success()
	if !s.up.Load() {
		s.setUp(true)
	}
}

// Ping checks Valkey: with a ProbeKey, by writing that key (SET with probeTTL), so that a server
// that still answers reads but refuses writes (OOM under noeviction, a read-only replica) fails
// the health check of an idle sidecar too, not only the next fill; without one, by a PING.
func (s *Store) Ping(ctx context.Context) error {
	if s.mem != nil {
		return nil
	}
	c, err := s.get()
	if err != nil {
		return err
	}
	cmd := c.B().Ping().Build()
	if s.opts.ProbeKey != "" {
		cmd = c.B().Set().Key(s.opts.ProbeKey).Value("1").PxMilliseconds(probeTTL.Milliseconds()).Build()
	}
	if err := c.Do(ctx, cmd).Error(); err != nil {
		return s.fail("ping", err)
	}
	s.ok()
	return nil
}

// Get returns the value of key and its remaining TTL, in one round trip, or from the
// in-process tier (local true) without one. A missing key is errMiss, a key holding another
// reader's fill lease errLeased.
func (s *Store) Get(ctx context.Context, key string) (body []byte, pttl time.Duration, local bool, err error) {
	if s.mem != nil {
		body, pttl, err = s.mem.Get(key)
		return body, pttl, true, err
	}
	if s.tierOn.Load() {
		// A hit in memory needs neither Valkey nor the breaker's leave: the copy is valid for as
		// long as its connection lives, and a broken connection empties its store.
		if body, pttl, ok := s.tier.peek(key); ok {
			if isLease(body) {
				return nil, 0, true, errLeased
			}
			return body, pttl, true, nil
		}
	}
	c, err := s.get()
	if err != nil {
		return nil, 0, false, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	var ms int64
	if s.tierOn.Load() {
		// The tier answers with the key's PTTL as Valkey sent it with the value (valkey-go
		// reads both in one MULTI), counted down since.
		res := c.DoCache(ctx, c.B().Get().Key(key).Cache(), tierTTL)
		body, err = res.AsBytes()
		local = res.IsCacheHit()
		ms = res.CachePTTL()
	} else {
		res := c.DoMulti(ctx, c.B().Get().Key(key).Build(), c.B().Pttl().Key(key).Build())
		body, err = res[0].AsBytes()
		if err == nil {
			if ms, err = res[1].AsInt64(); err != nil {
				ms, err = -1, nil // the value is good; only its age is unknown
			}
		}
	}
	if err != nil {
		if valkey.IsValkeyNil(err) {
			s.ok()
			return nil, 0, local, errMiss
		}
		return nil, 0, false, s.fail("get", err)
	}
	s.ok()
	if isLease(body) {
		return nil, 0, local, errLeased
	}
	return body, time.Duration(ms) * time.Millisecond, local, nil
}

// MGet returns the values of keys in order and their remaining TTLs, nil for each missing key,
// with one round trip for the keys the in-process tier does not hold (one MGET without the
// tier).
func (s *Store) MGet(ctx context.Context, keys []string) ([][]byte, []time.Duration, error) {
	if s.mem != nil {
		out, pttls := s.mem.MGet(keys)
		return out, pttls, nil
	}
	c, err := s.get()
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	out := make([][]byte, len(keys))
	pttls := make([]time.Duration, len(keys))
	if s.tierOn.Load() {
		cmds := make([]valkey.CacheableTTL, len(keys))
		for i, k := range keys {
			cmds[i] = valkey.CT(c.B().Get().Key(k).Cache(), tierTTL)
		}
		for i, r := range c.DoMultiCache(ctx, cmds...) {
			b, err := r.AsBytes()
			if valkey.IsValkeyNil(err) {
				continue
			}
			if err != nil {
				return nil, nil, s.fail("mget", err)
			}
			if !isLease(b) {
				out[i], pttls[i] = b, time.Duration(r.CachePTTL())*time.Millisecond
			}
		}
		s.ok()
		return out, pttls, nil
	}
	cmds := make(valkey.Commands, 0, len(keys)+1)
	cmds = append(cmds, c.B().Mget().Key(keys...).Build())
	for _, k := range keys {
		cmds = append(cmds, c.B().Pttl().Key(k).Build())
	}
	res := c.DoMulti(ctx, cmds...)
	msgs, err := res[0].ToArray()
	if err != nil {
		return nil, nil, s.fail("mget", err)
	}
	if len(msgs) != len(keys) {
		return nil, nil, s.fail("mget", fmt.Errorf("got %d values for %d keys", len(msgs), len(keys)))
	}
	for i := range msgs {
		if msgs[i].IsNil() {
			continue
		}
		b, err := msgs[i].AsBytes()
		if err != nil {
			return nil, nil, s.fail("mget", err)
		}
		if isLease(b) {
			continue // a fill in flight: a miss to this reader
		}
		out[i] = b
		ms, err := res[i+1].AsInt64()
		if err != nil {
			ms = -1
		}
		pttls[i] = time.Duration(ms) * time.Millisecond
	}
	s.ok()
	return out, pttls, nil
}
