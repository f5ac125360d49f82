package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/valkey-io/valkey-go"
)

// clearTimeout bounds one clear request.
const clearTimeout = 2 * time.Minute

// endMargin is kept free at the end of -for, so that the last clear ends before the read load's
// schedule does (both start at about the same time and run for the same span).
const endMargin = 250 * time.Millisecond

// clearAnswer is the admin port's answer to a clear.
type clearAnswer struct {
	Deleted    int     `json:"deleted"`
	DurationMs float64 `json:"durationMs"`
	Pattern    string  `json:"pattern"`
}

// round is one clear and the fill before it (none before the first: -fill put the keys in).
type round struct {
	fill       time.Duration
	start, end time.Time // just before the request, just after its answer
	answer     clearAnswer
}

// clearLoop waits o.after, clears, then fills and clears again while another round fits before
// o.span from its start (less endMargin). It writes each clear's window to o.windows and prints
// one line per clear and a CLEAR_RESULT line.
func clearLoop(ctx context.Context, o options, vk valkey.Client, stdout io.Writer) error {
	begin := time.Now()
	end := begin.Add(o.span - endMargin)
	client := &http.Client{Timeout: clearTimeout}
	if err := sleep(ctx, o.after); err != nil {
		return err
	}
	var rounds []round
	for {
		var r round
		if len(rounds) > 0 {
			// A round is a fill, the settle pause and a clear: stop when the clear would not end
			// in time, judging by the last one. The fill then went for nothing, but it is not in
			// any window.
			last := rounds[len(rounds)-1]
			took, err := fill(ctx, vk, o.redis)
			if err != nil {
				return err
			}
			r.fill = took
			if time.Now().Add(o.settle + last.end.Sub(last.start)*3/2).After(end) {
				fmt.Fprintf(stdout, "clear: filled the keys again in %.0f ms, but another clear would not end within -for: stopped\n", ms(took))
				break
			}
			if err := sleep(ctx, o.settle); err != nil {
				return err
			}
		}
		var err error
		r.start = time.Now()
		r.answer, err = postClear(ctx, client, o)
		r.end = time.Now()
		if err != nil {
			return fmt.Errorf("clear %d: %w", len(rounds)+1, err)
		}
		rounds = append(rounds, r)
		fill := "keys filled before the run"
		if len(rounds) > 1 {
			fill = fmt.Sprintf("keys filled again in %.0f ms, then %s pause", ms(r.fill), o.settle)
		}
		fmt.Fprintf(stdout, "clear: clear %d of %q (%s): deleted %d, cachecar's durationMs %.1f, %.1f ms from request to answer\n",
			len(rounds), o.pattern, fill, r.answer.Deleted, r.answer.DurationMs, ms(r.end.Sub(r.start)))
		if r.answer.Deleted != o.redis.keys {
			fmt.Fprintf(stdout, "clear: WARNING clear %d deleted %d keys, not the %d put in\n", len(rounds), r.answer.Deleted, o.redis.keys)
		}
		if time.Now().After(end) {
			break
		}
	}
	if err := writeWindows(o.windows, rounds); err != nil {
		return err
	}
	var deleted, durs, clientMs, fills []string
	for _, r := range rounds {
		deleted = append(deleted, strconv.Itoa(r.answer.Deleted))
		durs = append(durs, fmt.Sprintf("%.1f", r.answer.DurationMs))
		clientMs = append(clientMs, fmt.Sprintf("%.1f", ms(r.end.Sub(r.start))))
		if r.fill > 0 {
			fills = append(fills, fmt.Sprintf("%.0f", ms(r.fill)))
		}
	}
	fmt.Fprintf(stdout, "clear: CLEAR_RESULT clears=%d keys=%d pattern=%s deleted=%s duration_ms=%s client_ms=%s fill_ms=%s\n",
		len(rounds), o.redis.keys, o.pattern, strings.Join(deleted, ","), strings.Join(durs, ","), strings.Join(clientMs, ","),
		orNone(strings.Join(fills, ",")))
	return nil
}

// postClear sends POST /api/admin/cache/clear {"pattern": o.pattern} and reads the answer.
func postClear(ctx context.Context, client *http.Client, o options) (clearAnswer, error) {
	var a clearAnswer
	body, err := json.Marshal(map[string]string{"pattern": o.pattern})
	if err != nil {
		return a, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimSuffix(o.admin, "/")+"/api/admin/cache/clear", bytes.NewReader(body))
	if err != nil {
		return a, err
	}
	req.Header.Set("Authorization", "Bearer "+o.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return a, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return a, fmt.Errorf("read answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return a, fmt.Errorf("status %d: %s", resp.StatusCode, bytes.TrimSpace(b))
	}
	if err := json.Unmarshal(b, &a); err != nil {
		return a, fmt.Errorf("answer %q: %w", b, err)
	}
	return a, nil
}

// writeWindows writes each clear's start and end, Unix nanoseconds, one clear a line.
func writeWindows(path string, rounds []round) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("windows: %w", err)
	}
	w := bufio.NewWriter(f)
	for _, r := range rounds {
		fmt.Fprintf(w, "%d %d\n", r.start.UnixNano(), r.end.UnixNano())
	}
	err = w.Flush()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("windows: %w", err)
	}
	return nil
}

// sleep waits d, or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
