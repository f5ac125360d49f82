package main

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// fakeRun records n keys updated 1 ms apart, each answered after 2 ms and deleted after 3 ms.
func fakeRun(n int) (*recorder, updateRun) {
	rec := newRecorder(1, n)
	// Commit timestamps are whole microseconds: a base with nanoseconds would make the expected
	// lags off by a fraction of a microsecond, depending on when the test runs.
	rec.base = rec.base.Truncate(time.Microsecond)
	for i := range n {
		s := int64(time.Millisecond) * int64(i+1)
		rec.sent[i].Store(s)
		rec.done[i].Store(s + int64(2*time.Millisecond))
		rec.deleted[i].Store(s + int64(3*time.Millisecond))
		rec.deletedWall[i].Store(rec.base.UnixNano() + s + int64(3*time.Millisecond))
	}
	rec.seen.Store(int64(n))
	return rec, updateRun{interval: time.Millisecond}
}

func resultLine(t *testing.T, out string) map[string]string {
	t.Helper()
	for _, l := range strings.Split(out, "\n") {
		if rest, ok := strings.CutPrefix(l, "INVALIDATION_RESULT "); ok {
			kv := map[string]string{}
			for _, f := range strings.Fields(rest) {
				k, v, _ := strings.Cut(f, "=")
				kv[k] = v
			}
			return kv
		}
	}
	t.Fatalf("no INVALIDATION_RESULT line in:\n%s", out)
	return nil
}

func TestReportCommitLag(t *testing.T) {
	rec, u := fakeRun(4)
	ct := commitTimes{ts: make([]int64, 4)}
	for i := range 3 {
		// Committed 1 ms after the UPDATE was sent: 2 ms before its key's del event.
		ct.ts[i] = (rec.base.UnixNano() + rec.sent[i].Load() + int64(time.Millisecond)) / 1000
	}
	// Key 3: committed after its del event (negative) and after its answer (outside); key 4: none.
	ct.ts[2] = (rec.base.UnixNano() + rec.sent[2].Load() + int64(4*time.Millisecond)) / 1000
	ct.nulls = 1
	var b bytes.Buffer
	report(&b, options{rate: 1000, workers: 1}, rec, u, ct, metricsSnapshot{}, metricsSnapshot{}, nil)
	kv := resultLine(t, b.String())
	want := map[string]string{"commit_status": "ok", "commit_keys": "3", "commit_p50_ms": "2.000", "commit_max_ms": "2.000",
		"commit_min_ms": "-1.000", "commit_negative": "1", "commit_outside": "1", "commit_missing": "1"}
	for k, v := range want {
		if kv[k] != v {
			t.Errorf("%s = %q, want %q\n%s", k, kv[k], v, b.String())
		}
	}
}

func TestReportCommitUnavailable(t *testing.T) {
	rec, u := fakeRun(2)
	ct := commitTimes{ts: make([]int64, 2), unavailable: "track_commit_timestamp is off"}
	var b bytes.Buffer
	report(&b, options{rate: 1000, workers: 1}, rec, u, ct, metricsSnapshot{}, metricsSnapshot{}, nil)
	kv := resultLine(t, b.String())
	for _, k := range []string{"commit_p50_ms", "commit_p90_ms", "commit_p99_ms", "commit_max_ms", "commit_missing"} {
		if kv[k] != "n/a" {
			t.Errorf("%s = %q, want n/a", k, kv[k])
		}
	}
	if kv["commit_status"] != "unavailable" || !strings.Contains(b.String(), "n/a, unavailable: track_commit_timestamp is off") {
		t.Errorf("unavailable not reported:\n%s", b.String())
	}
}
