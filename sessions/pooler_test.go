package sessions

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"
)

// The copies of PostgreSQL's answers need LISTEN and a session-level lock on one server session:
// through a real PgBouncer in transaction pooling they are not kept (reads still answer, from
// PostgreSQL); with AllowPooler (database.session_pooler), through session pooling, they are.
func TestPostgresCopiesThroughAPooler(t *testing.T) {
	for _, tc := range []struct {
		mode  string
		allow bool
		want  string
	}{
		{"transaction", false, "down"},
		{"session", true, "up"},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			f := newFixture(t, nil)
			f.stop()
			through := testenv.StartPgBouncer(t, f.url, tc.mode)
			opts := postgresOnlyOptions()
			opts.AllowPooler = tc.allow
			opts.Listen = func(ctx context.Context) (*pgx.Conn, error) { return pgx.Connect(ctx, through) }
			var logs testenv.SyncBuffer
			a := New(opts, nil, f.db, zerolog.New(&logs), prometheus.NewRegistry())
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { a.Run(ctx); close(done) }()
			defer func() { cancel(); <-done }()
			putVia(t, a, "p1", body("v1", time.Now().Add(time.Hour)))
			if tc.want == "up" {
				waitCopies(t, a, "up")
			} else {
				// Refused for the pooler, not for a probe that never came back.
				deadline := time.Now().Add(5 * time.Second)
				for !strings.Contains(logs.String(), "goes through a connection pooler") {
					if time.Now().After(deadline) {
						t.Fatalf("no pooler refusal logged: %s", logs.String())
					}
					time.Sleep(20 * time.Millisecond)
				}
				if got := a.PostgresCopies(); got != "down" {
					t.Fatalf("copies %q through a transaction pooler, want down", got)
				}
			}
			for i := 0; i < 3; i++ {
				if got, _, err := a.Get(ctx, "p1"); err != nil || !strings.Contains(string(got), `"v1"`) {
					t.Fatalf("read: %q, %v", got, err)
				}
			}
			if local := testutil.ToFloat64(a.m.pgLocal); (local > 0) != (tc.want == "up") {
				t.Fatalf("%v reads from copies with copies %s", local, tc.want)
			}
		})
	}
}
