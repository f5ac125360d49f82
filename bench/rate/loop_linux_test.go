package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestRun runs the whole program against a local server at 1000/s for 300 ms over 5
// connections and reads its LOAD_RESULT line.
func TestRun(t *testing.T) {
	tests := []struct {
		name string
		// closeEvery: every n-th answer carries Connection: close (0: never), so the loop has to
		// dial again and count it.
		closeEvery   int64
		wantNewConns bool
	}{
		{name: "keep-alive"},
		{name: "server closes connections", closeEvery: 25, wantNewConns: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var n atomic.Int64
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if !strings.HasPrefix(r.URL.Path, "/v1/courses/") {
					http.NotFound(w, r)
					return
				}
				if k := n.Add(1); tt.closeEvery > 0 && k%tt.closeEvery == 0 {
					w.Header().Set("Connection", "close")
				}
				w.Header().Set("X-Cache", "HIT")
				io.WriteString(w, `{"id":1}`)
			}))
			t.Cleanup(srv.Close)

			var out, errOut bytes.Buffer
			err := run(context.Background(), []string{"-base", srv.URL, "-rate", "1000", "-duration", "300ms",
				"-conns", "5", "-first", "1", "-last", "20"}, &out, &errOut)
			if err != nil {
				t.Fatalf("run: %v (stderr %q)", err, errOut.String())
			}
			got := loadResult(t, out.String())
			for k, want := range map[string]string{"requests": "300", "answers": "300", "errors": "0", "not_sent": "0",
				"non2xx": "0", "values": "HIT:300", "statuses": "200:300", "header": "X-Cache"} {
				if got[k] != want {
					t.Errorf("%s = %q, want %q\n%s", k, got[k], want, out.String())
				}
			}
			if (got["new_conns"] != "0") != tt.wantNewConns {
				t.Errorf("new_conns = %s, want new connections %v", got["new_conns"], tt.wantNewConns)
			}
			if got["p99_ms"] == "n/a" || got["self_cpu_pct"] == "n/a" {
				t.Errorf("p99_ms %q, self_cpu_pct %q: want numbers", got["p99_ms"], got["self_cpu_pct"])
			}
		})
	}
}

// TestRunRefusesWrongStatusOnOpen: the untimed request that opens each connection must answer
// -want, so a wrong path fails before the run rather than measuring 404s.
func TestRunRefusesWrongStatusOnOpen(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	t.Cleanup(srv.Close)
	err := run(context.Background(), []string{"-base", srv.URL, "-rate", "100", "-duration", "100ms", "-conns", "2"},
		io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "status 404") {
		t.Fatalf("run: %v, want an error about status 404", err)
	}
}

// TestRunSamples: -samples holds one line per answer, each due within the schedule and with a
// positive latency, and the p99 of its latencies is the LOAD_RESULT's.
func TestRunSamples(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"id":1}`)
	}))
	t.Cleanup(srv.Close)
	path := filepath.Join(t.TempDir(), "samples")
	before := time.Now()
	var out bytes.Buffer
	if err := run(context.Background(), []string{"-base", srv.URL, "-rate", "1000", "-duration", "200ms", "-conns", "4",
		"-samples", path}, &out, io.Discard); err != nil {
		t.Fatalf("run: %v", err)
	}
	after := time.Now()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var lat []time.Duration
	for line := range strings.Lines(string(b)) {
		var due, ns int64
		var status int
		if _, err := fmt.Sscanf(line, "%d %d %d\n", &due, &ns, &status); err != nil {
			t.Fatalf("line %q: %v", line, err)
		}
		if d := time.Unix(0, due); d.Before(before) || d.After(after) || ns <= 0 || status != 200 {
			t.Errorf("line %q: due outside the run, latency not positive or status not 200", line)
		}
		lat = append(lat, time.Duration(ns))
	}
	got := loadResult(t, out.String())
	if len(lat) != 200 || got["answers"] != "200" {
		t.Fatalf("%d samples, answers %s; want 200", len(lat), got["answers"])
	}
	if q := quantiles(lat); q[2] != got["p99_ms"] {
		t.Errorf("p99 of the samples %s ms, LOAD_RESULT p99_ms %s", q[2], got["p99_ms"])
	}
}

func loadResult(t *testing.T, out string) map[string]string {
	t.Helper()
	for line := range strings.Lines(out) {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "rate: LOAD_RESULT "); ok {
			m := map[string]string{}
			for _, kv := range strings.Fields(rest) {
				k, v, _ := strings.Cut(kv, "=")
				m[k] = v
			}
			return m
		}
	}
	t.Fatalf("no LOAD_RESULT line in %q", out)
	return nil
}
