package cachepolicy

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/valkey-io/valkey-go"
)

func (f *fixture) rawGet(t *testing.T, key string) ([]byte, bool) {
	t.Helper()
	b, err := f.raw.Do(context.Background(), f.raw.B().Get().Key(f.prefix+key).Build()).AsBytes()
	if valkey.IsValkeyNil(err) {
		return nil, false
	}
	if err != nil {
		t.Fatal(err)
	}
	return b, true
}

func (f *fixture) rawSet(t *testing.T, key, val string, ttl time.Duration) {
	t.Helper()
	if err := f.raw.Do(context.Background(), f.raw.B().Set().Key(f.prefix+key).Value(val).Px(ttl).Build()).Error(); err != nil {
		t.Fatal(err)
	}
}

// listPolicy is a two-placeholder policy whose keys are tagged by the first placeholder, like
// the dispatch lists by tenant.
func listPolicy(t *testing.T) *Policy {
	t.Helper()
	p, err := NewPolicy("list", "list:{group}:{page}", []string{"group", "page"}, time.Minute, `^[1-9][0-9]{0,18}$`,
		"SELECT json_build_object('group', $1::bigint, 'page', $2::bigint)::text", "")
	if err != nil {
		t.Fatal(err)
	}
	tag, err := NewTag("list", []string{"group", "page"}, []string{"group"})
	if err != nil {
		t.Fatal(err)
	}
	p.Tags = []*Tag{tag}
	p.Invalidated = true
	return p
}

func TestTagInvalidationDeletesEveryKeyOfTheTag(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	p := listPolicy(t)
	ctx := context.Background()
	for _, gp := range [][2]int64{{1, 1}, {1, 2}, {1, 3}, {2, 1}} {
		vals := []string{strconv.FormatInt(gp[0], 10), strconv.FormatInt(gp[1], 10)}
		if r, err := f.res.Get(ctx, p, vals, gp[0], gp[1]); err != nil || r.Cache != Miss {
			t.Fatalf("fill %v: %s %v", gp, r.Cache, err)
		}
	}
	members, err := f.raw.Do(ctx, f.raw.B().Zrange().Key(prefix+"cachecar:tag:list:1").Min("0").Max("-1").Build()).AsStrSlice()
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(members)
	if want := []string{prefix + "list:1:1", prefix + "list:1:2", prefix + "list:1:3"}; !slices.Equal(members, want) {
		t.Fatalf("tag set of group 1 = %v, want %v", members, want)
	}
	n, err := f.res.Invalidate(ctx, nil, []string{prefix + "cachecar:tag:list:1"})
	if err != nil || n != 3 {
		t.Fatalf("Invalidate(tag 1) = %d, %v; want 3 keys", n, err)
	}
	for _, k := range []string{"list:1:1", "list:1:2", "list:1:3", "cachecar:tag:list:1"} {
		if _, ok := f.rawGet(t, k); ok {
			t.Errorf("%s survived its tag's invalidation", k)
		}
	}
	if _, ok := f.rawGet(t, "list:2:1"); !ok {
		t.Error("list:2:1 of another tag was deleted")
	}
	// The tag lives at least as long as its member (whose TTL has its own jitter).
	member, _ := f.raw.Do(ctx, f.raw.B().Pttl().Key(prefix+"list:2:1").Build()).AsInt64()
	if pttl, _ := f.raw.Do(ctx, f.raw.B().Pttl().Key(prefix+"cachecar:tag:list:2").Build()).AsInt64(); member <= 0 || pttl < member {
		t.Errorf("tag TTL %d ms is shorter than its member's %d ms", pttl, member)
	}
}

func TestTagSetPrunesExpiredMembers(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	p := listPolicy(t)
	ctx := context.Background()
	tag := prefix + "cachecar:tag:list:1"
	// A member whose entry can no longer exist (its score is in the past).
	if err := f.raw.Do(ctx, f.raw.B().Zadd().Key(tag).ScoreMember().ScoreMember(1, prefix+"list:1:99").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.res.Get(ctx, p, []string{"1", "1"}, int64(1), int64(1)); err != nil {
		t.Fatal(err)
	}
	members, _ := f.raw.Do(ctx, f.raw.B().Zrange().Key(tag).Min("0").Max("-1").Build()).AsStrSlice()
	if !slices.Equal(members, []string{prefix + "list:1:1"}) {
		t.Fatalf("tag members %v: the expired member was not pruned", members)
	}
}

func TestForeignLeaseMeansNoFill(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	p := itemPolicy(t, "")
	ctx := context.Background()
	lease := leasePrefix + "other-reader"
	f.rawSet(t, "item:2", lease, time.Minute)
	r, err := f.res.Get(ctx, p, []string{"2"}, int64(2))
	if err != nil || r.Cache != Miss || isLease(r.Body) || len(r.Body) == 0 {
		t.Fatalf("read under another's lease: %q %s %v; want the row as a MISS", r.Body, r.Cache, err)
	}
	if b, _ := f.rawGet(t, "item:2"); string(b) != lease {
		t.Fatalf("key holds %q: the other reader's lease was overwritten", b)
	}
	// A batch read treats the leased key as a miss and leaves it alone too.
	items, state, err := f.res.GetMany(ctx, p, []int64{1, 2})
	if err != nil || state.Cache != Miss || items[1].Body == nil {
		t.Fatalf("GetMany: %v %s %v", items, state.Cache, err)
	}
	if b, _ := f.rawGet(t, "item:2"); string(b) != lease {
		t.Fatalf("GetMany overwrote the lease with %q", b)
	}
	if _, ok := f.rawGet(t, "item:1"); !ok {
		t.Fatal("GetMany did not fill item:1, which had no lease")
	}
}

func TestLeaseReleasedWhenNothingToStore(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	p := itemPolicy(t, "")
	ctx := context.Background()
	if _, err := f.res.Get(ctx, p, []string{"42"}, int64(42)); !errors.Is(err, ErrNotFound) {
		t.Fatalf("absent row: %v", err)
	}
	if b, ok := f.rawGet(t, "item:42"); ok {
		t.Fatalf("key holds %q after a not-found load; the lease should be released", b)
	}
	if _, _, err := f.res.GetMany(ctx, p, []int64{43}); err != nil {
		t.Fatal(err)
	}
	if b, ok := f.rawGet(t, "item:43"); ok {
		t.Fatalf("key holds %q after a batch not-found", b)
	}
}

func TestNotLiveBypassesInvalidatedPolicies(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	f.res.opts.Invalidation = true
	f.res.live.Store(false)
	p := itemPolicy(t, "")
	p.Invalidated = true
	ctx := context.Background()
	f.rawSet(t, "item:1", `{"stale":true}`, time.Minute)
	r, err := f.res.Get(ctx, p, []string{"1"}, int64(1))
	if err != nil || r.Cache != Bypass || string(r.Body) == `{"stale":true}` {
		t.Fatalf("not live: %q %s %v; want the database's row as a BYPASS", r.Body, r.Cache, err)
	}
	if _, ok := f.rawGet(t, "item:2"); ok {
		t.Fatal("filled while not live")
	}
	if items, state, err := f.res.GetMany(ctx, p, []int64{1}); err != nil || state.Cache != Bypass || string(items[0].Body) == `{"stale":true}` {
		t.Fatalf("batch not live: %q %s %v", items[0].Body, state.Cache, err)
	}
	// A policy no table invalidates is served as usual.
	q := itemPolicy(t, "")
	if r, err := f.res.Get(ctx, q, []string{"1"}, int64(1)); err != nil || r.Cache != Hit {
		t.Fatalf("TTL-only policy while not live: %s %v; want a HIT", r.Cache, err)
	}
	f.res.SetLive(true)
	if r, err := f.res.Get(ctx, p, []string{"1"}, int64(1)); err != nil || r.Cache != Hit {
		t.Fatalf("live: %s %v; want a HIT", r.Cache, err)
	}
}

func TestResyncDeletesOnlyPolicyKeys(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	p := itemPolicy(t, "")
	p.Invalidated = true
	ttlOnly, err := NewPolicy("manifest", "scorm:manifest:{f}", []string{"f"}, time.Minute, `^.+$`, "", "")
	if err != nil {
		t.Fatal(err)
	}
	f.res.opts.Policies = []*Policy{p, ttlOnly}
	gone := []string{"item:1", "item:2", "cachecar:tag:list:1"}
	kept := []string{"sess:abc", "scorm:manifest:a.zip:1", "itemx", "other"}
	for i := 0; i < 3000; i++ { // several SCAN pages
		gone = append(gone, "item:"+strconv.Itoa(1000+i))
	}
	for _, k := range append(append([]string(nil), gone...), kept...) {
		f.rawSet(t, k, "v", time.Minute)
	}
	f.rawSet(t, "item:3", leasePrefix+"x", time.Minute) // a lease in flight goes too
	gone = append(gone, "item:3")
	// Another namespace's keys are not ours.
	if err := f.raw.Do(context.Background(), f.raw.B().Set().Key("zz"+prefix+"item:1").Value("v").Px(time.Minute).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	defer f.raw.Do(context.Background(), f.raw.B().Del().Key("zz"+prefix+"item:1").Build())
	n, err := f.res.Resync(context.Background())
	if err != nil || n != len(gone) {
		t.Fatalf("Resync = %d, %v; want %d", n, err, len(gone))
	}
	for _, k := range gone[:4] {
		if _, ok := f.rawGet(t, k); ok {
			t.Errorf("%s survived the resync", k)
		}
	}
	for _, k := range kept {
		if _, ok := f.rawGet(t, k); !ok {
			t.Errorf("%s was deleted by the resync", k)
		}
	}
}

// TestReadAfterInvalidationDoesNotJoinOlderLoad: reader A's load read v1 and is still running
// when v2 is committed and its invalidation returns; reader B, starting after that, must get its
// own load (v2), not A's v1 through single-flight.
func TestReadAfterInvalidationDoesNotJoinOlderLoad(t *testing.T) {
	pool := itemsDB(t)
	addr, prefix := testenv.Valkey(t)
	f := newFixture(t, pool, addr, prefix, time.Second)
	f.res.opts.Invalidation = true
	f.res.SetLive(true)
	p := itemPolicy(t, "")
	p.Invalidated = true
	ctx := context.Background()
	var db atomic.Value
	db.Store("v1")
	readDone, release := make(chan struct{}), make(chan struct{})
	go f.res.GetFunc(ctx, p, []string{"1"}, func(context.Context) ([]byte, error) {
		v := db.Load().(string)
		close(readDone)
		<-release
		return []byte(`"` + v + `"`), nil
	})
	<-readDone
	db.Store("v2")
	if _, err := f.res.Invalidate(ctx, []string{prefix + "item:1"}, nil); err != nil {
		t.Fatal(err)
	}
	got := make(chan Result, 1)
	go func() {
		r, _ := f.res.GetFunc(ctx, p, []string{"1"}, func(context.Context) ([]byte, error) { return []byte(`"` + db.Load().(string) + `"`), nil })
		got <- r
	}()
	select {
	case r := <-got:
		if string(r.Body) != `"v2"` {
			t.Fatalf("B got %s", r.Body)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("B waited for A's load: it joined a flight that started before the invalidation")
	}
	close(release)
}
