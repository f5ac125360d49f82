package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"

	"github.com/jackc/pgx/v5"
)

// courseTable is the table updateSQL changes: the "t" of its notifications.
const courseTable = "courses"

// notification is the part of a trigger message (invalidation/payload.go) this run reads:
// {"v":1,"t":"courses","op":"UPDATE","ts":<µs>,"c":["id","tenant_id"],"r":[[17,3]]}.
type notification struct {
	T   string              `json:"t"`
	Op  string              `json:"op"`
	TS  int64               `json:"ts"` // clock_timestamp() in the statement's trigger, µs since the epoch
	C   []string            `json:"c"`
	R   [][]json.RawMessage `json:"r"`
	All bool                `json:"all"`
}

// notifyListener is a running LISTEN on its own connection; stop ends it and waits for it.
type notifyListener struct {
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
	err    error
}

// stop ends the listener and returns why it ended early, if it did (nil when stop ended it).
func (l *notifyListener) stop() error {
	l.once.Do(func() {
		l.cancel()
		l.err = <-l.done
	})
	return l.err
}

// connectListener opens the connection that LISTENs: not one of the workers, so that reading
// notifications never waits for an UPDATE, nor an UPDATE for them.
func connectListener(ctx context.Context, dbURL string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dbURL)
	if err != nil {
		return nil, errors.New("parse database url")
	}
	if cfg.RuntimeParams["application_name"] == "" {
		cfg.RuntimeParams["application_name"] = "cachecar-bench-invalidation-listen"
	}
	c, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to postgresql (listener): %w", err)
	}
	return c, nil
}

// listen runs LISTEN channel on conn and, until stop, records in rec the ts of every
// notification that is the UPDATE of one of its keys sent by one of the workers (backend
// process ids in workers). It returns once the LISTEN is in effect: every transaction that
// commits after that notifies this connection too.
func listen(ctx context.Context, conn *pgx.Conn, channel string, workers map[uint32]bool, rec *recorder) (*notifyListener, error) {
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{channel}.Sanitize()); err != nil {
		return nil, fmt.Errorf("listen %s: %w", channel, err)
	}
	lctx, cancel := context.WithCancel(ctx)
	l := &notifyListener{cancel: cancel, done: make(chan error, 1)}
	go func() {
		for {
			n, err := conn.WaitForNotification(lctx)
			if err != nil {
				if lctx.Err() != nil {
					err = nil // stopped
				}
				l.done <- err
				return
			}
			if n.Channel == channel {
				rec.notifiedBy(n.PID, n.Payload, workers)
			}
		}
	}()
	return l, nil
}

// notifiedBy records the ts of payload for every course id it names when it is an UPDATE of
// courses sent by a worker (one statement, one row, one message); anything else counts as
// another notification. Each id is updated once, so a second UPDATE message for an id (there
// should be none) counts as another notification and the first one stays.
func (r *recorder) notifiedBy(pid uint32, payload string, workers map[uint32]bool) {
	var n notification
	if err := json.Unmarshal([]byte(payload), &n); err != nil || n.TS <= 0 {
		r.badNotes.Add(1)
		return
	}
	idCol := -1
	for i, c := range n.C {
		if c == "id" {
			idCol = i
		}
	}
	if n.T != courseTable || n.Op != "UPDATE" || n.All || idCol < 0 || !workers[pid] {
		r.otherNotes.Add(1)
		return
	}
	for _, row := range n.R {
		id, err := jsonID(row, idCol)
		if err != nil {
			r.badNotes.Add(1)
			continue
		}
		i := id - r.first
		if i < 0 || i >= len(r.trig) || !r.trig[i].CompareAndSwap(0, n.TS) {
			r.otherNotes.Add(1)
			continue
		}
		r.notified.Add(1)
	}
}

// jsonID reads row[col] as an integer id (a JSON number, or a string holding one).
func jsonID(row []json.RawMessage, col int) (int, error) {
	if col >= len(row) {
		return 0, errors.New("short row")
	}
	if id, err := strconv.Atoi(string(row[col])); err == nil {
		return id, nil
	}
	var s string
	if err := json.Unmarshal(row[col], &s); err != nil {
		return 0, err
	}
	return strconv.Atoi(s)
}
