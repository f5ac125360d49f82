package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"

	"github.com/cachecar/cachecar/sessions"
)

// SessionStore stores express-session sessions; *sessions.Store is the real one.
type SessionStore interface {
	Parse(body []byte) (sessions.Session, error)
	Get(ctx context.Context, sid string) ([]byte, string, error)
	Put(ctx context.Context, sid string, sess sessions.Session) (string, error)
	Delete(ctx context.Context, sid string) (string, error)
	Touch(ctx context.Context, sid string, sess sessions.Session) (string, error)
}

// Sessions configures the session routes.
type Sessions struct {
	Store SessionStore
	// MaxBody bounds a PUT or touch body (413 beyond it).
	MaxBody int64
}

// sessionRoutes adds GET, PUT, DELETE /v1/sessions/{sid} and POST /v1/sessions/{sid}/touch.
// X-Session-Store says which store answered (valkey or postgres). Nothing of a session's
// contents is ever logged.
func (s *Server) sessionRoutes(mux *http.ServeMux) {
	cfg := s.opts.Sessions
	mux.Handle("GET /v1/sessions/{sid}", s.session(func(w http.ResponseWriter, r *http.Request, sid string) {
		body, from, err := cfg.Store.Get(r.Context(), sid)
		w.Header().Set("X-Session-Store", from)
		if err != nil {
			s.sessionError(w, r, err)
			return
		}
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("Cache-Control", "no-store")
		h.Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusOK)
		if r.Method != http.MethodHead {
			w.Write(body)
		}
	}))
	mux.Handle("PUT /v1/sessions/{sid}", s.session(func(w http.ResponseWriter, r *http.Request, sid string) {
		sess, err := s.sessionBody(w, r, false)
		if err != nil {
			s.sessionError(w, r, err)
			return
		}
		from, err := cfg.Store.Put(r.Context(), sid, sess)
		s.sessionDone(w, r, from, err)
	}))
	mux.Handle("DELETE /v1/sessions/{sid}", s.session(func(w http.ResponseWriter, r *http.Request, sid string) {
		from, err := cfg.Store.Delete(r.Context(), sid)
		s.sessionDone(w, r, from, err)
	}))
	mux.Handle("/v1/sessions/{sid}", methodNotAllowed("GET, HEAD, PUT, DELETE"))
	mux.Handle("POST /v1/sessions/{sid}/touch", s.session(func(w http.ResponseWriter, r *http.Request, sid string) {
		sess, err := s.sessionBody(w, r, true)
		if err != nil {
			s.sessionError(w, r, err)
			return
		}
		from, err := cfg.Store.Touch(r.Context(), sid, sess)
		s.sessionDone(w, r, from, err)
	}))
	mux.Handle("/v1/sessions/{sid}/touch", methodNotAllowed("POST"))
	noSID := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.sessionError(w, r, sessions.CheckSID(""))
	})
	mux.Handle("/v1/sessions/{$}", noSID)
	// Without its own pattern, ServeMux would redirect /v1/sessions to /v1/sessions/.
	mux.Handle("/v1/sessions", noSID)
}

// session checks the sid and the query string before h runs.
func (s *Server) session(h func(http.ResponseWriter, *http.Request, string)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := query(r, nil); err != nil {
			writeError(w, r, s, err)
			return
		}
		sid := r.PathValue("sid")
		if err := sessions.CheckSID(sid); err != nil {
			s.sessionError(w, r, err)
			return
		}
		h(w, r, sid)
	})
}

// sessionBody reads and parses the body, at most MaxBody bytes. For touch an empty body is
// allowed: the store's TTL applies.
func (s *Server) sessionBody(w http.ResponseWriter, r *http.Request, optional bool) (sessions.Session, error) {
	max := s.opts.Sessions.MaxBody
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, max))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		return sessions.Session{}, &sessions.InputError{Code: "too_large", Message: "the session is larger than " + strconv.FormatInt(max, 10) + " bytes", TooLarge: true}
	}
	if err != nil {
		return sessions.Session{}, &sessions.InputError{Code: "bad_body", Message: "could not read the body"}
	}
	if optional && len(body) == 0 {
		return sessions.Session{}, nil
	}
	return s.opts.Sessions.Store.Parse(body)
}

func (s *Server) sessionDone(w http.ResponseWriter, r *http.Request, from string, err error) {
	w.Header().Set("X-Session-Store", from)
	if err != nil {
		s.sessionError(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// sessionError maps the session store's errors; internals go to the log only, and never a
// session's contents.
func (s *Server) sessionError(w http.ResponseWriter, r *http.Request, err error) {
	var in *sessions.InputError
	switch {
	case errors.As(err, &in) && in.TooLarge:
		writeJSONError(w, http.StatusRequestEntityTooLarge, in.Code, in.Message)
	case errors.As(err, &in):
		writeJSONError(w, http.StatusBadRequest, in.Code, in.Message)
	case errors.Is(err, sessions.ErrNotFound):
		writeJSONError(w, http.StatusNotFound, "not_found", "no such session, or it expired")
	case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
		w.WriteHeader(499) // the client went away
	case errors.Is(err, sessions.ErrUnavailable):
		s.log.Warn().Err(err).Str("request_id", w.Header().Get("X-Request-Id")).Str("route", r.Pattern).Msg("session store unavailable")
		w.Header().Set("Retry-After", "1")
		writeJSONError(w, http.StatusServiceUnavailable, "sessions_unavailable", "the session store is unreachable; nothing was stored or read")
	default:
		s.log.Error().Err(err).Str("request_id", w.Header().Get("X-Request-Id")).Str("route", r.Pattern).Msg("session request failed")
		writeJSONError(w, http.StatusInternalServerError, "internal", "internal error; see the sidecar's log")
	}
}
