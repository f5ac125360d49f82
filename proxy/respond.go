package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/cachecar/cachecar/cachepolicy"
)

// writeResult sends a JSON body with the cache headers of res, or 304 when If-None-Match
// matches.
func writeResult(w http.ResponseWriter, r *http.Request, body []byte, res cachepolicy.Result, withAge bool) {
	etag := cachepolicy.ETag(body)
	h := w.Header()
	// Header values are set as slices directly (the names are canonical already): the constant
	// ones shared, the others in one array, instead of one allocation per Header.Set. Nothing
	// in net/http writes to a header's value slice.
	h["Content-Type"] = jsonContentType
	setCacheHeaders(h, res)
	vals := new([3]string)
	vals[0] = etag
	h["Etag"] = vals[0:1:1]
	if withAge {
		// Age is a non-negative number of seconds (RFC 9111 5.1), whatever the Reader says.
		vals[1] = strconv.FormatInt(max(int64(res.Age/time.Second), 0), 10)
		h["Age"] = vals[1:2:2]
	}
	if inm := r.Header.Get("If-None-Match"); inm != "" && etagMatch(inm, etag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	vals[2] = strconv.Itoa(len(body))
	h["Content-Length"] = vals[2:3:3]
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		w.Write(body)
	}
}

var (
	jsonContentType = []string{"application/json"}
	xCacheValues    = map[string][]string{
		cachepolicy.Hit: {cachepolicy.Hit}, cachepolicy.Miss: {cachepolicy.Miss},
		cachepolicy.Stale: {cachepolicy.Stale}, cachepolicy.Bypass: {cachepolicy.Bypass},
	}
)

// setCacheHeaders sets X-Cache and, on a stale answer, the Warning (RFC 7234 5.5) and
// Cache-Status (RFC 9211) headers that say why it was served.
func setCacheHeaders(h http.Header, res cachepolicy.Result) {
	if res.Cache == "" {
		return
	}
	if v, ok := xCacheValues[res.Cache]; ok {
		h["X-Cache"] = v
	} else {
		h.Set("X-Cache", res.Cache)
	}
	switch res.StaleReason {
	case cachepolicy.StaleWhileRevalidate:
		h.Set("Warning", `110 cachecar "Response is Stale"`)
		h.Set("Cache-Status", "cachecar; hit; detail=stale-while-revalidate")
	case cachepolicy.StaleIfError:
		h.Set("Warning", `111 cachecar "Revalidation Failed"`)
		h.Set("Cache-Status", "cachecar; fwd=stale; detail=stale-if-error")
	}
}

// etagMatch implements If-None-Match's weak comparison (RFC 9110 13.1.2).
func etagMatch(header, etag string) bool {
	for _, t := range strings.Split(header, ",") {
		t = strings.TrimSpace(t)
		if t == "*" || strings.TrimPrefix(t, "W/") == etag {
			return true
		}
	}
	return false
}

type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// writeJSONError sends the one error shape of every cachecar port.
func writeJSONError(w http.ResponseWriter, status int, code, msg string) {
	b, _ := json.Marshal(errorBody{errorDetail{Code: code, Message: msg}})
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(b)))
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(b)
}

// writeError maps a read's error onto its HTTP status: the one place that does.
func writeError(w http.ResponseWriter, r *http.Request, s *Server, err error) {
	var in *cachepolicy.InputError
	// observe has set the request id; repeating it ties this line to the access-log line.
	rid := w.Header().Get("X-Request-Id")
	switch {
	case errors.As(err, &in):
		writeJSONError(w, http.StatusBadRequest, in.Code, in.Message)
	case errors.Is(err, cachepolicy.ErrNotFound):
		writeJSONError(w, http.StatusNotFound, "not_found", "no such "+resourceName(r))
	case errors.Is(err, cachepolicy.ErrUnavailable):
		s.log.Warn().Err(err).Str("request_id", rid).Str("route", r.Pattern).Msg("database unavailable")
		w.Header().Set("Retry-After", "1")
		writeJSONError(w, http.StatusServiceUnavailable, "database_unavailable", "the database is unreachable and nothing is cached for this request")
	case errors.Is(err, cachepolicy.ErrClosed):
		w.Header().Set("Retry-After", "1")
		writeJSONError(w, http.StatusServiceUnavailable, "shutting_down", "the sidecar is shutting down; retry")
	case errors.Is(err, cachepolicy.ErrOverloaded):
		w.Header().Set("Retry-After", "1")
		writeJSONError(w, http.StatusServiceUnavailable, "overloaded", "too many database loads are running; retry shortly")
	case errors.Is(err, cachepolicy.ErrTimeout):
		s.log.Warn().Err(err).Str("request_id", rid).Str("route", r.Pattern).Msg("database timeout")
		writeJSONError(w, http.StatusGatewayTimeout, "database_timeout", "the database did not answer in time")
	case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
		// The client went away; nobody reads this answer. 499 is nginx's "client closed request".
		w.WriteHeader(499)
	default:
		s.log.Error().Err(err).Str("request_id", rid).Str("route", r.Pattern).Msg("read failed")
		writeJSONError(w, http.StatusInternalServerError, "internal", "internal error; see the sidecar's log")
	}
}

// resourceName names what a route serves, for 404 messages.
func resourceName(r *http.Request) string {
	switch r.Pattern {
	case "GET /v1/tenants/{id}", "GET /v1/tenants/{id}/stats", "GET /v1/tenants/{id}/dispatches":
		return "tenant"
	case "GET /v1/courses/{id}", "GET /v1/courses":
		return "course"
	case "GET /v1/dispatches/{id}":
		return "dispatch"
	case "GET /v1/manifests/{filename}":
		return "package"
	}
	return "resource"
}

func notFound() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSONError(w, http.StatusNotFound, "no_route", "no such route; see the README's API reference")
	})
}

func methodNotAllowed(allow string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", allow)
		writeJSONError(w, http.StatusMethodNotAllowed, "method_not_allowed", "method "+r.Method+" is not allowed here; allowed: "+allow)
	})
}
