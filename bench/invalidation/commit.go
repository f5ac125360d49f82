package main

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// commitTimes is what readCommitTimes learnt: per course id (index id-first), the commit
// timestamp of the transaction that last wrote its row, in Unix microseconds (0: none).
// unavailable says why there are none at all ("" when the figure is available).
type commitTimes struct {
	ts          []int64
	unavailable string
	nulls       int // rows whose pg_xact_commit_timestamp was NULL
	absent      int // updated ids with no row in the answer
}

// readCommitTimes asks PostgreSQL, after the last UPDATE, when the transaction that last wrote
// each updated row committed: pg_xact_commit_timestamp(xmin), which PostgreSQL records only with
// track_commit_timestamp on. Each id is updated once in a run, so that is its UPDATE's COMMIT
// unless something else wrote the row since (report checks it against the UPDATE's send and
// answer times). It never fails the run: when the timestamps cannot be read, unavailable says
// why.
func readCommitTimes(ctx context.Context, conns []*pgx.Conn, rec *recorder) commitTimes {
	ct := commitTimes{ts: make([]int64, len(rec.sent))}
	var conn *pgx.Conn
	for _, c := range conns {
		if !c.IsClosed() {
			conn = c
			break
		}
	}
	if conn == nil {
		ct.unavailable = "no open PostgreSQL connection left to read the commit timestamps"
		return ct
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var track string
	if err := conn.QueryRow(ctx, "SHOW track_commit_timestamp").Scan(&track); err != nil {
		ct.unavailable = fmt.Sprintf("SHOW track_commit_timestamp: %v", err)
		return ct
	}
	if track != "on" {
		ct.unavailable = fmt.Sprintf("track_commit_timestamp is %s in PostgreSQL, so it records no commit timestamps (deploy/local/services.sh turns it on; it needs a restart)", track)
		return ct
	}
	ids := make([]int64, 0, len(rec.sent))
	for i := range rec.sent {
		if rec.sent[i].Load() != 0 {
			ids = append(ids, int64(rec.first+i))
		}
	}
	if len(ids) == 0 {
		ct.unavailable = "no UPDATE was sent"
		return ct
	}
	rows, err := conn.Query(ctx, "SELECT id, pg_xact_commit_timestamp(xmin) FROM "+courseTable+" WHERE id = ANY($1)", ids)
	if err != nil {
		ct.unavailable = fmt.Sprintf("pg_xact_commit_timestamp: %v", err)
		return ct
	}
	found := 0
	for rows.Next() {
		var id int64
		var at *time.Time
		if err := rows.Scan(&id, &at); err != nil {
			rows.Close()
			ct.unavailable = fmt.Sprintf("pg_xact_commit_timestamp: %v", err)
			return ct
		}
		i := int(id) - rec.first
		if i < 0 || i >= len(ct.ts) {
			continue
		}
		found++
		if at == nil {
			ct.nulls++
			continue
		}
		ct.ts[i] = at.UnixMicro()
	}
	if err := rows.Err(); err != nil {
		ct.unavailable = fmt.Sprintf("pg_xact_commit_timestamp: %v", err)
		return ct
	}
	ct.absent = len(ids) - found
	if ct.nulls == found {
		ct.unavailable = fmt.Sprintf("pg_xact_commit_timestamp(xmin) returned NULL for all %d rows (commit timestamps are kept only for transactions committed while track_commit_timestamp was on)", found)
		if found == 0 {
			ct.unavailable = fmt.Sprintf("none of the %d updated ids has a row in %s", len(ids), courseTable)
		}
	}
	return ct
}
