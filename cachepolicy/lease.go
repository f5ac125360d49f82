package cachepolicy

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/valkey-io/valkey-go"
)

// Fill leases close the stale-set race (DESIGN.md invariant 1). A reader that misses puts a
// lease, a value only it knows, into the empty key before it reads PostgreSQL; its fill then
// replaces the value only if the lease is still there (compare-and-set in a Lua script). An
// invalidation deletes the key, lease included, so a fill that read the database before the
// invalidation finds its lease gone and is refused: the stale value never lands. This is Meta's
// memcache lease, with the key itself holding the token so that one DEL both invalidates and
// revokes. Keys of tag sets are registered in their sets in the same script that takes the lease,
// so an invalidation of the tag also revokes leases of keys not yet filled.
//
// A reader that finds another's lease (a fill in flight, maybe in another sidecar) waits a
// moment (cache.lease_wait) for that fill, and loads by itself without filling only if it does
// not come. Batch reads load the ids leased by others without waiting.

// leasePrefix starts every lease value. Cached values are JSON (or a manifest verdict) and never
// start with a NUL byte.
const leasePrefix = "\x00cachecar-lease:"

// isLease reports whether a cached value is a fill lease rather than an entry.
func isLease(b []byte) bool {
	return len(b) >= len(leasePrefix) && string(b[:len(leasePrefix)]) == leasePrefix
}

func newLease() string {
	var b [12]byte
	rand.Read(b[:])
	return leasePrefix + hex.EncodeToString(b[:])
}

// leaseScript takes the lease of KEYS[1] if the key is empty, and registers the key in the tag
// sets KEYS[2..]: each is a sorted set scored by the latest time its member can still exist, so
// that taking a lease also prunes members that have expired and a set never grows past the keys
// alive in it. Times are the server's (TIME), so sidecars with skewed clocks never prune each
// other's live members. ARGV: lease value, lease TTL (ms), member lifetime (ms).
var leaseScript = valkey.NewLuaScript(`
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local life = tonumber(ARGV[3])
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  redis.call('ZADD', KEYS[i], now + life, KEYS[1])
  if redis.call('PTTL', KEYS[i]) < life then redis.call('PEXPIRE', KEYS[i], life) end
end
return 1`)

// fillScript sets KEYS[1] to ARGV[2] for ARGV[3] ms only if it still holds the lease ARGV[1].
var fillScript = valkey.NewLuaScript(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1`)

// releaseScript deletes KEYS[1] only if it still holds the lease ARGV[1] (a load that failed).
var releaseScript = valkey.NewLuaScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)

// detachScript deletes the first ARGV[1] keys and renames each tag set that follows to a
// detached name (the same name plus ARGV[2]), atomically, and returns how many keys it deleted
// followed by the detached names. From then on, new leases register in fresh sets; every key of
// the detached sets (leases taken before, values filled from them) is deleted in batches
// afterwards, so one huge set never blocks the server in a single script. A lease taken after
// the detach reads PostgreSQL after the commit that caused it, so it is fresh.
var detachScript = valkey.NewLuaScript(`
local out = {0}
local nk = tonumber(ARGV[1])
for i = 1, nk do out[1] = out[1] + redis.call('UNLINK', KEYS[i]) end
for i = nk + 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('RENAME', KEYS[i], KEYS[i] .. ARGV[2])
    out[#out + 1] = KEYS[i] .. ARGV[2]
  end
end
return out`)

// Refresh leases. An entry past its fresh TTL but inside its policy's stale window is still in
// its key (Valkey keeps it for TTL plus the window), so the key cannot hold a lease. Its
// refresher takes the lease in the key's companion (the key plus refreshSuffix) instead, and its
// fill replaces the value only while the companion still holds that lease. Every invalidation
// deletes a key's companion with the key, so a refresh that read the database before an
// invalidation is refused exactly like a fill.
const refreshSuffix = "\x00refresh"

// refreshKey is the companion of key that holds its refresh lease.
func refreshKey(key string) string { return key + refreshSuffix }

// refreshLeaseScript takes the refresh lease of KEYS[1] in KEYS[2] if the entry is still there
// and its PTTL is at most ARGV[4] ms (past its TTL: the stale window; or near its end, for a
// refresh ahead of expiry), and registers KEYS[1]
// in the tag sets KEYS[3..] as leaseScript does. ARGV: lease, lease TTL (ms), member lifetime
// (ms), PTTL bound (ms).
var refreshLeaseScript = valkey.NewLuaScript(`
local p = redis.call('PTTL', KEYS[1])
if p == -2 or p > tonumber(ARGV[4]) then return 0 end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local life = tonumber(ARGV[3])
for i = 3, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  redis.call('ZADD', KEYS[i], now + life, KEYS[1])
  if redis.call('PTTL', KEYS[i]) < life then redis.call('PEXPIRE', KEYS[i], life) end
end
return 1`)

// refreshFillScript sets KEYS[1] to ARGV[2] for ARGV[3] ms and drops the refresh lease, only if
// KEYS[2] still holds the lease ARGV[1].
var refreshFillScript = valkey.NewLuaScript(`
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1`)

// RefreshLease takes the refresh lease of an entry whose PTTL is at most below (its stale
// window, or more for a refresh ahead of expiry; see refreshLeaseScript); life is how long the
// key may live from now (for its tag sets).
func (s *Store) RefreshLease(ctx context.Context, key, lease string, tags []string, leaseTTL, life, below time.Duration) (bool, error) {
	if s.mem != nil {
		return s.mem.RefreshLease(key, lease, tags, leaseTTL, life, below), nil
	}
	c, err := s.get()
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	keys := append([]string{key, refreshKey(key)}, tags...)
	n, err := refreshLeaseScript.Exec(ctx, c, keys, []string{lease, ms(leaseTTL), ms(leaseTTL + life), ms(below)}).AsInt64()
	if err != nil {
		return false, s.fail("lease", err)
	}
	s.ok()
	return n == 1, nil
}

// RefreshFill stores value under key for ttl if the refresh lease is still key's, and reports
// whether it did.
func (s *Store) RefreshFill(ctx context.Context, key, lease string, value []byte, ttl time.Duration) (bool, error) {
	if s.mem != nil {
		return s.mem.RefreshFill(key, lease, value, ttl), nil
	}
	c, err := s.get()
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	n, err := refreshFillScript.Exec(ctx, c, []string{key, refreshKey(key)}, []string{lease, valkey.BinaryString(value), ms(ttl)}).AsInt64()
	if err != nil {
		return false, s.fail("fill", err)
	}
	s.ok()
	return n == 1, nil
}

// ReleaseRefresh gives up a refresh lease after a load that stored nothing.
func (s *Store) ReleaseRefresh(ctx context.Context, key, lease string) error {
	return s.Release(ctx, refreshKey(key), lease)
}

// errLeased: the key holds another reader's fill lease (its load is in flight).
var errLeased = errors.New("fill lease held by another reader")

// Lease takes the fill lease of key, registering key in tags, and reports whether it got it.
// leaseTTL bounds how long a crashed reader's lease blocks fills; ttl is the entry's TTL.
func (s *Store) Lease(ctx context.Context, key, lease string, tags []string, leaseTTL, ttl time.Duration) (bool, error) {
	if s.mem != nil {
		return s.mem.Lease(key, lease, tags, leaseTTL, ttl), nil
	}
	c, err := s.get()
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	var n int64
	if len(tags) == 0 {
		err = c.Do(ctx, c.B().Set().Key(key).Value(lease).Nx().Px(leaseTTL).Build()).Error()
		if valkey.IsValkeyNil(err) {
			s.ok()
			return false, nil
		}
		n = 1
	} else {
		// A member lives at most the lease plus the entry's TTL.
		n, err = leaseScript.Exec(ctx, c, append([]string{key}, tags...), []string{lease, ms(leaseTTL), ms(leaseTTL + ttl)}).AsInt64()
	}
	if err != nil {
		return false, s.fail("lease", err)
	}
	s.ok()
	return n == 1, nil
}

// Fill stores value under key for ttl if key still holds lease, and reports whether it did.
func (s *Store) Fill(ctx context.Context, key, lease string, value []byte, ttl time.Duration) (bool, error) {
	if s.mem != nil {
		return s.mem.Fill(key, lease, value, ttl), nil
	}
	c, err := s.get()
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	n, err := fillScript.Exec(ctx, c, []string{key}, []string{lease, valkey.BinaryString(value), ms(ttl)}).AsInt64()
	if err != nil {
		return false, s.fail("fill", err)
	}
	s.ok()
	return n == 1, nil
}

// FillMany is Fill for many keys, pipelined; it returns how many were stored.
func (s *Store) FillMany(ctx context.Context, keys, leases []string, values [][]byte, ttls []time.Duration) (int, error) {
	if s.mem != nil {
		stored := 0
		for i := range keys {
			if s.mem.Fill(keys[i], leases[i], values[i], ttls[i]) {
				stored++
			}
		}
		return stored, nil
	}
	if len(keys) == 0 {
		return 0, nil
	}
	c, err := s.get()
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	execs := make([]valkey.LuaExec, len(keys))
	for i := range keys {
		execs[i] = valkey.LuaExec{Keys: []string{keys[i]}, Args: []string{leases[i], valkey.BinaryString(values[i]), ms(ttls[i])}}
	}
	stored := 0
	for _, r := range fillScript.ExecMulti(ctx, c, execs...) {
		n, err := r.AsInt64()
		if err != nil {
			return stored, s.fail("fill", err)
		}
		stored += int(n)
	}
	s.ok()
	return stored, nil
}

// LeaseMany takes the fill leases of keys (no tags), pipelined, and reports which it got.
func (s *Store) LeaseMany(ctx context.Context, keys, leases []string, leaseTTL time.Duration) ([]bool, error) {
	if s.mem != nil {
		got := make([]bool, len(keys))
		for i := range keys {
			got[i] = s.mem.Lease(keys[i], leases[i], nil, leaseTTL, 0)
		}
		return got, nil
	}
	c, err := s.get()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	cmds := make(valkey.Commands, len(keys))
	for i := range keys {
		cmds[i] = c.B().Set().Key(keys[i]).Value(leases[i]).Nx().Px(leaseTTL).Build()
	}
	got := make([]bool, len(keys))
	for i, r := range c.DoMulti(ctx, cmds...) {
		err := r.Error()
		if valkey.IsValkeyNil(err) {
			continue
		}
		if err != nil {
			return nil, s.fail("lease", err)
		}
		got[i] = true
	}
	s.ok()
	return got, nil
}

// Release gives up the lease of key after a load that stored nothing, so the next reader can
// take one at once instead of waiting for it to expire.
func (s *Store) Release(ctx context.Context, key, lease string) error {
	if s.mem != nil {
		s.mem.Release(key, lease)
		return nil
	}
	c, err := s.get()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	if err := releaseScript.Exec(ctx, c, []string{key}, []string{lease}).Error(); err != nil {
		return s.fail("release", err)
	}
	s.ok()
	return nil
}

// Invalidate deletes keys and every member of the tag sets tags (and the sets), and returns how
// many keys it deleted. Members are not declared to the script, so this runs on a standalone
// server or a primary with replicas, not on a Valkey Cluster.
func (s *Store) Invalidate(ctx context.Context, keys, tags []string) (int, error) {
	if s.mem != nil {
		return s.mem.Invalidate(keys, tags), nil
	}
	c, err := s.getAlways()
	if err != nil {
		return 0, err
	}
	start := time.Now()
	defer s.tier.drop(keys) // after the deletes: see tierStats.drop
	keys = withRefreshKeys(keys)
	if len(tags) == 0 {
		n, err := c.Do(ctx, c.B().Unlink().Key(keys...).Build()).AsInt64()
		if err != nil {
			return 0, s.fail("invalidate", err)
		}
		s.okAlways(start)
		return int(n), nil
	}
	suffix := ":detached:" + newLease()[len(leasePrefix):]
	res, err := detachScript.Exec(ctx, c, append(append([]string(nil), keys...), tags...),
		[]string{strconv.Itoa(len(keys)), suffix}).ToArray()
	if err != nil {
		return 0, s.fail("invalidate", err)
	}
	n, err := res[0].AsInt64()
	if err != nil {
		return 0, s.fail("invalidate", err)
	}
	deleted := int(n)
	for _, m := range res[1:] {
		set, err := m.ToString()
		if err != nil {
			return deleted, s.fail("invalidate", err)
		}
		for {
			// Pop a batch of members and delete them; the set disappears with its last member.
			// A detached set left behind by a failure keeps its TTL and its tag prefix, so the
			// resync that follows a failure deletes it and its members' keys with it.
			members, err := c.Do(ctx, c.B().Zpopmin().Key(set).Count(500).Build()).AsZScores()
			if err != nil {
				return deleted, s.fail("invalidate", err)
			}
			if len(members) == 0 {
				break
			}
			batch := make([]string, 0, 2*len(members))
			for _, z := range members {
				batch = append(batch, z.Member, refreshKey(z.Member))
			}
			n, err := c.Do(ctx, c.B().Unlink().Key(batch...).Build()).AsInt64()
			if err != nil {
				return deleted, s.fail("invalidate", err)
			}
			s.tier.drop(batch)
			deleted += int(n)
		}
	}
	s.okAlways(start)
	return deleted, nil
}

// withRefreshKeys returns keys followed by their refresh companions.
func withRefreshKeys(keys []string) []string {
	out := make([]string, 0, 2*len(keys))
	out = append(out, keys...)
	for _, k := range keys {
		out = append(out, refreshKey(k))
	}
	return out
}

// ServerID identifies the Valkey server's data: its run id (new after a restart) and its
// replication id (new after a failover promotes a replica). When it changes, deletes may have
// been lost or old entries restored from disk, as in a gap.
func (s *Store) ServerID(ctx context.Context) (string, error) {
	if s.mem != nil {
		return s.mem.runID, nil
	}
	c, err := s.getAlways()
	if err != nil {
		return "", err
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout*20)
	defer cancel()
	info, err := c.Do(ctx, c.B().Info().Section("server", "replication").Build()).ToString()
	if err != nil {
		return "", s.fail("info", err)
	}
	var runID, replID string
	for _, line := range strings.Split(info, "\n") {
		line = strings.TrimSpace(line)
		if v, ok := strings.CutPrefix(line, "run_id:"); ok {
			runID = v
		}
		if v, ok := strings.CutPrefix(line, "master_replid:"); ok {
			replID = v
		}
	}
	if runID == "" {
		return "", fmt.Errorf("valkey info: no run_id")
	}
	s.okAlways(start)
	return runID + "/" + replID, nil
}

// DeletePrefixed deletes every key under match (a SCAN glob) that starts with one of prefixes,
// with SCAN and UNLINK in batches: never KEYS, never FLUSHDB, and never a key outside the
// prefixes (sessions and other apps' keys share the server). It returns how many it deleted.
func (s *Store) DeletePrefixed(ctx context.Context, match string, prefixes []string) (int, error) {
	if s.mem != nil {
		return s.mem.DeletePrefixed(prefixes), nil
	}
	c, err := s.getAlways()
	if err != nil {
		return 0, err
	}
	start := time.Now()
	deleted := 0
	var cursor uint64
	for {
		e, err := c.Do(ctx, c.B().Scan().Cursor(cursor).Match(match).Count(1000).Build()).AsScanEntry()
		if err != nil {
			return deleted, s.fail("scan", err)
		}
		var batch []string
		for _, k := range e.Elements {
			for _, p := range prefixes {
				if strings.HasPrefix(k, p) {
					batch = append(batch, k)
					break
				}
			}
		}
		if len(batch) > 0 {
			n, err := c.Do(ctx, c.B().Unlink().Key(batch...).Build()).AsInt64()
			if err != nil {
				return deleted, s.fail("unlink", err)
			}
			s.tier.drop(batch)
			deleted += int(n)
		}
		cursor = e.Cursor
		if cursor == 0 {
			break
		}
	}
	s.okAlways(start)
	return deleted, nil
}

func ms(d time.Duration) string { return strconv.FormatInt(d.Milliseconds(), 10) }
