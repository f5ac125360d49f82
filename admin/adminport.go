package admin

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/cachecar/cachecar/internal/httpx"
	"github.com/rs/zerolog"
	"golang.org/x/time/rate"

	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/cachecar/cachecar/invalidation"
)

// AdminOptions configures the admin port.
type AdminOptions struct {
	// Token is the bearer token; the admin port is not started without one.
	Token string
	// ClearRate and ClearBurst limit clears (per second, and how many at once).
	ClearRate  float64
	ClearBurst int
	// WarmMaxIDs bounds the ids of one warm request.
	WarmMaxIDs int
	// Namespace prefixes every key, as the resolver's does.
	Namespace string
	// SessionPrefix is the sessions' key prefix after the namespace ("" with sessions off).
	SessionPrefix string
	// SessionSentinel is the sessions' trust key (namespace included): a clear of session keys
	// deletes it first, so that reads go to PostgreSQL and nobody is logged out.
	SessionSentinel string
	// Policies are the cache policies by name (the manifests' included): their key spaces bound
	// what a clear may touch, and the ones taking one id can be warmed.
	Policies map[string]*cachepolicy.Policy
	// WarmSQL maps a policy name to its configured warm query (ids), for warm requests that
	// name no ids.
	WarmSQL map[string]string
	// Listener is the invalidation listener (nil when off).
	Listener ListenerStatus
	// Backend says how the cache runs: "valkey+tier", "valkey", "memory" or "none".
	Backend string
}

// AdminCache is what the admin port needs of the read path; *cachepolicy.Resolver is the real one.
type AdminCache interface {
	CacheStatus
	Stats() map[string]cachepolicy.PolicyStats
	KeyInfo(ctx context.Context, key string, extra ...*cachepolicy.Policy) (cachepolicy.KeyInfo, error)
	DeleteKey(ctx context.Context, key string) (bool, error)
	ClearPrefix(ctx context.Context, prefix string, exact bool, pause time.Duration, also ...string) (int, error)
	PolicyOf(key string, extra ...*cachepolicy.Policy) (*cachepolicy.Policy, bool)
	Live() bool
	ClearAll(ctx context.Context, pause time.Duration, extra ...*cachepolicy.Policy) (int, error)
	Warm(ctx context.Context, p *cachepolicy.Policy, ids []int64, concurrency int, interval time.Duration, progress func(cachepolicy.WarmProgress)) (cachepolicy.WarmProgress, error)
	WarmIDs(ctx context.Context, sql string, limit int) ([]int64, error)
}

// ValkeyInfo is what the admin port reads from Valkey; *cachepolicy.Store is the real one. Nil
// without Valkey.
type ValkeyInfo interface {
	Pinger
	Info(ctx context.Context, section string) (string, error)
	MemoryInfo(ctx context.Context) (cachepolicy.MemoryInfo, error)
}

// Admin serves the admin port: cache stats, clears, one key, warming; behind a bearer token.
type Admin struct {
	opts    AdminOptions
	cache   AdminCache
	valkey  ValkeyInfo
	log     zerolog.Logger
	token   [sha256.Size]byte
	limiter *rate.Limiter
	warming chan struct{} // one warm at a time: it shares database.max_loads with the app
}

// maxKeyBytes bounds a key named in a request.
const maxKeyBytes = 1024

// clearPause is slept between a clear's batches, so that a clear of many keys leaves the server
// to the read path in between.
const clearPause = time.Millisecond

// NewAdmin returns the admin port's server. valkey may be nil.
func NewAdmin(opts AdminOptions, cache AdminCache, valkey ValkeyInfo, log zerolog.Logger) *Admin {
	a := &Admin{opts: opts, cache: cache, valkey: valkey, log: log,
		token:   sha256.Sum256([]byte(opts.Token)),
		limiter: rate.NewLimiter(rate.Limit(opts.ClearRate), max(opts.ClearBurst, 1)),
		warming: make(chan struct{}, 1)}
	return a
}

// Handler returns the admin routes behind the bearer token.
func (a *Admin) Handler() http.Handler {
	mux := http.NewServeMux()
	route := func(pattern string, allow string, h http.HandlerFunc) {
		mux.HandleFunc(pattern, h)
		mux.Handle(pattern[strings.IndexByte(pattern, ' ')+1:], methodNotAllowed(allow))
	}
	route("GET /api/admin/cache/stats", "GET", a.stats)
	route("POST /api/admin/cache/clear", "POST", a.clear)
	route("POST /api/admin/cache/warm", "POST", a.warm)
	// The path without the key has its own patterns (the missing key's 400), else ServeMux would
	// redirect /api/admin/cache/keys to /api/admin/cache/keys/.
	for _, path := range []string{"/api/admin/cache/keys/{key...}", "/api/admin/cache/keys"} {
		mux.HandleFunc("GET "+path, a.getKey)
		mux.HandleFunc("DELETE "+path, a.deleteKey)
		mux.Handle(path, methodNotAllowed("GET, DELETE"))
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		adminError(w, http.StatusNotFound, "no_route", "no such route; the admin port serves /api/admin/cache/stats, /clear, /warm and /keys/{key}")
	})
	// The token is checked first, so that nothing about the routes shows without it.
	return a.auth(httpx.Canonical(mux, adminError))
}

// auth lets a request through only with the right bearer token. Both tokens are hashed before
// the constant-time comparison, so neither the comparison's time nor its length check says
// anything about the configured token.
func (a *Admin) auth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := r.Header.Get("Authorization")
		given, ok := "", len(h) > 7 && strings.EqualFold(h[:7], "bearer ")
		if ok {
			given = h[7:]
		}
		sum := sha256.Sum256([]byte(strings.TrimSpace(given)))
		if !ok || subtle.ConstantTimeCompare(sum[:], a.token[:]) != 1 {
			if ok {
				w.Header().Set("WWW-Authenticate", `Bearer realm="cachecar-admin", error="invalid_token"`)
			} else {
				w.Header().Set("WWW-Authenticate", `Bearer realm="cachecar-admin"`)
			}
			adminError(w, http.StatusUnauthorized, "unauthorized", "a valid Authorization: Bearer token is required")
			return
		}
		next.ServeHTTP(w, r)
	})
}

type policyStats struct {
	Hits    int64   `json:"hits"`
	Misses  int64   `json:"misses"`
	Stale   int64   `json:"stale"`
	Bypass  int64   `json:"bypass"`
	HitRate float64 `json:"hitRate"`
}

func (a *Admin) stats(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	out := map[string]any{"enabled": a.opts.Backend != "none"}
	policies := map[string]policyStats{}
	for name, s := range a.cache.Stats() {
		policies[name] = policyStats{s.Hits, s.Misses, s.Stale, s.Bypass, math.Round(s.HitRate()*10000) / 10000}
	}
	out["policies"] = policies
	on, tier := a.cache.Tier()
	backend := map[string]any{"mode": a.opts.Backend, "tier": TierStatus{Enabled: on, Entries: tier.Entries, Bytes: tier.Bytes, MaxBytes: tier.Limit}}
	healthy := a.opts.Backend != "none"
	circuit := map[string]string{"database": cachepolicy.CircuitName(a.cache.DatabaseCircuit())}
	if a.valkey != nil {
		circuit["valkey"] = cachepolicy.CircuitName(a.cache.ValkeyCircuit())
		status := "up"
		if err := a.valkey.Ping(ctx); err != nil {
			status, healthy = "down", false
		}
		backend["valkey"] = status
		info := map[string]string{}
		for _, section := range []string{"stats", "keyspace"} {
			if text, err := a.valkey.Info(ctx, section); err == nil {
				info[section] = text
			}
		}
		out["info"] = info
		if mi, err := a.valkey.MemoryInfo(ctx); err == nil {
			out["memory"] = map[string]any{"maxmemory": mi.MaxMemory, "maxmemoryPolicy": mi.MaxMemoryPolicy,
				"usedMemory": mi.UsedMemory, "evictedKeys": mi.EvictedKeys, "warnings": nonNil(cachepolicy.MemoryWarnings(mi, a.opts.SessionPrefix != ""))}
		}
		if circuit["valkey"] != "closed" {
			healthy = false
		}
	} else {
		backend["valkey"] = "disabled"
	}
	out["backend"] = backend
	out["circuit"] = circuit
	listener := map[string]any{"status": "disabled"}
	if a.opts.Listener != nil {
		st := a.opts.Listener.Status()
		listener["status"] = "down"
		switch st.State {
		case invalidation.StateLive:
			listener["status"] = "up"
		case invalidation.StateError:
			listener["status"] = "error"
		}
		if listener["status"] != "up" {
			healthy = false
		}
		listener["since"] = st.Since.UTC().Format(time.RFC3339Nano)
		if !st.LastNotification.IsZero() {
			listener["lastNotification"] = st.LastNotification.UTC().Format(time.RFC3339Nano)
		}
	}
	out["listener"] = listener
	out["healthy"] = healthy
	writeJSON(w, http.StatusOK, out)
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

type clearRequest struct {
	Pattern         *string `json:"pattern"`
	IncludeSessions bool    `json:"include_sessions"`
}

// clearBody is clearRequest as sent: a "pattern" of null must not read as an absent one (a
// script with an unset variable would clear everything).
type clearBody struct {
	Pattern         json.RawMessage `json:"pattern"`
	IncludeSessions bool            `json:"include_sessions"`
}

func (a *Admin) clear(w http.ResponseWriter, r *http.Request) {
	if a.noCache(w) {
		return
	}
	var body clearBody
	if !decodeJSON(w, r, &body) {
		return
	}
	req := clearRequest{IncludeSessions: body.IncludeSessions}
	if body.Pattern != nil {
		var p string
		if err := json.Unmarshal(body.Pattern, &p); err != nil || string(body.Pattern) == "null" {
			adminError(w, http.StatusBadRequest, "bad_pattern", `pattern must be a string (like "course:*"); to clear every policy's keys send {}`)
			return
		}
		req.Pattern = &p
	}
	sc, err := a.scope(req)
	if err != nil {
		adminError(w, http.StatusBadRequest, "bad_pattern", err.Error())
		return
	}
	if res := a.limiter.Reserve(); res.Delay() > 0 {
		d := res.Delay()
		res.Cancel()
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(d.Seconds()))))
		adminError(w, http.StatusTooManyRequests, "rate_limited", fmt.Sprintf("clears are limited to %g per second (burst %d); retry in %s", a.opts.ClearRate, a.opts.ClearBurst, d.Round(time.Millisecond)))
		return
	}
	start := time.Now()
	var n int
	switch {
	case sc.all:
		n, err = a.cache.ClearAll(r.Context(), clearPause, a.extraPolicies()...)
	case sc.sessions:
		// Without its sentinel no sidecar trusts Valkey's sessions: reads go to PostgreSQL,
		// which keeps every session, until a reconciliation copies them back. The sentinel is
		// deleted in the same UNLINK as each batch of session keys, so a reconciliation that
		// ran between two batches never leaves it vouching for keys deleted after it.
		n, err = a.cache.ClearPrefix(r.Context(), a.opts.Namespace+sc.prefix, sc.exact, clearPause, a.opts.SessionSentinel)
	case sc.exact:
		var existed bool
		if existed, err = a.cache.DeleteKey(r.Context(), a.opts.Namespace+sc.prefix); existed {
			n = 1
		}
	default:
		n, err = a.cache.ClearPrefix(r.Context(), a.opts.Namespace+sc.prefix, false, clearPause)
	}
	took := time.Since(start)
	pattern := "{}"
	if req.Pattern != nil {
		pattern = *req.Pattern
	}
	ev := a.log.Info()
	if err != nil {
		ev = a.log.Warn().Err(err)
	}
	ev.Str("audit", "cache_clear").Str("remote", r.RemoteAddr).Str("pattern", pattern).Bool("include_sessions", req.IncludeSessions).
		Int("deleted", n).Float64("duration_ms", float64(took.Microseconds())/1000).Msg("cache clear")
	if err != nil {
		adminError(w, http.StatusServiceUnavailable, "cache_unavailable", fmt.Sprintf("the clear stopped after %d keys: the cache did not answer", n))
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"deleted": n, "durationMs": float64(took.Microseconds()) / 1000, "pattern": pattern})
}

// clearScope is what a clear request covers.
type clearScope struct {
	all      bool   // every policy's keys ({})
	prefix   string // keys starting with this (namespace not included)
	exact    bool   // just the key prefix (the pattern had no '*')
	sessions bool   // session keys
}

// scope checks a clear request: {} (no pattern) clears every policy's keys; a pattern is a key or
// a key prefix followed by one trailing '*', inside a policy's key space (or the sessions', when
// include_sessions says so).
func (a *Admin) scope(req clearRequest) (clearScope, error) {
	if req.Pattern == nil {
		if req.IncludeSessions {
			return clearScope{}, errors.New(`{} clears every cache policy's keys and never sessions; name them: {"pattern": "` + a.opts.SessionPrefix + `*", "include_sessions": true}`)
		}
		return clearScope{all: true}, nil
	}
	p := *req.Pattern
	switch {
	case p == "" || p == "*":
		return clearScope{}, errors.New(`pattern must name a policy's keys (like "course:*"); to clear every policy's keys send {}`)
	case len(p) > maxKeyBytes:
		return clearScope{}, fmt.Errorf("pattern is longer than %d bytes", maxKeyBytes)
	}
	lit, glob := strings.CutSuffix(p, "*")
	if strings.ContainsAny(lit, "*?[]\\") {
		return clearScope{}, errors.New("pattern may use only one '*', at its end; ?, [ ] and \\ are not allowed")
	}
	sc := clearScope{prefix: lit, exact: !glob}
	if a.opts.SessionPrefix != "" && (strings.HasPrefix(lit, a.opts.SessionPrefix) || strings.HasPrefix(a.opts.SessionPrefix, lit)) {
		if !req.IncludeSessions {
			return clearScope{}, errors.New(`pattern covers session keys; add "include_sessions": true to clear them from Valkey (PostgreSQL keeps every session, so nobody is logged out)`)
		}
		if !strings.HasPrefix(lit, a.opts.SessionPrefix) {
			return clearScope{}, errors.New("pattern reaches outside the sessions' key space")
		}
		sc.sessions = true
		return sc, nil
	}
	for _, pol := range a.opts.Policies {
		if strings.HasPrefix(lit, pol.KeyPrefix()) {
			return sc, nil
		}
	}
	return clearScope{}, fmt.Errorf("pattern %q is outside every cache policy's key space (%s)", p, a.keySpaces())
}

func (a *Admin) keySpaces() string {
	var s []string
	for _, p := range a.opts.Policies {
		s = append(s, p.KeyPrefix()+"*")
	}
	return strings.Join(s, ", ")
}

// extraPolicies are the policies the resolver does not know (the manifests').
func (a *Admin) extraPolicies() []*cachepolicy.Policy {
	var out []*cachepolicy.Policy
	for _, p := range a.opts.Policies {
		out = append(out, p)
	}
	return out
}

// key returns the request's key (namespace added), or writes a 400.
func (a *Admin) key(w http.ResponseWriter, r *http.Request) (string, bool) {
	k := r.PathValue("key")
	switch {
	case k == "":
		adminError(w, http.StatusBadRequest, "bad_key", "the key is missing: /api/admin/cache/keys/{key}")
		return "", false
	case len(k) > maxKeyBytes:
		adminError(w, http.StatusBadRequest, "bad_key", fmt.Sprintf("the key is longer than %d bytes", maxKeyBytes))
		return "", false
	}
	if _, ok := a.cache.PolicyOf(a.opts.Namespace+k, a.extraPolicies()...); !ok {
		adminError(w, http.StatusBadRequest, "bad_key", fmt.Sprintf("key %q is outside every cache policy's key space (%s)", clipKey(k), a.keySpaces()))
		return "", false
	}
	return a.opts.Namespace + k, true
}

// noCache answers 409 when the sidecar runs with no cache at all (no Valkey, no in-process
// tier): there is nothing to clear, read or warm, and "the cache did not answer" would send an
// operator looking for an outage.
func (a *Admin) noCache(w http.ResponseWriter) bool {
	if a.opts.Backend != "none" {
		return false
	}
	adminError(w, http.StatusConflict, "no_cache", "no cache is configured (valkey.addrs is empty and cache.tier_max_bytes is 0): every read goes to PostgreSQL")
	return true
}

// clipKey shortens a key for an error message.
func clipKey(k string) string {
	if len(k) > 64 {
		return k[:64] + "..."
	}
	return k
}

func (a *Admin) getKey(w http.ResponseWriter, r *http.Request) {
	if a.noCache(w) {
		return
	}
	key, ok := a.key(w, r)
	if !ok {
		return
	}
	ki, err := a.cache.KeyInfo(r.Context(), key, a.extraPolicies()...)
	if err != nil {
		adminError(w, http.StatusServiceUnavailable, "cache_unavailable", "the cache did not answer")
		return
	}
	if !ki.Exists {
		adminError(w, http.StatusNotFound, "not_found", "no such key")
		return
	}
	ki.Key = strings.TrimPrefix(ki.Key, a.opts.Namespace)
	writeJSON(w, http.StatusOK, ki)
}

func (a *Admin) deleteKey(w http.ResponseWriter, r *http.Request) {
	if a.noCache(w) {
		return
	}
	key, ok := a.key(w, r)
	if !ok {
		return
	}
	rest := strings.TrimPrefix(key, a.opts.Namespace)
	existed, err := a.cache.DeleteKey(r.Context(), key)
	if err != nil {
		adminError(w, http.StatusServiceUnavailable, "cache_unavailable", "the cache did not answer")
		return
	}
	a.log.Info().Str("audit", "cache_delete_key").Str("remote", r.RemoteAddr).Str("key", rest).Bool("existed", existed).Msg("cache key deleted")
	writeJSON(w, http.StatusOK, map[string]any{"deleted": existed})
}

type warmRequest struct {
	Policy string  `json:"policy"`
	IDs    []int64 `json:"ids"`
}

func (a *Admin) warm(w http.ResponseWriter, r *http.Request) {
	if a.noCache(w) {
		return
	}
	var req warmRequest
	if !decodeJSON(w, r, &req) {
		return
	}
	p, ok := a.opts.Policies[req.Policy]
	if !ok || p.Name == "manifest" {
		adminError(w, http.StatusBadRequest, "bad_policy", fmt.Sprintf("policy %q cannot be warmed (warmable: tenant, course, dispatch, tenant_stats)", req.Policy))
		return
	}
	if p.Name == "dispatch_list" {
		adminError(w, http.StatusBadRequest, "bad_policy", "dispatch_list is read by page, not by id: warm tenant_stats or dispatch instead")
		return
	}
	if len(req.IDs) > a.opts.WarmMaxIDs {
		adminError(w, http.StatusRequestEntityTooLarge, "too_many_ids", fmt.Sprintf("%d ids is more than admin.warm_max_ids (%d)", len(req.IDs), a.opts.WarmMaxIDs))
		return
	}
	for _, id := range req.IDs {
		if id <= 0 {
			adminError(w, http.StatusBadRequest, "bad_id", "ids must be positive integers")
			return
		}
	}
	ids := req.IDs
	if ids == nil {
		sql := a.opts.WarmSQL[p.Name]
		if sql == "" {
			adminError(w, http.StatusBadRequest, "no_ids", fmt.Sprintf(`give "ids", or configure policies.%s.warm_sql`, p.Name))
			return
		}
		var err error
		if ids, err = a.cache.WarmIDs(r.Context(), sql, a.opts.WarmMaxIDs); err != nil {
			adminError(w, http.StatusServiceUnavailable, "database_unavailable", "the warm query failed; see the sidecar's log")
			a.log.Warn().Err(err).Str("policy", p.Name).Msg("warm query failed")
			return
		}
	}
	if !a.cache.Live() {
		adminError(w, http.StatusServiceUnavailable, "not_live", "invalidation is not live yet: reads do not fill the cache until it is; retry shortly")
		return
	}
	select {
	case a.warming <- struct{}{}:
		defer func() { <-a.warming }()
	default:
		adminError(w, http.StatusConflict, "warm_running", "a warm-up is running; one at a time, since it shares the database loads with the app")
		return
	}
	res, err := Warm(r.Context(), a.cache, p, ids, a.log)
	out := map[string]any{"policy": p.Name, "total": res.Total, "done": res.Done, "failed": res.Failed}
	if err != nil {
		out["error"] = "some reads failed; see the sidecar's log"
	}
	writeJSON(w, http.StatusOK, out)
}

// Warm reads ids of p through the cache, logging progress every 5 s for long runs. Start-up
// warming uses it too.
func Warm(ctx context.Context, cache AdminCache, p *cachepolicy.Policy, ids []int64, log zerolog.Logger) (cachepolicy.WarmProgress, error) {
	start := time.Now()
	res, err := cache.Warm(ctx, p, ids, 8, 5*time.Second, func(pr cachepolicy.WarmProgress) {
		if pr.Done < pr.Total {
			log.Info().Str("policy", p.Name).Int("done", pr.Done).Int("failed", pr.Failed).Int("total", pr.Total).Msg("warming")
		}
	})
	ev := log.Info()
	if err != nil {
		ev = log.Warn().AnErr("first_error", err)
	}
	ev.Str("policy", p.Name).Int("done", res.Done).Int("failed", res.Failed).Int("total", res.Total).
		Dur("took", time.Since(start)).Msg("warm-up finished")
	return res, err
}

// decodeJSON reads one JSON object into v, strictly: at most 64 KiB, known fields only, nothing
// after it. The Content-Type is not checked (curl -d sends a form type): the body must be JSON. On failure it writes the 4xx and returns false.
func decodeJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 64<<10))
	if err != nil {
		adminError(w, http.StatusRequestEntityTooLarge, "too_large", "the body is larger than 64 KiB")
		return false
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		adminError(w, http.StatusBadRequest, "bad_json", "the body is not the expected JSON object: "+jsonProblem(err))
		return false
	}
	if _, err := dec.Token(); err != io.EOF {
		adminError(w, http.StatusBadRequest, "bad_json", "the body has something after its JSON object")
		return false
	}
	return true
}

// jsonProblem names a decoding problem without echoing values.
func jsonProblem(err error) string {
	var syn *json.SyntaxError
	var typ *json.UnmarshalTypeError
	switch {
	case errors.As(err, &syn):
		return "malformed JSON at byte " + strconv.FormatInt(syn.Offset, 10)
	case errors.As(err, &typ):
		return fmt.Sprintf("field %q must be %s", typ.Field, typ.Type)
	case errors.Is(err, io.EOF):
		return "the body is empty"
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return "unknown field " + strings.TrimPrefix(err.Error(), "json: unknown field ")
	}
	return "malformed JSON"
}

func adminError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, map[string]any{"error": map[string]string{"code": code, "message": msg}})
}
