// Package cachepolicy answers reads through the cache: policies, the Valkey tier, single-flight
// loads from PostgreSQL, and the fallback to PostgreSQL when the cache cannot be used.
package cachepolicy

import (
	"context"
	"errors"
	"hash/fnv"
	"strconv"
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
	// QueryTimeout bounds one load; it must be positive.
	QueryTimeout time.Duration
}

// Resolver answers reads: cache first, then one load per cold key, then a fill.
type Resolver struct {
	opts   Options
	store  *Store // nil: no shared cache, every read is a BYPASS
	loader Loader
	m      *Metrics
	log    zerolog.Logger
	flight singleflight.Group
}

// New returns a resolver. store may be nil (no cache configured or cache disabled).
func New(opts Options, store *Store, loader Loader, log zerolog.Logger, m *Metrics) *Resolver {
	return &Resolver{opts: opts, store: store, loader: loader, m: m, log: log}
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

// Get answers one read of policy p. key is the rendered key (without namespace); args are the
// SQL arguments of p.SQL.
func (r *Resolver) Get(ctx context.Context, p *Policy, key string, args ...any) (Result, error) {
	return r.GetFunc(ctx, p, key, func(ctx context.Context) ([]byte, error) {
		return r.loader.LoadOne(ctx, p.SQL, args...)
	})
}

// LoadFunc loads one entry's bytes. It returns ErrNotFound when there is nothing to cache.
type LoadFunc func(ctx context.Context) ([]byte, error)

// GetFunc answers one read of policy p whose entry is loaded by load instead of p.SQL (a parsed
// file, say), with the same tiers, single-flight and fill as Get.
func (r *Resolver) GetFunc(ctx context.Context, p *Policy, key string, load LoadFunc) (Result, error) {
	key = r.opts.Namespace + key
	cacheState := Bypass
	if r.store != nil {
		body, pttl, err := r.store.Get(ctx, key)
		switch {
		case err == nil:
			r.m.lookups.WithLabelValues(p.Name, "hit").Inc()
			return Result{Body: body, Cache: Hit, Age: age(p.TTL, pttl)}, nil
		case errors.Is(err, errMiss):
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

	// One load per key per process: concurrent misses wait for the first one's query. The
	// load runs detached from the first caller's cancellation, so that a client hanging up does
	// not fail everyone waiting on the same key; each caller still stops waiting when its own
	// context ends.
	ch := r.flight.DoChan(key, func() (any, error) {
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.opts.QueryTimeout)
		defer cancel()
		start := time.Now()
		body, err := load(lctx)
		if p.SQL != "" { // database loads only: a policy without SQL loads from elsewhere
			r.observe(p, start, err)
		}
		if err != nil {
			return nil, err
		}
		if cacheState == Miss {
			if err := r.store.Set(lctx, key, body, p.TTL); err != nil {
				r.logValkey(err)
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

// Item is one entry of a batch read; Body nil means not found.
type Item struct {
	ID   int64
	Body []byte
}

// GetMany answers a batch of single-row reads of p by id with one MGET and, for the misses, one
// query of p.BatchSQL. The result is in the order of ids. The cache result is Hit only when every
// id was cached.
func (r *Resolver) GetMany(ctx context.Context, p *Policy, ids []int64) ([]Item, string, error) {
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
	if r.store != nil {
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
	missIDs := make([]int64, len(missing))
	for j, i := range missing {
		missIDs[j] = ids[i]
	}
	lctx, cancel := context.WithTimeout(ctx, r.opts.QueryTimeout)
	defer cancel()
	start := time.Now()
	found, err := r.loader.LoadMany(lctx, p.BatchSQL, missIDs)
	r.observe(p, start, err)
	if err != nil {
		return nil, "", err
	}
	var fillKeys []string
	var fillVals [][]byte
	for _, i := range missing {
		if b, ok := found[ids[i]]; ok {
			items[i].Body = b
			fillKeys = append(fillKeys, keys[i])
			fillVals = append(fillVals, b)
		}
	}
	if state == Miss {
		if err := r.store.SetMany(lctx, fillKeys, fillVals, p.TTL); err != nil {
			r.logValkey(err)
		}
	}
	return items, state, nil
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
