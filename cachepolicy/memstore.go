package cachepolicy

import (
	"encoding/binary"
	"encoding/hex"
	"strings"
	"sync"
	"time"

	"crypto/rand"

	"github.com/VictoriaMetrics/fastcache"
)

// memStore is the cache of a sidecar without Valkey (valkey.addrs empty): the same entries,
// leases, refresh leases and tag sets as in Valkey, kept in the process's own memory. Values live
// in fastcache (bounded, outside the Go heap, see tier.go); leases and tag sets, which exist only
// for keys being filled or keys of tagged policies, live in maps under one lock. Every operation
// that the Valkey store does in a Lua script runs under that lock here, so the stale-set race is
// closed the same way: an invalidation deletes the lease, and the fill that held it is refused.
type memStore struct {
	c     *fastcache.Cache
	runID string

	mu     sync.Mutex
	leases map[string]memLease         // fill leases by key, refresh leases by refreshKey(key)
	tags   map[string]map[string]int64 // tag set -> member key -> expiry (Unix ms)
	// registrations counts tag registrations, for the sweep in register.
	registrations int
}

const sweepEvery = 1024

type memLease struct {
	value string
	exp   int64 // Unix ms
}

func newMemStore(size int) *memStore {
	var b [8]byte
	rand.Read(b[:])
	return &memStore{c: fastcache.New(size), runID: hex.EncodeToString(b[:]),
		leases: make(map[string]memLease), tags: make(map[string]map[string]int64)}
}

// Entries are [kind][expiry, Unix ms, 8 bytes][value]; kind 1 says the value is too big for one
// fastcache entry (64 KiB) and lives in fastcache's SetBig under bigKey.
const (
	memSmall = 0
	memBig   = 1
	memHead  = 9
	// memMaxSmall keeps key plus entry under fastcache's 64 KiB limit.
	memMaxSmall = 64<<10 - 1024
)

func bigKey(key string) string { return key + "\x00big" }

func nowMs() int64 { return time.Now().UnixMilli() }

// get returns key's value and its remaining TTL, or ok false.
func (m *memStore) get(key string) ([]byte, time.Duration, bool) {
	b := m.c.Get(nil, []byte(key))
	if len(b) < memHead {
		return nil, 0, false
	}
	left := int64(binary.BigEndian.Uint64(b[1:memHead])) - nowMs()
	if left <= 0 {
		return nil, 0, false
	}
	v := b[memHead:]
	if b[0] == memBig {
		if v = m.c.GetBig(nil, []byte(bigKey(key))); len(v) == 0 {
			return nil, 0, false
		}
	}
	return v, time.Duration(left) * time.Millisecond, true
}

func (m *memStore) set(key string, value []byte, ttl time.Duration) {
	head := make([]byte, memHead, memHead+len(value))
	binary.BigEndian.PutUint64(head[1:], uint64(nowMs()+ttl.Milliseconds()))
	if len(key)+len(value) < memMaxSmall {
		m.c.Set([]byte(key), append(head, value...))
		return
	}
	head[0] = memBig
	m.c.SetBig([]byte(bigKey(key)), value)
	m.c.Set([]byte(key), head)
}

// del deletes key's value, lease and refresh lease, and reports whether it held a value.
func (m *memStore) del(key string) bool {
	_, _, had := m.get(key)
	m.c.Del([]byte(key))
	m.c.Del([]byte(bigKey(key)))
	delete(m.leases, key)
	delete(m.leases, refreshKey(key))
	return had
}

// leaseHeld returns the live lease under k, or "".
func (m *memStore) leaseHeld(k string) string {
	l, ok := m.leases[k]
	if !ok {
		return ""
	}
	if l.exp <= nowMs() {
		delete(m.leases, k)
		return ""
	}
	return l.value
}

func (m *memStore) Get(key string) ([]byte, time.Duration, error) {
	if v, left, ok := m.get(key); ok {
		return v, left, nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.leaseHeld(key) != "" {
		return nil, 0, errLeased
	}
	return nil, 0, errMiss
}

func (m *memStore) MGet(keys []string) ([][]byte, []time.Duration) {
	out := make([][]byte, len(keys))
	pttls := make([]time.Duration, len(keys))
	for i, k := range keys {
		out[i], pttls[i], _ = m.get(k)
	}
	return out, pttls
}

// register adds key to tags until life from now, pruning members that have expired. Every
// sweepEvery registrations it also sweeps every set, so that the sets of keys nobody reads again
// (old pages of a list) do not stay in memory.
func (m *memStore) register(key string, tags []string, life time.Duration) {
	now := nowMs()
	if m.registrations++; m.registrations%sweepEvery == 0 {
		for t, set := range m.tags {
			for k, exp := range set {
				if exp <= now {
					delete(set, k)
				}
			}
			if len(set) == 0 {
				delete(m.tags, t)
			}
		}
	}
	for _, t := range tags {
		set := m.tags[t]
		if set == nil {
			set = make(map[string]int64)
			m.tags[t] = set
		}
		for k, exp := range set {
			if exp <= now {
				delete(set, k)
			}
		}
		set[key] = now + life.Milliseconds()
	}
}

func (m *memStore) Lease(key, lease string, tags []string, leaseTTL, ttl time.Duration) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, _, ok := m.get(key); ok || m.leaseHeld(key) != "" {
		return false
	}
	m.leases[key] = memLease{lease, nowMs() + leaseTTL.Milliseconds()}
	m.register(key, tags, leaseTTL+ttl)
	return true
}

func (m *memStore) Fill(key, lease string, value []byte, ttl time.Duration) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.leaseHeld(key) != lease {
		return false
	}
	delete(m.leases, key)
	m.set(key, value, ttl)
	return true
}

func (m *memStore) Release(key, lease string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.leaseHeld(key) == lease {
		delete(m.leases, key)
	}
}

func (m *memStore) RefreshLease(key, lease string, tags []string, leaseTTL, life, stale time.Duration) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, left, ok := m.get(key)
	if !ok || left > stale || m.leaseHeld(refreshKey(key)) != "" {
		return false
	}
	m.leases[refreshKey(key)] = memLease{lease, nowMs() + leaseTTL.Milliseconds()}
	m.register(key, tags, leaseTTL+life)
	return true
}

func (m *memStore) RefreshFill(key, lease string, value []byte, ttl time.Duration) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.leaseHeld(refreshKey(key)) != lease {
		return false
	}
	delete(m.leases, refreshKey(key))
	m.set(key, value, ttl)
	return true
}

func (m *memStore) Invalidate(keys, tags []string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, k := range keys {
		if m.del(k) {
			n++
		}
	}
	for _, t := range tags {
		for k := range m.tags[t] {
			if m.del(k) {
				n++
			}
		}
		delete(m.tags, t)
	}
	return n
}

// DeletePrefixed deletes every entry under prefixes. fastcache cannot list its keys, but every
// key of this store is a cache policy's (sessions never live here), so a resync drops them all
// when any prefix is asked for: the same outcome, for the keys that matter, as SCAN and UNLINK.
func (m *memStore) DeletePrefixed(prefixes []string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	var st fastcache.Stats
	m.c.UpdateStats(&st)
	m.c.Reset()
	for k := range m.leases {
		for _, p := range prefixes {
			if strings.HasPrefix(k, p) {
				delete(m.leases, k)
				break
			}
		}
	}
	clear(m.tags)
	return int(st.EntriesCount)
}

func (m *memStore) stats() TierStats {
	var st fastcache.Stats
	m.c.UpdateStats(&st)
	return TierStats{Entries: st.EntriesCount, Bytes: st.BytesSize, Limit: st.MaxBytesSize}
}
