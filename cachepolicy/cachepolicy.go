// Package cachepolicy answers reads through the cache: policies, the Valkey tier, single-flight
// loads from PostgreSQL, and the fallback to PostgreSQL when the cache cannot be used.
package cachepolicy

import (
	"context"
	"errors"
	"fmt"
	"github.com/cespare/xxhash/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"golang.org/x/sync/singleflight"
)

// Cache results, as sent in the X-Cache header.
const (
	Hit    = "HIT"
	Miss   = "MISS"
	Stale  = "STALE"  // an entry past its TTL, inside its policy's stale window
	Bypass = "BYPASS" // the cache could not be used (disabled, unreachable, failing)
)

// Why a stale entry was served, as in RFC 5861's Cache-Control extensions.
const (
	StaleWhileRevalidate = "stale-while-revalidate"
	StaleIfError         = "stale-if-error"
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
	// MaxLoads bounds the database loads running at once (the bulkhead); a load past it fails
	// at once with ErrOverloaded. 0 means no bound.
	MaxLoads int
	// LeaseWait is how long a reader that finds another reader's fill lease (a load in flight,
	// maybe in another sidecar) waits for its fill before it loads by itself.
	LeaseWait time.Duration
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
	// slots is the bulkhead of database loads (nil: unbounded).
	slots chan struct{}
	// db is the database's circuit breaker: after repeated connection failures loads fail at
	// once for a jittered, growing back-off instead of each dialling a dead server.
	db *Breaker
	// bg is the parent of background refreshes; Close cancels it and waits for them.
	bg       context.Context
	bgCancel context.CancelFunc
	bgMu     sync.Mutex // orders bgWait.Add before Close's Wait
	bgWait   sync.WaitGroup
	hits     sync.Map     // policy name -> *policyCounters
	probers  atomic.Int32 // ProbeDatabase calls running
}

// Database breaker: three connection failures in a row open it for 250 ms, doubling up to 5 s
// while its probes fail.
const (
	dbBreakerThreshold = 3
	dbBreakerMinOpen   = 250 * time.Millisecond
	dbBreakerMaxOpen   = 5 * time.Second
)

// New returns a resolver. store may be nil (no cache configured or cache disabled).
func New(opts Options, store *Store, loader Loader, log zerolog.Logger, m *Metrics) *Resolver {
	r := &Resolver{opts: opts, store: store, loader: loader, m: m, log: log}
	r.bg, r.bgCancel = context.WithCancel(context.Background())
	r.live.Store(!opts.Invalidation)
	if opts.MaxLoads > 0 {
		r.slots = make(chan struct{}, opts.MaxLoads)
	}
	r.db = &Breaker{Threshold: dbBreakerThreshold, MinOpen: dbBreakerMinOpen, MaxOpen: dbBreakerMaxOpen,
		OnChange: func(state int) {
			m.dbCircuit.Set(float64(state))
			if state == CircuitOpen {
				log.Warn().Msg("database circuit open: loads fail fast; stale entries are served where policies allow")
			} else if state == CircuitClosed {
				log.Info().Msg("database circuit closed")
			}
		}}
	return r
}

// Close stops background refreshes and waits for those running to end (each is bounded by the
// query timeout, and cancelled here). Loads in flight for readers are cancelled too: their
// readers get an error at once. Reads after Close do not refresh. Close may be called again.
func (r *Resolver) Close() {
	r.bgMu.Lock()
	r.bgCancel()
	r.bgMu.Unlock()
	r.bgWait.Wait()
}

// policyCounters count one policy's lookups: the Prometheus series, resolved once (the hit path
// then skips WithLabelValues' hashing and locked lookup), and plain counts since start for the
// admin port's stats.
type policyCounters struct {
	name                      string
	hit, miss, stale, bypass  prometheus.Counter
	local                     prometheus.Counter
	nHit, nMiss, nStale, nByp atomic.Int64
}

func (r *Resolver) counters(p *Policy) *policyCounters {
	if c, ok := r.hits.Load(p.Name); ok {
		return c.(*policyCounters)
	}
	c := &policyCounters{name: p.Name,
		hit: r.m.lookups.WithLabelValues(p.Name, "hit"), miss: r.m.lookups.WithLabelValues(p.Name, "miss"),
		stale: r.m.lookups.WithLabelValues(p.Name, "stale"), bypass: r.m.lookups.WithLabelValues(p.Name, "bypass"),
		local: r.m.localHits.WithLabelValues(p.Name)}
	got, _ := r.hits.LoadOrStore(p.Name, c)
	return got.(*policyCounters)
}

// count records n lookups of p with result hit, miss, stale or bypass.
func (r *Resolver) count(p *Policy, result string, n int) {
	if n == 0 {
		return
	}
	c := r.counters(p)
	switch result {
	case "hit":
		c.hit.Add(float64(n))
		c.nHit.Add(int64(n))
	case "miss":
		c.miss.Add(float64(n))
		c.nMiss.Add(int64(n))
	case "stale":
		c.stale.Add(float64(n))
		c.nStale.Add(int64(n))
	default:
		c.bypass.Add(float64(n))
		c.nByp.Add(int64(n))
	}
}

// PolicyStats are one policy's lookups since the process started.
type PolicyStats struct {
	Hits, Misses, Stale, Bypass int64
}

// HitRate is hits over all lookups (0 without lookups).
func (s PolicyStats) HitRate() float64 {
	n := s.Hits + s.Misses + s.Stale + s.Bypass
	if n == 0 {
		return 0
	}
	return float64(s.Hits) / float64(n)
}

// Stats returns every policy's lookups since start, by name: the configured policies (zero
// until read) and any other policy read through this resolver (the manifests').
func (r *Resolver) Stats() map[string]PolicyStats {
	out := make(map[string]PolicyStats)
	for _, p := range r.opts.Policies {
		out[p.Name] = PolicyStats{}
	}
	r.hits.Range(func(_, v any) bool {
		c := v.(*policyCounters)
		out[c.name] = PolicyStats{Hits: c.nHit.Load(), Misses: c.nMiss.Load(), Stale: c.nStale.Load(), Bypass: c.nByp.Load()}
		return true
	})
	return out
}

// DatabaseCircuit returns the database breaker's state.
func (r *Resolver) DatabaseCircuit() int { return r.db.State() }

// ProbeDatabase closes the database breaker of a sidecar that gets no reads, until ctx ends:
// while the breaker is not closed, it pings PostgreSQL whenever the breaker lets a probe through.
// Without it, only the next read probes, and an idle sidecar reports an open circuit long after
// PostgreSQL came back.
func (r *Resolver) ProbeDatabase(ctx context.Context, ping func(context.Context) error) {
	r.probers.Add(1)
	defer r.probers.Add(-1)
	t := time.NewTicker(dbBreakerMinOpen)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if r.db.State() == CircuitClosed || !r.db.Allow() {
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, r.opts.QueryTimeout)
		err := ping(pctx)
		cancel()
		switch {
		case err == nil:
			r.db.Success()
		case ctx.Err() == nil:
			r.db.Failure()
		}
	}
}

// probedElsewhere reports that the database breaker is not closed (recent loads failed) and that
// ProbeDatabase is running, which closes it once the database answers: a read holding an entry
// inside stale_if_error then serves it rather than become the probe itself.
func (r *Resolver) probedElsewhere() bool {
	return r.probers.Load() > 0 && r.db.State() != CircuitClosed
}

// DatabaseBreaker is the database circuit breaker, for other users of the same PostgreSQL (the
// session store) to consult and feed.
func (r *Resolver) DatabaseBreaker() *Breaker { return r.db }

// ValkeyCircuit returns the Valkey breaker's state (closed without Valkey).
func (r *Resolver) ValkeyCircuit() int {
	if r.store == nil {
		return CircuitClosed
	}
	return r.store.Circuit()
}

// Tier reports whether the in-process tier is on, and what it holds.
func (r *Resolver) Tier() (bool, TierStats) {
	if r.store == nil {
		return false, TierStats{}
	}
	return r.store.Tier()
}

// Result is one answered read. Body is the JSON exactly as PostgreSQL produced it.
type Result struct {
	Body  []byte
	Cache string // Hit, Miss, Stale or Bypass
	Age   time.Duration
	// StaleReason says why a Stale result was served: StaleWhileRevalidate or StaleIfError.
	StaleReason string
	// Local is set on a hit answered from the in-process tier.
	Local bool
}

// ETag returns a strong entity tag of body: its 64-bit xxHash, the same in every sidecar. It is
// computed on every answer, hits included; xxHash reads 8 bytes a step where the FNV-1a it
// replaced read one (BenchmarkETag).
func ETag(body []byte) string {
	h := xxhash.Sum64(body)
	var buf [18]byte
	buf[0] = '"'
	b := strconv.AppendUint(buf[:1], h, 36)
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
	return r.get(ctx, p, vals, nil, args)
}

// loadOf is load, or when it is nil a load of p.SQL with a copy of args: made only when a read
// needs to load, so that a hit allocates neither it nor, since args does not escape, the
// caller's arguments.
func (r *Resolver) loadOf(p *Policy, load LoadFunc, args []any) LoadFunc {
	if load != nil {
		return load
	}
	own := append([]any(nil), args...)
	return func(ctx context.Context) ([]byte, error) { return r.loader.LoadOne(ctx, p.SQL, own...) }
}

// LoadFunc loads one entry's bytes. It returns ErrNotFound when there is nothing to cache.
type LoadFunc func(ctx context.Context) ([]byte, error)

// entry is what a lookup found in the cache.
type entry struct {
	body  []byte
	age   time.Duration
	fresh bool // within its TTL
	swr   bool // past its TTL, inside stale_while_revalidate
	sie   bool // past its TTL, inside stale_if_error
}

// classifyEntry places a cached value of key in p's windows from its remaining PTTL (negative:
// unknown, taken as fresh).
func (p *Policy) classifyEntry(key string, body []byte, pttl time.Duration) entry {
	ttl, win := p.ttlFor(key), p.staleWindow()
	e := entry{body: body, age: age(ttl+win, pttl)}
	if pttl < 0 || pttl > win {
		e.fresh = true
		if pttl < 0 {
			e.age = 0
		}
		return e
	}
	past := win - pttl // how long past its TTL
	e.swr = past < p.StaleWhileRevalidate
	e.sie = past < p.StaleIfError
	return e
}

// flightResult is what one load hands to every caller sharing it.
type flightResult struct {
	body  []byte
	cache string        // Miss, or Hit when a fill by another reader arrived while waiting
	pttl  time.Duration // of a Hit
	local bool
}

// GetFunc answers one read of policy p whose entry is loaded by load instead of p.SQL (a parsed
// file, say), with the same tiers, single-flight, lease and fill as Get.
func (r *Resolver) GetFunc(ctx context.Context, p *Policy, vals []string, load LoadFunc) (Result, error) {
	return r.get(ctx, p, vals, load, nil)
}

// get is Get (load nil: p.SQL with args) and GetFunc.
func (r *Resolver) get(ctx context.Context, p *Policy, vals []string, load LoadFunc, args []any) (Result, error) {
	key := p.Key.RenderAfter(r.opts.Namespace, vals...)
	cacheState := Bypass
	var mode fillMode // how a load may fill the key
	var stale entry   // a stale entry to fall back on, when it is inside stale_if_error
	if r.store != nil && !r.usable(p) {
		// Invalidation is not live: a change may have been missed, so the entry is not served
		// as a hit. It is still a stale entry, good for stale_if_error when the database fails
		// too (the usual reason the listener is away).
		if p.StaleIfError > 0 {
			if body, pttl, _, err := r.store.Get(ctx, key); err == nil && !isNegative(body) {
				if e := p.classifyEntry(key, body, pttl); e.fresh || e.sie {
					e.sie = true
					stale = e
				}
			}
		}
	}
	if r.usable(p) {
		body, pttl, local, err := r.store.Get(ctx, key)
		switch {
		case err == nil && isNegative(body):
			r.count(p, "hit", 1)
			return Result{Cache: Hit, Local: local}, ErrNotFound
		case err == nil:
			e := p.classifyEntry(key, body, pttl)
			switch {
			case e.fresh:
				r.count(p, "hit", 1)
				if local {
					r.counters(p).local.Inc()
				}
				if ttl := p.ttlFor(key); p.RefreshAhead > 0 && e.age >= time.Duration(p.RefreshAhead*float64(ttl)) {
					// Lease only while the entry is still this far into its TTL: a refresh done
					// by another reader meanwhile makes it fresh again, and this one stops.
					r.refresh(p, key, slices.Clone(vals), r.loadOf(p, load, args), "ahead", p.staleWindow()+ttl-time.Duration(p.RefreshAhead*float64(ttl)))
				}
				return Result{Body: body, Cache: Hit, Age: e.age, Local: local}, nil
			case e.swr:
				r.count(p, "stale", 1)
				r.m.staleServed.WithLabelValues(p.Name, StaleWhileRevalidate).Inc()
				r.refresh(p, key, slices.Clone(vals), r.loadOf(p, load, args), "stale", p.staleWindow())
				return Result{Body: body, Cache: Stale, Age: e.age, StaleReason: StaleWhileRevalidate, Local: local}, nil
			}
			// Past stale_while_revalidate: load now, keeping the entry for stale_if_error.
			cacheState, mode = Miss, fillRefresh
			if e.sie {
				stale = e
			}
		case errors.Is(err, errMiss):
			cacheState, mode = Miss, fillLease
		case errors.Is(err, errLeased):
			cacheState, mode = Miss, fillWait
		default:
			r.logValkey(err)
		}
	}
	if cacheState == Miss {
		r.count(p, "miss", 1)
	} else {
		r.count(p, "bypass", 1)
	}
	if stale.sie && r.probedElsewhere() {
		// The database is failing and ProbeDatabase finds out when it answers again: the
		// stale entry answers now, rather than after this read, taking the breaker's probe,
		// waits out the query timeout on a database that does not answer.
		r.m.staleServed.WithLabelValues(p.Name, StaleIfError).Inc()
		return Result{Body: stale.body, Cache: Stale, Age: stale.age, StaleReason: StaleIfError}, nil
	}

	// One load per key per process: concurrent misses wait for the first one's query. The
	// load runs detached from the first caller's cancellation, so that a client hanging up does
	// not fail everyone waiting on the same key; each caller still stops waiting when its own
	// context ends.
	flightKey := strconv.FormatUint(r.epoch.Load(), 36) + "\x00" + key
	// Copies of vals and args go to the load, so that a hit keeps the caller's on its stack.
	lf, ownVals := r.loadOf(p, load, args), slices.Clone(vals)
	ch := r.flight.DoChan(flightKey, func() (any, error) {
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.opts.QueryTimeout)
		defer cancel()
		defer context.AfterFunc(r.bg, cancel)() // Close cuts it short
		return r.loadAndFill(lctx, p, key, ownVals, lf, plan{mode: mode, refreshBelow: p.staleWindow(), shed: cacheState == Bypass})
	})
	select {
	case res := <-ch:
		if res.Shared {
			r.m.shared.WithLabelValues(p.Name).Inc()
		}
		if res.Err != nil {
			if stale.sie && !errors.Is(res.Err, ErrNotFound) {
				r.m.staleServed.WithLabelValues(p.Name, StaleIfError).Inc()
				return Result{Body: stale.body, Cache: Stale, Age: stale.age, StaleReason: StaleIfError}, nil
			}
			return Result{Cache: cacheState}, res.Err
		}
		f := res.Val.(flightResult)
		if f.cache == Hit {
			return Result{Body: f.body, Cache: Hit, Age: p.classifyEntry(key, f.body, f.pttl).age, Local: f.local}, nil
		}
		return Result{Body: f.body, Cache: cacheState}, nil
	case <-ctx.Done():
		return Result{}, ctx.Err()
	}
}

// fillMode says how a load may fill its key.
type fillMode int

const (
	fillNone    fillMode = iota // no cache, or not usable: load only
	fillLease                   // the key is empty: take its fill lease
	fillRefresh                 // the key holds a stale entry: take its refresh lease
	fillWait                    // the key holds another reader's lease: wait for its fill first
)

// plan says how one load goes.
type plan struct {
	mode fillMode
	// refreshBelow: in fillRefresh, the refresh lease is taken only while the key's PTTL is at
	// most this (its stale window, or more for a refresh ahead of expiry).
	refreshBelow time.Duration
	// background is a refresh nobody waits for: without the lease (another reader, maybe in
	// another sidecar, is refreshing), it does not load at all.
	background bool
	why        string // of a background refresh, for its metric: stale or ahead
	// shed: the read bypasses the cache, so a full bulkhead refuses it at once (see runLoad).
	shed bool
}

// loadAndFill is one load of key, run once per process for concurrent readers: lease, load,
// fill (or, in fillWait, first wait for another reader's fill).
func (r *Resolver) loadAndFill(ctx context.Context, p *Policy, key string, vals []string, load LoadFunc, pl plan) (any, error) {
	mode := pl.mode
	if mode == fillWait {
		f, next, err := r.awaitFill(ctx, key)
		if err != nil || f != nil {
			return deref(f), err
		}
		mode = next
	}
	var tags []string
	if mode != fillNone && len(p.Tags) > 0 {
		tags = make([]string, len(p.Tags))
		for i, t := range p.Tags {
			tags[i] = r.opts.Namespace + t.Render(vals...)
		}
	}
	ttl := p.ttlFor(key) + p.staleWindow()
	// The lease goes in before the database is read: an invalidation after this point deletes
	// it, and the fill below is refused.
	// Tag sets keep the key as long as it can live: as an entry, or as a cached "not found".
	life := max(ttl, p.NegativeTTL)
	lease, lost := r.takeLease(ctx, key, tags, life, mode, pl.refreshBelow)
	if lost && mode == fillLease {
		// Another reader (another sidecar: this process's readers share this load) took the
		// lease between the lookup and now: wait for its fill rather than query too. Should its
		// load fail, the key is empty again and this one takes the lease.
		f, next, err := r.awaitFill(ctx, key)
		if err != nil || f != nil {
			return deref(f), err
		}
		if next == fillLease {
			lease, _ = r.takeLease(ctx, key, tags, life, fillLease, 0)
		}
	}
	if lease == "" && pl.background {
		return flightResult{}, nil
	}
	if pl.background {
		r.m.refreshes.WithLabelValues(p.Name, pl.why).Inc()
	}
	body, err := r.runLoad(ctx, p, load, pl.shed)
	if lease == "" {
		return flightResult{body: body, cache: Miss}, err
	}
	// Valkey calls after the load get their own time (the store bounds each): a load that used
	// most of the query timeout must not leave its lease behind.
	vctx := context.WithoutCancel(ctx)
	value := body
	switch {
	case errors.Is(err, ErrNotFound) && p.NegativeTTL > 0:
		value, ttl = []byte(negativeValue), p.NegativeTTL
	case err != nil:
		r.release(vctx, key, lease, mode)
		return nil, err
	}
	fill := r.store.Fill
	if mode == fillRefresh {
		fill = r.store.RefreshFill
	}
	stored, ferr := fill(vctx, key, lease, value, ttl)
	if ferr != nil {
		r.logValkey(ferr)
		r.release(vctx, key, lease, mode)
	} else if !stored {
		r.m.fillsRefused.WithLabelValues(p.Name).Inc()
	}
	return flightResult{body: body, cache: Miss}, err
}

// deref returns *f, or nil for a nil f (loadAndFill's result when there is none).
func deref(f *flightResult) any {
	if f == nil {
		return nil
	}
	return *f
}

// takeLease takes the fill or refresh lease of key for mode and returns it, or "" when this load
// must not fill: no cache, a failed call, or (lost) another reader holds the lease.
func (r *Resolver) takeLease(ctx context.Context, key string, tags []string, life time.Duration, mode fillMode, refreshBelow time.Duration) (lease string, lost bool) {
	if mode != fillLease && mode != fillRefresh {
		return "", false
	}
	l := newLease()
	var got bool
	var err error
	if mode == fillLease {
		got, err = r.store.Lease(ctx, key, l, tags, r.leaseTTL(), life)
	} else {
		got, err = r.store.RefreshLease(ctx, key, l, tags, r.leaseTTL(), life, refreshBelow)
	}
	if err != nil {
		// A timed-out call may still have set the lease: take it back (by value, so nobody
		// else's), or the key would stay unfillable until the lease expired.
		r.logValkey(err)
		r.release(context.WithoutCancel(ctx), key, l, mode)
		return "", false
	}
	if !got {
		return "", true
	}
	return l, false
}

func (r *Resolver) release(ctx context.Context, key, lease string, mode fillMode) {
	var err error
	if mode == fillRefresh {
		err = r.store.ReleaseRefresh(ctx, key, lease)
	} else {
		err = r.store.Release(ctx, key, lease)
	}
	if err != nil {
		r.logValkey(err)
	}
}

// awaitFill waits up to LeaseWait for another reader's fill of key, polling (from the in-process
// tier when it is on, where a fill arrives as an invalidation of the lease). It returns the
// filled entry, or how to go on: take the lease when the key became empty (that reader's load
// failed, or an invalidation revoked its lease), or load without filling when the wait ran out.
func (r *Resolver) awaitFill(ctx context.Context, key string) (*flightResult, fillMode, error) {
	deadline := time.Now().Add(r.opts.LeaseWait)
	wait := 500 * time.Microsecond
	for {
		if time.Now().Add(wait).After(deadline) {
			return nil, fillNone, nil
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fillNone, nil
		case <-t.C:
		}
		wait = min(wait*2, 8*time.Millisecond)
		body, pttl, local, err := r.store.Get(ctx, key)
		switch {
		case errors.Is(err, errLeased):
			continue
		case errors.Is(err, errMiss):
			return nil, fillLease, nil
		case err != nil:
			r.logValkey(err)
			return nil, fillNone, nil
		case isNegative(body):
			return nil, fillNone, ErrNotFound
		}
		return &flightResult{body: body, cache: Hit, pttl: pttl, local: local}, fillNone, nil
	}
}

// runLoad runs one database load through the bulkhead and the database breaker. A read that
// bypasses the cache (Valkey's breaker open, Valkey unreachable, invalidation not live: every
// read of this kind falls through at once) is shed at once when the bulkhead is full (503 with
// Retry-After); a miss while the cache works waits for a slot, within its query timeout, as it
// would for a pooled connection.
func (r *Resolver) runLoad(ctx context.Context, p *Policy, load LoadFunc, shed bool) ([]byte, error) {
	if r.slots != nil {
		select {
		case r.slots <- struct{}{}:
		default:
			if shed {
				r.m.shed.WithLabelValues(p.Name).Inc()
				return nil, ErrOverloaded
			}
			select {
			case r.slots <- struct{}{}:
			case <-ctx.Done():
				r.m.shed.WithLabelValues(p.Name).Inc()
				return nil, fmt.Errorf("%w: no load slot within the query timeout", ErrTimeout)
			}
		}
		defer func() { <-r.slots }()
	}
	if p.SQL == "" { // not a database load (a parsed file): no breaker, no query metrics
		return load(ctx)
	}
	if !r.db.Allow() {
		r.m.queries.WithLabelValues(p.Name, "circuit_open").Inc()
		return nil, fmt.Errorf("%w: circuit open after repeated failures", ErrUnavailable)
	}
	start := time.Now()
	body, err := load(ctx)
	if err != nil && r.bg.Err() != nil {
		// Close cancelled it: no verdict on the database (a half-open breaker replaces a
		// probe that never reports), no query metric, no timeout.
		return nil, fmt.Errorf("%w: %v", ErrClosed, err)
	}
	r.observe(p, start, err)
	if errors.Is(err, ErrUnavailable) || errors.Is(err, ErrTimeout) {
		// A timeout counts too: a database that no longer answers (a partition, a frozen
		// server) times out rather than refusing.
		r.db.Failure()
	} else {
		r.db.Success()
	}
	return body, err
}

// refresh reloads a stale or ageing entry in the background, at most once at a time per key in
// this process, and across sidecars by the refresh lease. The reader that triggered it has
// already been answered.
func (r *Resolver) refresh(p *Policy, key string, vals []string, load LoadFunc, why string, below time.Duration) {
	fk := "refresh\x00" + strconv.FormatUint(r.epoch.Load(), 36) + "\x00" + key
	r.flight.DoChan(fk, func() (any, error) {
		r.bgMu.Lock()
		if r.bg.Err() != nil { // closed
			r.bgMu.Unlock()
			return nil, nil
		}
		r.bgWait.Add(1)
		r.bgMu.Unlock()
		defer r.bgWait.Done()
		ctx, cancel := context.WithTimeout(r.bg, r.opts.QueryTimeout)
		defer cancel()
		_, err := r.loadAndFill(ctx, p, key, vals, load, plan{mode: fillRefresh, refreshBelow: below, background: true, why: why})
		if err != nil && !errors.Is(err, ErrNotFound) {
			r.log.Debug().Err(err).Str("policy", p.Name).Msg("background refresh failed; the stale entry stays")
		}
		return nil, nil
	})
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
// query of p.BatchSQL. The result is in the order of ids. The cache result (Result.Cache and
// StaleReason; no Body) is Hit only when every id was cached and fresh, Stale when some entry
// was served stale. p's key must have one
// placeholder (so p has no tags).
func (r *Resolver) GetMany(ctx context.Context, p *Policy, ids []int64) ([]Item, Result, error) {
	if len(p.Tags) > 0 {
		// Batch leases register no tags: a tagged key filled here would escape invalidation.
		return nil, Result{}, fmt.Errorf("policy %s: batch reads of a tagged policy are not supported", p.Name)
	}
	keys := make([]string, len(ids))
	for i, id := range ids {
		keys[i] = p.Key.RenderAfter(r.opts.Namespace, strconv.FormatInt(id, 10))
	}
	items := make([]Item, len(ids))
	for i, id := range ids {
		items[i].ID = id
	}
	var missing []int
	stale := map[int]entry{} // entries past stale_while_revalidate kept for stale_if_error
	state := Bypass
	anyStale := false
	if r.store != nil && !r.usable(p) && p.StaleIfError > 0 {
		// As in GetFunc: entries are kept only for stale_if_error while invalidation is away.
		if vals, pttls, err := r.store.MGet(ctx, keys); err == nil {
			for i, v := range vals {
				if v != nil && !isNegative(v) {
					if e := p.classifyEntry(keys[i], v, pttls[i]); e.fresh || e.sie {
						stale[i] = e
					}
				}
			}
		}
	}
	if r.usable(p) {
		vals, pttls, err := r.store.MGet(ctx, keys)
		if err == nil {
			state = Hit
			hits := 0
			for i, v := range vals {
				if v == nil {
					missing = append(missing, i)
					continue
				}
				if isNegative(v) {
					hits++
					continue
				}
				e := p.classifyEntry(keys[i], v, pttls[i])
				switch {
				case e.fresh:
					hits++
					items[i].Body = v
				case e.swr:
					anyStale = true
					items[i].Body = v
					r.count(p, "stale", 1)
					r.m.staleServed.WithLabelValues(p.Name, StaleWhileRevalidate).Inc()
					r.refresh(p, keys[i], []string{strconv.FormatInt(ids[i], 10)}, r.oneLoad(p, ids[i]), "stale", p.staleWindow())
				default:
					if e.sie {
						stale[i] = e
					}
					// The key holds the old entry, so no fill lease can be had: the batch
					// load answers this reader and a background refresh replaces the entry.
					missing = append(missing, i)
					r.refresh(p, keys[i], []string{strconv.FormatInt(ids[i], 10)}, r.oneLoad(p, ids[i]), "stale", p.staleWindow())
				}
			}
			r.count(p, "hit", hits)
			r.count(p, "miss", len(missing))
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
		r.count(p, "bypass", len(ids))
	}
	if len(missing) == 0 {
		return items, manyResult(state, anyStale), nil
	}
	serveStale := func() ([]Item, Result, error) {
		for i, e := range stale {
			items[i].Body = e.body
		}
		r.m.staleServed.WithLabelValues(p.Name, StaleIfError).Add(float64(len(stale)))
		return items, Result{Cache: Stale, StaleReason: StaleIfError}, nil
	}
	if len(stale) == len(missing) && r.probedElsewhere() {
		// As in get: the database is failing and ProbeDatabase probes it.
		return serveStale()
	}
	// The missing keys in key order, so that the same set asked for in another order is the
	// same load (found is by id, so the order of the load does not matter).
	order := slices.Clone(missing)
	slices.SortFunc(order, func(x, y int) int { return strings.Compare(keys[x], keys[y]) })
	missKeys := make([]string, len(order))
	missIDs := make([]int64, len(order))
	for j, i := range order {
		missKeys[j], missIDs[j] = keys[i], ids[i]
	}
	// One load per set of missing ids per process, as for one key: identical batches missing at
	// once (a page many users open) share one query. The load runs detached from the first
	// caller's cancellation; each caller stops waiting when its own context ends.
	var fk strings.Builder
	fk.WriteString(strconv.FormatUint(r.epoch.Load(), 36))
	fk.WriteString("\x00many\x00")
	fk.WriteString(p.Name)
	fk.WriteByte(0)
	fk.WriteString(state)
	for _, k := range missKeys {
		fk.WriteByte(0)
		fk.WriteString(k)
	}
	ch := r.flight.DoChan(fk.String(), func() (any, error) {
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.opts.QueryTimeout)
		defer cancel()
		defer context.AfterFunc(r.bg, cancel)() // Close cuts it short
		return r.loadMany(lctx, p, missKeys, missIDs, state)
	})
	var res singleflight.Result
	select {
	case res = <-ch:
	case <-ctx.Done():
		return nil, Result{}, ctx.Err()
	}
	if res.Shared {
		r.m.shared.WithLabelValues(p.Name).Inc()
	}
	if err := res.Err; err != nil {
		if len(stale) == len(missing) {
			// Every id the load should have answered has an entry inside stale_if_error.
			return serveStale()
		}
		return nil, Result{}, err
	}
	found := res.Val.(map[int64][]byte)
	for _, i := range missing {
		if b, ok := found[ids[i]]; ok {
			items[i].Body = b
		}
	}
	return items, manyResult(state, anyStale), nil
}

// loadMany loads the missing ids of a batch with one query and, on a Miss, fills the keys whose
// lease it took (Bypass: Valkey is away, nothing is filled).
func (r *Resolver) loadMany(ctx context.Context, p *Policy, keys []string, ids []int64, state string) (map[int64][]byte, error) {
	var leases []string
	var got []bool
	if state == Miss {
		leases = make([]string, len(keys))
		for j := range keys {
			leases[j] = newLease()
		}
		var err error
		if got, err = r.store.LeaseMany(ctx, keys, leases, r.leaseTTL()); err != nil {
			r.logValkey(err)
			for j := range keys { // see takeLease: a timed-out call may have set them
				r.store.Release(context.WithoutCancel(ctx), keys[j], leases[j])
			}
			got = nil
		}
	}
	var found map[int64][]byte
	_, err := r.runLoad(ctx, p, func(ctx context.Context) ([]byte, error) {
		var err error
		found, err = r.loader.LoadMany(ctx, p.BatchSQL, ids)
		return nil, err
	}, state == Bypass)
	// Valkey calls after the load get their own time: a load that used most of the query
	// timeout must not leave its leases behind by timing out the fill.
	vctx := context.WithoutCancel(ctx)
	if err != nil {
		for j := range keys {
			if got != nil && got[j] {
				if err := r.store.Release(vctx, keys[j], leases[j]); err != nil {
					r.logValkey(err)
				}
			}
		}
		return nil, err
	}
	var fillKeys, fillLeases []string
	var fillVals [][]byte
	var fillTTLs []time.Duration
	for j, id := range ids {
		if got == nil || !got[j] {
			continue
		}
		b, ok := found[id]
		ttl := p.ttlFor(keys[j]) + p.staleWindow()
		if !ok {
			if p.NegativeTTL <= 0 {
				// Nothing to store: give the lease back so the next reader can take one.
				if err := r.store.Release(vctx, keys[j], leases[j]); err != nil {
					r.logValkey(err)
				}
				continue
			}
			b, ttl = []byte(negativeValue), p.NegativeTTL
		}
		fillKeys = append(fillKeys, keys[j])
		fillLeases = append(fillLeases, leases[j])
		fillVals = append(fillVals, b)
		fillTTLs = append(fillTTLs, ttl)
	}
	if len(fillKeys) == 0 {
		return found, nil // nothing leased (Bypass, or no cache at all: r.store is nil)
	}
	stored, err := r.store.FillMany(vctx, fillKeys, fillLeases, fillVals, fillTTLs)
	if err != nil {
		r.logValkey(err)
	} else if refused := len(fillKeys) - stored; refused > 0 {
		r.m.fillsRefused.WithLabelValues(p.Name).Add(float64(refused))
	}
	return found, nil
}

// manyResult is a batch's cache result: Stale (with stale-while-revalidate, the only way a batch
// serves an entry stale without an error) when some entry was, else the lookup's state.
func manyResult(state string, anyStale bool) Result {
	if anyStale {
		return Result{Cache: Stale, StaleReason: StaleWhileRevalidate}
	}
	return Result{Cache: state}

}

// oneLoad loads one id of p with p.SQL, for a background refresh of one entry of a batch.
func (r *Resolver) oneLoad(p *Policy, id int64) LoadFunc {
	return func(ctx context.Context) ([]byte, error) { return r.loader.LoadOne(ctx, p.SQL, id) }
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
