package testenv

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Certs are PEM files in a test's temporary directory: a throwaway CA, a server certificate it
// signed (valid for localhost, 127.0.0.1 and ::1) and a client certificate it signed.
type Certs struct {
	CAFile                 string
	ServerCert, ServerKey  string
	ClientCert, ClientKey  string
	ServerName             string // a name the server certificate is valid for: "localhost"
	caCert                 *x509.Certificate
	caKey                  *ecdsa.PrivateKey
	clientPair, serverPair tls.Certificate
}

// NewCerts makes a CA (ECDSA P-256, valid for a day) and the server and client certificates it
// signs, and writes them as PEM files (keys as PKCS #8, mode 0600).
func NewCerts(t testing.TB) *Certs {
	t.Helper()
	dir := t.TempDir()
	c := &Certs{ServerName: "localhost"}
	caKey := newKey(t)
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: "cachecar test CA " + Suffix()},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatalf("create CA: %v", err)
	}
	if c.caCert, err = x509.ParseCertificate(der); err != nil {
		t.Fatal(err)
	}
	c.caKey = caKey
	c.CAFile = filepath.Join(dir, "ca.pem")
	writePEM(t, c.CAFile, "CERTIFICATE", der)

	c.ServerCert, c.ServerKey, c.serverPair = c.issue(t, dir, "server", &x509.Certificate{
		Subject:     pkix.Name{CommonName: "localhost"},
		DNSNames:    []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	c.ClientCert, c.ClientKey, c.clientPair = c.issue(t, dir, "client", &x509.Certificate{
		Subject:     pkix.Name{CommonName: "cachecar"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	return c
}

// issue signs tmpl with the CA and writes the certificate and its key as name.pem and
// name-key.pem.
func (c *Certs) issue(t testing.TB, dir, name string, tmpl *x509.Certificate) (certFile, keyFile string, pair tls.Certificate) {
	t.Helper()
	key := newKey(t)
	tmpl.SerialNumber = serial(t)
	tmpl.NotBefore = time.Now().Add(-time.Hour)
	tmpl.NotAfter = time.Now().Add(24 * time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.caCert, &key.PublicKey, c.caKey)
	if err != nil {
		t.Fatalf("create %s certificate: %v", name, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
	writePEM(t, certFile, "CERTIFICATE", der)
	writePEM(t, keyFile, "PRIVATE KEY", keyDER)
	return certFile, keyFile, tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// ClientTLS is a client configuration trusting the CA, with the client certificate.
func (c *Certs) ClientTLS() *tls.Config {
	pool := x509.NewCertPool()
	pool.AddCert(c.caCert)
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{c.clientPair}, MinVersion: tls.VersionTLS12}
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func serial(t testing.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// RedisOptions configures StartRedisWith.
type RedisOptions struct {
	// TLS, when set, makes the server speak TLS only (no plain port), with the server
	// certificate of TLS and trusting its CA for client certificates.
	TLS *Certs
	// AuthClients requires a client certificate signed by the CA (tls-auth-clients yes);
	// without it the server asks for none.
	AuthClients bool
	// Args are more redis-server arguments ("--maxmemory", "1mb").
	Args []string
}

// RedisProcess is a throwaway redis-server started with StartRedisWith.
type RedisProcess struct {
	Addr string
	cmd  *exec.Cmd
}

// StartRedisWith starts a throwaway redis-server on a free loopback port, with TLS and extra
// arguments as opts says, and waits until it answers PING (over TLS when it speaks TLS). It is
// killed when the test ends.
func StartRedisWith(t testing.TB, opts RedisOptions) *RedisProcess {
	t.Helper()
	bin := os.Getenv(EnvRedisServer)
	if bin == "" {
		if p, err := exec.LookPath("redis-server"); err == nil {
			bin = p
		}
	}
	if bin == "" {
		missing(t, EnvRedisServer)
	}
	addr := ClosedAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	args := []string{"--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no",
		"--loglevel", "warning", "--dir", t.TempDir()}
	var clientTLS *tls.Config
	if opts.TLS != nil {
		auth := "no"
		if opts.AuthClients {
			auth = "yes"
		}
		args = append(args, "--port", "0", "--tls-port", port,
			"--tls-cert-file", opts.TLS.ServerCert, "--tls-key-file", opts.TLS.ServerKey,
			"--tls-ca-cert-file", opts.TLS.CAFile, "--tls-auth-clients", auth)
		clientTLS = opts.TLS.ClientTLS()
	} else {
		args = append(args, "--port", port)
	}
	args = append(args, opts.Args...)
	cmd := exec.Command(bin, args...)
	stderr := &SyncBuffer{}
	cmd.Stdout, cmd.Stderr = stderr, stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	r := &RedisProcess{Addr: addr, cmd: cmd}
	t.Cleanup(r.Stop)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if pingRedis(addr, clientTLS) {
			return r
		}
	}
	t.Fatalf("redis-server %v on %s did not answer PING:\n%s", args, addr, stderr)
	return nil
}

// pingRedis reports whether a server answers PING on addr, over TLS when tc is set.
func pingRedis(addr string, tc *tls.Config) bool {
	d := &net.Dialer{Timeout: 200 * time.Millisecond}
	var c net.Conn
	var err error
	if tc != nil {
		c, err = tls.DialWithDialer(d, "tcp", addr, tc)
	} else {
		c, err = d.Dial("tcp", addr)
	}
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && line == "+PONG\r\n"
}

// Stop kills the server and waits for it to exit.
func (r *RedisProcess) Stop() {
	if r.cmd == nil {
		return
	}
	r.cmd.Process.Kill()
	r.cmd.Wait()
	r.cmd = nil
}
