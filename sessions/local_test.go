package sessions

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// Session reads from Valkey are answered from the client's tracked copies (Options.Local): these
// tests hold them to what reads from Valkey itself promise.

func (f *fixture) localReads() float64 { return testutil.ToFloat64(f.store.m.local) }

// getWant reads sid and fails unless it is want (or not found, for want "").
func (f *fixture) getWant(t *testing.T, sid, want, when string) {
	t.Helper()
	got, from, err := f.get(t, sid)
	switch {
	case want == "" && !errors.Is(err, ErrNotFound):
		t.Fatalf("%s: got %q from %s (%v), want not found", when, got, from, err)
	case want != "" && (err != nil || got != want):
		t.Fatalf("%s: got %q from %s (%v), want %q", when, got, from, err, want)
	}
}

func TestLocalCopiesAnswerRepeatedReads(t *testing.T) {
	for _, local := range []bool{true, false} {
		t.Run(fmt.Sprintf("local=%v", local), func(t *testing.T) {
			f := newFixture(t, func(o *Options) {
				if !local {
					o.Local = nil
				}
			})
			b := string(body("ann", time.Now().Add(time.Hour)))
			f.put(t, "rep", []byte(b))
			for i := range 5 {
				got, from, err := f.get(t, "rep")
				if err != nil || got != b || from != FromValkey {
					t.Fatalf("read %d: %q from %s, %v", i, got, from, err)
				}
			}
			// The first read goes to Valkey; the next four are answered from the copy.
			if n := f.localReads(); (local && n != 4) || (!local && n != 0) {
				t.Fatalf("local reads %v with local copies %v", n, local)
			}
			// An absent session is remembered too, and still absent.
			f.getWant(t, "none", "", "first read of an absent session")
			f.getWant(t, "none", "", "second read of an absent session")
		})
	}
}

// A copy follows every writer that is not this process: an app using connect-redis directly
// and another sidecar. The issue allows a second; tracking takes milliseconds.
func TestLocalCopiesFollowOtherWriters(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	other, _, _ := f.start(t, nil)
	v1 := string(body("v1", time.Now().Add(time.Hour)))
	f.put(t, "shared", []byte(v1))
	f.getWant(t, "shared", v1, "first read")
	f.getWant(t, "shared", v1, "second read")
	if f.localReads() < 1 {
		t.Fatal("the second read was not answered from the copy")
	}
	eventually := func(want, what string) {
		t.Helper()
		deadline := time.Now().Add(time.Second)
		for {
			got, _, err := f.get(t, "shared")
			if (want == "" && errors.Is(err, ErrNotFound)) || (want != "" && err == nil && got == want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("after %s: still %q (%v) a second later", what, got, err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}

	// connect-redis's save: SET with EX, straight into Valkey.
	v2 := string(body("v2", time.Now().Add(time.Hour)))
	if err := f.raw.Do(ctx, f.raw.B().Set().Key("sess:shared").Value(v2).ExSeconds(3600).Build()).Error(); err != nil {
		t.Fatal(err)
	}
	eventually(v2, "a connect-redis save")

	// Another sidecar's save, then its destroy.
	waitActive(t, other, FromValkey)
	sess, err := other.Parse(body("v3", time.Now().Add(time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.Put(ctx, "shared", sess); err != nil {
		t.Fatal(err)
	}
	eventually(string(sess.Raw), "another sidecar's save")
	if _, err := other.Delete(ctx, "shared"); err != nil {
		t.Fatal(err)
	}
	eventually("", "another sidecar's destroy")

	// connect-redis's destroy of a session this sidecar holds a copy of.
	// A key deleted straight in Valkey (connect-redis's destroy; outside a migration from it,
	// PostgreSQL decides, so the read then comes from there: TestEvictedSessionServedFromPostgres
	// has both modes): the copy goes, and the next reads stop answering from it.
	f.put(t, "shared", []byte(v1))
	f.getWant(t, "shared", v1, "read before the key is deleted")
	if err := f.raw.Do(ctx, f.raw.B().Del().Key("sess:shared").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Second)
	for {
		got, from, err := f.get(t, "shared")
		if err != nil {
			t.Fatal(err)
		}
		if from == FromPostgres && got == v1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a second after the key was deleted, still %q from %s", got, from)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// This process's own writes are seen by its very next read, without waiting for Valkey's
// invalidation message.
func TestLocalCopiesReadYourOwnWrites(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	for i := range 200 {
		v := string(body(fmt.Sprintf("v%d", i), time.Now().Add(time.Hour)))
		f.get(t, "mine") // absent or the last value, now with a copy (or an absent one) to replace
		f.put(t, "mine", []byte(v))
		f.getWant(t, "mine", v, fmt.Sprintf("read right after save %d", i))
		f.getWant(t, "mine", v, fmt.Sprintf("second read after save %d", i))
		if i%2 == 1 {
			if _, err := f.store.Delete(ctx, "mine"); err != nil {
				t.Fatal(err)
			}
			f.getWant(t, "mine", "", fmt.Sprintf("read right after destroy %d", i))
		}
	}
	if f.localReads() < 200 {
		t.Fatalf("only %v reads were answered from copies: the test did not exercise them", f.localReads())
	}
}

// proxied starts a second store (a sidecar) whose Valkey connection goes through a fault proxy,
// once the fixture's own store is stopped (so that nobody else reconciles), and waits until it
// trusts Valkey.
func (f *fixture) proxied(t *testing.T, tweak func(*Options)) (*Store, *testenv.Proxy) {
	t.Helper()
	f.stop()
	p := testenv.StartProxy(t, f.redis.Addr)
	g := &fixture{url: f.url, db: f.db, redis: &testenv.Redis{Addr: p.Addr()}, raw: f.raw}
	s, _, _ := g.start(t, tweak)
	waitActive(t, s, FromValkey)
	return s, p
}

// A copy is never served once its key expired in Valkey, however late the reply that brought it
// arrived: valkey-go dates a copy's expiry from the reply's arrival, 100 ms (the proxy's
// latency) after the server read the key's PTTL.
func TestLocalCopyEndsWithItsKey(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	b := string(body("brief", time.Now().Add(1500*time.Millisecond)))
	f.put(t, "brief", []byte(b))
	s, p := f.proxied(t, nil)
	p.SetLatency(100 * time.Millisecond)
	if got, _, err := s.Get(ctx, "brief"); err != nil || string(got) != b {
		t.Fatalf("first read: %q, %v", got, err)
	}
	// The key's expiry, read straight from Valkey while it is alive (nothing here touches it
	// once it may have expired: a read of an expired key deletes it and drops the copy).
	pttl, err := f.raw.Do(ctx, f.raw.B().Pttl().Key("sess:brief").Build()).AsInt64()
	if err != nil || pttl <= 0 {
		t.Fatalf("PTTL %d, %v", pttl, err)
	}
	// The server read the PTTL before its reply arrived: the key expired by then.
	gone := time.Now().Add(time.Duration(pttl+2) * time.Millisecond)
	local := 0
	for time.Now().Before(gone.Add(150 * time.Millisecond)) {
		start := time.Now()
		before := testutil.ToFloat64(s.m.local)
		got, from, err := s.Get(ctx, "brief")
		fromCopy := testutil.ToFloat64(s.m.local) > before
		if fromCopy {
			local++
		}
		if start.After(gone) && err == nil {
			t.Fatalf("read %v after the key expired: %q from %s (from the copy: %v)", start.Sub(gone), got, from, fromCopy)
		}
		time.Sleep(time.Millisecond)
	}
	if local < 10 {
		t.Fatalf("only %d reads came from the copy while the key lived", local)
	}
}

// Copies kept while Valkey was trusted are dropped when it is trusted again: a reconciliation may
// have rewritten keys whose invalidation messages are still on their way.
func TestLocalCopiesDroppedWhenTrustReturns(t *testing.T) {
	f := newFixture(t, nil)
	local := f.store.opts.Local.(*cachepolicy.LocalCopies)
	b := string(body("ann", time.Now().Add(time.Hour)))
	f.put(t, "kept", []byte(b))
	f.getWant(t, "kept", b, "first read")
	if n := local.Stats().Entries; n < 2 {
		t.Fatalf("the tier holds %d entries after a read, want the session and the sentinel", n)
	}
	f.store.distrust() // as a write that missed Valkey does; Run trusts it again (the epoch did not move)
	f.waitActive(t, FromValkey)
	if n := local.Stats().Entries; n != 0 {
		t.Fatalf("the tier still holds %d entries once Valkey was trusted again", n)
	}
	f.getWant(t, "kept", b, "read after trust returned")
}

// valkey-go caches an MGET key by key: with the sentinel held and the session not, it answers the
// sentinel from its copy and the session from Valkey one trip later. A FLUSHALL in that trip
// paired an old sentinel (trusted) with the flushed session (nil): a live, acknowledged session
// answered 404. Now a read takes the pair from copies of one moment, or one MGET.
func TestLocalCopiesNeverPairAcrossAFlush(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	b := string(body("ann", time.Now().Add(time.Hour)))
	f.put(t, "live", []byte(b))
	s, p := f.proxied(t, nil)
	// Another session's read leaves the sentinel's copy behind.
	if _, _, err := s.Get(ctx, "warm"); !errors.Is(err, ErrNotFound) {
		t.Fatal(err)
	}
	p.SetLatency(100 * time.Millisecond)
	type result struct {
		body []byte
		from string
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		b, from, err := s.Get(ctx, "live")
		ch <- result{b, from, err}
	}()
	time.Sleep(20 * time.Millisecond)
	if err := f.raw.Do(ctx, f.raw.B().Flushall().Build()).Error(); err != nil {
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil || string(r.body) != b {
		t.Fatalf("read of a live session during a FLUSHALL: %q from %s, %v", r.body, r.from, r.err)
	}
	// Answered from one moment, not rescued by PostgreSQL's confirmation of an absent session
	// (a mixed pair finds the session absent under a trusted sentinel).
	if n := testutil.ToFloat64(s.m.missing); n != 0 {
		t.Fatalf("the read paired the old sentinel with the flushed session (%v confirmed in PostgreSQL)", n)
	}
}

// forgetting records the keys the store forgets, in front of the real tier.
type forgetting struct {
	LocalCopies
	mu   sync.Mutex
	keys []string
}

func (l *forgetting) Forget(keys ...string) {
	l.mu.Lock()
	l.keys = append(l.keys, keys...)
	l.mu.Unlock()
	l.LocalCopies.Forget(keys...)
}

// Every write drops this process's copy of its session before it is acknowledged, not waiting
// for Valkey's invalidation (which Redis sends right after the write's reply).
func TestWritesForgetTheirCopy(t *testing.T) {
	var rec *forgetting
	f := newFixture(t, func(o *Options) {
		rec = &forgetting{LocalCopies: o.Local}
		o.Local = rec
	})
	ctx := context.Background()
	sess, err := f.store.Parse(body("ann", time.Now().Add(time.Hour)))
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []struct {
		name string
		do   func() error
	}{
		{"put", func() error { _, err := f.store.Put(ctx, "w", sess); return err }},
		{"touch", func() error { _, err := f.store.Touch(ctx, "w", sess); return err }},
		{"delete", func() error { _, err := f.store.Delete(ctx, "w"); return err }},
	} {
		rec.mu.Lock()
		rec.keys = nil
		rec.mu.Unlock()
		if err := w.do(); err != nil {
			t.Fatalf("%s: %v", w.name, err)
		}
		rec.mu.Lock()
		got := slices.Clone(rec.keys)
		rec.mu.Unlock()
		if !slices.Equal(got, []string{"sess:w"}) {
			t.Fatalf("%s forgot %q, want [sess:w]", w.name, got)
		}
	}
}

// A connection that silently stopped delivering (a partition) delivers no invalidation either,
// and a read from the copies sends nothing that would notice. Once nothing was heard from Valkey
// for longer than a check interval plus its timeout (Run's check may be late), reads go to
// Valkey, where the dead connection fails them over to PostgreSQL.
func TestLocalCopiesNotUsedWhenValkeyFellSilent(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	b := string(body("ann", time.Now().Add(time.Hour)))
	f.put(t, "quiet", []byte(b))
	s, p := f.proxied(t, nil)
	for range 2 {
		if got, from, err := s.Get(ctx, "quiet"); err != nil || string(got) != b || from != FromValkey {
			t.Fatalf("read before the partition: %q from %s, %v", got, from, err)
		}
	}
	local := testutil.ToFloat64(s.m.local)
	if local < 1 {
		t.Fatal("the second read did not come from the copy")
	}
	p.Blackhole()
	time.Sleep(20 * time.Millisecond)    // answers already on their way have arrived
	s.lastHeard.Store(-int64(time.Hour)) // as if Run's check had been held up since
	got, from, err := s.Get(ctx, "quiet")
	if testutil.ToFloat64(s.m.local) != local {
		t.Fatalf("answered from the copy (%q from %s, %v) though nothing was heard from Valkey", got, from, err)
	}
	if err != nil || string(got) != b || from != FromPostgres {
		t.Fatalf("read during the partition: %q from %s, %v; want the session from PostgreSQL", got, from, err)
	}
}
