package cachepolicy

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// mapLoader answers LoadMany from a map, as PostgreSQL would; LoadOne is not used here.
type mapLoader struct {
	Loader
	rows map[int64][]byte
}

func (m mapLoader) LoadMany(_ context.Context, _ string, ids []int64) (map[int64][]byte, error) {
	out := map[int64][]byte{}
	for _, id := range ids {
		if b, ok := m.rows[id]; ok {
			out[id] = b
		}
	}
	return out, nil
}

// With no cache at all (no Valkey, no in-process tier: a nil store), a batch read loads from
// the database and answers. It used to call the store's fill on nil and crash the process
// (the panic escaped through the single-flight goroutine).
func TestGetManyWithoutACache(t *testing.T) {
	m := NewMetrics(prometheus.NewRegistry())
	r := New(Options{QueryTimeout: time.Second}, nil, mapLoader{rows: map[int64][]byte{1: []byte(`{"id":1}`), 3: []byte(`{"id":3}`)}}, zerolog.Nop(), m)
	defer r.Close()
	items, res, err := r.GetMany(context.Background(), itemPolicy(t, ""), []int64{1, 2, 3})
	if err != nil || res.Cache != Bypass {
		t.Fatalf("GetMany without a cache: %s %v, want BYPASS", res.Cache, err)
	}
	if len(items) != 3 || string(items[0].Body) != `{"id":1}` || items[1].Body != nil || string(items[2].Body) != `{"id":3}` {
		t.Fatalf("items %+v", items)
	}
}
