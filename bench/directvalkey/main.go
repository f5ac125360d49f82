// Command directvalkey answers GET /v1/sessions/{sid} with one Valkey GET per request, what an
// app using connect-redis directly does on every request: the floor under cachecar's session
// reads from Valkey (scenario h), measured on the same machine in the same run. With -path
// /v1/courses/{key} it is a bare hand-written cache-aside service's hit, the floor under
// cachecar's hits from Valkey (scenario k).
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/cachecar/cachecar/bench/internal/benchsrv"
	"github.com/valkey-io/valkey-go"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "directvalkey:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("directvalkey", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:18082", "address to listen on")
	addr := fs.String("valkey-addr", "127.0.0.1:6379", "Valkey or Redis address")
	path := fs.String("path", "/v1/sessions/{key}", "route served (GET); its {key} wildcard is appended to -key-prefix")
	prefix := fs.String("key-prefix", "sess:", "key prefix: {key} is read from PREFIX+{key} (connect-redis's default is sess:)")
	header := fs.String("header", "X-Session-Store: valkey", `header sent with every answer, "Name: value" (empty: none), as cachecar sends X-Session-Store or X-Cache`)
	timeout := fs.Duration("timeout", 50*time.Millisecond, "timeout of one GET (cachecar's default Valkey timeout)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *timeout <= 0 {
		return fmt.Errorf("timeout %s: must be positive", *timeout)
	}
	if !strings.HasPrefix(*path, "/") || !strings.HasSuffix(*path, "/{key}") {
		return fmt.Errorf("path %q: must start with / and end with /{key}", *path)
	}
	var hname, hvalue string
	if *header != "" {
		n, v, ok := strings.Cut(*header, ":")
		if !ok || strings.TrimSpace(n) == "" {
			return fmt.Errorf("header %q: want \"Name: value\"", *header)
		}
		hname, hvalue = http.CanonicalHeaderKey(strings.TrimSpace(n)), strings.TrimSpace(v)
	}
	// No client-side cache: every read is a round trip, as connect-redis makes it.
	vk, err := valkey.NewClient(valkey.ClientOption{InitAddress: []string{*addr}, DisableCache: true})
	if err != nil {
		return fmt.Errorf("connect to valkey at %s: %w", *addr, err)
	}
	defer vk.Close()

	mux := http.NewServeMux()
	mux.Handle("GET "+*path, getHandler(vk, *prefix, *timeout, hname, hvalue))

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	fmt.Fprintf(stdout, "directvalkey: listening on %s, GET %s from keys %s{key} on %s\n", ln.Addr(), *path, *prefix, *addr)
	return benchsrv.Serve(ctx, srv, ln)
}

// getHandler reads one key per request and writes its bytes as they are, with the header given
// (cachecar's X-Session-Store or X-Cache), so that the load generators count its answers the
// same way.
func getHandler(vk valkey.Client, prefix string, timeout time.Duration, hname, hvalue string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), timeout)
		defer cancel()
		body, err := vk.Do(ctx, vk.B().Get().Key(prefix+r.PathValue("key")).Build()).AsBytes()
		switch {
		case valkey.IsValkeyNil(err):
			benchsrv.WriteError(w, http.StatusNotFound, "not_found", "no such key")
			return
		case err != nil:
			benchsrv.WriteError(w, http.StatusServiceUnavailable, "valkey_unavailable", "valkey read failed")
			return
		}
		benchsrv.WriteJSON(w, body, hname, hvalue)
	})
}
