package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/cachecar/cachecar/configs"
	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
)

// call is one call the fake Reader received.
type call struct {
	Method string // "Get" or "GetMany"
	Policy string
	Key    string
	Args   []any
	IDs    []int64
}

// fakeReader records every call and answers with canned results. It stands in for the
// resolver so that the tests can prove bad input never reaches a key or SQL, and can produce
// every error the resolver can end with.
type fakeReader struct {
	t *testing.T

	mu    sync.Mutex
	calls []call

	result cachepolicy.Result
	err    error
	// errResult is returned with err (a negative-cache hit carries Cache: HIT).
	errResult cachepolicy.Result
	// items answers GetMany; nil answers every id with {"id":N}.
	items func(ids []int64) []cachepolicy.Item
	state string
	// hook, when set, runs first on every call (to panic, block or fail).
	hook func(ctx context.Context) error
}

// keyRE is every key the default policies may render: nothing else may reach a Reader.
var keyRE = regexp.MustCompile(`^(?:(?:tenant|course|dispatch):[1-9][0-9]{0,18}|dashboard:stats:[1-9][0-9]{0,18}|dispatches:list:[1-9][0-9]{0,18}:(?:-|[a-z][a-z_]{0,31}):(?:0|[1-9][0-9]{0,18}):(?:[1-9]|[1-9][0-9]|100))$`)

func (f *fakeReader) Get(ctx context.Context, p *cachepolicy.Policy, vals []string, args ...any) (cachepolicy.Result, error) {
	key := p.Key.Render(vals...)
	f.mu.Lock()
	f.calls = append(f.calls, call{Method: "Get", Policy: p.Name, Key: key, Args: args})
	f.mu.Unlock()
	if !keyRE.MatchString(key) {
		f.t.Errorf("Reader.Get got key %q outside every policy's pattern", key)
	}
	if f.hook != nil {
		if err := f.hook(ctx); err != nil {
			return cachepolicy.Result{}, err
		}
	}
	if f.err != nil {
		return f.errResult, f.err
	}
	return f.result, nil
}

func (f *fakeReader) GetMany(ctx context.Context, p *cachepolicy.Policy, ids []int64) ([]cachepolicy.Item, cachepolicy.Result, error) {
	f.mu.Lock()
	f.calls = append(f.calls, call{Method: "GetMany", Policy: p.Name, IDs: append([]int64(nil), ids...)})
	f.mu.Unlock()
	for _, id := range ids {
		if id <= 0 {
			f.t.Errorf("Reader.GetMany got id %d", id)
		}
	}
	if f.hook != nil {
		if err := f.hook(ctx); err != nil {
			return nil, cachepolicy.Result{}, err
		}
	}
	if f.err != nil {
		return nil, cachepolicy.Result{}, f.err
	}
	if f.items != nil {
		return f.items(ids), cachepolicy.Result{Cache: f.state}, nil
	}
	out := make([]cachepolicy.Item, len(ids))
	for i, id := range ids {
		out[i] = cachepolicy.Item{ID: id, Body: []byte(fmt.Sprintf(`{"id":%d}`, id))}
	}
	return out, cachepolicy.Result{Cache: f.state}, nil
}

func (f *fakeReader) Calls() []call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]call(nil), f.calls...)
}

func (f *fakeReader) Reset() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = nil
}

// syncBuffer is a bytes.Buffer safe for the concurrent writes of a live server's log.

// compilePolicies is cmd/cachecar's, copied: the tests run on the shipped defaults.
func compilePolicies(cfg *configs.Config) (Policies, error) {
	var out Policies
	targets := map[string]**cachepolicy.Policy{
		"tenant": &out.Tenant, "course": &out.Course, "dispatch": &out.Dispatch,
		"dispatch_list": &out.DispatchList, "tenant_stats": &out.TenantStats,
	}
	for name, pc := range cfg.Policies.Named() {
		p, err := cachepolicy.NewPolicy(name, pc.Key, configs.PolicyParams[name], pc.EffectiveTTL(cfg.Cache.TTLDefault),
			pc.IDPattern, pc.SQL, pc.BatchSQL)
		if err != nil {
			return out, err
		}
		*targets[name] = p
	}
	return out, nil
}

// testBody is a cached value with the details a re-encoding would change: spacing, key order,
// escapes, a big number, non-ASCII text.
var testBody = []byte(`{"id": 5,  "title":"Caf\u00e9 \"101\"","zeta":1,"alpha":[1, 2 ,3],"big":12345678901234567890,"t":"ünïcode"}`)

type harness struct {
	h    http.Handler
	fake *fakeReader
	reg  *prometheus.Registry
	log  *testenv.SyncBuffer
}

func newHarness(t *testing.T, opts Options) *harness {
	t.Helper()
	cfg, err := configs.Load(configs.Source{})
	if err != nil {
		t.Fatal(err)
	}
	pol, err := compilePolicies(cfg)
	if err != nil {
		t.Fatal(err)
	}
	fake := &fakeReader{t: t, result: cachepolicy.Result{Body: testBody, Cache: cachepolicy.Hit, Age: 42 * time.Second}, state: cachepolicy.Miss}
	reg := prometheus.NewRegistry()
	buf := &testenv.SyncBuffer{}
	srv := New(opts, fake, pol, zerolog.New(buf), reg)
	return &harness{h: srv.Handler(), fake: fake, reg: reg, log: buf}
}

func defaultHarness(t *testing.T) *harness {
	return newHarness(t, Options{AccessSample: 1})
}

// do serves one request. target may hold any escapes (it is sent as the raw request-target).
func (h *harness) do(method, target string, header ...string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, target, nil)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	rec := httptest.NewRecorder()
	h.h.ServeHTTP(rec, req)
	return rec
}

// errorJSON checks the one error shape and returns its code and message.
func errorJSON(t *testing.T, rec *httptest.ResponseRecorder) (code, msg string) {
	t.Helper()
	if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
		t.Errorf("error Content-Type %q, want application/json", ct)
	}
	var body struct {
		Error *struct {
			Code    *string `json:"code"`
			Message *string `json:"message"`
		} `json:"error"`
	}
	dec := json.NewDecoder(bytes.NewReader(rec.Body.Bytes()))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil || body.Error == nil || body.Error.Code == nil || body.Error.Message == nil {
		t.Fatalf("error body %q is not {\"error\":{\"code\",\"message\"}} (%v)", rec.Body.String(), err)
	}
	if *body.Error.Code == "" || *body.Error.Message == "" {
		t.Errorf("error body %q has an empty code or message", rec.Body.String())
	}
	return *body.Error.Code, *body.Error.Message
}

func wantNoCalls(t *testing.T, f *fakeReader, what string) {
	t.Helper()
	if c := f.Calls(); len(c) > 0 {
		t.Errorf("%s reached the Reader: %+v", what, c)
	}
}

var hexID = regexp.MustCompile(`^[0-9a-f]{16}$`)

func TestRoutesPassBodyThrough(t *testing.T) {
	tests := []struct {
		path   string
		policy string
		key    string
		args   []any
	}{
		{"/v1/tenants/5", "tenant", "tenant:5", []any{int64(5)}},
		{"/v1/tenants/5/stats", "tenant_stats", "dashboard:stats:5", []any{int64(5)}},
		{"/v1/courses/5", "course", "course:5", []any{int64(5)}},
		{"/v1/dispatches/5", "dispatch", "dispatch:5", []any{int64(5)}},
		{"/v1/tenants/7/dispatches", "dispatch_list", "dispatches:list:7:-:0:20", []any{int64(7), nil, int64(0), int64(20)}},
		{"/v1/courses/9223372036854775807", "course", "course:9223372036854775807", []any{int64(9223372036854775807)}},
		{"/v1/courses/5?", "course", "course:5", []any{int64(5)}},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			h := defaultHarness(t)
			rec := h.do("GET", tt.path)
			if rec.Code != http.StatusOK {
				t.Fatalf("status %d, body %s", rec.Code, rec.Body)
			}
			if !bytes.Equal(rec.Body.Bytes(), testBody) {
				t.Errorf("body changed on the way:\n got %s\nwant %s", rec.Body.Bytes(), testBody)
			}
			hd := rec.Header()
			for name, want := range map[string]string{
				"Content-Type":   "application/json",
				"X-Cache":        "HIT",
				"ETag":           cachepolicy.ETag(testBody),
				"Age":            "42",
				"Content-Length": strconv.Itoa(len(testBody)),
			} {
				if got := hd.Get(name); got != want {
					t.Errorf("%s = %q, want %q", name, got, want)
				}
			}
			if rid := hd.Get("X-Request-Id"); !hexID.MatchString(rid) {
				t.Errorf("X-Request-Id %q is not a generated id", rid)
			}
			want := []call{{Method: "Get", Policy: tt.policy, Key: tt.key, Args: tt.args}}
			if got := h.fake.Calls(); !reflect.DeepEqual(got, want) {
				t.Errorf("Reader calls:\n got %#v\nwant %#v", got, want)
			}
		})
	}
}

func TestCacheStatesAndAge(t *testing.T) {
	for _, tt := range []struct {
		cache string
		age   time.Duration
		want  string
	}{
		{cachepolicy.Miss, 0, "0"},
		{cachepolicy.Bypass, 0, "0"},
		{cachepolicy.Hit, 1999 * time.Millisecond, "1"},
		{cachepolicy.Hit, -5 * time.Second, "0"},
	} {
		h := defaultHarness(t)
		h.fake.result = cachepolicy.Result{Body: []byte(`{}`), Cache: tt.cache, Age: tt.age}
		rec := h.do("GET", "/v1/courses/1")
		if rec.Header().Get("X-Cache") != tt.cache || rec.Header().Get("Age") != tt.want {
			t.Errorf("%s age %v: X-Cache %q Age %q, want %q", tt.cache, tt.age, rec.Header().Get("X-Cache"), rec.Header().Get("Age"), tt.want)
		}
	}
}

func TestCourseBatch(t *testing.T) {
	h := defaultHarness(t)
	a, b := []byte(`{"id":3, "t":"a"}`), []byte(`{"id":2,"t":"\u00e9"}`)
	h.fake.items = func(ids []int64) []cachepolicy.Item {
		return []cachepolicy.Item{{ID: 3, Body: a}, {ID: 1}, {ID: 2, Body: b}, {ID: 4}}
	}
	h.fake.state = cachepolicy.Miss
	rec := h.do("GET", "/v1/courses?ids=3,1,2,4")
	if rec.Code != 200 {
		t.Fatalf("status %d: %s", rec.Code, rec.Body)
	}
	want := `{"courses":[{"id":3, "t":"a"},{"id":2,"t":"\u00e9"}],"not_found":[1,4]}`
	if rec.Body.String() != want {
		t.Errorf("body\n got %s\nwant %s", rec.Body, want)
	}
	if !json.Valid(rec.Body.Bytes()) {
		t.Error("batch body is not valid JSON")
	}
	hd := rec.Header()
	if hd.Get("X-Cache") != "MISS" || hd.Get("ETag") != cachepolicy.ETag([]byte(want)) || hd.Get("Content-Type") != "application/json" ||
		!hexID.MatchString(hd.Get("X-Request-Id")) || hd.Get("Content-Length") != strconv.Itoa(len(want)) {
		t.Errorf("headers %v", hd)
	}
	// A batch mixes entries of different ages: it claims none.
	if _, ok := hd["Age"]; ok {
		t.Errorf("batch answer has Age %q", hd.Get("Age"))
	}
	wantCalls := []call{{Method: "GetMany", Policy: "course", IDs: []int64{3, 1, 2, 4}}}
	if got := h.fake.Calls(); !reflect.DeepEqual(got, wantCalls) {
		t.Errorf("calls %#v, want %#v", got, wantCalls)
	}

	// Nothing found and everything found.
	h.fake.items = func(ids []int64) []cachepolicy.Item { return []cachepolicy.Item{{ID: 8}} }
	if rec := h.do("GET", "/v1/courses?ids=8"); rec.Body.String() != `{"courses":[],"not_found":[8]}` {
		t.Errorf("none found: %s", rec.Body)
	}
	h.fake.items = nil
	h.fake.state = cachepolicy.Hit
	if rec := h.do("GET", "/v1/courses?ids=8,9"); rec.Body.String() != `{"courses":[{"id":8},{"id":9}],"not_found":[]}` || rec.Header().Get("X-Cache") != "HIT" {
		t.Errorf("all found: %s %s", rec.Body, rec.Header().Get("X-Cache"))
	}
}

func TestRequestID(t *testing.T) {
	h := defaultHarness(t)
	long64 := strings.Repeat("a", 64)
	for _, sane := range []string{"abc", "req-1_2.3", long64, "0123456789abcdef", "A"} {
		rec := h.do("GET", "/v1/courses/1", "X-Request-Id", sane)
		if got := rec.Header().Get("X-Request-Id"); got != sane {
			t.Errorf("sane id %q answered as %q", sane, got)
		}
	}
	for _, insane := range []string{
		strings.Repeat("a", 65), strings.Repeat("x", 200), "a b", "a\nb", "a\r\nX-Evil: 1", "é", "<script>", "a/b", "a:b", "a\x00b", "\"q\"",
	} {
		rec := h.do("GET", "/v1/courses/1", "X-Request-Id", insane)
		if got := rec.Header().Get("X-Request-Id"); !hexID.MatchString(got) {
			t.Errorf("insane id %q answered as %q, want a generated one", insane, got)
		}
	}
	// Generated ids differ, and errors carry one too.
	seen := map[string]bool{}
	for range 50 {
		rid := h.do("GET", "/v1/courses/abc").Header().Get("X-Request-Id")
		if !hexID.MatchString(rid) || seen[rid] {
			t.Fatalf("generated id %q (repeat %v)", rid, seen[rid])
		}
		seen[rid] = true
	}
}

func TestConditional(t *testing.T) {
	etag := cachepolicy.ETag(testBody)
	tests := []struct {
		inm  string
		want int
	}{
		{etag, 304},
		{"*", 304},
		{`"nope", ` + etag, 304},
		{`"nope",` + etag + `,"other"`, 304},
		{"W/" + etag, 304},
		{`W/"nope", W/` + etag, 304},
		{`"nope"`, 200},
		{`W/"nope"`, 200},
		{strings.Trim(etag, `"`), 200},
		{etag + "x", 200},
		{`""`, 200},
	}
	for _, path := range []string{"/v1/courses/5", "/v1/tenants/5/dispatches?limit=5"} {
		for _, tt := range tests {
			h := defaultHarness(t)
			rec := h.do("GET", path, "If-None-Match", tt.inm)
			if rec.Code != tt.want {
				t.Errorf("%s If-None-Match %s: status %d, want %d", path, tt.inm, rec.Code, tt.want)
				continue
			}
			if tt.want == 304 {
				if rec.Body.Len() != 0 {
					t.Errorf("304 has a body: %q", rec.Body)
				}
				if rec.Header().Get("ETag") != etag || rec.Header().Get("X-Cache") != "HIT" {
					t.Errorf("304 headers %v", rec.Header())
				}
			} else if !bytes.Equal(rec.Body.Bytes(), testBody) {
				t.Errorf("200 body %q", rec.Body)
			}
		}
	}
	// The batch answer has its own ETag and honours it too.
	h := defaultHarness(t)
	first := h.do("GET", "/v1/courses?ids=1,2")
	if rec := h.do("GET", "/v1/courses?ids=1,2", "If-None-Match", first.Header().Get("ETag")); rec.Code != 304 || rec.Body.Len() != 0 {
		t.Errorf("batch revalidation: %d %q", rec.Code, rec.Body)
	}
}

func TestHead(t *testing.T) {
	h := defaultHarness(t)
	ts := httptest.NewServer(h.h)
	defer ts.Close()
	for _, path := range []string{"/v1/courses/5", "/v1/tenants/5", "/v1/tenants/5/stats", "/v1/dispatches/5", "/v1/tenants/5/dispatches", "/v1/courses?ids=1,2"} {
		req, _ := http.NewRequest("HEAD", ts.URL+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || len(body) != 0 || resp.Header.Get("ETag") == "" || resp.Header.Get("X-Cache") == "" {
			t.Errorf("HEAD %s: %d, %d body bytes, headers %v", path, resp.StatusCode, len(body), resp.Header)
		}
	}
	// Recorder view: the handler itself writes no body for HEAD, but says how long it would be.
	rec := h.do("HEAD", "/v1/courses/5")
	if rec.Code != 200 || rec.Body.Len() != 0 || rec.Header().Get("Content-Length") != strconv.Itoa(len(testBody)) {
		t.Errorf("HEAD: %d %q %v", rec.Code, rec.Body, rec.Header())
	}
}

// badIDs are ids that must answer 400 before any key or SQL exists. Each is the escaped form
// sent on the wire.
var badIDs = []string{
	"abc", "-1", "-0", "0", "00", "007", "01", "1.5", "1e3", "0x10", "0b1", "1_000", "+1", "%2B1", "%201", "1%20", "%09" + "1",
	"1%0A", "%0A1", "12345678901234567890", "9223372036854775808", "99999999999999999999999999",
	strings.Repeat("9", 65), strings.Repeat("1", 200), "*", "%2A", ":", "1:2", "course:1", "%00", "1%00", "1%2F2", "%2F1",
	"%EF%BC%91%EF%BC%92%EF%BC%93", // full-width １２３
	"%C3%A9", "%D9%A1",            // é, Arabic-Indic one
	"1,2", "1;2", "%7Bid%7D", "%3Cscript%3E", "..%2F..%2Fetc", "%2E%2E", "1%25", "%FF",
}

var idRoutes = []string{"/v1/tenants/%s", "/v1/tenants/%s/stats", "/v1/tenants/%s/dispatches", "/v1/courses/%s", "/v1/dispatches/%s"}

func TestBadIDs(t *testing.T) {
	h := defaultHarness(t)
	for _, route := range idRoutes {
		for _, id := range badIDs {
			path := fmt.Sprintf(route, id)
			h.fake.Reset()
			rec := h.do("GET", path)
			if rec.Code != http.StatusBadRequest {
				t.Errorf("GET %s: status %d, want 400 (%s)", path, rec.Code, rec.Body)
				continue
			}
			code, msg := errorJSON(t, rec)
			if code != "bad_id" {
				t.Errorf("GET %s: code %q, want bad_id", path, code)
			}
			if strings.Contains(msg, "script") || strings.Contains(msg, "99999") {
				t.Errorf("GET %s: message echoes the id: %q", path, msg)
			}
			if rec.Header().Get("ETag") != "" || rec.Header().Get("X-Cache") != "" {
				t.Errorf("GET %s: 400 carries cache headers %v", path, rec.Header())
			}
			wantNoCalls(t, h.fake, "GET "+path)
		}
	}
}

// TestOddPathsNeverReachReader: odd paths (a lone escaped slash is read as an empty segment;
// empty and dot segments are never cleaned into another route) are a JSON 404, never a Reader
// call and never a redirect.
func TestOddPathsNeverReachReader(t *testing.T) {
	h := defaultHarness(t)
	for _, path := range []string{
		"/v1/courses/%2F", "/v1/courses/", "/v1/courses//", "/v1/courses/1/", "/v1/tenants/1/stats/",
		"/v1/courses/.", "/v1/courses/..", "/v1/courses/../tenants/1", "/v1/courses//1",
	} {
		h.fake.Reset()
		rec := h.do("GET", path)
		if rec.Code != 404 {
			t.Errorf("GET %s: %d, want 404 (%s)", path, rec.Code, rec.Body)
			continue
		}
		if code, _ := errorJSON(t, rec); code != "no_route" {
			t.Errorf("GET %s: code %q", path, code)
		}
		wantNoCalls(t, h.fake, "GET "+path)
	}
}

// TestUncleanTargetsAnswerJSON: ServeMux answers a path with an empty, . or .. segment with a
// redirect to its cleaned form, and the request-target * with a bare 400, both before any
// handler runs. cachecar answers them itself: the JSON error shape, a request id, an access-log
// line and a count, all under the route "unmatched".
func TestUncleanTargetsAnswerJSON(t *testing.T) {
	for _, tt := range []struct {
		method, target string
		status         int
		code           string
	}{
		{"GET", "/v1/courses//1", 404, "no_route"},
		{"GET", "/v1/courses/../tenants/1", 404, "no_route"},
		{"GET", "/v1/./courses/1", 404, "no_route"},
		{"GET", "//v1/courses/1", 404, "no_route"},
		{"GET", "/v1/courses/1/..", 404, "no_route"},
		{"HEAD", "/v1/courses/../courses/1", 404, "no_route"},
		{"POST", "/v1/courses/../courses/1", 404, "no_route"},
		{"GET", "*", 400, "bad_request"},
		{"POST", "*", 400, "bad_request"},
	} {
		t.Run(tt.method+" "+tt.target, func(t *testing.T) {
			h := defaultHarness(t)
			rec := h.do(tt.method, tt.target)
			if rec.Code != tt.status {
				t.Fatalf("status %d, want %d (%s)", rec.Code, tt.status, rec.Body)
			}
			if loc := rec.Header().Get("Location"); loc != "" {
				t.Errorf("Location %q: want no redirect", loc)
			}
			if tt.method != "HEAD" {
				if code, _ := errorJSON(t, rec); code != tt.code {
					t.Errorf("code %q, want %q", code, tt.code)
				}
			}
			if rid := rec.Header().Get("X-Request-Id"); !hexID.MatchString(rid) {
				t.Errorf("X-Request-Id %q", rid)
			}
			wantNoCalls(t, h.fake, tt.method+" "+tt.target)
			if n := countRequests(t, h.reg, "unmatched", strconv.Itoa(tt.status)); n != 1 {
				t.Errorf("requests{route=unmatched,code=%d} = %v, want 1", tt.status, n)
			}
			var entry map[string]any
			if err := json.Unmarshal([]byte(strings.TrimSpace(h.log.String())), &entry); err != nil {
				t.Fatalf("want one access-log line: %v\n%s", err, h.log)
			}
			if entry["route"] != "unmatched" || entry["status"] != float64(tt.status) {
				t.Errorf("access log route %v status %v, want unmatched %d", entry["route"], entry["status"], tt.status)
			}
		})
	}
}

// TestRouteLabels: the route of the access log and the metrics is the matched pattern, or one
// of two fixed values, never anything taken from the path.
func TestRouteLabels(t *testing.T) {
	h := newSessionHarness(t)
	for _, tt := range []struct {
		method, target, route string
	}{
		{"GET", "/v1/courses/1", "GET /v1/courses/{id}"},
		{"HEAD", "/v1/courses/1", "GET /v1/courses/{id}"},
		{"GET", "/v1/courses?ids=1", "GET /v1/courses"},
		{"PUT", "/v1/sessions/" + testSID, "PUT /v1/sessions/{sid}"},
		{"GET", "/v1/sessions/", "/v1/sessions/{$}"},
		{"GET", "/v1/sessions", "/v1/sessions"},
		{"POST", "/v1/courses/1", "method_not_allowed"},
		{"DELETE", "/v1/courses", "method_not_allowed"},
		{"PATCH", "/v1/sessions/" + testSID, "method_not_allowed"},
		{"GET", "/v1/sessions/" + testSID + "/touch", "method_not_allowed"},
		{"GET", "/", "unmatched"},
		{"GET", "/v1/nope/1", "unmatched"},
		{"POST", "/v1/nope/1", "unmatched"},
		{"GET", "/v1/courses//1", "unmatched"},
		{"GET", "/v1/courses/../tenants/1", "unmatched"},
		{"GET", "*", "unmatched"},
	} {
		h.log.Reset()
		h.send(tt.method, tt.target, []byte(`{"cookie":{}}`))
		var entry map[string]any
		if err := json.Unmarshal([]byte(strings.TrimSpace(h.log.String())), &entry); err != nil {
			t.Errorf("%s %s: want one access-log line: %v\n%s", tt.method, tt.target, err, h.log)
			continue
		}
		if entry["route"] != tt.route {
			t.Errorf("%s %s: route %q, want %q", tt.method, tt.target, entry["route"], tt.route)
		}
	}
}

func TestBatchIDs(t *testing.T) {
	ids := func(n int) string {
		s := make([]string, n)
		for i := range s {
			s[i] = strconv.Itoa(i + 1)
		}
		return strings.Join(s, ",")
	}
	tests := []struct {
		name  string
		query string
		code  string  // "" = 200
		want  []int64 // ids handed to GetMany on 200
	}{
		{"one", "ids=1", "", []int64{1}},
		{"order kept", "ids=9,3,7", "", []int64{9, 3, 7}},
		{"exactly 100", "ids=" + ids(100), "", nil},
		{"max int64", "ids=9223372036854775807", "", []int64{9223372036854775807}},
		{"escaped comma splits", "ids=1%2C2", "", []int64{1, 2}},
		{"missing", "", "bad_ids", nil},
		{"empty", "ids=", "bad_ids", nil},
		{"no value", "ids", "bad_ids", nil},
		{"only a comma", "ids=,", "bad_id", nil},
		{"101 entries", "ids=" + ids(101), "bad_ids", nil},
		{"10000 entries", "ids=" + ids(10000), "bad_ids", nil},
		{"101 empty entries", "ids=" + strings.Repeat(",", 100), "bad_ids", nil},
		{"duplicates", "ids=1,2,1", "bad_ids", nil},
		{"adjacent duplicates", "ids=5,5", "bad_ids", nil},
		{"bad among good", "ids=1,2,abc,4", "bad_id", nil},
		{"zero among good", "ids=1,0", "bad_id", nil},
		{"leading zero among good", "ids=1,07", "bad_id", nil},
		{"negative", "ids=-1", "bad_id", nil},
		{"overflow", "ids=1,9223372036854775808", "bad_id", nil},
		{"star", "ids=*", "bad_id", nil},
		{"colon", "ids=1:2", "bad_id", nil},
		{"nul", "ids=1,%00", "bad_id", nil},
		{"full-width digits", "ids=%EF%BC%91", "bad_id", nil},
		{"trailing comma", "ids=1,2,", "bad_id", nil},
		{"leading comma", "ids=,1", "bad_id", nil},
		{"double comma", "ids=1,,2", "bad_id", nil},
		{"space after comma", "ids=1,%202", "bad_id", nil},
		{"plus is a space", "ids=1,+2", "bad_id", nil},
		{"space before comma", "ids=1%20,2", "bad_id", nil},
		{"semicolon", "ids=1;2", "bad_query", nil},
		{"repeated ids", "ids=1&ids=2", "bad_query", nil},
		{"unknown param", "ids=1&limit=2", "bad_query", nil},
		{"malformed escape", "ids=1%zz", "bad_query", nil},
		{"malformed escape in name", "%zz=1&ids=1", "bad_query", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := defaultHarness(t)
			target := "/v1/courses"
			if tt.query != "" {
				target += "?" + tt.query
			}
			rec := h.do("GET", target)
			if tt.code == "" {
				if rec.Code != 200 {
					t.Fatalf("status %d: %s", rec.Code, rec.Body)
				}
				calls := h.fake.Calls()
				if len(calls) != 1 || calls[0].Method != "GetMany" {
					t.Fatalf("calls %+v", calls)
				}
				if tt.want != nil && !reflect.DeepEqual(calls[0].IDs, tt.want) {
					t.Errorf("ids %v, want %v", calls[0].IDs, tt.want)
				}
				if tt.want == nil && len(calls[0].IDs) != 100 {
					t.Errorf("%d ids, want 100", len(calls[0].IDs))
				}
				return
			}
			if rec.Code != 400 {
				t.Fatalf("status %d, want 400: %s", rec.Code, rec.Body)
			}
			if code, _ := errorJSON(t, rec); code != tt.code {
				t.Errorf("code %q, want %q", code, tt.code)
			}
			wantNoCalls(t, h.fake, target)
		})
	}
}

func TestDispatchList(t *testing.T) {
	tests := []struct {
		query string
		key   string
		args  []any
	}{
		{"", "dispatches:list:7:-:0:20", []any{int64(7), nil, int64(0), int64(20)}},
		{"limit=5&status=active&after=100", "dispatches:list:7:active:100:5", []any{int64(7), "active", int64(100), int64(5)}},
		{"after=100&limit=5&status=active", "dispatches:list:7:active:100:5", []any{int64(7), "active", int64(100), int64(5)}},
		{"limit=1", "dispatches:list:7:-:0:1", []any{int64(7), nil, int64(0), int64(1)}},
		{"limit=100", "dispatches:list:7:-:0:100", []any{int64(7), nil, int64(0), int64(100)}},
		{"limit=20", "dispatches:list:7:-:0:20", []any{int64(7), nil, int64(0), int64(20)}},
		{"after=0", "dispatches:list:7:-:0:20", []any{int64(7), nil, int64(0), int64(20)}},
		{"after=9223372036854775807", "dispatches:list:7:-:9223372036854775807:20", []any{int64(7), nil, int64(9223372036854775807), int64(20)}},
		{"status=in_progress", "dispatches:list:7:in_progress:0:20", []any{int64(7), "in_progress", int64(0), int64(20)}},
		{"status=" + strings.Repeat("a", 32), "dispatches:list:7:" + strings.Repeat("a", 32) + ":0:20", []any{int64(7), strings.Repeat("a", 32), int64(0), int64(20)}},
	}
	for _, tt := range tests {
		t.Run("ok "+tt.query, func(t *testing.T) {
			h := defaultHarness(t)
			rec := h.do("GET", "/v1/tenants/7/dispatches?"+tt.query)
			if rec.Code != 200 || !bytes.Equal(rec.Body.Bytes(), testBody) {
				t.Fatalf("status %d: %s", rec.Code, rec.Body)
			}
			want := []call{{Method: "Get", Policy: "dispatch_list", Key: tt.key, Args: tt.args}}
			if got := h.fake.Calls(); !reflect.DeepEqual(got, want) {
				t.Errorf("calls\n got %#v\nwant %#v", got, want)
			}
		})
	}

	bad := []struct {
		query string
		code  string
	}{
		{"limit=0", "bad_limit"}, {"limit=101", "bad_limit"}, {"limit=abc", "bad_limit"}, {"limit=-1", "bad_limit"},
		{"limit=", "bad_limit"}, {"limit=1.5", "bad_limit"}, {"limit=1000", "bad_limit"}, {"limit=%2B5", "bad_limit"},
		{"limit=05", "bad_limit"}, {"limit=005", "bad_limit"}, {"limit=%205", "bad_limit"}, {"limit=99999999999999999999", "bad_limit"},
		{"after=-1", "bad_after"}, {"after=abc", "bad_after"}, {"after=01", "bad_after"}, {"after=", "bad_after"},
		{"after=%2B1", "bad_after"}, {"after=%201", "bad_after"}, {"after=9223372036854775808", "bad_after"}, {"after=0x10", "bad_after"},
		{"after=-0", "bad_after"}, {"after=00", "bad_after"},
		{"status=ACTIVE", "bad_status"}, {"status=Active", "bad_status"}, {"status=a+b", "bad_status"}, {"status=a%20b", "bad_status"},
		{"status=*", "bad_status"}, {"status=" + strings.Repeat("a", 33), "bad_status"}, {"status=" + strings.Repeat("a", 40), "bad_status"},
		{"status=", "bad_status"}, {"status=1abc", "bad_status"}, {"status=_x", "bad_status"}, {"status=a-b", "bad_status"},
		{"status=active:1", "bad_status"}, {"status=%C3%A9", "bad_status"}, {"status=-", "bad_status"}, {"status=active%0A", "bad_status"},
		{"status=a%00", "bad_status"}, {"status=%7Bstatus%7D", "bad_status"},
		{"page=2", "bad_query"}, {"limit=1&limit=2", "bad_query"}, {"status=a&status=b", "bad_query"}, {"limit=%zz", "bad_query"},
		{"LIMIT=5", "bad_query"}, {"limit=5;after=1", "bad_query"},
	}
	h := defaultHarness(t)
	for _, tt := range bad {
		h.fake.Reset()
		rec := h.do("GET", "/v1/tenants/7/dispatches?"+tt.query)
		if rec.Code != 400 {
			t.Errorf("?%s: status %d, want 400 (%s)", tt.query, rec.Code, rec.Body)
			continue
		}
		if code, _ := errorJSON(t, rec); code != tt.code {
			t.Errorf("?%s: code %q, want %q", tt.query, code, tt.code)
		}
		wantNoCalls(t, h.fake, "?"+tt.query)
	}
	// A bad tenant with good parameters is a bad id.
	h.fake.Reset()
	rec := h.do("GET", "/v1/tenants/0/dispatches?limit=5")
	if code, _ := errorJSON(t, rec); rec.Code != 400 || code != "bad_id" {
		t.Errorf("bad tenant: %d %s", rec.Code, code)
	}
	wantNoCalls(t, h.fake, "bad tenant")
}

func TestQueryOnSingleRoutes(t *testing.T) {
	h := defaultHarness(t)
	for _, route := range []string{"/v1/tenants/1", "/v1/tenants/1/stats", "/v1/courses/1", "/v1/dispatches/1"} {
		for _, q := range []string{"x=1", "id=2", "ids=1", "%zz", "a=%zz", "a=1;b=2", "a=1&a=2", "=1"} {
			h.fake.Reset()
			rec := h.do("GET", route+"?"+q)
			if rec.Code != 400 {
				t.Errorf("%s?%s: status %d, want 400", route, q, rec.Code)
				continue
			}
			if code, _ := errorJSON(t, rec); code != "bad_query" {
				t.Errorf("%s?%s: code %q", route, q, code)
			}
			wantNoCalls(t, h.fake, route+"?"+q)
		}
	}
	// A long unknown parameter name is clipped in the message.
	rec := h.do("GET", "/v1/courses/1?"+strings.Repeat("n", 500)+"=1")
	if _, msg := errorJSON(t, rec); len(msg) > 200 {
		t.Errorf("message echoes %d bytes", len(msg))
	}
}

var allRoutes = []string{"/v1/tenants/1", "/v1/tenants/1/stats", "/v1/tenants/1/dispatches", "/v1/courses/1", "/v1/courses?ids=1", "/v1/courses", "/v1/dispatches/1"}

func TestUnknownRoutes(t *testing.T) {
	h := defaultHarness(t)
	for _, path := range []string{"/", "/v1", "/v1/", "/v1/course/1", "/v2/courses/1", "/V1/courses/1", "/v1/Courses/1", "/v1/courses/1/extra",
		"/v1/tenants/1/other", "/v1/tenants", "/v1/dispatches", "/v1/manifests/x.zip", "/v1/sessions/abc", "/metrics", "/health", "/api/admin/cache/stats"} {
		for _, method := range []string{"GET", "POST"} {
			h.fake.Reset()
			rec := h.do(method, path)
			if rec.Code != 404 {
				t.Errorf("%s %s: %d, want 404", method, path, rec.Code)
				continue
			}
			if code, _ := errorJSON(t, rec); code != "no_route" {
				t.Errorf("%s %s: code %q", method, path, code)
			}
			wantNoCalls(t, h.fake, method+" "+path)
		}
	}
}

func TestWrongMethods(t *testing.T) {
	h := defaultHarness(t)
	for _, path := range allRoutes {
		for _, method := range []string{"POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"} {
			h.fake.Reset()
			rec := h.do(method, path)
			if rec.Code != 405 {
				t.Errorf("%s %s: %d, want 405", method, path, rec.Code)
				continue
			}
			if code, _ := errorJSON(t, rec); code != "method_not_allowed" {
				t.Errorf("%s %s: code %q", method, path, code)
			}
			if allow := rec.Header().Get("Allow"); allow != "GET, HEAD" {
				t.Errorf("%s %s: Allow %q", method, path, allow)
			}
			wantNoCalls(t, h.fake, method+" "+path)
		}
	}
}

func TestErrorMapping(t *testing.T) {
	const secret = "password authentication failed for user app_secret_user at 10.1.2.3: SELECT * FROM courses"
	tests := []struct {
		name   string
		err    error
		status int
		code   string
	}{
		{"not found", cachepolicy.ErrNotFound, 404, "not_found"},
		{"not found wrapped", fmt.Errorf("load course 5: %w", cachepolicy.ErrNotFound), 404, "not_found"},
		{"unavailable wrapped", fmt.Errorf("load: %s: %w", secret, cachepolicy.ErrUnavailable), 503, "database_unavailable"},
		{"timeout wrapped", fmt.Errorf("load: %s: %w", secret, cachepolicy.ErrTimeout), 504, "database_timeout"},
		{"plain error", errors.New(secret), 500, "internal"},
		{"deadline from the resolver", fmt.Errorf("%s: %w", secret, context.DeadlineExceeded), 500, "internal"},
		{"input error", &cachepolicy.InputError{Code: "bad_thing", Message: "the thing is bad"}, 400, "bad_thing"},
	}
	for _, tt := range tests {
		for _, path := range allRoutes[:len(allRoutes)-2] {
			t.Run(tt.name+" "+path, func(t *testing.T) {
				h := defaultHarness(t)
				h.fake.err = tt.err
				rec := h.do("GET", path)
				if rec.Code != tt.status {
					t.Fatalf("status %d, want %d (%s)", rec.Code, tt.status, rec.Body)
				}
				code, msg := errorJSON(t, rec)
				if code != tt.code {
					t.Errorf("code %q, want %q", code, tt.code)
				}
				for _, leak := range []string{"app_secret_user", "10.1.2.3", "SELECT", "password", "deadline"} {
					if strings.Contains(rec.Body.String(), leak) {
						t.Errorf("body leaks %q: %s", leak, rec.Body)
					}
				}
				if ra := rec.Header().Get("Retry-After"); (tt.status == 503) != (ra != "") {
					t.Errorf("Retry-After %q on %d", ra, tt.status)
				}
				if rec.Header().Get("Cache-Control") != "no-store" || rec.Header().Get("ETag") != "" || rec.Header().Get("X-Cache") != "" {
					t.Errorf("error headers %v", rec.Header())
				}
				if !hexID.MatchString(rec.Header().Get("X-Request-Id")) {
					t.Error("error has no X-Request-Id")
				}
				if tt.status == 404 {
					want := "tenant"
					switch {
					case strings.HasPrefix(path, "/v1/courses"):
						want = "course"
					case strings.HasPrefix(path, "/v1/dispatches"):
						want = "dispatch"
					}
					if !strings.Contains(msg, want) {
						t.Errorf("404 message %q does not name the %s", msg, want)
					}
				}
			})
		}
	}
	// A read whose load failed after the cache missed (or was bypassed) says so in X-Cache.
	for _, cache := range []string{cachepolicy.Miss, cachepolicy.Bypass} {
		h := defaultHarness(t)
		h.fake.err = fmt.Errorf("load: %w", cachepolicy.ErrUnavailable)
		h.fake.errResult = cachepolicy.Result{Cache: cache}
		rec := h.do("GET", "/v1/courses/1")
		if rec.Code != 503 || rec.Header().Get("X-Cache") != cache {
			t.Errorf("a %s whose load failed: %d X-Cache %q, want 503 %s", cache, rec.Code, rec.Header().Get("X-Cache"), cache)
		}
	}
	// The batch route maps its errors the same way.
	for _, tt := range tests {
		h := defaultHarness(t)
		h.fake.err = tt.err
		rec := h.do("GET", "/v1/courses?ids=1,2")
		if rec.Code != tt.status {
			t.Errorf("batch %s: %d, want %d", tt.name, rec.Code, tt.status)
		}
		if code, _ := errorJSON(t, rec); code != tt.code {
			t.Errorf("batch %s: code %q", tt.name, code)
		}
		if strings.Contains(rec.Body.String(), "app_secret_user") {
			t.Errorf("batch %s leaks the error: %s", tt.name, rec.Body)
		}
	}
}

// TestClientGone: a client that hung up gets no error body and no 5xx count against the sidecar.
func TestClientGone(t *testing.T) {
	h := defaultHarness(t)
	ctx, cancel := context.WithCancel(context.Background())
	h.fake.hook = func(context.Context) error { cancel(); return context.Canceled }
	req := httptest.NewRequest("GET", "/v1/courses/1", nil).WithContext(ctx)
	rec := httptest.NewRecorder()
	h.h.ServeHTTP(rec, req)
	if rec.Code != 499 || rec.Body.Len() != 0 {
		t.Errorf("client gone: %d %q, want 499 and no body", rec.Code, rec.Body)
	}
	// A canceled error while the client is still there is a real failure.
	h.fake.hook = func(context.Context) error { return context.Canceled }
	if rec := h.do("GET", "/v1/courses/1"); rec.Code != 500 {
		t.Errorf("canceled with the client present: %d, want 500", rec.Code)
	}
}

func TestPanickingReader(t *testing.T) {
	h := defaultHarness(t)
	var mu sync.Mutex
	panics := true
	h.fake.hook = func(context.Context) error {
		mu.Lock()
		defer mu.Unlock()
		if panics {
			panic("boom: secret internals")
		}
		return nil
	}
	ts := httptest.NewServer(h.h)
	defer ts.Close()
	get := func(path string) (*http.Response, string) {
		t.Helper()
		resp, err := http.Get(ts.URL + path)
		if err != nil {
			t.Fatalf("GET %s: %v (the server must survive a panic)", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}
	for _, path := range []string{"/v1/courses/1", "/v1/courses?ids=1"} {
		resp, body := get(path)
		if resp.StatusCode != 500 || !strings.Contains(body, `"code":"internal"`) || strings.Contains(body, "boom") {
			t.Errorf("panic on %s: %d %s", path, resp.StatusCode, body)
		}
		if resp.Header.Get("Content-Type") != "application/json" || !hexID.MatchString(resp.Header.Get("X-Request-Id")) {
			t.Errorf("panic headers %v", resp.Header)
		}
	}
	mu.Lock()
	panics = false
	mu.Unlock()
	if resp, body := get("/v1/courses/1"); resp.StatusCode != 200 || body != string(testBody) {
		t.Errorf("after a panic: %d %s", resp.StatusCode, body)
	}
	if !strings.Contains(h.log.String(), "handler panicked") {
		t.Errorf("panic not logged: %s", h.log)
	}
	if n := countRequests(t, h.reg, "GET /v1/courses/{id}", "500"); n != 1 {
		t.Errorf("%v panics counted as 500, want 1", n)
	}
}

// TestConcurrent drives every route at once (run with -race).
func TestConcurrent(t *testing.T) {
	h := defaultHarness(t)
	ts := httptest.NewServer(h.h)
	defer ts.Close()
	var wg sync.WaitGroup
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			path := allRoutes[i%len(allRoutes)]
			if i%3 == 0 {
				path = "/v1/courses/x"
			}
			resp, err := http.Get(ts.URL + path)
			if err != nil {
				t.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}()
	}
	wg.Wait()
	if n := len(h.fake.Calls()); n == 0 {
		t.Error("no calls reached the Reader")
	}
}

// countRequests sums cachecar_http_requests_total over cache results for route and code.
func countRequests(t *testing.T, reg *prometheus.Registry, route, code string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != "cachecar_http_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["route"] == route && l["code"] == code {
				n += m.GetCounter().GetValue()
			}
		}
	}
	return n
}

func TestMetrics(t *testing.T) {
	h := defaultHarness(t)
	paths := []string{
		"/v1/tenants/12345", "/v1/tenants/12345/stats", "/v1/tenants/12345/dispatches?limit=12&status=active&after=12345",
		"/v1/courses/12345", "/v1/courses?ids=12345,123456", "/v1/dispatches/12345",
		"/v1/courses/x12345", "/v1/nope/12345", "/v1//courses/12345", "/v1/courses/12345?id=12345",
	}
	for _, p := range paths {
		h.do("GET", p)
	}
	h.do("POST", "/v1/courses/12345")
	h.do("HEAD", "/v1/courses/12345")
	h.do("GET", "/v1/courses/../courses/12345")
	h.do("GET", "*")

	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	allowedRoutes := map[string]bool{"unmatched": true, "method_not_allowed": true}
	for _, r := range []string{"/v1/tenants/{id}", "/v1/tenants/{id}/stats", "/v1/tenants/{id}/dispatches", "/v1/courses/{id}", "/v1/courses", "/v1/dispatches/{id}"} {
		allowedRoutes["GET "+r] = true
	}
	found := map[string]bool{}
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), "cachecar_") {
			t.Errorf("metric %s lacks the cachecar_ prefix", mf.GetName())
		}
		found[mf.GetName()] = true
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				v := lp.GetValue()
				if strings.Contains(v, "12345") || strings.Contains(v, "active") {
					t.Errorf("%s label %s=%q holds a request value", mf.GetName(), lp.GetName(), v)
				}
				if lp.GetName() == "route" && !allowedRoutes[v] {
					t.Errorf("%s route label %q is not a route template", mf.GetName(), v)
				}
			}
		}
	}
	for _, name := range []string{"cachecar_http_requests_total", "cachecar_http_request_duration_seconds"} {
		if !found[name] {
			t.Errorf("metric %s missing; have %v", name, found)
		}
	}
	for _, tt := range []struct {
		route, code string
		want        float64
	}{
		{"GET /v1/courses/{id}", "200", 2}, // GET and HEAD
		{"GET /v1/courses/{id}", "400", 2}, // bad id, unknown parameter
		{"GET /v1/courses", "200", 1},
		{"GET /v1/tenants/{id}/dispatches", "200", 1},
		{"unmatched", "404", 3}, // an unknown path, an empty segment, a dot-dot segment
		{"unmatched", "400", 1}, // *
		{"method_not_allowed", "405", 1},
	} {
		if got := countRequests(t, h.reg, tt.route, tt.code); got != tt.want {
			t.Errorf("requests{route=%q,code=%q} = %v, want %v", tt.route, tt.code, got, tt.want)
		}
	}
}

func TestAccessLog(t *testing.T) {
	h := defaultHarness(t)
	rec := h.do("GET", "/v1/courses/987654", "X-Request-Id", "rid-1")
	if rec.Code != 200 {
		t.Fatalf("status %d", rec.Code)
	}
	line := strings.TrimSpace(h.log.String())
	if strings.Count(line, "\n") != 0 {
		t.Fatalf("want one log line, got:\n%s", line)
	}
	var entry map[string]any
	if err := json.Unmarshal([]byte(line), &entry); err != nil {
		t.Fatalf("log line is not JSON: %v\n%s", err, line)
	}
	for field, want := range map[string]any{"request_id": "rid-1", "route": "GET /v1/courses/{id}", "status": 200.0, "cache": "HIT", "method": "GET"} {
		if entry[field] != want {
			t.Errorf("log %s = %#v, want %#v", field, entry[field], want)
		}
	}
	if d, ok := entry["duration_ms"].(float64); !ok || d < 0 {
		t.Errorf("duration_ms = %#v", entry["duration_ms"])
	}

	// Values never reach the log: not in paths, queries, or on errors.
	h.log.Reset()
	h.do("GET", "/v1/courses?ids=987654,5")
	h.do("GET", "/v1/tenants/987654/dispatches?status=sekrit_status&after=987654")
	h.do("GET", "/v1/courses/987654x")
	h.do("GET", "/v1/nope/987654")
	h.do("GET", "/v1/courses/987654", "X-Request-Id", "has space 987654")
	h.fake.err = fmt.Errorf("load: %w", cachepolicy.ErrUnavailable)
	h.do("GET", "/v1/dispatches/987654")
	h.fake.err = nil
	out := h.log.String()
	for _, v := range []string{"987654", "sekrit", "has space"} {
		if strings.Contains(out, v) {
			t.Errorf("log contains %q:\n%s", v, out)
		}
	}
	var requests int
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		var e map[string]any
		if err := json.Unmarshal([]byte(l), &e); err != nil {
			t.Fatalf("log line is not JSON: %s", l)
		}
		if _, ok := e["request_id"]; !ok {
			t.Errorf("log line lacks request_id: %s", l)
		}
		if e["message"] == "request" {
			requests++
			for _, f := range []string{"request_id", "route", "status", "duration_ms", "cache"} {
				if _, ok := e[f]; !ok {
					t.Errorf("access line lacks %s: %s", f, l)
				}
			}
		}
	}
	if requests != 6 {
		t.Errorf("%d access lines for 6 requests:\n%s", requests, out)
	}
}

func TestAccessSample(t *testing.T) {
	// Sample 0 (the zero Options): no access lines, except for 5xx, which are always logged.
	h := newHarness(t, Options{})
	for range 20 {
		h.do("GET", "/v1/courses/1")
		h.do("GET", "/v1/courses/x")
	}
	if out := h.log.String(); strings.Contains(out, `"message":"request"`) {
		t.Errorf("sample 0 logged requests:\n%s", out)
	}
	h.fake.err = errors.New("boom")
	h.do("GET", "/v1/courses/1")
	if n := strings.Count(h.log.String(), `"message":"request"`); n != 1 {
		t.Errorf("a 500 at sample 0 logged %d access lines, want 1", n)
	}

	// Sample 0.5: some, not all.
	h = newHarness(t, Options{AccessSample: 0.5})
	for range 400 {
		h.do("GET", "/v1/courses/1")
	}
	n := strings.Count(h.log.String(), `"message":"request"`)
	if n < 100 || n > 300 {
		t.Errorf("sample 0.5 logged %d of 400", n)
	}
}

func TestStaleAndNegativeHeaders(t *testing.T) {
	body := []byte(`{"id":1}`)
	tests := []struct {
		name        string
		res         cachepolicy.Result
		err         error
		status      int
		xcache      string
		warning     string
		cacheStatus string
		retryAfter  string
	}{
		{"stale while revalidate", cachepolicy.Result{Body: body, Cache: cachepolicy.Stale, Age: 70 * time.Second, StaleReason: cachepolicy.StaleWhileRevalidate},
			nil, 200, "STALE", `110 cachecar "Response is Stale"`, "cachecar; hit; detail=stale-while-revalidate", ""},
		{"stale if error", cachepolicy.Result{Body: body, Cache: cachepolicy.Stale, Age: 700 * time.Second, StaleReason: cachepolicy.StaleIfError},
			nil, 200, "STALE", `111 cachecar "Revalidation Failed"`, "cachecar; fwd=stale; detail=stale-if-error", ""},
		{"fresh hit", cachepolicy.Result{Body: body, Cache: cachepolicy.Hit}, nil, 200, "HIT", "", "", ""},
		{"cached not found", cachepolicy.Result{Cache: cachepolicy.Hit}, cachepolicy.ErrNotFound, 404, "HIT", "", "", ""},
		{"bulkhead full", cachepolicy.Result{}, cachepolicy.ErrOverloaded, 503, "", "", "", "1"},
	}
	for _, tt := range tests {
		for _, path := range []string{"/v1/tenants/1", "/v1/tenants/1/stats", "/v1/tenants/1/dispatches"} {
			t.Run(tt.name+" "+path, func(t *testing.T) {
				h := defaultHarness(t)
				if tt.err != nil {
					h.fake.err, h.fake.errResult = tt.err, tt.res
				} else {
					h.fake.result = tt.res
				}
				rec := h.do("GET", path)
				if rec.Code != tt.status {
					t.Fatalf("status %d, want %d (%s)", rec.Code, tt.status, rec.Body)
				}
				hd := rec.Header()
				if hd.Get("X-Cache") != tt.xcache || hd.Get("Warning") != tt.warning || hd.Get("Cache-Status") != tt.cacheStatus || hd.Get("Retry-After") != tt.retryAfter {
					t.Errorf("headers %v", hd)
				}
				if tt.status == 200 && hd.Get("Age") != strconv.Itoa(int(tt.res.Age/time.Second)) {
					t.Errorf("Age %q, want %d", hd.Get("Age"), int(tt.res.Age/time.Second))
				}
			})
		}
	}
}
