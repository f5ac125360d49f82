package main

import (
	"bufio"
	"cmp"
	"fmt"
	"io"
	"math"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// window is one clear, from just before its request to just after its answer, Unix nanoseconds.
type window struct{ start, end int64 }

// split is bench/rate's samples divided by the clears' windows.
type split struct {
	in, out       []time.Duration // latency of the requests due inside a window, and of the others
	inNon2xx      int             // answers due inside a window with a status outside 2xx
	outNon2xx     int
	first, last   int64         // the earliest and latest scheduled send
	windows       int           // clears
	windowsInRun  int           // clears that overlap [first, last]
	clearTime     time.Duration // the clears' total time
	clearTimeSeen time.Duration // the part of it inside [first, last]
}

// analyzeFiles reads bench/rate's -samples file and the clears' windows and prints the latency
// of the requests due during a clear, and of the others, with a WINDOW_RESULT line.
func analyzeFiles(samplesPath, windowsPath string, stdout io.Writer) error {
	wf, err := os.Open(windowsPath)
	if err != nil {
		return err
	}
	ws, err := readWindows(wf)
	wf.Close()
	if err != nil {
		return fmt.Errorf("%s: %w", windowsPath, err)
	}
	sf, err := os.Open(samplesPath)
	if err != nil {
		return err
	}
	s, err := splitSamples(sf, ws)
	sf.Close()
	if err != nil {
		return fmt.Errorf("%s: %w", samplesPath, err)
	}
	in, out := quantiles(s.in), quantiles(s.out)
	fmt.Fprintf(stdout, "clear: %d clears, %d of them during the read load; %.0f ms of clearing, %.0f ms of it during the load\n",
		s.windows, s.windowsInRun, ms(s.clearTime), ms(s.clearTimeSeen))
	fmt.Fprintf(stdout, "clear: requests due during a clear: %d (non-2xx %d), latency from the scheduled send p50 %s, p90 %s, p99 %s, max %s ms\n",
		len(s.in), s.inNon2xx, in[0], in[1], in[2], in[3])
	fmt.Fprintf(stdout, "clear: requests due outside the clears (the fills between them included): %d (non-2xx %d), p50 %s, p90 %s, p99 %s, max %s ms\n",
		len(s.out), s.outNon2xx, out[0], out[1], out[2], out[3])
	fmt.Fprintf(stdout, "clear: WINDOW_RESULT clears=%d clears_in_run=%d clear_ms=%.1f clear_ms_in_run=%.1f samples=%d non2xx=%d p50_ms=%s p90_ms=%s p99_ms=%s max_ms=%s out_samples=%d out_non2xx=%d out_p50_ms=%s out_p99_ms=%s out_max_ms=%s\n",
		s.windows, s.windowsInRun, ms(s.clearTime), ms(s.clearTimeSeen), len(s.in), s.inNon2xx, in[0], in[1], in[2], in[3],
		len(s.out), s.outNon2xx, out[0], out[2], out[3])
	return nil
}

// readWindows reads "<start> <end>" lines (Unix nanoseconds), sorted by start.
func readWindows(r io.Reader) ([]window, error) {
	var ws []window
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) != 2 {
			return nil, fmt.Errorf("line %d: want \"<start> <end>\"", n)
		}
		start, err1 := strconv.ParseInt(f[0], 10, 64)
		end, err2 := strconv.ParseInt(f[1], 10, 64)
		if err1 != nil || err2 != nil || end < start {
			return nil, fmt.Errorf("line %d: %q is not a window", n, sc.Text())
		}
		ws = append(ws, window{start, end})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	slices.SortFunc(ws, func(a, b window) int { return cmp.Compare(a.start, b.start) })
	return ws, nil
}

// splitSamples reads bench/rate's samples ("<due Unix ns> <latency ns> <status>" lines) and puts
// each latency in or out by whether its scheduled send time falls inside one of ws (ends
// included): a request due while a clear ran counts, however long it then took.
func splitSamples(r io.Reader, ws []window) (split, error) {
	s := split{windows: len(ws), first: math.MaxInt64, last: math.MinInt64}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) != 3 {
			return s, fmt.Errorf("line %d: want \"<due> <latency> <status>\"", n)
		}
		due, err1 := strconv.ParseInt(f[0], 10, 64)
		lat, err2 := strconv.ParseInt(f[1], 10, 64)
		status, err3 := strconv.Atoi(f[2])
		if err1 != nil || err2 != nil || err3 != nil {
			return s, fmt.Errorf("line %d: %q is not a sample", n, sc.Text())
		}
		s.first, s.last = min(s.first, due), max(s.last, due)
		non2xx := status < 200 || status > 299
		if inside(ws, due) {
			s.in = append(s.in, time.Duration(lat))
			if non2xx {
				s.inNon2xx++
			}
		} else {
			s.out = append(s.out, time.Duration(lat))
			if non2xx {
				s.outNon2xx++
			}
		}
	}
	if err := sc.Err(); err != nil {
		return s, err
	}
	for _, w := range ws {
		s.clearTime += time.Duration(w.end - w.start)
		if lo, hi := max(w.start, s.first), min(w.end, s.last); lo <= hi {
			s.windowsInRun++
			s.clearTimeSeen += time.Duration(hi - lo)
		}
	}
	return s, nil
}

// inside reports whether t falls in one of ws (sorted by start, not overlapping: one clear at a
// time).
func inside(ws []window, t int64) bool {
	// The last window starting at or before t is the only one that can hold it.
	i := sort.Search(len(ws), func(i int) bool { return ws[i].start > t })
	return i > 0 && ws[i-1].end >= t
}

// quantiles are p50, p90, p99 and max of d (sorted in place) in milliseconds, nearest rank,
// "n/a" when d is empty: the same as bench/rate's, so that the figures compare.
func quantiles(d []time.Duration) [4]string {
	out := [4]string{"n/a", "n/a", "n/a", "n/a"}
	if len(d) == 0 {
		return out
	}
	slices.Sort(d)
	for k, q := range []float64{0.50, 0.90, 0.99, 1} {
		i := int(math.Ceil(q*float64(len(d)))) - 1
		out[k] = fmt.Sprintf("%.3f", float64(d[min(max(i, 0), len(d)-1)])/float64(time.Millisecond))
	}
	return out
}
