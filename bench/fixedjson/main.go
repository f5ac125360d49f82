// Command fixedjson serves a fixed 1 KB JSON body on the course route: the HTTP ceiling of the
// machine, the baseline every other benchmark scenario is compared with.
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
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cachecar/cachecar/bench/internal/benchsrv"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "fixedjson:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("fixedjson", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:18080", "address to listen on")
	size := fs.Int("size", 1024, "size of the JSON body in bytes (at least 64)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	body, err := fixedBody(*size)
	if err != nil {
		return err
	}

	mux := http.NewServeMux()
	// The same route pattern as cachecar and directpg, so that routing costs the same everywhere.
	mux.Handle("GET /v1/courses/{id}", fixedHandler(body))
	// And the session route's, for the HTTP floor under bench/run.sh's h (bench/sessions -load).
	mux.Handle("GET /v1/sessions/{sid}", fixedHandler(body))

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	fmt.Fprintf(stdout, "fixedjson: listening on %s, body %d bytes\n", ln.Addr(), len(body))
	return benchsrv.Serve(ctx, srv, ln)
}

// fixedHandler writes the same bytes for every request, like a cache hit that costs nothing.
func fixedHandler(body []byte) http.Handler {
	length := strconv.Itoa(len(body))
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("Content-Length", length)
		_, _ = w.Write(body)
	})
}

// fixedBody builds a valid JSON object of exactly size bytes, shaped like a course row.
func fixedBody(size int) ([]byte, error) {
	const head = `{"id":1,"tenant_id":1,"title":"Fixed course","status":"published","description":"`
	const tail = `"}`
	pad := size - len(head) - len(tail)
	if pad < 0 {
		return nil, fmt.Errorf("size %d is below the minimum %d", size, len(head)+len(tail))
	}
	return []byte(head + strings.Repeat("x", pad) + tail), nil
}
