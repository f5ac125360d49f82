// Package sessions stores express-session sessions: Valkey first, PostgreSQL as the durable
// store of record, byte-compatible with connect-redis and connect-pg-simple.
package sessions

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/valkey-io/valkey-go"
)

// How it keeps its promises (DESIGN.md invariant 5):
//
//   - Never lost: a write is acknowledged only after PostgreSQL committed it. Valkey gets the same
//     bytes right after, so reads are served from memory.
//   - Valkey is trusted for reads only while it provably holds what PostgreSQL holds: a sentinel
//     key in Valkey must equal the epoch kept in PostgreSQL. Every write that could not reach
//     Valkey (it was down, or the call failed) changes the epoch in the same transaction, and a
//     destroy records a tombstone, so that a Valkey that comes back, empty or with old copies, is
//     not trusted until a reconciliation has copied PostgreSQL into it, deleted the tombstoned
//     keys and set the sentinel. A restart that empties Valkey loses the sentinel too.
//   - After a migration from connect-redis (which wrote Valkey alone), Valkey stays the source
//     of truth until PostgreSQL has been synced from it (migration.go).
//   - A trusted Valkey's "absent" is confirmed in PostgreSQL (except while Valkey is the source
//     of truth, valkeyOnly): a key evicted, or run out a moment before its row, does not lose
//     its session.
//   - While Valkey is not trusted, or known down, reads and writes use PostgreSQL only: no
//     per-request Valkey timeout once the outage is known. A probe every RefreshInterval brings
//     it back. Those reads may be answered from copies of PostgreSQL's answers, kept correct by
//     the session table's notify triggers (pgcopies.go).
//   - Expiry is the stores': the key's TTL and the expire column, computed as connect-redis and
//     connect-pg-simple compute them from cookie.expires; the body is never rewritten to move it.

// Store results, as sent in the X-Session-Store header.
const (
	FromValkey   = "valkey"
	FromPostgres = "postgres"
)

// Errors the HTTP layer maps to status codes.
var (
	// ErrNotFound: no such session, or it expired.
	ErrNotFound = errors.New("session not found")
	// ErrUnavailable: PostgreSQL, the durable store, cannot be reached; nothing was acknowledged.
	ErrUnavailable = errors.New("session store unavailable")
)

// InputError is a bad sid or body: a 400 (or 413 for TooLarge).
type InputError struct {
	Code, Message string
	TooLarge      bool
}

func (e *InputError) Error() string { return e.Message }

// sidRE is what express-session's ids (uid-safe, base64url) are made of.
var sidRE = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,256}$`)

// CheckSID returns an *InputError unless sid is a plausible express-session id.
func CheckSID(sid string) error {
	if !sidRE.MatchString(sid) {
		return &InputError{Code: "bad_sid", Message: "sid must be 1 to 256 characters of A-Z, a-z, 0-9, '_', '.', '-'"}
	}
	return nil
}

// Options configures a Store. Zero durations are not valid (a zero Timeout fails every Valkey
// call, a zero RefreshInterval panics in Run): cmd passes the configured values.
type Options struct {
	// Prefix is the Valkey key prefix: the namespace plus connect-redis's "sess:".
	Prefix string
	// SentinelKey holds the epoch Valkey was last reconciled to.
	SentinelKey string
	// TTL is the lifetime of a session whose cookie has no expires (connect-redis's ttl option,
	// connect-pg-simple's ttl).
	TTL time.Duration
	// Table is the connect-pg-simple table, schema-qualified if configured, already quoted.
	Table string
	// MaxBody bounds a stored session's JSON, in bytes.
	MaxBody int64
	// Timeout bounds each Valkey call.
	Timeout time.Duration
	// RefreshInterval is how often the store re-reads the epoch, checks the sentinel and, while
	// Valkey is down, probes it.
	RefreshInterval time.Duration
	// PruneInterval is how often expired rows are deleted (jittered ±10%).
	PruneInterval time.Duration
	// DeleteUnknown makes a reconciliation delete sessions in Valkey that PostgreSQL does not
	// have (a Valkey restored from an old snapshot). Turn it off while apps still write
	// sessions to Valkey directly with connect-redis: theirs are not in PostgreSQL.
	DeleteUnknown bool
	// ReadPostgres (migrating from connect-pg-simple) serves every read from PostgreSQL and
	// leaves Valkey alone: apps that write the table directly never tell Valkey. A marker in the
	// sentinel keeps every sidecar from trusting Valkey until one running without it has
	// reconciled it (deleting what PostgreSQL does not have).
	ReadPostgres bool
	// AllowPooler keeps copies of PostgreSQL's answers also when the LISTEN connection goes
	// through a pooler (database.session_pooler: one that pins each client to a server
	// connection, as PgBouncer's session pooling does); without it such a connection keeps none.
	AllowPooler bool
	// ValkeyOnly (migrating from connect-redis) makes Valkey the source of truth, as it is for
	// connect-redis: no reads from PostgreSQL when Valkey is down (503), and reconciliation
	// copies no rows into Valkey, because a row may be a session connect-redis has destroyed.
	ValkeyOnly bool
	// MigrationStale is how long after the last sidecar running with ValkeyOnly set its flag the
	// others end the migration from connect-redis by syncing PostgreSQL from Valkey (see
	// migration.go); 0 means 30 s.
	MigrationStale time.Duration
	// Local is the in-process tier of the Valkey client dial returns, when it keeps one
	// (client tracking: cachepolicy.LocalCopies); nil when it keeps none.
	Local LocalCopies
	// PostgresCopies bounds the copies of sessions read from PostgreSQL (pgcopies.go), in
	// bytes; 0 keeps none. They are never kept with ValkeyOnly.
	PostgresCopies int64
	// Listen opens the copies' LISTEN connection: a direct session (LISTEN does not survive
	// transaction pooling). nil takes one out of the pool.
	Listen func(context.Context) (*pgx.Conn, error)
	// DB is the database circuit breaker the read path uses (cachepolicy's): while it is open,
	// session reads and writes that need PostgreSQL fail at once (503) instead of each waiting
	// on a dead or frozen server, and theirs count towards opening it. nil: none.
	DB Breaker
}

// Breaker is a circuit breaker: a call it allows is followed by Success or Failure, except one
// whose caller hung up (no verdict; the breaker replaces a probe that never reports).
type Breaker interface {
	Allow() bool
	Success()
	Failure()
}

// errCircuitOpen: the database breaker refused the call; nothing was sent to PostgreSQL.
var errCircuitOpen = fmt.Errorf("%w: database circuit open after repeated failures", ErrUnavailable)

// LocalCopies is the Valkey client's in-process tier, as the store needs it: reads are
// answered from the tracked copies of the session and the sentinel when both are held (from one
// moment), else read through DoCache, which keeps copies; and the store drops copies itself
// where waiting for Valkey's invalidation message would be too late.
type LocalCopies interface {
	// Forget drops the copies of keys; called once this process's change to them is
	// acknowledged, so that its next read does not find the old value.
	Forget(keys ...string)
	// Reset drops every copy and keeps none of the reads in flight.
	Reset()
	// Peek returns the copy of key as a GET reads it (a nil reply for an absent key), without
	// reading Valkey; ok is false when there is none.
	Peek(key string) (valkey.ValkeyMessage, bool)
}

// localTTL bounds how long a tracked copy lives whatever the key's TTL; the key's TTL (a session
// always has one) and Valkey's invalidation messages normally end it first.
const localTTL = time.Hour

// pgMigrationMarker is the sentinel while some sidecar runs with ReadPostgres.
const pgMigrationMarker = "migrating:connect-pg-simple"

// Store is the session store. Safe for concurrent use; Run keeps it in shape.
type Store struct {
	opts Options
	dial func() (valkey.Client, error) // nil: no Valkey configured, PostgreSQL only
	vk   atomic.Pointer[vkBox]         // set once dial succeeds
	db   *pgxpool.Pool
	log  zerolog.Logger
	m    *metrics
	now  func() time.Time

	up      atomic.Bool // the last Valkey call worked (the breaker)
	trusted atomic.Bool // the sentinel matched the token at the last check
	// token is what the sentinel must hold for Valkey to be trusted: the epoch in PostgreSQL
	// and the Valkey server's run id, so that a restart from a snapshot (which brings the
	// sentinel back with old data) is not trusted.
	token atomic.Pointer[string]
	// pendingStale: a write transaction failed after it had touched Valkey; Run must move the
	// epoch before this store trusts Valkey again.
	pendingStale atomic.Bool
	// lastHeard is when a call that Valkey answered on the client's connection was sent, in ns
	// since born (the monotonic clock: a wall clock stepped back must not stretch it): every
	// invalidation Valkey sent before that had arrived by its answer.
	lastHeard atomic.Int64
	born      time.Time

	// fromRedis: a migration from connect-redis ran and PostgreSQL was not synced from Valkey
	// since (migration.go); flagRead: the flag was read at least once. flagSet: when this
	// ValkeyOnly sidecar last set the flag (Run's goroutine only).
	fromRedis atomic.Bool
	flagRead  atomic.Bool
	flagSet   time.Time
	syncing   atomic.Bool    // a sync from Valkey runs (at most one per process)
	syncAfter time.Time      // no sync starts before (Run's goroutine only)
	bg        sync.WaitGroup // that sync's goroutine
	// confirmSem holds a slot per PostgreSQL read confirming a session Valkey answered absent.
	confirmSem chan struct{}
	// pg holds copies of sessions read from PostgreSQL; nil when none are kept.
	pg *pgCopies

	// trustMu orders trusting Valkey against writes that missed it: staleGen counts those
	// writes (after their commit), and a check may trust Valkey only if none committed since
	// it began, because it may have read the epoch before that commit.
	trustMu  sync.Mutex
	staleGen uint64
}

// distrust stops trusting Valkey at once: this process just committed a write Valkey missed
// (the epoch moved in the same transaction), so its own next read must not find Valkey's copy.
func (s *Store) distrust() {
	s.trustMu.Lock()
	s.staleGen++
	s.trusted.Store(false)
	s.trustMu.Unlock()
	s.setActive()
}

// trustGen returns the count of missed writes, to pass to trustSince.
func (s *Store) trustGen() uint64 {
	s.trustMu.Lock()
	defer s.trustMu.Unlock()
	return s.staleGen
}

// trustSince trusts Valkey unless a write that missed it committed since gen was read.
func (s *Store) trustSince(gen uint64) bool {
	s.trustMu.Lock()
	ok := s.staleGen == gen
	if ok {
		if !s.trusted.Load() && s.opts.Local != nil {
			// Copies kept from before Valkey stopped being trusted may predate what a
			// reconciliation wrote since (its invalidation messages may still be on their way):
			// none is served from now on.
			s.opts.Local.Reset()
		}
		if !s.trusted.Load() && s.pg != nil {
			// Valkey answers the reads from now on: the copies of PostgreSQL's answers would
			// only take memory (they stay correct, and fill again in the next outage).
			s.pg.reset()
		}
		s.trusted.Store(true)
	}
	s.trustMu.Unlock()
	s.setActive()
	return ok
}

type vkBox struct{ c valkey.Client }

// New returns a store over db and, when dial is not nil, the Valkey client dial returns (called
// by Run until it succeeds, so that a Valkey down at start-up is picked up later). It starts
// nothing; call Run.
func New(opts Options, dial func() (valkey.Client, error), db *pgxpool.Pool, log zerolog.Logger, reg prometheus.Registerer) *Store {
	s := &Store{opts: opts, dial: dial, db: db, log: log, m: newMetrics(reg), now: time.Now, born: time.Now(), confirmSem: make(chan struct{}, confirmSlots)}
	if opts.PostgresCopies > 0 && !opts.ValkeyOnly {
		s.pg = newPGCopies(opts.PostgresCopies)
	}
	empty := ""
	s.token.Store(&empty)
	s.setActive()
	mg := s.Migration()
	if mg == "" {
		mg = "none"
	}
	s.m.migration.WithLabelValues(mg).Set(1)
	return s
}

// client returns the Valkey client, nil before it connected (or without Valkey).
func (s *Store) client() valkey.Client {
	if b := s.vk.Load(); b != nil {
		return b.c
	}
	return nil
}

// Close closes the Valkey client; it is idempotent.
func (s *Store) Close() {
	if b := s.vk.Swap(nil); b != nil {
		b.c.Close()
	}
}

// HasValkey reports whether Valkey is configured for sessions.
func (s *Store) HasValkey() bool { return s.dial != nil }

// heard records that Valkey answered a call sent at sent.
func (s *Store) heard(sent time.Time) {
	n := int64(sent.Sub(s.born))
	for {
		cur := s.lastHeard.Load()
		if cur >= n || s.lastHeard.CompareAndSwap(cur, n) {
			return
		}
	}
}

// copiesCurrent reports whether the tracked copies may answer: Valkey answered a call sent
// within the last check interval plus the check's timeout. A connection that silently stopped
// delivering (a partition) delivers no invalidation either; a read from the copies sends
// nothing that would notice, and the check that would (Run's) may be late, so past that bound
// reads go to Valkey, where a dead connection fails them over to PostgreSQL.
func (s *Store) copiesCurrent() bool {
	return time.Since(s.born)-time.Duration(s.lastHeard.Load()) <= s.opts.RefreshInterval+4*s.opts.Timeout
}

// valkeyOK reports whether reads may be served from Valkey now.
func (s *Store) valkeyOK() bool {
	return s.client() != nil && s.up.Load() && s.trusted.Load() && !s.opts.ReadPostgres
}

// Migration is the rolling migration this store runs (sessions.migration): "connect-pg-simple"
// (ReadPostgres), "connect-redis" (ValkeyOnly), or "" for none.
func (s *Store) Migration() string {
	switch {
	case s.opts.ReadPostgres:
		return "connect-pg-simple"
	case s.opts.ValkeyOnly:
		return "connect-redis"
	}
	return ""
}

// Active is the store that answers reads now: FromValkey or FromPostgres.
func (s *Store) Active() string {
	if s.valkeyOK() {
		return FromValkey
	}
	return FromPostgres
}

func (s *Store) setActive() {
	if s.valkeyOK() {
		s.m.active.WithLabelValues(FromValkey).Set(1)
		s.m.active.WithLabelValues(FromPostgres).Set(0)
	} else {
		s.m.active.WithLabelValues(FromValkey).Set(0)
		s.m.active.WithLabelValues(FromPostgres).Set(1)
	}
}

// markDown opens the breaker after a failed Valkey call: until a probe succeeds, requests do not
// wait on Valkey.
func (s *Store) markDown(op string, err error) {
	if s.up.Swap(false) {
		s.log.Warn().Str("op", op).Err(err).Msg("valkey failed; sessions are served from PostgreSQL until it is back and reconciled")
	}
	s.trusted.Store(false)
	s.setActive()
}

// Session is a parsed, validated body ready to store.
type Session struct {
	Raw []byte // the JSON text as the app sent it
	// Expires is cookie.expires; zero when the cookie has none (the store's TTL applies).
	Expires time.Time
}

// Parse validates a PUT or touch body: a JSON object within MaxBody, whose cookie.expires (if
// any) is a date. body must already be limited to MaxBody+1 bytes by the caller.
func (s *Store) Parse(body []byte) (Session, error) {
	if int64(len(body)) > s.opts.MaxBody {
		return Session{}, &InputError{Code: "too_large", Message: fmt.Sprintf("the session is larger than %d bytes", s.opts.MaxBody), TooLarge: true}
	}
	trimmed := bytes.TrimSpace(body)
	// json.Valid takes invalid UTF-8 inside strings; PostgreSQL's json type does not.
	if len(trimmed) == 0 || trimmed[0] != '{' || !utf8.Valid(trimmed) || !json.Valid(trimmed) {
		return Session{}, &InputError{Code: "bad_session", Message: "the body must be a JSON object (the express-session session)"}
	}
	// Maps, not structs: encoding/json matches struct fields case-insensitively, and JavaScript
	// reads exactly "cookie" and "expires" (the last of duplicate keys, as a map decode keeps).
	var shape map[string]json.RawMessage
	if err := json.Unmarshal(trimmed, &shape); err != nil {
		return Session{}, &InputError{Code: "bad_session", Message: "the body must be a JSON object (the express-session session)"}
	}
	out := Session{Raw: body}
	c := bytes.TrimSpace(shape["cookie"])
	if len(c) == 0 || string(c) == "null" {
		return out, nil
	}
	var cookie map[string]json.RawMessage
	if c[0] != '{' || json.Unmarshal(c, &cookie) != nil {
		return Session{}, &InputError{Code: "bad_cookie", Message: "cookie must be an object"}
	}
	e := bytes.TrimSpace(cookie["expires"])
	if len(e) == 0 || string(e) == "null" || string(e) == "false" {
		return out, nil
	}
	var text string
	if json.Unmarshal(e, &text) != nil {
		return Session{}, &InputError{Code: "bad_cookie", Message: "cookie.expires must be a date string (as JSON.stringify writes a Date)"}
	}
	if text == "" {
		return out, nil // falsy in JavaScript: both Node stores read it as no expires
	}
	t, err := time.Parse(time.RFC3339Nano, text)
	if err != nil {
		return Session{}, &InputError{Code: "bad_cookie", Message: "cookie.expires is not a date (want ISO 8601, e.g. 2026-12-01T10:00:00.000Z)"}
	}
	out.Expires = t
	return out, nil
}

// ttlSeconds is connect-redis's TTL: whole seconds until cookie.expires, rounded up, else the
// configured TTL. It may be zero or negative: the session is already over.
func (s *Store) ttlSeconds(sess Session, now time.Time) int64 {
	if sess.Expires.IsZero() {
		return int64(s.opts.TTL / time.Second)
	}
	// Date.now() is whole milliseconds: floor now before subtracting, as connect-redis does.
	ms := sess.Expires.UnixMilli() - now.UnixMilli()
	return int64(math.Ceil(float64(ms) / 1000))
}

// expireUnix is connect-pg-simple's expire: cookie.expires in Unix seconds, rounded up, else
// now plus the TTL, rounded up.
func (s *Store) expireUnix(sess Session, now time.Time) int64 {
	if sess.Expires.IsZero() {
		return int64(math.Ceil(float64(now.UnixMilli())/1000 + s.opts.TTL.Seconds()))
	}
	return int64(math.Ceil(float64(sess.Expires.UnixMilli()) / 1000))
}

// nowUnix is connect-pg-simple's currentTimestamp: now in Unix seconds, rounded up.
func nowUnix(now time.Time) int64 { return int64(math.Ceil(float64(now.UnixMilli()) / 1000)) }
