package cachepolicy

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// tlsStore connects a store with the in-process tier to addr over TLS with tc.
func tlsStore(t *testing.T, addr string, tc *tls.Config) (*Store, *Metrics, error) {
	t.Helper()
	m := NewMetrics(prometheus.NewRegistry())
	var log bytes.Buffer
	s := NewStore(StoreOptions{Addrs: []string{addr}, TLS: tc, Timeout: time.Second, DialTimeout: time.Second,
		ReconnectMax: time.Second, TierSize: MinTierSize, BreakerThreshold: 5, BreakerMinOpen: time.Second}, zerolog.New(&log), m)
	t.Cleanup(s.Close)
	return s, m, s.Connect()
}

// caPool reads a PEM CA file into a pool.
func caPool(t *testing.T, file string) *x509.CertPool {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(b) {
		t.Fatalf("no certificate in %s", file)
	}
	return p
}

// TestTLSStore: the store speaks TLS to a server that requires a client certificate, with
// client tracking (the in-process tier) working over it; a server signed by another CA, and a
// client without a certificate, are refused at Connect.
func TestTLSStore(t *testing.T) {
	certs := testenv.NewCerts(t)
	srv := testenv.StartRedisWith(t, testenv.RedisOptions{TLS: certs, AuthClients: true})
	clientCert, err := tls.LoadX509KeyPair(certs.ClientCert, certs.ClientKey)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("verified with a client certificate", func(t *testing.T) {
		s, m, err := tlsStore(t, srv.Addr, &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: caPool(t, certs.CAFile),
			Certificates: []tls.Certificate{clientCert}})
		if err != nil {
			t.Fatalf("connect over TLS: %v", err)
		}
		if on, _ := s.Tier(); !on {
			t.Fatal("the in-process tier is off over TLS: client tracking did not start")
		}
		r := New(Options{Namespace: "tls:", QueryTimeout: time.Second}, s, nil, zerolog.Nop(), m)
		p := itemPolicy(t, "")
		ctx := context.Background()
		load := func(context.Context) ([]byte, error) { return []byte(`{"id":5}`), nil }
		want := []struct {
			cache string
			local bool
		}{{Miss, false}, {Hit, false}, {Hit, true}}
		for i, w := range want {
			res, err := r.GetFunc(ctx, p, []string{"5"}, load)
			if err != nil || res.Cache != w.cache || res.Local != w.local || string(res.Body) != `{"id":5}` {
				t.Fatalf("read %d: %s local=%v %q %v; want %s local=%v", i, res.Cache, res.Local, res.Body, err, w.cache, w.local)
			}
		}
		// An invalidation reaches the tier over the TLS connection too.
		if _, err := r.Invalidate(ctx, []string{"tls:item:5"}, nil); err != nil {
			t.Fatal(err)
		}
		if res, err := r.GetFunc(ctx, p, []string{"5"}, load); err != nil || res.Cache != Miss {
			t.Fatalf("read after the invalidation: %s %v, want MISS", res.Cache, err)
		}
	})

	other := testenv.NewCerts(t)
	for _, c := range []struct {
		name string
		tc   *tls.Config
		want string
	}{
		{"server signed by another CA", &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: caPool(t, other.CAFile),
			Certificates: []tls.Certificate{clientCert}}, "certificate"},
		{"server name the certificate lacks", &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: caPool(t, certs.CAFile),
			Certificates: []tls.Certificate{clientCert}, ServerName: "valkey.example"}, "valkey.example"},
		// Under TLS 1.3 the client's handshake completes before the server checks its
		// certificate; the refusal arrives as a reset of the connection's first command (HELLO).
		{"no client certificate", &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: caPool(t, certs.CAFile)}, "connect valkey"},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, _, err := tlsStore(t, srv.Addr, c.tc)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("connect: %v, want an error naming %q", err, c.want)
			}
			if s.Up() {
				t.Fatal("the store says it is up without a connection")
			}
		})
	}
}
