package sessions

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"
)

// cachecar_session_migration names the configured migration, so that the fallback alert can
// leave out sidecars that read PostgreSQL by design; Migration names it for /health/detailed.
func TestMigrationMetric(t *testing.T) {
	for _, tc := range []struct {
		opts Options
		want string
	}{
		{Options{}, "none"},
		{Options{ReadPostgres: true}, "connect-pg-simple"},
		{Options{ValkeyOnly: true}, "connect-redis"},
	} {
		s := New(tc.opts, nil, nil, zerolog.Nop(), prometheus.NewRegistry())
		if got := testutil.ToFloat64(s.m.migration.WithLabelValues(tc.want)); got != 1 {
			t.Errorf("%+v: cachecar_session_migration{migration=%q} = %v, want 1", tc.opts, tc.want, got)
		}
		if n := testutil.CollectAndCount(s.m.migration); n != 1 {
			t.Errorf("%+v: %d migration series, want 1", tc.opts, n)
		}
		if mg := s.Migration(); (mg == "" && tc.want != "none") || (mg != "" && mg != tc.want) {
			t.Errorf("%+v: Migration() = %q, want %q", tc.opts, mg, tc.want)
		}
	}
}
