package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valkey-io/valkey-go"
)

// recorder holds, per course id, when its update was sent and answered and when its key's
// deletion was seen, in nanoseconds since base on the monotonic clock (0: not yet). It also
// holds two wall-clock times, to compare with the trigger's clock_timestamp() and the COMMIT's
// pg_xact_commit_timestamp (read after the run, see commit.go): the deletion event's arrival
// (deletedWall, Unix nanoseconds) and the ts of the UPDATE's notification
// (trig, Unix microseconds, as the trigger sends it). Workers write sent and done, the
// subscription writes deleted and deletedWall, the notification listener writes trig; they are
// read after all three stopped.
type recorder struct {
	base        time.Time
	first       int
	sent        []atomic.Int64
	done        []atomic.Int64
	deleted     []atomic.Int64
	deletedWall []atomic.Int64
	trig        []atomic.Int64
	seen        atomic.Int64 // keys whose deletion was seen
	foreign     atomic.Int64 // deletion events of keys outside first..first+len-1, or seen twice
	notified    atomic.Int64 // keys whose UPDATE's notification was seen
	otherNotes  atomic.Int64 // notifications that are not the UPDATE of one of the keys (see notified)
	badNotes    atomic.Int64 // notifications that could not be read
}

func newRecorder(first, count int) *recorder {
	return &recorder{
		base: time.Now(), first: first,
		sent: make([]atomic.Int64, count), done: make([]atomic.Int64, count), deleted: make([]atomic.Int64, count),
		deletedWall: make([]atomic.Int64, count), trig: make([]atomic.Int64, count),
	}
}

// now is the time since base, never 0 (0 means "not yet").
func (r *recorder) now() int64 { return r.since(time.Now()) }

// since is t's time since base on the monotonic clock, never 0.
func (r *recorder) since(t time.Time) int64 { return max(int64(t.Sub(r.base)), 1) }

// deletedID records the first deletion event of id's key, which arrived at t.
func (r *recorder) deletedID(id int, t time.Time) {
	i := id - r.first
	if i < 0 || i >= len(r.deleted) || !r.deleted[i].CompareAndSwap(0, r.since(t)) {
		r.foreign.Add(1)
		return
	}
	r.deletedWall[i].Store(t.UnixNano())
	r.seen.Add(1)
}

// countAbsent returns how many of keys do not exist in Redis.
func countAbsent(ctx context.Context, vk valkey.Client, keys []string) (int, error) {
	absent := 0
	for i := 0; i < len(keys); i += 1000 {
		batch := keys[i:min(i+1000, len(keys))]
		n, err := vk.Do(ctx, vk.B().Exists().Key(batch...).Build()).AsInt64()
		if err != nil {
			return 0, fmt.Errorf("exists: %w", err)
		}
		absent += len(batch) - int(n)
	}
	return absent, nil
}

// enableKeyspaceEvents makes the server publish keyspace events (K) of generic commands (g: DEL,
// UNLINK, EXPIRE...), keeping whatever else was on. restore sets the old value back; it is safe
// to call more than once (only the first call acts) and works after ctx ended.
func enableKeyspaceEvents(ctx context.Context, vk valkey.Client) (prev, now string, restore func() error, err error) {
	m, err := vk.Do(ctx, vk.B().ConfigGet().Parameter("notify-keyspace-events").Build()).AsStrMap()
	if err != nil {
		return "", "", nil, fmt.Errorf("config get notify-keyspace-events: %w", err)
	}
	prev, ok := m["notify-keyspace-events"]
	if !ok {
		return "", "", nil, errors.New("config get notify-keyspace-events: no such parameter")
	}
	now = prev
	if !strings.Contains(now, "K") {
		now += "K"
	}
	if !strings.ContainsAny(now, "gA") { // A is every class but m and n, g included
		now += "g"
	}
	restore = func() error { return nil }
	if now == prev {
		return prev, now, restore, nil
	}
	if err := vk.Do(ctx, vk.B().ConfigSet().ParameterValue().ParameterValue("notify-keyspace-events", now).Build()).Error(); err != nil {
		return "", "", nil, fmt.Errorf("config set notify-keyspace-events: %w", err)
	}
	var once sync.Once
	restore = func() error {
		var err error
		once.Do(func() {
			rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			err = vk.Do(rctx, vk.B().ConfigSet().ParameterValue().ParameterValue("notify-keyspace-events", prev).Build()).Error()
			if err != nil {
				err = fmt.Errorf("put notify-keyspace-events back to %q: %w", prev, err)
			}
		})
		return err
	}
	return prev, now, restore, nil
}

// subscription is a running PSUBSCRIBE; stop ends it and waits for it.
type subscription struct {
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

func (s *subscription) stop() {
	s.once.Do(func() {
		s.cancel()
		<-s.done
	})
}

// subscribe listens to the keyspace events of every key starting with prefix in db, passes each
// deletion (del, unlink) to rec, and returns once the server confirmed the subscription.
func subscribe(ctx context.Context, vk valkey.Client, db int, prefix string, rec *recorder) (*subscription, error) {
	channelPrefix := "__keyspace@" + strconv.Itoa(db) + "__:" + prefix
	pattern := globEscape(channelPrefix) + "*"
	ready := make(chan struct{})
	var readyOnce sync.Once
	sctx, cancel := context.WithCancel(ctx)
	hooked := valkey.WithOnSubscriptionHook(sctx, func(s valkey.PubSubSubscription) {
		if s.Kind == "psubscribe" {
			readyOnce.Do(func() { close(ready) })
		}
	})
	s := &subscription{cancel: cancel, done: make(chan error, 1)}
	go func() {
		// The callback runs on the client's reading goroutine, right as the event is parsed: the
		// time taken here is when the event arrived.
		s.done <- vk.Receive(hooked, vk.B().Psubscribe().Pattern(pattern).Build(), func(m valkey.PubSubMessage) {
			// One reading of the clock: its monotonic part times the lag from the UPDATE, its
			// wall-clock part the lag from the trigger's clock_timestamp().
			at := time.Now()
			if m.Message != "del" && m.Message != "unlink" {
				return
			}
			id, err := strconv.Atoi(strings.TrimPrefix(m.Channel, channelPrefix))
			if err != nil {
				rec.foreign.Add(1)
				return
			}
			rec.deletedID(id, at)
		})
	}()
	select {
	case <-ready:
		return s, nil
	case err := <-s.done:
		cancel()
		return nil, fmt.Errorf("psubscribe %s: %v", pattern, err)
	case <-time.After(5 * time.Second):
		s.stop()
		return nil, fmt.Errorf("psubscribe %s: not confirmed within 5s", pattern)
	}
}

// globEscape escapes the glob characters of s for PSUBSCRIBE.
func globEscape(s string) string {
	var b strings.Builder
	for _, c := range s {
		if strings.ContainsRune(`*?[]\`, c) {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	return b.String()
}
