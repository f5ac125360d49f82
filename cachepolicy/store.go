package cachepolicy

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
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
}

// Store is the shared cache tier in Valkey/Redis. It is safe for concurrent use. While it has
// no connection, or Valkey fails, its calls fail fast and the resolver reads PostgreSQL.
type Store struct {
	opts   StoreOptions
	log    zerolog.Logger
	m      *Metrics
	client atomic.Pointer[clientBox]
	up     atomic.Bool
}

type clientBox struct{ c valkey.Client }

// NewStore returns a store that is not yet connected. It starts no goroutines; call Connect
// and Run.
func NewStore(opts StoreOptions, log zerolog.Logger, m *Metrics) *Store {
	return &Store{opts: opts, log: log, m: m}
}

// Connect makes one connection attempt, bounded by the dial timeout.
func (s *Store) Connect() error {
	if s.client.Load() != nil {
		return nil
	}
	c, err := valkey.NewClient(valkey.ClientOption{
		InitAddress:      s.opts.Addrs,
		Username:         s.opts.Username,
		Password:         s.opts.Password,
		SelectDB:         s.opts.DB,
		DisableCache:     true,
		Dialer:           net.Dialer{Timeout: s.opts.DialTimeout, KeepAlive: 30 * time.Second},
		ConnWriteTimeout: s.opts.Timeout * 20,
		ClientName:       "cachecar",
		MaxFlushDelay:    s.opts.MaxFlushDelay,
	})
	if err != nil {
		s.setUp(false)
		return fmt.Errorf("connect valkey %v: %w", s.opts.Addrs, err)
	}
	s.client.Store(&clientBox{c})
	s.m.valkeyConns.Inc()
	s.setUp(true)
	return nil
}

// Run keeps trying to connect, with exponential back-off and jitter, while the store has no
// connection, then waits for ctx to end and closes the client.
func (s *Store) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for s.client.Load() == nil {
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

func (s *Store) get() (valkey.Client, error) {
	b := s.client.Load()
	if b == nil {
		return nil, errNotConnected
	}
	return b.c, nil
}

// fail records a failed call of op and returns err wrapped.
func (s *Store) fail(op string, err error) error {
	s.m.valkeyErrs.WithLabelValues(op).Inc()
	s.setUp(false)
	return fmt.Errorf("valkey %s: %w", op, err)
}

func (s *Store) ok() {
	if !s.up.Load() {
		s.setUp(true)
	}
}

// Ping checks Valkey with one PING.
func (s *Store) Ping(ctx context.Context) error {
	c, err := s.get()
	if err != nil {
		return err
	}
	if err := c.Do(ctx, c.B().Ping().Build()).Error(); err != nil {
		return s.fail("ping", err)
	}
	s.ok()
	return nil
}

// Get returns the value of key and its remaining TTL, in one round trip. A missing key is errMiss.
func (s *Store) Get(ctx context.Context, key string) ([]byte, time.Duration, error) {
	c, err := s.get()
	if err != nil {
		return nil, 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	res := c.DoMulti(ctx, c.B().Get().Key(key).Build(), c.B().Pttl().Key(key).Build())
	body, err := res[0].AsBytes()
	if err != nil {
		if valkey.IsValkeyNil(err) {
			s.ok()
			return nil, 0, errMiss
		}
		return nil, 0, s.fail("get", err)
	}
	if isLease(body) {
		s.ok()
		return nil, 0, errLeased
	}
	pttl, err := res[1].AsInt64()
	if err != nil {
		pttl = -1 // the value is good; only its age is unknown
	}
	s.ok()
	return body, time.Duration(pttl) * time.Millisecond, nil
}

// MGet returns the values of keys in order, nil for each missing key, with one MGET.
func (s *Store) MGet(ctx context.Context, keys []string) ([][]byte, error) {
	c, err := s.get()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	msgs, err := c.Do(ctx, c.B().Mget().Key(keys...).Build()).ToArray()
	if err != nil {
		return nil, s.fail("mget", err)
	}
	if len(msgs) != len(keys) {
		return nil, s.fail("mget", fmt.Errorf("got %d values for %d keys", len(msgs), len(keys)))
	}
	out := make([][]byte, len(keys))
	for i := range msgs {
		if msgs[i].IsNil() {
			continue
		}
		b, err := msgs[i].AsBytes()
		if err != nil {
			return nil, s.fail("mget", err)
		}
		if isLease(b) {
			continue // a fill in flight: a miss to this reader
		}
		out[i] = b
	}
	s.ok()
	return out, nil
}
