package sessions

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cachecar/cachecar/cachepolicy"
)

// tierOf waits until the store's in-process tier is connected and returns it.
func tierOf(t *testing.T, s *Store) *cachepolicy.Store {
	t.Helper()
	tier, ok := s.opts.Tier.(*cachepolicy.Store)
	if !ok {
		t.Fatalf("the store has no cachepolicy tier (%T)", s.opts.Tier)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if on, _ := tier.Tier(); on {
			return tier
		}
		if time.Now().After(deadline) {
			t.Fatal("the in-process tier never connected")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A session read before is answered from memory: with Valkey frozen, the read still answers at
// once from Valkey's copy, where a read that needed Valkey would wait out the timeout and go to
// PostgreSQL. A session that expires in Valkey expires in memory too.
func TestTierAnswersRepeatReadsFromMemory(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.RefreshInterval = time.Hour }) // no probe while frozen
	tierOf(t, f.store)
	b := body("mem", time.Now().Add(time.Hour))
	f.put(t, "m", b)
	short := body("brief", time.Now().Add(1500*time.Millisecond))
	f.put(t, "short", short)
	for _, sid := range []string{"m", "short"} {
		if got, from, err := f.get(t, sid); err != nil || from != FromValkey {
			t.Fatalf("first read of %s: %q from %s, %v", sid, got, from, err)
		}
	}
	_, stats := tierOf(t, f.store).Tier()
	if stats.Entries < 3 { // both sessions and the sentinel
		t.Fatalf("the tier holds %d entries after reading two sessions", stats.Entries)
	}

	f.redis.Pause()
	start := time.Now()
	got, from, err := f.get(t, "m")
	took := time.Since(start)
	f.redis.Resume()
	if err != nil || from != FromValkey || got != string(b) {
		t.Fatalf("read with Valkey frozen: %q from %s, %v", got, from, err)
	}
	if took >= f.store.opts.Timeout {
		t.Fatalf("read with Valkey frozen took %s: it went to Valkey", took)
	}

	time.Sleep(2500 * time.Millisecond) // "short" expired in Valkey
	if got, from, err := f.get(t, "short"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("expired session read back: %q from %s, %v", got, from, err)
	}
}

// A write through this sidecar is seen by its next read at once, even with reads of the same
// session in flight all the while (their loads may carry the value from before the write).
func TestTierOwnWritesSeenAtOnce(t *testing.T) {
	f := newFixture(t, nil)
	tierOf(t, f.store)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				f.store.Get(ctx, "w")
			}
		}()
	}
	defer func() { cancel(); wg.Wait() }()
	exp := time.Now().Add(time.Hour)
	for i := range 200 {
		want := fmt.Sprintf("v%d", i)
		f.put(t, "w", body(want, exp))
		got, from, err := f.get(t, "w")
		if err != nil || !strings.Contains(got, `"`+want+`"`) {
			t.Fatalf("read right after writing %s: %q from %s, %v", want, got, from, err)
		}
		if i%50 == 49 {
			if _, err := f.store.Delete(context.Background(), "w"); err != nil {
				t.Fatal(err)
			}
			if got, from, err := f.get(t, "w"); !errors.Is(err, ErrNotFound) {
				t.Fatalf("read right after destroying: %q from %s, %v", got, from, err)
			}
		}
	}
}

// Writes made elsewhere (connect-redis straight into Valkey, another sidecar) reach this
// sidecar's copy with Valkey's invalidation message: within a second, the bound, and in
// practice within milliseconds.
func TestTierSeesWritesMadeElsewhere(t *testing.T) {
	f := newFixture(t, func(o *Options) { o.DeleteUnknown = false; o.ValkeyOnly = true })
	tierOf(t, f.store)
	ctx := context.Background()
	other, _, _ := f.start(t, func(o *Options) { o.DeleteUnknown = false; o.ValkeyOnly = true })
	exp := time.Now().Add(time.Hour)
	f.put(t, "e", body("v1", exp))

	within := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not seen within a second", what)
			}
			time.Sleep(time.Millisecond)
		}
	}
	readsUser := func(user string) func() bool {
		return func() bool {
			got, _, err := f.get(t, "e")
			return err == nil && strings.Contains(got, `"`+user+`"`)
		}
	}
	within("first read", readsUser("v1")) // now held in memory

	// connect-redis's SET, straight into Valkey.
	raw := body("by-node", exp)
	if err := f.raw.Do(ctx, f.raw.B().Set().Key("sess:e").Value(string(raw)).Ex(time.Hour).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	within("a change by connect-redis", readsUser("by-node"))

	// Another sidecar's write, once it trusts Valkey (before, its write would reach PostgreSQL
	// only).
	deadline := time.Now().Add(10 * time.Second)
	for other.Active() != FromValkey {
		if time.Now().After(deadline) {
			t.Fatal("the other sidecar never trusted Valkey")
		}
		time.Sleep(10 * time.Millisecond)
	}
	s, err := other.Parse(body("by-other", exp))
	if err != nil {
		t.Fatal(err)
	}
	if from, err := other.Put(ctx, "e", s); err != nil || from != FromValkey {
		t.Fatalf("the other sidecar's write: %s, %v", from, err)
	}
	within("a change by another sidecar", readsUser("by-other"))

	// connect-redis's destroy (logout).
	if err := f.raw.Do(ctx, f.raw.B().Del().Key("sess:e").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	within("a logout by connect-redis", func() bool {
		_, _, err := f.get(t, "e")
		return errors.Is(err, ErrNotFound)
	})
}
