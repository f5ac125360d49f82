package proxy

import (
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"

	"github.com/cachecar/cachecar/cachepolicy"
)

const (
	maxBatchIDs      = 100
	maxListLimit     = 100
	defaultListLimit = 20
)

// statusRE is the rule of the dispatch list's status filter: it becomes part of a key.
var statusRE = regexp.MustCompile(`^[a-z][a-z_]{0,31}$`)

// single serves a resource read by one id: GET /v1/courses/{id} and the like.
func (s *Server) single(p *cachepolicy.Policy, idName string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := query(r, nil); err != nil {
			writeError(w, r, s, err)
			return
		}
		id, err := p.ParseID(idName, r.PathValue("id"))
		if err != nil {
			writeError(w, r, s, err)
			return
		}
		// The key is rendered from the parsed id, never from the raw text, so that one row
		// has one key whatever the id pattern lets through (say, leading zeros).
		sid := strconv.FormatInt(id, 10)
		res, err := s.read.Get(r.Context(), p, []string{sid}, id)
		if err != nil {
			errorCacheHeader(w, res)
			writeError(w, r, s, err)
			return
		}
		writeResult(w, r, res.Body, res, true)
	})
}

// errorCacheHeader sets X-Cache on a read that ended in an error: how the cache answered before
// it (a cached 404 is a HIT; a MISS or BYPASS whose load failed says so too).
func errorCacheHeader(w http.ResponseWriter, res cachepolicy.Result) {
	if res.Cache != "" {
		w.Header().Set("X-Cache", res.Cache)
	}
}

// courseBatch serves GET /v1/courses?ids=1,2,3.
func (s *Server) courseBatch() http.Handler {
	p := s.pol.Course
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q, err := query(r, []string{"ids"})
		if err != nil {
			writeError(w, r, s, err)
			return
		}
		raw, ok := q["ids"]
		if !ok || raw == "" {
			writeError(w, r, s, badRequest("bad_ids", "ids is required: a comma-separated list of 1 to 100 course ids"))
			return
		}
		parts := strings.Split(raw, ",")
		if len(parts) > maxBatchIDs {
			writeError(w, r, s, badRequest("bad_ids", fmt.Sprintf("ids lists %d ids; at most %d are allowed", len(parts), maxBatchIDs)))
			return
		}
		ids := make([]int64, 0, len(parts))
		seen := make(map[int64]bool, len(parts))
		for i, part := range parts {
			id, err := p.ParseID(fmt.Sprintf("ids entry %d", i+1), part)
			if err != nil {
				writeError(w, r, s, err)
				return
			}
			if seen[id] {
				writeError(w, r, s, badRequest("bad_ids", fmt.Sprintf("ids lists %d twice", id)))
				return
			}
			seen[id] = true
			ids = append(ids, id)
		}
		items, state, err := s.read.GetMany(r.Context(), p, ids)
		if err != nil {
			writeError(w, r, s, err)
			return
		}
		// The cached JSON of each course goes out as it is, spliced into the envelope.
		n := 32
		for _, it := range items {
			n += len(it.Body) + 21
		}
		body := make([]byte, 0, n)
		body = append(body, `{"courses":[`...)
		first := true
		for _, it := range items {
			if it.Body == nil {
				continue
			}
			if !first {
				body = append(body, ',')
			}
			first = false
			body = append(body, it.Body...)
		}
		body = append(body, `],"not_found":[`...)
		first = true
		for _, it := range items {
			if it.Body != nil {
				continue
			}
			if !first {
				body = append(body, ',')
			}
			first = false
			body = strconv.AppendInt(body, it.ID, 10)
		}
		body = append(body, "]}"...)
		writeResult(w, r, body, state, false)
	})
}

// dispatchList serves GET /v1/tenants/{id}/dispatches?limit=&after=&status=.
func (s *Server) dispatchList() http.Handler {
	p := s.pol.DispatchList
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		q, err := query(r, []string{"limit", "after", "status"})
		if err != nil {
			writeError(w, r, s, err)
			return
		}
		tenant, err := p.ParseID("tenant id", r.PathValue("id"))
		if err != nil {
			writeError(w, r, s, err)
			return
		}
		limit := int64(defaultListLimit)
		if v, ok := q["limit"]; ok {
			// Only the canonical spelling: ParseInt alone takes "+5" and "005" too.
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 1 || n > maxListLimit || strconv.FormatInt(n, 10) != v {
				writeError(w, r, s, badRequest("bad_limit", fmt.Sprintf("limit must be a whole number from 1 to %d", maxListLimit)))
				return
			}
			limit = n
		}
		after := int64(0)
		if v, ok := q["after"]; ok {
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 0 || strconv.FormatInt(n, 10) != v {
				writeError(w, r, s, badRequest("bad_after", "after must be a dispatch id (a non-negative whole number) from next_after"))
				return
			}
			after = n
		}
		status, statusKey := any(nil), "-"
		if v, ok := q["status"]; ok {
			if !statusRE.MatchString(v) {
				writeError(w, r, s, badRequest("bad_status", "status must be lower-case letters and underscores, at most 32"))
				return
			}
			status, statusKey = v, v
		}
		vals := []string{strconv.FormatInt(tenant, 10), statusKey, strconv.FormatInt(after, 10), strconv.FormatInt(limit, 10)}
		res, err := s.read.Get(r.Context(), p, vals, tenant, status, after, limit)
		if err != nil {
			errorCacheHeader(w, res)
			writeError(w, r, s, err)
			return
		}
		writeResult(w, r, res.Body, res, true)
	})
}

// query parses the query string strictly: it must decode, name only allowed parameters, and name
// each at most once. It returns the values by name.
func query(r *http.Request, allowed []string) (map[string]string, error) {
	if r.URL.RawQuery == "" {
		return nil, nil
	}
	vals, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return nil, badRequest("bad_query", "the query string is malformed")
	}
	out := make(map[string]string, len(vals))
	for name, v := range vals {
		ok := false
		for _, a := range allowed {
			ok = ok || a == name
		}
		if !ok {
			if len(allowed) == 0 {
				return nil, badRequest("bad_query", fmt.Sprintf("unknown query parameter %q: this route takes none", clip(name)))
			}
			return nil, badRequest("bad_query", fmt.Sprintf("unknown query parameter %q (allowed: %s)", clip(name), strings.Join(allowed, ", ")))
		}
		if len(v) != 1 {
			return nil, badRequest("bad_query", fmt.Sprintf("query parameter %q is given %d times", name, len(v)))
		}
		out[name] = v[0]
	}
	return out, nil
}

// clip shortens user text echoed in an error message and quotes nothing itself (callers use %q).
func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}

func badRequest(code, msg string) error {
	return &cachepolicy.InputError{Code: code, Message: msg}
}
