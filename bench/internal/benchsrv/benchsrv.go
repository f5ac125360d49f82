// Package benchsrv is what the bench's bare servers (fixedjson, directpg, directvalkey) share:
// serving until cancelled, the project's error shape, and a JSON answer.
package benchsrv

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"
)

// CourseQuery is the query cachecar's course loader runs on a miss, so that the bare services
// that read courses from PostgreSQL compare with it.
const CourseQuery = `SELECT row_to_json(c)::text FROM courses c WHERE c.id = $1`

// Serve runs srv on ln until ctx is done, then lets in-flight requests finish.
func Serve(ctx context.Context, srv *http.Server, ln net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}

// WriteError writes the project's error shape; messages are fixed strings, never internals.
func WriteError(w http.ResponseWriter, status int, code, message string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = fmt.Fprintf(w, `{"error":{"code":%q,"message":%q}}`, code, message)
}

// WriteJSON writes body as a 200 JSON answer, with the header hname: hvalue when hname is set.
func WriteJSON(w http.ResponseWriter, body []byte, hname, hvalue string) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	if hname != "" {
		h.Set(hname, hvalue)
	}
	_, _ = w.Write(body)
}
