package main

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"time"
)

// quantile is the nearest-rank q-quantile of sorted (not empty).
func quantile(sorted []time.Duration, q float64) time.Duration {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// report prints what happened in words, then one INVALIDATION_RESULT line of key=value pairs
// for bench/run.sh.
//
// Four figures measure the lag from COMMIT to the key's deletion, each ending when the key's del
// event arrives: lags, from just before the UPDATE is sent (an upper bound: it includes the
// statement and its commit); fromTrig, from the trigger's clock_timestamp() (after the row
// change, just before the commit; it still includes the commit); fromCommit, from the commit
// timestamp PostgreSQL recorded for the UPDATE's transaction (pg_xact_commit_timestamp, with
// track_commit_timestamp on: the "from COMMIT", the one the targets read when it is
// available); afterAnswer, from the UPDATE's answer (a lower bound: the commit was done before
// it). fromTrig and fromCommit compare the wall clock of this program with the database's, the
// same clock on this machine; negative values are counted and kept, not dropped. A commit
// timestamp outside [just before the UPDATE was sent, its answer] is not that UPDATE's (something
// else wrote the row) or the clocks disagreed: counted as outside and kept too.
func report(w io.Writer, o options, rec *recorder, u updateRun, ct commitTimes, before, after metricsSnapshot, listenErr error) {
	n := len(rec.sent)
	// afterAnswer is the deletion event's time relative to the UPDATE's answer: what is left of
	// the lag once the statement and its commit are done (negative when the event came first).
	var lags, trips, afterAnswer, fromTrig, fromCommit []time.Duration
	var behind time.Duration
	var firstSent, lastSent int64
	sent, missing, early := 0, 0, 0
	trigNegative, trigOutside := 0, 0
	commitNegative, commitOutside, commitMissing := 0, 0, 0
	baseWall := rec.base.UnixNano() // + a monotonic offset of rec: that moment on the wall clock
	for i := range n {
		s, d, del := rec.sent[i].Load(), rec.done[i].Load(), rec.deleted[i].Load()
		if s == 0 {
			missing++ // never sent: interrupted (measure does not get here then)
			continue
		}
		sent++
		if firstSent == 0 || s < firstSent {
			firstSent = s
		}
		lastSent = max(lastSent, s)
		behind = max(behind, time.Duration(s)-(u.start+time.Duration(i)*u.interval))
		trips = append(trips, time.Duration(d-s))
		cts := int64(0)
		if ct.unavailable == "" {
			if cts = ct.ts[i]; cts == 0 {
				commitMissing++
			} else if sentUs, doneUs := floorDiv(baseWall+s, 1000), -floorDiv(-(baseWall+d), 1000); cts < sentUs || cts > doneUs {
				// Compared in whole microseconds, the commit timestamp's precision.
				commitOutside++
			}
		}
		switch {
		case del == 0:
			missing++
		case del < s:
			// Deleted before its update was sent (a resync, an expiry, another writer): this
			// key's lag cannot be measured.
			early++
		default:
			lags = append(lags, time.Duration(del-s))
			afterAnswer = append(afterAnswer, time.Duration(del-d))
			if ts := rec.trig[i].Load(); ts != 0 {
				l := time.Duration(rec.deletedWall[i].Load() - ts*int64(time.Microsecond))
				fromTrig = append(fromTrig, l)
				if l < 0 {
					trigNegative++
				}
				if l > time.Duration(del-s) || l < time.Duration(del-d) {
					trigOutside++
				}
			}
			if cts != 0 {
				l := time.Duration(rec.deletedWall[i].Load() - cts*int64(time.Microsecond))
				fromCommit = append(fromCommit, l)
				if l < 0 {
					commitNegative++
				}
			}
		}
	}
	trigMissing := n - int(rec.notified.Load())
	slices.Sort(lags)
	slices.Sort(fromTrig)
	slices.Sort(fromCommit)
	slices.Sort(trips)
	slices.Sort(afterAnswer)
	rate := math.NaN()
	if sent > 1 && lastSent > firstSent {
		rate = float64(sent-1) / time.Duration(lastSent-firstSent).Seconds()
	}

	fmt.Fprintf(w, "invalidation: %d updates (%s, %d connections) at %.1f/s (target %d/s), at most %.3f ms behind schedule, errors %d",
		sent, updateSQL, o.workers, rate, o.rate, ms(behind), u.errors)
	if u.firstErr != nil {
		fmt.Fprintf(w, " (first: %v)", u.firstErr)
	}
	fmt.Fprintln(w)
	tp := map[string]string{"p50": "n/a", "p99": "n/a"}
	if len(trips) > 0 {
		tp["p50"], tp["p99"] = fmt.Sprintf("%.3f", ms(quantile(trips, .5))), fmt.Sprintf("%.3f", ms(quantile(trips, .99)))
		fmt.Fprintf(w, "invalidation: UPDATE round trip (statement and commit) p50 %s ms, p99 %s ms, max %.3f ms\n",
			tp["p50"], tp["p99"], ms(trips[len(trips)-1]))
	}
	fmt.Fprintf(w, "invalidation: deletions seen for %d of %d keys within %s of the last update: missing %d, deleted before their update %d, other deletion events %d\n",
		rec.seen.Load(), n, o.eventTimeout, missing, early, rec.foreign.Load())
	p := map[string]string{"p50": "n/a", "p90": "n/a", "p99": "n/a", "max": "n/a", "a50": "n/a", "a99": "n/a"}
	if len(lags) > 0 {
		for k, q := range map[string]float64{"p50": .5, "p90": .9, "p99": .99, "max": 1} {
			p[k] = fmt.Sprintf("%.3f", ms(quantile(lags, q)))
		}
		p["a50"] = fmt.Sprintf("%.3f", ms(quantile(afterAnswer, .5)))
		p["a99"] = fmt.Sprintf("%.3f", ms(quantile(afterAnswer, .99)))
		fmt.Fprintf(w, "invalidation: lag from just before the UPDATE is sent to the key's del event (upper bound), %d keys: p50 %s ms, p90 %s ms, p99 %s ms, max %s ms\n",
			len(lags), p["p50"], p["p90"], p["p99"], p["max"])
	}
	t := map[string]string{"p50": "n/a", "p90": "n/a", "p99": "n/a", "max": "n/a", "min": "n/a"}
	if len(fromTrig) > 0 {
		for k, q := range map[string]float64{"p50": .5, "p90": .9, "p99": .99, "max": 1} {
			t[k] = fmt.Sprintf("%.3f", ms(quantile(fromTrig, q)))
		}
		t["min"] = fmt.Sprintf("%.3f", ms(fromTrig[0]))
		fmt.Fprintf(w, "invalidation: lag from the trigger (just before COMMIT) to the key's del event, %d keys: p50 %s ms, p90 %s ms, p99 %s ms, max %s ms; min %s ms, %d negative, %d outside the other two figures (clocks disagreeing)\n",
			len(fromTrig), t["p50"], t["p90"], t["p99"], t["max"], t["min"], trigNegative, trigOutside)
	}
	c := map[string]string{"p50": "n/a", "p90": "n/a", "p99": "n/a", "max": "n/a", "min": "n/a",
		"missing": "n/a", "negative": "n/a", "outside": "n/a", "status": "ok"}
	switch {
	case ct.unavailable != "":
		c["status"] = "unavailable"
		fmt.Fprintf(w, "invalidation: lag from COMMIT (pg_xact_commit_timestamp) to the key's del event: n/a, unavailable: %s\n", ct.unavailable)
	default:
		c["missing"], c["negative"], c["outside"] = strconv.Itoa(commitMissing), strconv.Itoa(commitNegative), strconv.Itoa(commitOutside)
		if len(fromCommit) == 0 {
			c["status"] = "none"
			fmt.Fprintf(w, "invalidation: lag from COMMIT (pg_xact_commit_timestamp) to the key's del event: n/a, no key has both a del event and a commit timestamp")
		} else {
			for k, q := range map[string]float64{"p50": .5, "p90": .9, "p99": .99, "max": 1} {
				c[k] = fmt.Sprintf("%.3f", ms(quantile(fromCommit, q)))
			}
			c["min"] = fmt.Sprintf("%.3f", ms(fromCommit[0]))
			fmt.Fprintf(w, "invalidation: lag from COMMIT (pg_xact_commit_timestamp) to the key's del event, %d keys: p50 %s ms, p90 %s ms, p99 %s ms, max %s ms; min %s ms, %d negative",
				len(fromCommit), c["p50"], c["p90"], c["p99"], c["max"], c["min"], commitNegative)
		}
		fmt.Fprintf(w, "; no commit timestamp %d (NULL %d, no row %d); commit timestamp outside [UPDATE sent, answer] %d (another write of the row, or the clocks disagreeing)\n",
			commitMissing, ct.nulls, ct.absent, commitOutside)
	}
	fmt.Fprintf(w, "invalidation: notifications on %q: the UPDATE's seen for %d of %d keys (no notification: %d), other %d, unreadable %d",
		o.channel, rec.notified.Load(), n, trigMissing, rec.otherNotes.Load(), rec.badNotes.Load())
	if rec.notified.Load() == 0 {
		fmt.Fprintf(w, " (wrong -channel, or no triggers on %s?)", courseTable)
	}
	fmt.Fprintln(w)
	if listenErr != nil {
		fmt.Fprintf(w, "invalidation: WARNING the LISTEN connection failed during the run: %v\n", listenErr)
	}
	if len(lags) > 0 {
		fmt.Fprintf(w, "invalidation: del event after the UPDATE's answer (lower bound: the lag without the statement and its commit): p50 %s ms, p99 %s ms\n",
			p["a50"], p["a99"])
	}
	side := map[string]string{"count": "n/a", "le2": "n/a", "le10": "n/a", "reconnects": "n/a"}
	if before.found && after.found {
		count := after.lagCount - before.lagCount
		side["count"] = fmt.Sprintf("%.0f", count)
		side["reconnects"] = fmt.Sprintf("%.0f", after.reconnects-before.reconnects)
		if count > 0 {
			side["le2"] = fmt.Sprintf("%.4f", (after.le2ms-before.le2ms)/count)
			side["le10"] = fmt.Sprintf("%.4f", (after.le10ms-before.le10ms)/count)
		}
		fmt.Fprintf(w, "invalidation: cachecar_invalidation_lag_seconds during the run (trigger to UNLINK done): %s observations, fraction <= 2 ms %s, <= 10 ms %s; listener reconnects %s\n",
			side["count"], side["le2"], side["le10"], side["reconnects"])
	}
	fmt.Fprintf(w, "INVALIDATION_RESULT updates=%d errors=%d rate=%.1f target_rate=%d keys=%d missing=%d early=%d p50_ms=%s p90_ms=%s p99_ms=%s max_ms=%s behind_ms=%.3f update_p50_ms=%s update_p99_ms=%s after_answer_p50_ms=%s after_answer_p99_ms=%s sidecar_count=%s sidecar_le_2ms=%s sidecar_le_10ms=%s reconnects=%s trig_keys=%d trig_p50_ms=%s trig_p90_ms=%s trig_p99_ms=%s trig_max_ms=%s trig_min_ms=%s trig_negative=%d trig_outside=%d trig_missing=%d commit_status=%s commit_keys=%d commit_p50_ms=%s commit_p90_ms=%s commit_p99_ms=%s commit_max_ms=%s commit_min_ms=%s commit_negative=%s commit_outside=%s commit_missing=%s\n",
		sent, u.errors, rate, o.rate, n, missing, early, p["p50"], p["p90"], p["p99"], p["max"], ms(behind),
		tp["p50"], tp["p99"], p["a50"], p["a99"], side["count"], side["le2"], side["le10"], side["reconnects"],
		len(fromTrig), t["p50"], t["p90"], t["p99"], t["max"], t["min"], trigNegative, trigOutside, trigMissing,
		c["status"], len(fromCommit), c["p50"], c["p90"], c["p99"], c["max"], c["min"], c["negative"], c["outside"], c["missing"])
}

// floorDiv is a/b rounded down (b > 0).
func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && a < 0 {
		q--
	}
	return q
}
