package invalidation

import (
	"slices"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
)

// TestListenerRefusesATransactionPooler: through a real PgBouncer in transaction pooling, LISTEN
// succeeds and no notification arrives, so the listener must refuse the connection (an error
// that names the pooler and the setting) and never let the cache serve.
func TestListenerRefusesATransactionPooler(t *testing.T) {
	f := startListenerWith(t, testSpec, true, func(url string, o *Options) {
		o.URL = testenv.StartPgBouncer(t, url, "transaction")
	})
	f.wantNeverLive(t, 10*time.Second, "through a transaction pooler", "pooler", "invalidation.listen_url", "database.session_pooler")
}

// TestListenerThroughASessionPooler: with AllowPooler (database.session_pooler), a PgBouncer in session pooling (each
// client pinned to a server connection) is accepted, and changes arrive through it.
func TestListenerThroughASessionPooler(t *testing.T) {
	f := startListenerWith(t, testSpec, true, func(url string, o *Options) {
		o.URL = testenv.StartPgBouncer(t, url, "session")
		o.AllowPooler = true
	})
	f.waitLive(t)
	f.exec(t, "UPDATE courses SET title = 'uno' WHERE id = 1")
	f.cache.waitFor(t, "the change through the session pooler", func() bool { return len(f.cache.calls) > 0 })
	f.cache.mu.Lock()
	got := f.cache.calls[0]
	f.cache.mu.Unlock()
	if !slices.Equal(got.keys, []string{"course:1"}) {
		t.Errorf("invalidated %v, want course:1", got.keys)
	}
}
