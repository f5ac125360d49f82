package sessions

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/cachecar/cachecar/cachepolicy"
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
	for other.Active() != FromValkey {
		time.Sleep(10 * time.Millisecond)
	}
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
	f.put(t, "shared", []byte(v1))
	f.getWant(t, "shared", v1, "read before the connect-redis destroy")
	if err := f.raw.Do(ctx, f.raw.B().Del().Key("sess:shared").Build()).Error(); err != nil {
		t.Fatal(err)
	}
	eventually("", "a connect-redis destroy")
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

// A copy is never served once its key expired in Valkey.
func TestLocalCopyEndsWithItsKey(t *testing.T) {
	f := newFixture(t, nil)
	ctx := context.Background()
	b := string(body("brief", time.Now().Add(1200*time.Millisecond)))
	f.put(t, "brief", []byte(b))
	before := f.localReads()
	deadline := time.Now().Add(5 * time.Second)
	for {
		// Checked before the read: a key gone then is gone for the read too.
		n, err := f.raw.Do(ctx, f.raw.B().Exists().Key("sess:brief").Build()).AsInt64()
		if err != nil {
			t.Fatal(err)
		}
		got, from, gerr := f.get(t, "brief")
		if n == 0 {
			if !errors.Is(gerr, ErrNotFound) {
				t.Fatalf("the key expired in Valkey, the read still got %q from %s (%v)", got, from, gerr)
			}
			break
		}
		if gerr != nil && !errors.Is(gerr, ErrNotFound) {
			t.Fatal(gerr)
		}
		if time.Now().After(deadline) {
			t.Fatal("the key never expired")
		}
	}
	if f.localReads()-before < 10 {
		t.Fatalf("only %v reads came from the copy while the key lived", f.localReads()-before)
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
