package cachepolicy

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Policy is one cached resource: where it lives (key template), for how long, which ids may
// reach a key or SQL, and how it is loaded.
type Policy struct {
	// Name identifies the policy in metrics and logs ("course").
	Name string
	// Key renders the cache key from the policy's parameters.
	Key *Template
	// TTL is how long a filled entry lives; always positive.
	TTL time.Duration
	// ID is the rule every id parameter must match (anchored).
	ID *regexp.Regexp
	// SQL loads one entry: it returns one row with one text column of JSON; no row or NULL is
	// ErrNotFound.
	SQL string
	// BatchSQL loads many entries by id ($1 bigint[]), returning (id, json) rows. Optional.
	BatchSQL string
	// Invalidated is set when changes of some table invalidate the policy's entries: they are
	// served and filled only while invalidation is live (Resolver.SetLive).
	Invalidated bool
	// Tags are the tag sets every key of the policy is registered in when its fill lease is
	// taken, one per dependency that binds only some of the key's placeholders. Invalidating a
	// tag deletes all its keys, without SCAN or KEYS.
	Tags []*Tag
	// StaleWhileRevalidate is how long past its TTL an entry is still served (X-Cache: STALE)
	// while one background load refreshes it (RFC 5861).
	StaleWhileRevalidate time.Duration
	// StaleIfError is how long past its TTL an entry is served when the load that should
	// replace it fails or times out (RFC 5861).
	StaleIfError time.Duration
	// NegativeTTL is how long a "not found" is cached; 0 caches none.
	NegativeTTL time.Duration
	// RefreshAhead, between 0 and 1, refreshes an entry in the background when it is read after
	// this fraction of its TTL has passed, so that a key read often never goes cold; 0 is off.
	RefreshAhead float64
}

// staleWindow is how long Valkey keeps an entry past its fresh TTL.
func (p *Policy) staleWindow() time.Duration { return max(p.StaleWhileRevalidate, p.StaleIfError) }

// ttlFor is the fresh TTL of key: the policy's TTL with ±10% jitter, so that keys filled together
// (a warm-up, a burst after a deploy) do not all expire together. The jitter is a hash of the key,
// not a random draw, so that a reader can tell from the key's remaining PTTL exactly how old an
// entry is and whether it is still fresh, with no timestamp stored next to the value.
func (p *Policy) ttlFor(key string) time.Duration {
	h := uint64(14695981039346656037) // FNV-1a, inline: no allocation on the hit path
	for i := 0; i < len(key); i++ {
		h = (h ^ uint64(key[i])) * 1099511628211
	}
	// FNV-1a's last bytes barely reach its top bits: keys that differ in their last digits
	// (course:100..199) would share a TTL to the millisecond. splitmix64's finaliser spreads
	// every input bit over the whole word.
	h ^= h >> 30
	h *= 0xbf58476d1ce4e5b9
	h ^= h >> 27
	h *= 0x94d049bb133111eb
	h ^= h >> 31
	f := 0.9 + 0.2*float64(h>>11)/float64(1<<53)
	return time.Duration(float64(p.TTL) * f).Truncate(time.Millisecond)
}

// negativeValue is what a cached "not found" holds. Entries are JSON, manifest verdicts or
// leases, none of which starts with a NUL byte followed by this text.
const negativeValue = "\x00cachecar-absent"

func isNegative(b []byte) bool { return string(b) == negativeValue }

// tagPrefix starts every tag-set key (after the namespace). Resync deletes these with the
// policies' keys.
const tagPrefix = "cachecar:tag:"

// Tag is the tag set of the keys of one policy that share the values of some placeholders:
// "cachecar:tag:dispatch_list:{tenant_id}" holds every dispatch list key of one tenant.
type Tag struct {
	prefix string
	slots  []int // indexes into the policy's placeholders, in the order of Params
	params []string
}

// NewTag returns the tag of policy over the placeholders bound (a subset of params, the
// policy's placeholders in key order).
func NewTag(policy string, params, bound []string) (*Tag, error) {
	t := &Tag{prefix: tagPrefix + policy + ":"}
	for _, b := range bound {
		i := -1
		for j, p := range params {
			if p == b {
				i = j
			}
		}
		if i < 0 {
			return nil, fmt.Errorf("policy %s: tag placeholder {%s} is not in the key", policy, b)
		}
		t.slots = append(t.slots, i)
		t.params = append(t.params, b)
	}
	if len(t.slots) == 0 {
		return nil, fmt.Errorf("policy %s: a tag needs at least one placeholder", policy)
	}
	return t, nil
}

// Params returns the placeholders the tag binds, in the order RenderBound takes their values.
func (t *Tag) Params() []string { return t.params }

// Render returns the tag-set key of a key with placeholder values vals (in key order).
func (t *Tag) Render(vals ...string) string {
	b := make([]string, len(t.slots))
	for i, s := range t.slots {
		b[i] = vals[s]
	}
	return t.RenderBound(b...)
}

// RenderBound returns the tag-set key from the bound placeholders' values, in Params order.
func (t *Tag) RenderBound(vals ...string) string {
	return t.prefix + strings.Join(vals, ":")
}

// KeyPrefix is the literal text every key of the policy starts with.
func (p *Policy) KeyPrefix() string {
	if len(p.Key.parts) == 0 {
		return p.Key.tail
	}
	return p.Key.parts[0]
}

// NewPolicy compiles a policy. params names the placeholders of key, in the order Render takes
// their values.
func NewPolicy(name, key string, params []string, ttl time.Duration, idPattern, sql, batchSQL string) (*Policy, error) {
	tmpl, err := ParseTemplate(key, params)
	if err != nil {
		return nil, fmt.Errorf("policy %s: %w", name, err)
	}
	re, err := regexp.Compile(idPattern)
	if err != nil {
		return nil, fmt.Errorf("policy %s: id pattern: %w", name, err)
	}
	if ttl <= 0 {
		return nil, fmt.Errorf("policy %s: ttl must be positive", name)
	}
	return &Policy{Name: name, Key: tmpl, TTL: ttl, ID: re, SQL: sql, BatchSQL: batchSQL}, nil
}

// ParseID checks s against the policy's id rule and returns it as a positive int64. Anything
// else is an *InputError: it never reaches a key or SQL.
func (p *Policy) ParseID(name, s string) (int64, error) {
	if len(s) > 64 || !p.ID.MatchString(s) {
		return 0, &InputError{Code: "bad_id", Message: fmt.Sprintf("%s must be a positive integer id", name)}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n <= 0 {
		return 0, &InputError{Code: "bad_id", Message: fmt.Sprintf("%s is out of range", name)}
	}
	return n, nil
}

// Template is a compiled key template such as "course:{id}".
type Template struct {
	raw   string
	parts []string // literal text; parts[i] precedes the value of slots[i]
	slots []int    // index into the Render arguments
	tail  string
}

// ParseTemplate compiles key. Each name in params must appear exactly once, and no other
// placeholder may.
func ParseTemplate(key string, params []string) (*Template, error) {
	t := &Template{raw: key}
	seen := make([]bool, len(params))
	rest := key
	for {
		open := strings.IndexByte(rest, '{')
		if open < 0 {
			if strings.IndexByte(rest, '}') >= 0 {
				return nil, fmt.Errorf("key %q: unbalanced brace", key)
			}
			t.tail = rest
			break
		}
		end := strings.IndexByte(rest[open:], '}')
		if end < 0 || strings.IndexByte(rest[:open], '}') >= 0 {
			return nil, fmt.Errorf("key %q: unbalanced brace", key)
		}
		name := rest[open+1 : open+end]
		idx := -1
		for i, p := range params {
			if p == name {
				idx = i
			}
		}
		if idx < 0 {
			return nil, fmt.Errorf("key %q: unknown placeholder {%s}", key, name)
		}
		if seen[idx] {
			return nil, fmt.Errorf("key %q: placeholder {%s} appears twice", key, name)
		}
		seen[idx] = true
		t.parts = append(t.parts, rest[:open])
		t.slots = append(t.slots, idx)
		rest = rest[open+end+1:]
	}
	for i, ok := range seen {
		if !ok {
			return nil, fmt.Errorf("key %q: missing placeholder {%s}", key, params[i])
		}
	}
	return t, nil
}

// Render fills the template. Values must already be validated: Render does not escape.
func (t *Template) Render(values ...string) string { return t.RenderAfter("", values...) }

// RenderAfter is prefix + t.Render(values...) in one allocation (the hit path renders every
// key after the namespace).
func (t *Template) RenderAfter(prefix string, values ...string) string {
	n := len(prefix) + len(t.tail)
	for i, p := range t.parts {
		n += len(p) + len(values[t.slots[i]])
	}
	var b strings.Builder
	b.Grow(n)
	b.WriteString(prefix)
	for i, p := range t.parts {
		b.WriteString(p)
		b.WriteString(values[t.slots[i]])
	}
	b.WriteString(t.tail)
	return b.String()
}

// String returns the template as configured.
func (t *Template) String() string { return t.raw }
