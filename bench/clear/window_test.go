package main

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestSplitSamples(t *testing.T) {
	// Two clears, [100, 200] and [300, 400]; one more after the samples end.
	windows := "300 400\n100 200\n900 950\n"
	tests := []struct {
		name      string
		samples   string
		wantIn    []time.Duration
		wantOut   []time.Duration
		inNon2xx  int
		outNon2xx int
		inRun     int
		seen      time.Duration
	}{
		{
			name:    "ends of a window count as inside",
			samples: "99 1 200\n100 2 200\n150 3 200\n200 4 200\n201 5 200\n",
			wantIn:  []time.Duration{2, 3, 4},
			wantOut: []time.Duration{1, 5},
			inRun:   1, seen: 100, // [100, 200]; the second clear starts after the last sample
		},
		{
			name:     "between and after the windows, statuses counted",
			samples:  "250 7 200\n350 8 503\n410 9 404\n",
			wantIn:   []time.Duration{8},
			wantOut:  []time.Duration{7, 9},
			inNon2xx: 1, outNon2xx: 1,
			inRun: 1, seen: 100, // [300, 400] whole; [100, 200] ends before the first sample
		},
		{
			name:    "a clear that started before the load counts from its first sample",
			samples: "150 1 200\n160 2 200\n",
			wantIn:  []time.Duration{1, 2},
			inRun:   1, seen: 10,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ws, err := readWindows(strings.NewReader(windows))
			if err != nil {
				t.Fatal(err)
			}
			s, err := splitSamples(strings.NewReader(tt.samples), ws)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(s.in, tt.wantIn) || !slices.Equal(s.out, tt.wantOut) {
				t.Errorf("in %v, out %v; want %v, %v", s.in, s.out, tt.wantIn, tt.wantOut)
			}
			if s.inNon2xx != tt.inNon2xx || s.outNon2xx != tt.outNon2xx {
				t.Errorf("non-2xx in %d, out %d; want %d, %d", s.inNon2xx, s.outNon2xx, tt.inNon2xx, tt.outNon2xx)
			}
			if s.windows != 3 || s.windowsInRun != tt.inRun || s.clearTime != 250 || s.clearTimeSeen != tt.seen {
				t.Errorf("windows %d, in run %d, clear time %d, seen %d; want 3, %d, 250, %d",
					s.windows, s.windowsInRun, s.clearTime, s.clearTimeSeen, tt.inRun, tt.seen)
			}
		})
	}
}

func TestSplitSamplesRejectsBadLines(t *testing.T) {
	for _, bad := range []string{"1 2\n", "a 2 200\n", "1 2 x\n"} {
		if _, err := splitSamples(strings.NewReader(bad), nil); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
	for _, bad := range []string{"1\n", "5 4\n", "x 4\n"} {
		if _, err := readWindows(strings.NewReader(bad)); err == nil {
			t.Errorf("window %q: no error", bad)
		}
	}
}

func TestQuantiles(t *testing.T) {
	d := make([]time.Duration, 0, 200)
	for i := 200; i >= 1; i-- {
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	// Nearest rank: p50 is the 100th of 200, p99 the 198th.
	if got, want := quantiles(d), [4]string{"100.000", "180.000", "198.000", "200.000"}; got != want {
		t.Errorf("quantiles = %v, want %v", got, want)
	}
	if got := quantiles(nil); got[2] != "n/a" {
		t.Errorf("quantiles(nil) p99 = %q, want n/a", got[2])
	}
}

// TestAnalyzeFiles runs the -analyze mode on files and reads its WINDOW_RESULT line.
func TestAnalyzeFiles(t *testing.T) {
	dir := t.TempDir()
	var samples strings.Builder
	for due := int64(0); due < 1000; due += 10 {
		lat := time.Millisecond
		if due >= 400 && due <= 600 {
			lat = 5 * time.Millisecond
		}
		fmt.Fprintf(&samples, "%d %d 200\n", due, lat)
	}
	write(t, dir+"/samples", samples.String())
	write(t, dir+"/windows", "400 600\n")
	var out bytes.Buffer
	if err := run(t.Context(), []string{"-analyze", "-samples", dir + "/samples", "-windows", dir + "/windows"},
		func(string) string { return "" }, &out, &out); err != nil {
		t.Fatal(err)
	}
	line := out.String()[strings.Index(out.String(), "WINDOW_RESULT"):]
	for _, want := range []string{"clears=1 ", "clears_in_run=1 ", "samples=21 ", "p99_ms=5.000 ", "out_samples=79 ", "out_p99_ms=1.000 "} {
		if !strings.Contains(line, want) {
			t.Errorf("WINDOW_RESULT lacks %q:\n%s", want, out.String())
		}
	}
}

func write(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}
