package cachepolicy

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// What the admin port asks of the cache: server facts, clears, one key, warming.

// errNoValkey: the call needs a Valkey server and the store has none (memory only).
var errNoValkey = errors.New("no Valkey configured: the cache is this process's memory")

// Info returns Valkey's raw INFO text of section ("stats", "keyspace", "memory").
func (s *Store) Info(ctx context.Context, section string) (string, error) {
	if s.mem != nil {
		return "", errNoValkey
	}
	c, err := s.getAlways()
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout*20)
	defer cancel()
	out, err := c.Do(ctx, c.B().Info().Section(section).Build()).ToString()
	if err != nil {
		return "", s.fail("info", err)
	}
	return out, nil
}

// MemoryInfo is what Valkey says about its memory: the limit, what it does at the limit, what it
// uses, and how many keys it has evicted.
type MemoryInfo struct {
	MaxMemory       int64  `json:"maxmemory"`
	MaxMemoryPolicy string `json:"maxmemoryPolicy"`
	UsedMemory      int64  `json:"usedMemory"`
	EvictedKeys     int64  `json:"evictedKeys"`
}

// MemoryInfo reads Valkey's memory facts from INFO memory and INFO stats.
func (s *Store) MemoryInfo(ctx context.Context) (MemoryInfo, error) {
	var mi MemoryInfo
	mem, err := s.Info(ctx, "memory")
	if err != nil {
		return mi, err
	}
	stats, err := s.Info(ctx, "stats")
	if err != nil {
		return mi, err
	}
	f := infoFields(mem + "\n" + stats)
	mi.MaxMemory, _ = strconv.ParseInt(f["maxmemory"], 10, 64)
	mi.MaxMemoryPolicy = f["maxmemory_policy"]
	mi.UsedMemory, _ = strconv.ParseInt(f["used_memory"], 10, 64)
	mi.EvictedKeys, _ = strconv.ParseInt(f["evicted_keys"], 10, 64)
	return mi, nil
}

// infoFields parses INFO's "name:value" lines.
func infoFields(info string) map[string]string {
	out := make(map[string]string)
	for _, line := range strings.Split(info, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok && !strings.HasPrefix(k, "#") {
			out[k] = v
		}
	}
	return out
}

// MemoryWarnings says what is risky in mi for a cache that shares Valkey with sessions: no
// limit (Valkey grows until the host runs out), or a policy that evicts keys with a TTL, which
// session keys have (an evicted session reads as absent until the next reconciliation).
func MemoryWarnings(mi MemoryInfo, sessions bool) []string {
	var w []string
	if mi.MaxMemory == 0 {
		w = append(w, "valkey has no maxmemory: it grows until the host runs out of memory; set maxmemory and an eviction policy")
	}
	if sessions && mi.MaxMemoryPolicy != "" && mi.MaxMemoryPolicy != "noeviction" {
		w = append(w, fmt.Sprintf("valkey's maxmemory-policy %s can evict session keys (they have a TTL): give sessions a server or database of their own with noeviction, or size maxmemory so it is never reached", mi.MaxMemoryPolicy))
	}
	return w
}

// clearBatch is how many keys one SCAN step asks for and one UNLINK deletes: small enough that
// neither blocks the server for long, so reads keep their latency while a big clear runs.
const clearBatch = 500

// ClearMatch deletes every key that SCAN finds under match (a glob) and keep accepts, with SCAN
// and UNLINK in batches (never KEYS or FLUSHDB), and drops this process's local copies of them;
// every other sidecar drops its copies on Valkey's invalidation messages. pause, if positive, is
// slept between batches. The keys in also are deleted by every batch's UNLINK, in the same
// command: a key whose presence vouches for the others (the sessions' sentinel) is then never
// seen next to a batch's deletions, even if something set it again since the last batch. Without
// Valkey it empties the memory store (it cannot list its keys).
func (s *Store) ClearMatch(ctx context.Context, match string, keep func(string) bool, pause time.Duration, also ...string) (int, error) {
	if s.mem != nil {
		return s.mem.DeletePrefixed(nil), nil
	}
	c, err := s.getAlways()
	if err != nil {
		return 0, err
	}
	deleted := 0
	var cursor uint64
	for {
		e, err := c.Do(ctx, c.B().Scan().Cursor(cursor).Match(match).Count(clearBatch).Build()).AsScanEntry()
		if err != nil {
			return deleted, s.fail("scan", err)
		}
		var batch []string
		for _, k := range e.Elements {
			if keep == nil || keep(k) {
				batch = append(batch, k)
			}
		}
		if len(batch) > 0 {
			res := c.DoMulti(ctx, c.B().Exists().Key(also...).Build(), c.B().Unlink().Key(append(batch, also...)...).Build())
			if len(also) == 0 {
				res = res[1:]
			}
			counts := make([]int64, len(res))
			for i, r := range res {
				if counts[i], err = r.AsInt64(); err != nil {
					return deleted, s.fail("unlink", err)
				}
			}
			s.tier.drop(batch)
			n := counts[len(counts)-1]
			if len(also) > 0 {
				n -= counts[0] // the also-keys are not counted as cleared
			}
			deleted += int(n)
		}
		cursor = e.Cursor
		if cursor == 0 {
			if len(also) > 0 {
				if err := c.Do(ctx, c.B().Unlink().Key(also...).Build()).Error(); err != nil {
					return deleted, s.fail("unlink", err)
				}
			}
			return deleted, nil
		}
		if pause > 0 {
			select {
			case <-ctx.Done():
				return deleted, ctx.Err()
			case <-time.After(pause):
			}
		}
	}
}

// KeyInfo describes one key for the admin port.
type KeyInfo struct {
	Key    string `json:"key"`
	Exists bool   `json:"exists"`
	Type   string `json:"type,omitempty"`
	// TTL is the time left, in milliseconds (-1: no expiry).
	TTL int64 `json:"ttlMs"`
	// Size is the value's length in bytes (strings only).
	Size int64 `json:"size"`
	// Policy is the cache policy whose key space holds the key ("" if none).
	Policy string `json:"policy,omitempty"`
	// Age is how long ago the entry was filled, in milliseconds, when the policy says (-1: unknown).
	Age int64 `json:"ageMs"`
	// State is fresh, stale (past its TTL, inside a stale window), negative (a cached 404),
	// lease (a fill in flight), or "" when not a policy's entry.
	State string `json:"state,omitempty"`
}

// Key reads one key's type, TTL and size.
func (s *Store) Key(ctx context.Context, key string) (KeyInfo, error) {
	ki := KeyInfo{Key: key, TTL: -1, Age: -1}
	if s.mem != nil {
		b, pttl, err := s.mem.Get(key)
		switch {
		case errors.Is(err, errMiss):
			return ki, nil
		case errors.Is(err, errLeased):
			ki.Exists, ki.Type, ki.State = true, "string", "lease"
			return ki, nil
		}
		ki.Exists, ki.Type, ki.TTL, ki.Size = true, "string", pttl.Milliseconds(), int64(len(b))
		return ki, nil
	}
	c, err := s.getAlways()
	if err != nil {
		return ki, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout*20)
	defer cancel()
	res := c.DoMulti(ctx, c.B().Type().Key(key).Build(), c.B().Pttl().Key(key).Build(), c.B().Get().Key(key).Build())
	typ, err := res[0].ToString()
	if err != nil {
		return ki, s.fail("type", err)
	}
	if typ == "none" {
		return ki, nil
	}
	ki.Exists, ki.Type = true, typ
	ki.TTL, _ = res[1].AsInt64()
	if typ == "string" {
		if b, err := res[2].AsBytes(); err == nil {
			ki.Size = int64(len(b))
			switch {
			case isLease(b):
				ki.State = "lease"
			case isNegative(b):
				ki.State = "negative"
			}
		}
	}
	return ki, nil
}

// PolicyOf returns the policy whose key space holds key (namespace included): the one whose
// literal prefix is the longest prefix of the key. ok is false for a key of no policy.
func (r *Resolver) PolicyOf(key string, extra ...*Policy) (*Policy, bool) {
	rest, ok := strings.CutPrefix(key, r.opts.Namespace)
	if !ok {
		return nil, false
	}
	var best *Policy
	for _, p := range append(append([]*Policy(nil), r.opts.Policies...), extra...) {
		if pre := p.KeyPrefix(); strings.HasPrefix(rest, pre) && (best == nil || len(pre) > len(best.KeyPrefix())) {
			best = p
		}
	}
	return best, best != nil
}

// KeyInfo describes key (namespace included), with its policy, age and state when it is a
// policy's entry.
func (r *Resolver) KeyInfo(ctx context.Context, key string, extra ...*Policy) (KeyInfo, error) {
	if r.store == nil {
		return KeyInfo{}, errNoCache
	}
	ki, err := r.store.Key(ctx, key)
	if err != nil || !ki.Exists {
		return ki, err
	}
	p, ok := r.PolicyOf(key, extra...)
	if !ok {
		return ki, nil
	}
	ki.Policy = p.Name
	if ki.State == "" && ki.TTL >= 0 {
		e := p.classifyEntry(key, nil, time.Duration(ki.TTL)*time.Millisecond)
		ki.Age = e.age.Milliseconds()
		ki.State = "fresh"
		if !e.fresh {
			ki.State = "stale"
		}
	}
	return ki, nil
}

// errNoCache: there is no cache to ask.
var errNoCache = errors.New("no cache configured")

// DeleteKey deletes one key (namespace included) with its refresh companion, as an invalidation
// does, and reports whether it existed.
func (r *Resolver) DeleteKey(ctx context.Context, key string) (bool, error) {
	if r.store == nil {
		return false, errNoCache
	}
	n, err := r.Invalidate(ctx, []string{key}, nil)
	return n > 0, err
}

// ClearPrefix deletes every key starting with prefix (namespace included), or, with exact, the
// key prefix itself; the keys in also go with every batch (see Store.ClearMatch). The admin port
// checks that prefix is inside a policy's (or the sessions') key space before it gets here.
func (r *Resolver) ClearPrefix(ctx context.Context, prefix string, exact bool, pause time.Duration, also ...string) (int, error) {
	if r.store == nil {
		return 0, errNoCache
	}
	r.epoch.Add(1)
	match := globEscape(prefix)
	if !exact {
		match += "*"
	}
	return r.store.ClearMatch(ctx, match, nil, pause, also...)
}

// ClearAll deletes every key of every policy (extra: policies the resolver does not resync, such
// as the manifests'), their fill and refresh leases and tag sets; never anything else, sessions
// included.
func (r *Resolver) ClearAll(ctx context.Context, pause time.Duration, extra ...*Policy) (int, error) {
	if r.store == nil {
		return 0, errNoCache
	}
	r.epoch.Add(1)
	prefixes := []string{r.opts.Namespace + tagPrefix}
	for _, p := range append(append([]*Policy(nil), r.opts.Policies...), extra...) {
		prefixes = append(prefixes, r.opts.Namespace+p.KeyPrefix())
	}
	keep := func(k string) bool {
		for _, p := range prefixes {
			if strings.HasPrefix(k, p) {
				return true
			}
		}
		return false
	}
	return r.store.ClearMatch(ctx, globEscape(r.opts.Namespace)+"*", keep, pause)
}

// WarmProgress is a warm-up's state, reported while it runs.
type WarmProgress struct {
	Done, Failed, Total int
}

// Warm reads every id of p through the cache (a miss loads and fills it; a hit costs nothing),
// concurrency at a time, calling progress at most every interval and once at the end. p's key
// must take one id (not the dispatch list's pages). It returns how many reads succeeded and the
// first error that was not a missing row.
func (r *Resolver) Warm(ctx context.Context, p *Policy, ids []int64, concurrency int, interval time.Duration, progress func(WarmProgress)) (WarmProgress, error) {
	if len(p.Key.slots) != 1 {
		return WarmProgress{}, fmt.Errorf("policy %s is read by more than an id and cannot be warmed by ids", p.Name)
	}
	total := len(ids)
	var done, failed atomic.Int64
	var firstErr error
	var errOnce sync.Once
	next := make(chan int64)
	var wg sync.WaitGroup
	for range max(concurrency, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range next {
				_, err := r.Get(ctx, p, []string{strconv.FormatInt(id, 10)}, id)
				if err != nil && !errors.Is(err, ErrNotFound) {
					failed.Add(1)
					errOnce.Do(func() { firstErr = err })
				}
				done.Add(1)
			}
		}()
	}
	tick := time.NewTicker(max(interval, time.Millisecond))
	defer tick.Stop()
	snapshot := func() WarmProgress {
		return WarmProgress{Done: int(done.Load()), Failed: int(failed.Load()), Total: total}
	}
feed:
	for _, id := range ids {
		for {
			select {
			case next <- id:
				continue feed
			case <-tick.C:
				if progress != nil {
					progress(snapshot())
				}
			case <-ctx.Done():
				break feed
			}
		}
	}
	close(next)
	wg.Wait()
	final := snapshot()
	if progress != nil {
		progress(final)
	}
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	return final, firstErr
}

// WarmIDs runs p's warm query (SQL returning ids, bigint) and returns at most limit ids.
func (r *Resolver) WarmIDs(ctx context.Context, sql string, limit int) ([]int64, error) {
	pg, ok := r.loader.(interface {
		IDs(ctx context.Context, sql string, limit int) ([]int64, error)
	})
	if !ok {
		return nil, fmt.Errorf("the loader cannot run warm queries")
	}
	return pg.IDs(ctx, sql, limit)
}
