package cachepolicy

import (
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/VictoriaMetrics/fastcache"
	"github.com/valkey-io/valkey-go"
)

// The in-process tier is valkey-go's server-assisted client-side cache (RESP3 CLIENT TRACKING):
// a GET through DoCache is answered from memory when this connection read the key before, and
// Valkey tells the connection when any client changes or deletes the key, which drops the local
// copy. A broken connection flushes everything the connection cached, so an outage or a
// restarted server never leaves a local copy that missed its invalidation.
//
// valkey-go's own store keeps every entry as a tree of Go values; a tier of 100k entries then
// gives the garbage collector 100k objects to mark on every cycle, which is where a naive local
// cache's 14 ms p99 came from. localStore keeps entries serialized in fastcache instead: 64 KiB
// chunks allocated outside the Go heap, indexed by maps without pointers, so a full tier adds
// nothing for the collector to scan, and its memory is bounded by its size. Entries larger than
// fastcache's 64 KiB limit are not kept locally; they are served from Valkey.

// trackedOption returns opt with client tracking on and every reply it caches kept in a
// localStore of size bytes registered in stats.
func trackedOption(opt valkey.ClientOption, size int, stats *tierStats) valkey.ClientOption {
	// Every pipelined connection gets its own store. One connection (auto-pipelined, so
	// concurrent calls still share writes) keeps one store: a hit is one lookup, and the whole
	// tier size is one bound. Calls that are not cached use the same connection, so a write's
	// acknowledgement arrives after every reply this connection read before it.
	opt.DisableCache = false
	opt.PipelineMultiplex = -1
	opt.CacheSizeEachConn = size
	// Copies are right only while invalidation messages arrive. valkey-go PINGs a connection
	// that received nothing for Dialer.KeepAlive and closes it (flushing its store) when the PING
	// gets no answer within ConnWriteTimeout; at 30 s a silently dead connection (a dropped flow,
	// a partition) would keep serving copies that long.
	opt.Dialer.KeepAlive = tierPingGap
	opt.NewCacheStoreFn = func(o valkey.CacheStoreOption) valkey.CacheStore {
		return newLocalStore(o.CacheSizeEachConn, stats)
	}
	return opt
}

// LocalCopies is an in-process tier for a valkey-go client other than the cache's (the
// sessions' store): the same bounded, tracked, off-heap copies, in a tier of its own.
type LocalCopies struct {
	size  int
	stats tierStats
}

// NewLocalCopies returns a tier of size bytes (at least MinTierSize).
func NewLocalCopies(size int) *LocalCopies {
	return &LocalCopies{size: max(size, MinTierSize)}
}

// Option returns opt with client tracking on and the replies of DoCache and DoMultiCache kept
// in this tier. valkey.NewClient fails with valkey.ErrNoCache when the server cannot track.
func (l *LocalCopies) Option(opt valkey.ClientOption) valkey.ClientOption {
	return trackedOption(opt, l.size, &l.stats)
}

// Forget drops the copies of keys (GETs and MGETs of them) once this process's own change to
// them is acknowledged; see tierStats.drop.
func (l *LocalCopies) Forget(keys ...string) { l.stats.drop(keys) }

// Peek returns this tier's live copy of key as a GET (or an MGET's element) read it: a nil
// reply for an absent key. It never reads Valkey. Copies are dropped in the order Valkey's
// invalidations arrive, so the copies held at one moment are the server's values at one point
// of its stream; a caller that needs two keys from one moment peeks one, the other, then the
// first again, and takes them if the first did not change (see sessions).
func (l *LocalCopies) Peek(key string) (valkey.ValkeyMessage, bool) { return l.stats.lookup(key) }

// Reset drops every copy, and keeps none of the replies of reads in flight.
func (l *LocalCopies) Reset() {
	for _, s := range l.stats.list() {
		s.reset()
	}
}

// Stats returns what the tier holds now.
func (l *LocalCopies) Stats() TierStats { return l.stats.read() }

// tierStats holds every connection's store, for peeks, metrics and stats. The list is copied
// on change (connections come and go rarely) so that the hit path reads it without a lock.
type tierStats struct {
	mu     sync.Mutex
	stores atomic.Pointer[[]*localStore]
}

func (t *tierStats) add(s *localStore) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var next []*localStore
	if cur := t.stores.Load(); cur != nil {
		next = append(next, *cur...)
	}
	next = append(next, s)
	t.stores.Store(&next)
}

func (t *tierStats) remove(s *localStore) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cur := t.stores.Load()
	if cur == nil {
		return
	}
	var next []*localStore
	for _, x := range *cur {
		if x != s {
			next = append(next, x)
		}
	}
	t.stores.Store(&next)
}

func (t *tierStats) list() []*localStore {
	if cur := t.stores.Load(); cur != nil {
		return *cur
	}
	return nil
}

// peek answers a GET of key from the tier without going through the client: the same lookup
// DoCache's Flight makes, without the per-call context and command it needs. A key is cached
// only in the store of the connection its reads go to, and every store holds only entries its
// connection's tracking keeps valid, so any store's copy may be served.
func (t *tierStats) peek(key string) (body []byte, pttl time.Duration, ok bool) {
	m, ok := t.lookup(key)
	if !ok || m.IsNil() {
		return nil, 0, false
	}
	str, err := m.ToString()
	if err != nil {
		return nil, 0, false
	}
	// str is a view of the entry's buffer, which nothing else holds or reuses.
	return unsafe.Slice(unsafe.StringData(str), len(str)), time.Duration(m.CachePTTL()) * time.Millisecond, true
}

// lookup returns the live copy of a GET (or an MGET's element) of key, a nil reply included.
func (t *tierStats) lookup(key string) (valkey.ValkeyMessage, bool) {
	stores := t.list()
	if len(stores) == 0 {
		return valkey.ValkeyMessage{}, false
	}
	k := []byte(entryKey(key, "GET"))
	now := time.Now().UnixMilli()
	for _, s := range stores {
		buf := s.c.Get(nil, k)
		if len(buf) <= 8 || int64(binary.BigEndian.Uint64(buf)) <= now {
			continue
		}
		var m valkey.ValkeyMessage
		if m.CacheUnmarshalView(buf[8:]) != nil {
			continue
		}
		return m, true
	}
	return valkey.ValkeyMessage{}, false
}

// drop deletes the local copies of keys from every store, once this process's own change to
// them is acknowledged. Valkey's invalidation message does the same a moment later; dropping at
// once means a read in this process that starts after the change finds no stored old copy. A
// load of one of the keys still in flight may carry a reply Valkey sent before the change: it
// hands that reply to the callers waiting on it, including one that joins it after the drop
// (microseconds, within the invalidation bound), but keeps no copy, so no later read finds it.
func (t *tierStats) drop(keys []string) {
	for _, s := range t.list() {
		for _, k := range keys {
			s.forget(entryKey(k, "GET"))
		}
	}
}

// TierStats is what the in-process tier holds now.
type TierStats struct {
	Entries uint64
	Bytes   uint64 // memory the tier's chunks take
	Limit   uint64
}

func (t *tierStats) read() TierStats {
	var out TierStats
	for _, s := range t.list() {
		var st fastcache.Stats
		s.c.UpdateStats(&st)
		out.Entries += st.EntriesCount
		out.Bytes += st.BytesSize
		out.Limit += st.MaxBytesSize
	}
	return out
}

// localStore is one connection's valkey.CacheStore.
type localStore struct {
	c     *fastcache.Cache
	stats *tierStats

	mu      sync.Mutex
	flights map[string]*tierFlight // loads in flight, by key and command
	// late counts, by key and command, the loads that failed (Cancel) while their request may
	// still be on the wire: valkey-go matches replies to loads by key alone, so such a reply
	// would land in a newer load of the key, dated from that load's start. The next reply of
	// the key is handed to its callers but not kept.
	late   map[string]int
	closed bool
	cmds   atomic.Pointer[[]string] // the commands ever cached (GET), to delete a key's entries
}

func newLocalStore(size int, stats *tierStats) *localStore {
	s := &localStore{c: fastcache.New(size), stats: stats, flights: make(map[string]*tierFlight), late: make(map[string]int)}
	s.cmds.Store(new([]string))
	stats.add(s)
	return s
}

type tierFlight struct {
	ch     chan struct{}
	val    valkey.ValkeyMessage
	err    error
	xat    int64     // the caller's client-side expiry, Unix ms
	start  time.Time // when the read was asked for, before it was sent
	noKeep bool      // the key was dropped while this load was in flight: serve the reply, keep no copy
}

// forget deletes the entry k and marks a load of it in flight as not to be kept.
func (s *localStore) forget(k string) {
	s.mu.Lock()
	if f := s.flights[k]; f != nil {
		f.noKeep = true
	}
	s.c.Del([]byte(k))
	s.mu.Unlock()
}

func (f *tierFlight) Wait(ctx context.Context) (valkey.ValkeyMessage, error) {
	select {
	case <-ctx.Done():
		return valkey.ValkeyMessage{}, ctx.Err()
	case <-f.ch:
		return f.val, f.err
	}
}

func entryKey(key, cmd string) string { return key + "\x00" + cmd }

// Flight answers from memory, or joins a load in flight, or starts one (nil, nil).
func (s *localStore) Flight(key, cmd string, ttl time.Duration, now time.Time) (valkey.ValkeyMessage, valkey.CacheEntry) {
	k := entryKey(key, cmd)
	if buf := s.c.Get(nil, []byte(k)); len(buf) > 8 {
		if xat := int64(binary.BigEndian.Uint64(buf)); xat > now.UnixMilli() {
			var m valkey.ValkeyMessage
			if err := m.CacheUnmarshalView(buf[8:]); err == nil {
				return m, nil
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if f := s.flights[k]; f != nil {
		return valkey.ValkeyMessage{}, f
	}
	if !s.closed {
		s.flights[k] = &tierFlight{ch: make(chan struct{}), xat: now.Add(ttl).UnixMilli(), start: now}
		s.noteCmd(cmd)
	}
	return valkey.ValkeyMessage{}, nil
}

// noteCmd remembers cmd, under s.mu.
func (s *localStore) noteCmd(cmd string) {
	cur := *s.cmds.Load()
	for _, c := range cur {
		if c == cmd {
			return
		}
	}
	next := append(append([]string(nil), cur...), cmd)
	s.cmds.Store(&next)
}

// Update stores the reply of a load this store started, hands it to the callers waiting on it,
// and returns its expiry: the server's (the key's PTTL, read in the same transaction) or the
// caller's, whichever comes first.
func (s *localStore) Update(key, cmd string, val valkey.ValkeyMessage) int64 {
	k := entryKey(key, cmd)
	s.mu.Lock()
	defer s.mu.Unlock()
	late := s.late[k] > 0
	if late {
		if s.late[k]--; s.late[k] == 0 {
			delete(s.late, k)
		}
	}
	f := s.flights[k]
	if f == nil {
		return 0
	}
	delete(s.flights, k)
	sxat := val.CachePXAT() // the key's expiry on the server, read with the value
	xat := sxat
	if xat > 0 {
		// valkey-go adds the PTTL to the time it read the reply, later than the server ran the
		// command: the copy would outlive the key by the reply's trip. The server ran it after
		// the read was asked for, so that time plus the PTTL is never past the key's expiry:
		// take back everything since then, and 2 ms for the rounding.
		xat -= time.Since(f.start).Milliseconds() + 2
	}
	if xat <= 0 || f.xat < xat {
		xat = f.xat
	}
	if !f.noKeep && !late {
		buf := make([]byte, 8, 8+val.CacheSize())
		binary.BigEndian.PutUint64(buf, uint64(xat))
		buf = val.CacheMarshal(buf)
		s.c.Set([]byte(k), buf) // silently skipped past fastcache's 64 KiB entry limit
	}
	f.val = val
	close(f.ch)
	if sxat > 0 {
		// The caller reads the entry's age and freshness from this: it must be the server's
		// expiry, as a later hit from memory reports it, not the local copy's shorter life.
		return sxat
	}
	return xat
}

// Cancel fails the callers waiting on a load that failed.
func (s *localStore) Cancel(key, cmd string, err error) {
	k := entryKey(key, cmd)
	s.mu.Lock()
	f := s.flights[k]
	delete(s.flights, k)
	var verr *valkey.ValkeyError
	if f != nil && !s.closed && !errors.As(err, &verr) && !errors.Is(err, valkey.ErrDoCacheAborted) {
		// Not a reply of the server (those have arrived): the request may still be on the wire.
		s.late[k]++
	}
	s.mu.Unlock()
	if f != nil {
		f.err = err
		close(f.ch)
	}
}

// Delete drops the entries of keys (Valkey's invalidation message), or every entry for nil
// (Valkey flushed its data). Loads in flight are left alone: their replies were produced
// after the change, on the same connection.
func (s *localStore) Delete(keys []valkey.ValkeyMessage) {
	if keys == nil {
		s.c.Reset()
		return
	}
	cmds := *s.cmds.Load()
	for _, km := range keys {
		key, err := km.ToString()
		if err != nil {
			continue
		}
		for _, cmd := range cmds {
			s.c.Del([]byte(entryKey(key, cmd)))
		}
	}
}

// reset drops every entry and keeps no copy of the loads in flight (their callers still get
// their replies).
func (s *localStore) reset() {
	s.mu.Lock()
	for _, f := range s.flights {
		f.noKeep = true
	}
	s.c.Reset()
	s.mu.Unlock()
}

// Close flushes everything: the connection broke, so invalidations may have been missed.
func (s *localStore) Close(err error) {
	s.mu.Lock()
	flights := s.flights
	s.flights = map[string]*tierFlight{}
	s.closed = true
	s.mu.Unlock()
	s.c.Reset()
	s.stats.remove(s)
	for _, f := range flights {
		f.err = err
		close(f.ch)
	}
}
