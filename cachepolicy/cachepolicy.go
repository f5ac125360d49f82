// Package cachepolicy answers reads through the cache: policies, the Valkey tier, single-flight
// loads from PostgreSQL, and the fallback to PostgreSQL when the cache cannot be used.
package cachepolicy

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sync/singleflight"
)

// Cache results, as sent in the X-Cache header.
const (
	Hit    = "HIT"
	Miss   = "MISS"
	Bypass = "BYPASS" // the cache could not be used (disabled, unreachable, failing)
)

// Loader reads entries from the database. *PG is the real one.
type Loader interface {
	LoadOne(ctx context.Context, sql string, args ...any) ([]byte, error)
	LoadMany(ctx context.Context, sql string, ids []int64) (map[int64][]byte, error)
}

// Options configures a Resolver.
type Options struct {
	// Namespace prefixes every key ("" for none).
	Namespace string
	// QueryTimeout bounds one load; it must be positive. A fill lease lives a second longer.
	QueryTimeout time.Duration
	// Invalidation is set when a listener keeps the cache fresh: entries of invalidated policies
	// are then served only between SetLive(true) and SetLive(false). Unset, they are served
	// until their TTL ends.
	Invalidation bool
	// Policies are the policies whose keys a resync deletes (those with Invalidated set).
	Policies []*Policy
}

// Resolver answers reads: cache first, then one load per cold key, then a fill. It also is the
// invalidation listener's Cache.
type Resolver struct {
	opts   Options
	store  *Store // nil: no shared cache, every read is a BYPASS
	loader Loader
	m      *Metrics
	log    zerolog.Logger
	flight singleflight.Group
	live   atomic.Bool
	// epoch counts invalidations, resyncs and live changes. It is part of every single-flight
	// key: a read that starts after an invalidation must not join a load that read the
	// database before it (the load's own fill is refused by its lease, but its value would
	// still be handed to the joiner).
	epoch atomic.Uint64
}

// New returns a resolver. store may be nil (no cache configured or cache disabled).
func New(opts Options, store *Store, loader Loader, log zerolog.Logger, m *Metrics) *Resolver {
	r := &Resolver{opts: opts, store: store, loader: loader, m: m, log: log}
	r.live.Store(!opts.Invalidation)
	return r
}

// Result is one answered read. Body is the JSON exactly as PostgreSQL produced it.
type Result struct {
	Body  []byte
	Cache string // Hit, Miss or Bypass
	Age   time.Duration
}

// ETag returns a strong entity tag of body.
func ETag(body []byte) string {
	h := fnv.New64a()
	h.Write(body)
	var buf [18]byte
	buf[0] = '"'
	b := strconv.AppendUint(buf[:1], h.Sum64(), 36)
	return string(append(b, '"'))
}

// usable reports whether entries of p may be read and filled now: there is a cache, and p's
// entries are either not invalidated or invalidation is live. While the listener is away a
// change may have been missed, so nothing filled before may be trusted, and nothing filled now
// would be invalidated.
func (r *Resolver) usable(p *Policy) bool {
	return r.store != nil && (!p.Invalidated || r.live.Load())
}

// Get answers one read of policy p. vals are the values of the key's placeholders, in key
// order; args are the SQL arguments of p.SQL.
func (r *Resolver) Get(ctx context.Context, p *Policy, vals []string, args ...any) (Result, error) {
	return r.GetFunc(ctx, p, vals, func(ctx context.Context) ([]byte, error) {
		return r.loader.LoadOne(ctx, p.SQL, args...)
	})
}

// LoadFunc loads one entry's bytes. It returns ErrNotFound when there is nothing to cache.
type LoadFunc func(ctx context.Context) ([]byte, error)

// GetFunc answers one read of policy p whose entry is loaded by load instead of p.SQL (a parsed
// file, say), with the same tiers, single-flight, lease and fill as Get.
func (r *Resolver) GetFunc(ctx context.Context, p *Policy, vals []string, load LoadFunc) (Result, error) {
	key := r.opts.Namespace + p.Key.Render(vals...)
	cacheState := Bypass
	fill := false // take a lease and fill; false when another reader's lease is in the key
	if r.usable(p) {
		body, pttl, err := r.store.Get(ctx, key)
		switch {
		case err == nil:
			r.m.lookups.WithLabelValues(p.Name, "hit").Inc()
			return Result{Body: body, Cache: Hit, Age: age(p.TTL, pttl)}, nil
		case errors.Is(err, errMiss):
			cacheState, fill = Miss, true
		case errors.Is(err, errLeased):
			cacheState = Miss
		default:
			r.logValkey(err)
		}
	}
	if cacheState == Miss {
		r.m.lookups.WithLabelValues(p.Name, "miss").Inc()
	} else {
		r.m.lookups.WithLabelValues(p.Name, "bypass").Inc()
	}
	var tags []string
	if fill && len(p.Tags) > 0 {
		tags = make([]string, len(p.Tags))
		for i, t := range p.Tags {
			tags[i] = r.opts.Namespace + t.Render(vals...)
		}
	}

	// One load per key per process: concurrent misses wait for the first one's query. The
	// load runs detached from the first caller's cancellation, so that a client hanging up does
	// not fail everyone waiting on the same key; each caller still stops waiting when its own
	// context ends.
	flightKey := strconv.FormatUint(r.epoch.Load(), 36) + "\x00" + key
	ch := r.flight.DoChan(flightKey, func() (any, error) {
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.opts.QueryTimeout)
		defer cancel()
		// The lease goes in before the database is read: an invalidation after this point
		// deletes it, and the fill below is refused.
		lease := ""
		if fill {
			l := newLease()
			got, err := r.store.Lease(lctx, key, l, tags, r.leaseTTL(), p.TTL)
			if err != nil {
				// A timed-out call may still have set the lease: take it back (by value, so
				// nobody else's), or the key would stay unfillable until the lease expired.
				r.logValkey(err)
				r.store.Release(context.WithoutCancel(lctx), key, l)
			} else if got {
				lease = l
			}
		}
		start := time.Now()
		body, err := load(lctx)
		if p.SQL != "" { // database loads only: a policy without SQL loads from elsewhere
			r.observe(p, start, err)
		}
		if err != nil {
			if lease != "" {
				if err := r.store.Release(context.WithoutCancel(lctx), key, lease); err != nil {
					r.logValkey(err)
				}
			}
			return nil, err
		}
		if lease != "" {
			// The fill gets its own time (the store bounds it): a load that used most of the
			// query timeout must not leave its lease behind.
			stored, err := r.store.Fill(context.WithoutCancel(lctx), key, lease, body, p.TTL)
			if err != nil {
				r.logValkey(err)
				r.store.Release(context.WithoutCancel(lctx), key, lease)
			} else if !stored {
				r.m.fillsRefused.WithLabelValues(p.Name).Inc()
			}
		}
		return body, nil
	})
	select {
	case res := <-ch:
		if res.Shared {
			r.m.shared.WithLabelValues(p.Name).Inc()
		}
		if res.Err != nil {
			return Result{}, res.Err
		}
		return Result{Body: res.Val.([]byte), Cache: cacheState}, nil
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

// leaseTTL is how long a fill lease lives: past the longest load, so that only a crashed
// reader's lease ever expires on its own.
func (r *Resolver) leaseTTL() time.Duration { return r.opts.QueryTimeout + time.Second }

// Item is one entry of a batch read; Body nil means not found.
type Item struct {
	ID   int64
	Body []byte
}

// GetMany answers a batch of single-row reads of p by id with one MGET and, for the misses, one
// query of p.BatchSQL. The result is in the order of ids. The cache result is Hit only when every
// id was cached. p's key must have one placeholder (so p has no tags).
func (r *Resolver) GetMany(ctx context.Context, p *Policy, ids []int64) ([]Item, string, error) {
	if len(p.Tags) > 0 {
		// Batch leases register no tags: a tagged key filled here would escape invalidation.
		return nil, "", fmt.Errorf("policy %s: batch reads of a tagged policy are not supported", p.Name)
	}
	keys := make([]string, len(ids))
	for i, id := range ids {
		keys[i] = r.opts.Namespace + p.Key.Render(strconv.FormatInt(id, 10))
	}
	items := make([]Item, len(ids))
	for i, id := range ids {
		items[i].ID = id
	}
	var missing []int
	state := Bypass
	if r.usable(p) {
		vals, err := r.store.MGet(ctx, keys)
		if err == nil {
			state = Hit
			for i, v := range vals {
				if v == nil {
					missing = append(missing, i)
					continue
				}
				items[i].Body = v
			}
			r.m.lookups.WithLabelValues(p.Name, "hit").Add(float64(len(ids) - len(missing)))
			r.m.lookups.WithLabelValues(p.Name, "miss").Add(float64(len(missing)))
			if len(missing) > 0 {
				state = Miss
			}
		} else {
			r.logValkey(err)
		}
	}
	if state == Bypass {
		missing = make([]int, len(ids))
		for i := range ids {
			missing[i] = i
		}
		r.m.lookups.WithLabelValues(p.Name, "bypass").Add(float64(len(ids)))
	}
	if len(missing) == 0 {
		return items, state, nil
	}
	lctx, cancel := context.WithTimeout(ctx, r.opts.QueryTimeout)
	defer cancel()
	var leases []string
	var got []bool
	if state == Miss {
		missKeys := make([]string, len(missing))
		leases = make([]string, len(missing))
		for j, i := range missing {
			missKeys[j] = keys[i]
			leases[j] = newLease()
		}
		var err error
		if got, err = r.store.LeaseMany(lctx, missKeys, leases, r.leaseTTL()); err != nil {
			r.logValkey(err)
			for j := range missKeys { // see GetFunc: a timed-out call may have set them
				r.store.Release(context.WithoutCancel(lctx), missKeys[j], leases[j])
			}
		}
	}
	missIDs := make([]int64, len(missing))
	for j, i := range missing {
		missIDs[j] = ids[i]
	}
	start := time.Now()
	found, err := r.loader.LoadMany(lctx, p.BatchSQL, missIDs)
	r.observe(p, start, err)
	// Valkey calls after the load get their own time: a load that used most of the query
	// timeout must not leave its leases behind by timing out the fill.
	vctx := context.WithoutCancel(lctx)
	if err != nil {
		for j, i := range missing {
			if got != nil && got[j] {
				if err := r.store.Release(vctx, keys[i], leases[j]); err != nil {
					r.logValkey(err)
				}
			}
		}
		return nil, "", err
	}
	var fillKeys, fillLeases []string
	var fillVals [][]byte
	for j, i := range missing {
		b, ok := found[ids[i]]
		if ok {
			items[i].Body = b
		}
		if got == nil || !got[j] {
			continue
		}
		if !ok {
			// Nothing to store: give the lease back so the next reader can take one.
			if err := r.store.Release(vctx, keys[i], leases[j]); err != nil {
				r.logValkey(err)
			}
			continue
		}
		fillKeys = append(fillKeys, keys[i])
		fillLeases = append(fillLeases, leases[j])
		fillVals = append(fillVals, b)
	}
	stored, err := r.store.FillMany(vctx, fillKeys, fillLeases, fillVals, p.TTL)
	if err != nil {
		r.logValkey(err)
	} else if refused := len(fillKeys) - stored; refused > 0 {
		r.m.fillsRefused.WithLabelValues(p.Name).Add(float64(refused))
	}
	return items, state, nil
}

// SetLive says whether invalidation is live (the listener is connected and has resynced). While
// it is not, entries of invalidated policies are neither served nor filled. Without
// Options.Invalidation it does nothing.
func (r *Resolver) SetLive(live bool) {
	if r.opts.Invalidation {
		r.epoch.Add(1)
		r.live.Store(live)
	}
}

// Live reports whether entries of invalidated policies are served.
func (r *Resolver) Live() bool { return r.live.Load() }

// Invalidate deletes keys and the keys of the tag sets tags. keys and tags are complete (the
// namespace included).
func (r *Resolver) Invalidate(ctx context.Context, keys, tags []string) (int, error) {
	if r.store == nil {
		return 0, nil
	}
	// Before the delete: a read that starts once this returns gets a new flight.
	r.epoch.Add(1)
	return r.store.Invalidate(ctx, keys, tags)
}

// ServerID identifies the Valkey server's data (see Store.ServerID); "" without a cache.
func (r *Resolver) ServerID(ctx context.Context) (string, error) {
	if r.store == nil {
		return "", nil
	}
	return r.store.ServerID(ctx)
}

// Resync deletes every entry, fill lease and tag set of the invalidated policies, found by
// their key prefixes with SCAN (never KEYS or FLUSHDB).
func (r *Resolver) Resync(ctx context.Context) (int, error) {
	if r.store == nil {
		return 0, nil
	}
	r.epoch.Add(1)
	prefixes := []string{r.opts.Namespace + tagPrefix}
	for _, p := range r.opts.Policies {
		if p.Invalidated {
			prefixes = append(prefixes, r.opts.Namespace+p.KeyPrefix())
		}
	}
	return r.store.DeletePrefixed(ctx, globEscape(r.opts.Namespace)+"*", prefixes)
}

// globEscape escapes the glob characters of s for SCAN MATCH.
func globEscape(s string) string {
	var b strings.Builder
	for _, c := range s {
		if strings.ContainsRune(`*?[]\`, c) {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	return b.String()
}

func (r *Resolver) observe(p *Policy, start time.Time, err error) {
	r.m.queryTime.WithLabelValues(p.Name).Observe(time.Since(start).Seconds())
	outcome := "ok"
	switch {
	case err == nil:
	case errors.Is(err, ErrNotFound):
		outcome = "not_found"
	case errors.Is(err, ErrUnavailable):
		outcome = "unavailable"
	case errors.Is(err, ErrTimeout):
		outcome = "timeout"
	default:
		outcome = "error"
	}
	r.m.queries.WithLabelValues(p.Name, outcome).Inc()
}

// logValkey logs a failed cache call at debug level: while Valkey is down every request would
// log it, so the outage itself is reported by health, metrics and the store's reconnect log.
func (r *Resolver) logValkey(err error) {
	if errors.Is(err, errNotConnected) {
		return
	}
	r.log.Debug().Err(err).Msg("cache unavailable; reading PostgreSQL")
}

// age is how long ago an entry with ttl was filled, from its remaining TTL.
func age(ttl, pttl time.Duration) time.Duration {
	if pttl < 0 || pttl > ttl {
		return 0
	}
	return ttl - pttl
}
