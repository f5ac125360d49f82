package cachepolicy

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/valkey-io/valkey-go"
)

// redisAdmin is a plain client of the server at addr, closed when the test ends, and a function
// that CONFIG SETs name, value pairs on it.
func redisAdmin(t *testing.T, addr string) (valkey.Client, func(kv ...string)) {
	t.Helper()
	admin, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{addr}, DisableCache: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(admin.Close)
	return admin, func(kv ...string) {
		t.Helper()
		for i := 0; i+1 < len(kv); i += 2 {
			if err := admin.Do(context.Background(), admin.B().ConfigSet().ParameterValue().ParameterValue(kv[i], kv[i+1]).Build()).Error(); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestValkeyOOMDegradesToPostgres fills a throwaway server to its maxmemory (noeviction): every
// write then fails with OOM. Reads must keep answering from the loader, and the repeated OOM
// replies must open the breaker, as a dead server would.
func TestValkeyOOMDegradesToPostgres(t *testing.T) {
	srv := testenv.StartRedis(t)
	ctx := context.Background()
	admin, config := redisAdmin(t, srv.Addr)
	config("maxmemory-policy", "noeviction", "maxmemory", "1")
	if err := admin.Do(ctx, admin.B().Set().Key("probe").Value("x").Build()).Error(); err == nil {
		t.Fatal("the server still accepts writes: it is not out of memory")
	}

	m := NewMetrics(prometheus.NewRegistry())
	s := NewStore(StoreOptions{Addrs: []string{srv.Addr}, Timeout: time.Second, DialTimeout: time.Second, ReconnectMax: time.Second,
		BreakerThreshold: 3, BreakerMinOpen: time.Minute, BreakerMaxOpen: time.Minute}, zerolog.Nop(), m)
	if err := s.Connect(); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	r := New(Options{QueryTimeout: time.Second, LeaseWait: 100 * time.Millisecond}, s, nil, zerolog.Nop(), m)
	p := itemPolicy(t, "")
	loads := 0
	for i := 1; i <= 10; i++ {
		id := fmt.Sprint(i)
		res, err := r.GetFunc(ctx, p, []string{id}, func(context.Context) ([]byte, error) {
			loads++
			return []byte(`{"id":` + id + `}`), nil
		})
		if err != nil || string(res.Body) != `{"id":`+id+`}` {
			t.Fatalf("read %d with Valkey out of memory: %q %v", i, res.Body, err)
		}
	}
	if loads != 10 {
		t.Fatalf("%d loads for 10 reads", loads)
	}
	if s.Circuit() != CircuitOpen {
		t.Fatalf("after 10 OOM replies the breaker is %s, want open", CircuitName(s.Circuit()))
	}
	// A call the open breaker refuses says why it opened, for /health/detailed.
	if err := s.Ping(ctx); err == nil || !strings.Contains(err.Error(), "circuit open") || !strings.Contains(err.Error(), "OOM ") {
		t.Fatalf("ping with the breaker open after OOM replies: %v, want the circuit-open error naming the OOM reply", err)
	}
}

// TestIdleHealthCheckSeesRefusedWrites: a sidecar with no reads still finds out that Valkey
// refuses writes (OOM under noeviction here, READONLY on a replica alike), because its health
// check writes its probe key; a PING, which is a read, would pass. Once the server takes writes
// again, the check passes after the breaker's pause.
func TestIdleHealthCheckSeesRefusedWrites(t *testing.T) {
	srv := testenv.StartRedis(t)
	ctx := context.Background()
	admin, config := redisAdmin(t, srv.Addr)
	m := NewMetrics(prometheus.NewRegistry())
	s := NewStore(StoreOptions{Addrs: []string{srv.Addr}, Timeout: time.Second, DialTimeout: time.Second, ReconnectMax: time.Second,
		BreakerThreshold: 3, BreakerMinOpen: 50 * time.Millisecond, BreakerMaxOpen: 50 * time.Millisecond,
		ProbeKey: "ns:cachecar:health"}, zerolog.Nop(), m)
	if err := s.Connect(); err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	if err := s.Ping(ctx); err != nil {
		t.Fatalf("ping of a writable server: %v", err)
	}
	pttl, err := admin.Do(ctx, admin.B().Pttl().Key("ns:cachecar:health").Build()).AsInt64()
	if err != nil || pttl <= 0 || pttl > probeTTL.Milliseconds() {
		t.Fatalf("probe key PTTL %d ms (%v): want it written with an expiry of at most %s", pttl, err, probeTTL)
	}

	config("maxmemory-policy", "noeviction", "maxmemory", "1")
	if err := admin.Do(ctx, admin.B().Ping().Build()).Error(); err != nil {
		t.Fatalf("PING of the full server: %v (a read should still pass)", err)
	}
	err = s.Ping(ctx)
	if err == nil || !strings.Contains(err.Error(), "OOM ") {
		t.Fatalf("health check of a server refusing writes: %v, want the OOM reply", err)
	}
	if s.Up() {
		t.Fatal("store still up after its write probe was refused")
	}

	config("maxmemory", "0")
	deadline := time.Now().Add(5 * time.Second)
	for s.Ping(ctx) != nil {
		if time.Now().After(deadline) {
			t.Fatalf("health check still failing 5 s after the server took writes again: %v", s.Ping(ctx))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !s.Up() {
		t.Fatal("store not up after a passing health check")
	}
}
