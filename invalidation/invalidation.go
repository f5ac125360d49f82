// Package invalidation keeps the cache fresh from PostgreSQL itself: the triggers migrate
// installs, the LISTEN/NOTIFY listener, and the mapping from a changed row to the keys it makes
// stale.
package invalidation

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// Rule maps the changes of one table to the cache entries they make stale.
type Rule struct {
	// Policy names the rule's policy in messages.
	Policy string
	// Table is the watched table (unqualified, resolved through the search_path).
	Table string
	// Columns are the table's columns the rule reads, in the order Target takes their values.
	Columns []string
	// Target turns one changed row's values of Columns (text; "" for NULL) into the key it makes
	// stale, or with tag true into the tag set whose keys it makes stale. ok false means the
	// values cannot be part of any key (NULL, not a valid id): nothing is invalidated for them.
	Target func(vals []string) (target string, tag bool, ok bool)
}

// Spec is what the triggers send and the listener applies.
type Spec struct {
	// Channel is the NOTIFY channel.
	Channel string
	// MaxRows is the most rows one statement's messages name; beyond it, a table-wide message.
	MaxRows int
	Rules   []Rule
}

// tables returns each watched table with the sorted union of the columns its rules read.
func (s Spec) tables() map[string][]string {
	out := map[string][]string{}
	for _, r := range s.Rules {
		for _, c := range r.Columns {
			if !slices.Contains(out[r.Table], c) {
				out[r.Table] = append(out[r.Table], c)
			}
		}
	}
	for _, cols := range out {
		sort.Strings(cols)
	}
	return out
}

// Cache is what the listener needs of the cache; *cachepolicy.Resolver is the real one.
type Cache interface {
	// Invalidate deletes keys, and every key registered in the tag sets tags (with the sets),
	// and returns how many keys it deleted. An error means some may be left.
	Invalidate(ctx context.Context, keys, tags []string) (int, error)
	// Resync deletes every entry (and fill lease) that depends on the database: after a gap,
	// notifications may have been lost and any of them may be stale.
	Resync(ctx context.Context) (int, error)
	// SetLive says whether invalidation is live. While it is not, the cache must not serve
	// entries that depend on the database, nor fill them.
	SetLive(live bool)
	// ServerID identifies the cache server's data. A change (a restart that may have restored
	// old entries from disk, a failover that may have lost deletes) is treated as a gap.
	ServerID(ctx context.Context) (string, error)
}

// Options configures a Listener. Every duration must be positive; there are no defaults here
// (cmd passes the configured values).
type Options struct {
	// URL is the PostgreSQL connection the listener LISTENs on. It must be a direct session (or,
	// with AllowPooler, a session-pooling PgBouncer): LISTEN does not survive transaction pooling.
	URL string
	// AllowPooler (database.session_pooler) accepts a connection whose backend process id is not
	// PostgreSQL's (a pooler such as PgBouncer); without it such a session fails (PoolerError),
	// since through transaction pooling LISTEN succeeds and no notification ever arrives.
	AllowPooler bool
	// Password, when set, replaces the password URL gives (database.password_file).
	Password string
	// ConnectTimeout bounds one connection attempt, and each setup step after it (LISTEN, the
	// trigger check).
	ConnectTimeout time.Duration
	// ReconnectMax caps the back-off between attempts; the first retry comes after 50-100 ms.
	ReconnectMax time.Duration
	// PingInterval is how often the listener re-checks its connection and the triggers
	// (Verify) and the cache server's identity: a silently dropped connection, triggers
	// removed or disabled behind its back, or a restarted cache server end the session.
	PingInterval time.Duration
	// CacheTimeout bounds one Invalidate call; ResyncTimeout bounds one Resync.
	CacheTimeout  time.Duration
	ResyncTimeout time.Duration
}

// Listener applies the triggers' notifications to the cache. Run it with Run.
type Listener struct {
	opts    Options
	spec    Spec
	byTable map[string][]Rule
	cache   Cache
	log     zerolog.Logger
	badLog  zerolog.Logger // sampled: malformed notifications
	m       *metrics

	mu     sync.Mutex
	status Status
}

// Listener states, as Status reports them.
const (
	StateConnecting = "connecting" // not yet connected, or reconnecting after a failure
	StateLive       = "live"       // listening, resynced: the cache serves
	StateError      = "error"      // the schema or triggers are wrong; retrying until fixed
)

// Status is the listener's state for health and stats.
type Status struct {
	State            string
	Since            time.Time // when State was entered
	LastNotification time.Time // zero: none yet
	Reconnects       int64
	Error            string // the last failure, without addresses or credentials
}

// New returns a listener; it starts nothing. reg receives its metrics.
func New(opts Options, spec Spec, cache Cache, log zerolog.Logger, reg prometheus.Registerer) *Listener {
	l := &Listener{opts: opts, spec: spec, byTable: map[string][]Rule{}, cache: cache, log: log, m: newMetrics(reg),
		// A hand-run NOTIFY loop must not flood the log.
		badLog: log.Sample(&zerolog.BurstSampler{Burst: 5, Period: time.Minute})}
	for _, r := range spec.Rules {
		l.byTable[r.Table] = append(l.byTable[r.Table], r)
	}
	l.status = Status{State: StateConnecting, Since: time.Now()}
	return l
}

// Status returns the listener's current state.
func (l *Listener) Status() Status {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.status
}

func (l *Listener) setState(state, errText string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.status.State != state {
		l.status.Since = time.Now()
	}
	l.status.State = state
	l.status.Error = errText
}

// Run listens until ctx ends. Each session connects, LISTENs, checks the triggers, resyncs the
// cache and only then lets it serve; any failure ends the session (the cache stops serving at
// once) and a new one starts after an exponential back-off with jitter.
func (l *Listener) Run(ctx context.Context) error {
	const first = 100 * time.Millisecond
	backoff := first
	for {
		wasLive, err := l.session(ctx)
		l.cache.SetLive(false)
		l.m.up.Set(0)
		if ctx.Err() != nil {
			return nil
		}
		if wasLive {
			backoff = first
		}
		state, msg := StateConnecting, describe(err)
		if IsSchemaError(err) {
			state = StateError
			l.log.Error().Err(err).Msg("invalidation cannot start; cached entries of invalidated policies are not served until it does")
		} else {
			l.log.Warn().Str("error", msg).Dur("retry_in", backoff).Msg("invalidation listener disconnected; reads bypass the cache until it is back")
		}
		l.setState(state, msg)
		l.m.reconnects.Inc()
		l.mu.Lock()
		l.status.Reconnects++
		l.mu.Unlock()
		wait := backoff/2 + rand.N(backoff/2+1)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		backoff = min(backoff*2, l.opts.ReconnectMax)
	}
}

// describe turns a session error into text for health: the failure, not the address or DSN.
func describe(err error) string {
	var pgErr *pgconn.PgError
	var se *SchemaError
	var pe *PoolerError
	switch {
	case errors.As(err, &se):
		return se.Error()
	case errors.As(err, &pe):
		return pe.Error()
	case errors.As(err, &pgErr):
		return "postgresql: " + pgErr.Message + " (" + pgErr.Code + ")"
	case pgconn.Timeout(err) || errors.Is(err, context.DeadlineExceeded):
		return "timed out"
	case err == nil:
		return ""
	}
	var ce *pgconn.ConnectError
	if errors.As(err, &ce) {
		return "cannot connect to postgresql"
	}
	var ie *invalidateError
	if errors.As(err, &ie) {
		return ie.Error()
	}
	return "connection lost"
}

// CheckDirect returns a *PoolerError naming key when conn does not reach PostgreSQL itself but a
// connection pooler: PgBouncer (and poolers like it) gives its clients a backend process id of
// its own, which pg_backend_pid() then contradicts. Through transaction pooling, LISTEN runs on
// whichever server connection the statement got and its notifications go to that connection's
// later clients or nowhere: LISTEN succeeds and nothing ever arrives, so changed rows would be
// served from the cache until their TTL. Other errors are the query's.
func CheckDirect(ctx context.Context, conn *pgx.Conn, key string) error {
	var pid uint32
	// The simple protocol: a named prepared statement is what a transaction pooler breaks.
	if err := conn.QueryRow(ctx, "SELECT pg_backend_pid()", pgx.QueryExecModeSimpleProtocol).Scan(&pid); err != nil {
		return err
	}
	if pid != conn.PgConn().PID() {
		return &PoolerError{Key: key}
	}
	return nil
}

// PoolerError is CheckDirect's refusal of a connection through a pooler: a configuration
// problem (IsSchemaError reports it), named by the setting whose URL leads there.
type PoolerError struct{ Key string }

func (e *PoolerError) Error() string {
	return e.Key + " goes through a connection pooler (its backend process id is not PostgreSQL's): " +
		"through transaction pooling LISTEN receives no notification, and prepared statements and session locks break. Point " + e.Key +
		" at PostgreSQL itself, or set database.session_pooler: true if the pooler gives each client a server connection of its own (session pooling)"
}

// invalidateError is a failure of the cache during a session: entries may be left stale, so the
// session ends and the next one resyncs.
type invalidateError struct{ msg string }

func (e *invalidateError) Error() string { return e.msg }

// session runs one connection. wasLive reports whether the cache was let serve during it.
func (l *Listener) session(ctx context.Context) (wasLive bool, err error) {
	// The cache server first: without it the session would end at the resync anyway, and a
	// PostgreSQL connection (authentication included) per attempt, from every sidecar, for as
	// long as Valkey is down, is a reconnect storm on the database.
	if _, err := l.cache.ServerID(ctx); err != nil {
		return false, &invalidateError{"cache server unreachable"}
	}
	cfg, err := pgx.ParseConfig(l.opts.URL)
	if err != nil {
		return false, &SchemaError{Problems: []string{"invalidation.listen_url is not a valid PostgreSQL URL"}}
	}
	cfg.ConnectTimeout = l.opts.ConnectTimeout
	if l.opts.Password != "" {
		cfg.Password = l.opts.Password
	}
	if cfg.RuntimeParams["application_name"] == "" {
		cfg.RuntimeParams["application_name"] = "cachecar-listener"
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return false, err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		conn.Close(cctx)
	}()
	// Deferred after the close, so it runs first: the cache stops serving the moment the
	// session fails, not after the connection is torn down.
	defer l.cache.SetLive(false)

	// LISTEN first: from here on no change is missed, so the resync below cannot race a change
	// committed between it and the first notification.
	sctx, cancel := context.WithTimeout(ctx, l.opts.ConnectTimeout)
	if !l.opts.AllowPooler {
		err = CheckDirect(sctx, conn, "invalidation.listen_url")
	}
	if err == nil {
		_, err = conn.Exec(sctx, "LISTEN "+quoteIdent(l.spec.Channel))
	}
	cancel()
	if IsSchemaError(err) {
		return false, err
	}
	if err != nil {
		return false, fmt.Errorf("listen: %w", err)
	}
	if err := l.verify(ctx, conn); err != nil {
		return false, err
	}
	if err := l.resync(ctx, "connect"); err != nil {
		return false, err
	}
	// The cache server's identity after the resync: if it changes during the session, the
	// server lost deletes or brought back old entries.
	serverID, err := l.cache.ServerID(ctx)
	if err != nil {
		return false, &invalidateError{"cache server unreachable"}
	}
	l.cache.SetLive(true)
	l.m.up.Set(1)
	l.setState(StateLive, "")
	l.log.Info().Str("channel", l.spec.Channel).Msg("invalidation listening")

	// One goroutine reads notifications off the connection; this one applies them. Whatever
	// arrived while the previous batch was being applied is applied in one call: under a burst
	// of writes, the lag stays one round trip to Valkey instead of a growing queue of them.
	rctx, stop := context.WithCancel(ctx)
	defer stop()
	notes := make(chan string, maxBatch)
	readErr := make(chan error, 1)
	go func() { readErr <- l.read(rctx, conn, notes) }()
	check := time.NewTicker(l.opts.PingInterval)
	defer check.Stop()
	for {
		var batch []string
		select {
		case <-ctx.Done():
			stop()
			<-readErr
			return true, nil
		case err := <-readErr:
			return true, err
		case <-check.C:
			id, err := l.cache.ServerID(ctx)
			if err != nil || id != serverID {
				stop()
				<-readErr
				if err != nil {
					return true, &invalidateError{"cache server unreachable"}
				}
				l.log.Warn().Msg("the cache server restarted or failed over; resyncing")
				return true, &invalidateError{"the cache server restarted or failed over"}
			}
			continue
		case p := <-notes:
			batch = append(batch, p)
		}
	drain:
		for len(batch) < maxBatch {
			select {
			case p := <-notes:
				batch = append(batch, p)
			default:
				break drain
			}
		}
		if err := l.apply(ctx, batch); err != nil {
			stop()
			<-readErr
			return true, err
		}
	}
}

// maxBatch bounds the notifications applied in one call to the cache.
const maxBatch = 512

// read passes every notification of conn to notes until ctx ends or the connection fails. Every
// ping interval it runs Verify on the connection: that proves the connection still works (a
// silently dropped one is noticed) and that the triggers are still there and enabled (migrate
// with another configuration, or DISABLE TRIGGER, would otherwise stop notifications without a
// word while the cache keeps serving).
func (l *Listener) read(ctx context.Context, conn *pgx.Conn, notes chan<- string) error {
	next := time.Now().Add(l.opts.PingInterval)
	for {
		wctx, cancel := context.WithDeadline(ctx, next)
		n, err := conn.WaitForNotification(wctx)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if err != nil && (wctx.Err() == nil || conn.IsClosed()) {
			return err
		}
		if !time.Now().Before(next) {
			if err := l.verify(ctx, conn); err != nil {
				return err
			}
			next = time.Now().Add(l.opts.PingInterval)
		}
		if n == nil {
			continue
		}
		select {
		case notes <- n.Payload:
		case <-ctx.Done():
			return nil
		}
	}
}

// verify runs Verify on conn within the setup timeout.
func (l *Listener) verify(ctx context.Context, conn *pgx.Conn) error {
	vctx, cancel := context.WithTimeout(ctx, 2*l.opts.ConnectTimeout)
	defer cancel()
	return Verify(vctx, conn, l.spec)
}

// resync deletes every database-derived entry while the cache does not serve them.
func (l *Listener) resync(ctx context.Context, reason string) error {
	l.cache.SetLive(false)
	rctx, cancel := context.WithTimeout(ctx, l.opts.ResyncTimeout)
	defer cancel()
	start := time.Now()
	n, err := l.cache.Resync(rctx)
	if err != nil {
		return &invalidateError{"cache resync failed: " + err.Error()}
	}
	l.m.resyncs.WithLabelValues(reason).Inc()
	l.m.resyncKeys.Add(float64(n))
	l.log.Info().Str("reason", reason).Int("keys", n).Dur("took", time.Since(start)).Msg("cache resynced")
	return nil
}

// apply applies a batch of notifications with one call to the cache. A payload that is not one
// of the triggers' messages is logged and counted, never applied: a hand-run NOTIFY must not
// delete keys.
func (l *Listener) apply(ctx context.Context, payloads []string) error {
	l.mu.Lock()
	l.status.LastNotification = time.Now()
	l.mu.Unlock()
	var changes []Change
	tableWide := false
	for _, payload := range payloads {
		c, err := ParseChange(payload)
		if err != nil {
			l.m.notes.WithLabelValues("malformed").Inc()
			l.badLog.Warn().Err(err).Int("bytes", len(payload)).Msg("ignored a notification that is not a cachecar trigger message (logged at most 5 a minute)")
			continue
		}
		if len(l.byTable[c.Table]) == 0 {
			l.m.notes.WithLabelValues("foreign").Inc()
			l.log.Debug().Str("table", c.Table).Msg("ignored a notification for a table no policy depends on")
			continue
		}
		if c.All {
			l.m.notes.WithLabelValues("table_wide").Inc()
			tableWide = true
		}
		changes = append(changes, c)
	}
	if tableWide {
		// Deleting everything covers every other change of the batch too: they were all
		// committed before the resync starts.
		if err := l.resync(ctx, "table_wide"); err != nil {
			return err
		}
		l.cache.SetLive(true)
		for _, c := range changes {
			if !c.All {
				l.m.notes.WithLabelValues("applied").Inc()
			}
			l.observeLag(c.At)
		}
		return nil
	}
	var keys, tags []string
	seen := map[string]bool{}
	applied := changes[:0]
	for _, c := range changes {
		var err error
		keys, tags, err = l.targets(c, l.byTable[c.Table], seen, keys, tags)
		if err != nil {
			// A trigger of a watched table that does not send what the policies need (installed
			// for another configuration): its changes cannot be mapped to keys, so this is a
			// gap. The next session's Verify names the problem.
			l.m.notes.WithLabelValues("malformed").Inc()
			l.log.Error().Err(err).Str("table", c.Table).Msg("a watched table's trigger does not send the columns the policies need; run `cachecar migrate`")
			return &invalidateError{"a notification could not be mapped to keys"}
		}
		l.m.notes.WithLabelValues("applied").Inc()
		applied = append(applied, c)
	}
	if len(keys)+len(tags) > 0 {
		ictx, cancel := context.WithTimeout(ctx, l.opts.CacheTimeout)
		defer cancel()
		n, err := l.cache.Invalidate(ictx, keys, tags)
		if err != nil {
			// Some keys may still hold what these changes made stale: treat it as a gap.
			l.log.Warn().Err(err).Msg("invalidation failed; resyncing")
			return &invalidateError{"cache invalidate failed"}
		}
		l.m.keys.Add(float64(n))
	}
	for _, c := range applied {
		l.observeLag(c.At)
	}
	return nil
}

func (l *Listener) observeLag(at time.Time) {
	lag := time.Since(at)
	if lag < 0 { // the database's clock is ahead of ours
		lag = 0
	}
	l.m.lag.Observe(lag.Seconds())
}

// targets maps a change's rows through rules to the keys and tags to delete, appending to keys
// and tags those not yet seen. A change lacking a rule's column adds nothing and is an error.
func (l *Listener) targets(c Change, rules []Rule, seen map[string]bool, keys, tags []string) ([]string, []string, error) {
	for _, r := range rules {
		for _, col := range r.Columns {
			if !slices.Contains(c.Columns, col) {
				return keys, tags, fmt.Errorf("message lacks column %q of policy %s", col, r.Policy)
			}
		}
	}
	for _, r := range rules {
		idx := make([]int, len(r.Columns))
		for i, col := range r.Columns {
			idx[i] = slices.Index(c.Columns, col)
		}
		vals := make([]string, len(idx))
		for _, row := range c.Rows {
			for i, j := range idx {
				vals[i] = row[j]
			}
			target, tag, ok := r.Target(vals)
			if !ok {
				continue
			}
			mark := "k" + target
			if tag {
				mark = "t" + target
			}
			if seen[mark] {
				continue
			}
			seen[mark] = true
			if tag {
				tags = append(tags, target)
			} else {
				keys = append(keys, target)
			}
		}
	}
	return keys, tags, nil
}
