package sessions

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus/testutil"
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
			a, _ := f.startPostgresOnly(t, func(o *Options) {
				o.AllowPooler = tc.allow
				o.Listen = func(ctx context.Context) (*pgx.Conn, error) { return pgx.Connect(ctx, through) }
			})
			ctx := context.Background()
			putVia(t, a, "p1", body("v1", time.Now().Add(time.Hour)))
			if tc.want == "up" {
				waitCopies(t, a, "up")
			} else {
				time.Sleep(500 * time.Millisecond) // several attempts of the copies' connection
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
