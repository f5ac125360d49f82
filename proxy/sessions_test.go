package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/cachecar/cachecar/sessions"
)

// sessionCall is one call the fake session store received.
type sessionCall struct {
	Method string // Parse, Get, Put, Delete or Touch
	SID    string
	Raw    string // the body Parse got, or the Session's Raw
}

// fakeSessions records every call and answers with canned results: it stands in for
// *sessions.Store so that the tests can prove bad input never reaches it, and can make it fail
// in every way the real one can.
type fakeSessions struct {
	mu    sync.Mutex
	calls []sessionCall
	sess  []sessions.Session // what Put and Touch received

	body []byte // Get's answer
	from string // the store every method reports
	err  error  // every method but Parse fails with it
}

// Parse checks what sessions.Store.Parse checks first: a JSON object, else bad_session.
func (f *fakeSessions) Parse(body []byte) (sessions.Session, error) {
	f.record(sessionCall{Method: "Parse", Raw: string(body)}, nil)
	trimmed := bytes.TrimSpace(body)
	if len(trimmed) == 0 || trimmed[0] != '{' || !json.Valid(trimmed) {
		return sessions.Session{}, &sessions.InputError{Code: "bad_session", Message: "the body must be a JSON object"}
	}
	return sessions.Session{Raw: body}, nil
}

func (f *fakeSessions) Get(ctx context.Context, sid string) ([]byte, string, error) {
	f.record(sessionCall{Method: "Get", SID: sid}, nil)
	if f.err != nil {
		return nil, f.from, f.err
	}
	return f.body, f.from, nil
}

func (f *fakeSessions) Put(ctx context.Context, sid string, sess sessions.Session) (string, error) {
	f.record(sessionCall{Method: "Put", SID: sid, Raw: string(sess.Raw)}, &sess)
	return f.from, f.err
}

func (f *fakeSessions) Delete(ctx context.Context, sid string) (string, error) {
	f.record(sessionCall{Method: "Delete", SID: sid}, nil)
	return f.from, f.err
}

func (f *fakeSessions) Touch(ctx context.Context, sid string, sess sessions.Session) (string, error) {
	f.record(sessionCall{Method: "Touch", SID: sid, Raw: string(sess.Raw)}, &sess)
	return f.from, f.err
}

func (f *fakeSessions) record(c sessionCall, sess *sessions.Session) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, c)
	if sess != nil {
		f.sess = append(f.sess, *sess)
	}
}

func (f *fakeSessions) Calls() []sessionCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]sessionCall(nil), f.calls...)
}

func (f *fakeSessions) Sessions() []sessions.Session {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]sessions.Session(nil), f.sess...)
}

func (f *fakeSessions) Reset() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls, f.sess = nil, nil
}

// sessionMaxBody is the harness's body limit.
const sessionMaxBody = 64

// sessionHarness is the whole handler, with the session routes over a fakeSessions.
type sessionHarness struct {
	*harness
	store *fakeSessions
}

func newSessionHarness(t *testing.T) *sessionHarness {
	t.Helper()
	store := &fakeSessions{body: testSession, from: sessions.FromValkey}
	h := newHarness(t, Options{AccessSample: 1, Sessions: &Sessions{Store: store, MaxBody: sessionMaxBody}})
	return &sessionHarness{harness: h, store: store}
}

// send serves one request with body (nil: none). target is sent as the raw request-target.
func (h *sessionHarness) send(method, target string, body []byte) *httptest.ResponseRecorder {
	var req *http.Request
	if body == nil {
		req = httptest.NewRequest(method, target, nil)
	} else {
		req = httptest.NewRequest(method, target, bytes.NewReader(body))
	}
	rec := httptest.NewRecorder()
	h.h.ServeHTTP(rec, req)
	return rec
}

func (h *sessionHarness) wantCalls(t *testing.T, what string, want ...sessionCall) {
	t.Helper()
	if got := h.store.Calls(); !reflect.DeepEqual(got, want) {
		t.Errorf("%s: store calls\n got %+v\nwant %+v", what, got, want)
	}
}

// testSession is a stored session with what a re-encoding would change: spacing, key order,
// escapes, a number JSON.stringify would rewrite. It is under sessionMaxBody.
var testSession = []byte(`{"cookie":{},  "z":1,"a":"\u00e9\/", "n":1.0}`)

const testSID = "Wm1dYXo2dmjT-Q_Ri8b3sHhVZp4cTF4b"

// sessionRequests are the four session routes, for sid, with a valid body where one is read.
func sessionRequests(sid string) []struct {
	method, target string
	body           []byte
} {
	return []struct {
		method, target string
		body           []byte
	}{
		{"GET", "/v1/sessions/" + sid, nil},
		{"PUT", "/v1/sessions/" + sid, []byte(`{"cookie":{}}`)},
		{"DELETE", "/v1/sessions/" + sid, nil},
		{"POST", "/v1/sessions/" + sid + "/touch", []byte(`{"cookie":{}}`)},
	}
}

func TestSessionBadSIDsNeverReachStore(t *testing.T) {
	h := newSessionHarness(t)
	bad := []string{
		strings.Repeat("a", 257),
		"a%20b", "%20", "a+b", "%2F", "a%2Fb", "%2Fetc%2Fpasswd", "%C3%A9", "caf%C3%A9", "%EF%BD%81", // ａ
		"%00", "a%00", "a%0A", "%25", "*", "%2A", ":", "sess:abc", "a;b", "a,b", "%7Bsid%7D", "%3Cscript%3E",
	}
	for _, s := range bad {
		for _, r := range sessionRequests(s) {
			h.store.Reset()
			rec := h.send(r.method, r.target, r.body)
			status, want := http.StatusBadRequest, "bad_sid"
			if s == "%2F" && strings.HasSuffix(r.target, "/touch") {
				// The mux reads a lone escaped slash as an empty segment: no route has
				// "/v1/sessions//touch", so it is the catch-all 404, still before any store call.
				status, want = http.StatusNotFound, "no_route"
			}
			if rec.Code != status {
				t.Errorf("%s %s: status %d, want %d (%s)", r.method, r.target, rec.Code, status, rec.Body)
				continue
			}
			code, msg := errorJSON(t, rec)
			if code != want {
				t.Errorf("%s %s: code %q, want %s", r.method, r.target, code, want)
			}
			if strings.Contains(msg, "script") || strings.Contains(msg, "aaaaaaaa") || strings.Contains(msg, "passwd") {
				t.Errorf("%s %s: message echoes the sid: %q", r.method, r.target, msg)
			}
			h.wantCalls(t, r.method+" "+r.target)
		}
	}
	// No sid at all, whatever the method, with or without the slash (never ServeMux's redirect
	// from /v1/sessions to /v1/sessions/), or an empty sid before /touch (never the redirect
	// of an unclean path).
	for _, target := range []string{"/v1/sessions/", "/v1/sessions", "/v1/sessions//touch", "/v1/sessions//"} {
		for _, method := range []string{"GET", "HEAD", "PUT", "DELETE", "POST", "PATCH"} {
			h.store.Reset()
			rec := h.send(method, target, []byte(`{}`))
			if rec.Code != http.StatusBadRequest {
				t.Errorf("%s %s: status %d, want 400", method, target, rec.Code)
				continue
			}
			if method != "HEAD" {
				if code, _ := errorJSON(t, rec); code != "bad_sid" {
					t.Errorf("%s %s: code %q, want bad_sid", method, target, code)
				}
			}
			h.wantCalls(t, method+" "+target)
		}
	}
}

func TestSessionGoodSIDs(t *testing.T) {
	h := newSessionHarness(t)
	for _, s := range []string{testSID, "a", "a.b-c_d", "A_Z-09", strings.Repeat("x", 256)} {
		h.store.Reset()
		rec := h.send("GET", "/v1/sessions/"+s, nil)
		if rec.Code != http.StatusOK {
			t.Errorf("GET sid %q: status %d (%s)", s, rec.Code, rec.Body)
		}
		h.wantCalls(t, "GET "+s, sessionCall{Method: "Get", SID: s})
	}
}

func TestSessionGet(t *testing.T) {
	h := newSessionHarness(t)
	h.store.from = sessions.FromPostgres
	rec := h.send("GET", "/v1/sessions/"+testSID, nil)
	if rec.Code != http.StatusOK {
		t.Fatalf("status %d (%s)", rec.Code, rec.Body)
	}
	if !bytes.Equal(rec.Body.Bytes(), testSession) {
		t.Errorf("body changed on the way:\n got %s\nwant %s", rec.Body.Bytes(), testSession)
	}
	for name, want := range map[string]string{
		"Content-Type":    "application/json",
		"Cache-Control":   "no-store",
		"X-Session-Store": "postgres",
		"Content-Length":  strconv.Itoa(len(testSession)),
	} {
		if got := rec.Header().Get(name); got != want {
			t.Errorf("%s = %q, want %q", name, got, want)
		}
	}
	if etag := rec.Header().Get("ETag"); etag != "" {
		t.Errorf("a session carries an ETag %q", etag)
	}
	h.wantCalls(t, "GET", sessionCall{Method: "Get", SID: testSID})

	// HEAD: the same headers, no body.
	h.store.Reset()
	h.store.from = sessions.FromValkey
	rec = h.send("HEAD", "/v1/sessions/"+testSID, nil)
	if rec.Code != http.StatusOK || rec.Body.Len() != 0 {
		t.Errorf("HEAD: status %d, %d body bytes", rec.Code, rec.Body.Len())
	}
	if got := rec.Header().Get("X-Session-Store"); got != "valkey" {
		t.Errorf("HEAD: X-Session-Store %q", got)
	}
	if got := rec.Header().Get("Content-Length"); got != strconv.Itoa(len(testSession)) {
		t.Errorf("HEAD: Content-Length %q", got)
	}
	h.wantCalls(t, "HEAD", sessionCall{Method: "Get", SID: testSID})

	// An empty query string is no query.
	h.store.Reset()
	if rec := h.send("GET", "/v1/sessions/"+testSID+"?", nil); rec.Code != http.StatusOK {
		t.Errorf("GET with a lone '?': status %d", rec.Code)
	}
}

func TestSessionPut(t *testing.T) {
	exact := []byte(`{"cookie":{"expires":null},"p":"` + strings.Repeat("x", sessionMaxBody-34) + `"}`)
	if len(exact) != sessionMaxBody {
		t.Fatalf("exact is %d bytes", len(exact))
	}
	for _, body := range [][]byte{testSession, []byte(" \n{ \"b\":1,\"a\" : 2 }\n"), exact} {
		h := newSessionHarness(t)
		rec := h.send("PUT", "/v1/sessions/"+testSID, body)
		if rec.Code != http.StatusNoContent {
			t.Errorf("PUT %s: status %d, want 204 (%s)", body, rec.Code, rec.Body)
			continue
		}
		if rec.Body.Len() != 0 {
			t.Errorf("PUT: 204 with a body %q", rec.Body)
		}
		if got := rec.Header().Get("X-Session-Store"); got != "valkey" {
			t.Errorf("PUT: X-Session-Store %q", got)
		}
		h.wantCalls(t, "PUT", sessionCall{Method: "Parse", Raw: string(body)}, sessionCall{Method: "Put", SID: testSID, Raw: string(body)})
		if s := h.store.Sessions(); len(s) != 1 || !bytes.Equal(s[0].Raw, body) {
			t.Errorf("Put got %+v, want Raw %q byte for byte", s, body)
		}
	}
}

func TestSessionPutNotAnObject(t *testing.T) {
	h := newSessionHarness(t)
	for _, body := range []string{"", " ", "not json", "[]", `"s"`, "42", "null", `{"a":1`, `{"a":1}x`} {
		h.store.Reset()
		rec := h.send("PUT", "/v1/sessions/"+testSID, []byte(body))
		if rec.Code != http.StatusBadRequest {
			t.Errorf("PUT %q: status %d, want 400", body, rec.Code)
			continue
		}
		if code, _ := errorJSON(t, rec); code != "bad_session" {
			t.Errorf("PUT %q: code %q, want bad_session", body, code)
		}
		h.wantCalls(t, fmt.Sprintf("PUT %q", body), sessionCall{Method: "Parse", Raw: body})
	}
}

func TestSessionBodyTooLarge(t *testing.T) {
	h := newSessionHarness(t)
	over := []byte(`{"p":"` + strings.Repeat("x", sessionMaxBody+1-8) + `"}`)
	if len(over) != sessionMaxBody+1 {
		t.Fatalf("over is %d bytes", len(over))
	}
	huge := []byte(`{"p":"` + strings.Repeat("x", 1<<20) + `"}`)
	for _, r := range []struct {
		method, target string
		body           []byte
	}{
		{"PUT", "/v1/sessions/" + testSID, over},
		{"PUT", "/v1/sessions/" + testSID, huge},
		{"PUT", "/v1/sessions/" + testSID, []byte(strings.Repeat("x", sessionMaxBody+1))},
		{"POST", "/v1/sessions/" + testSID + "/touch", over},
	} {
		h.store.Reset()
		rec := h.send(r.method, r.target, r.body)
		if rec.Code != http.StatusRequestEntityTooLarge {
			t.Errorf("%s %d bytes: status %d, want 413", r.method, len(r.body), rec.Code)
			continue
		}
		code, msg := errorJSON(t, rec)
		if code != "too_large" {
			t.Errorf("%s %d bytes: code %q", r.method, len(r.body), code)
		}
		if !strings.Contains(msg, strconv.Itoa(sessionMaxBody)) {
			t.Errorf("message %q does not state the limit", msg)
		}
		h.wantCalls(t, fmt.Sprintf("%s %d bytes", r.method, len(r.body)))
	}
}

func TestSessionDelete(t *testing.T) {
	h := newSessionHarness(t)
	h.store.from = sessions.FromPostgres
	// Twice: destroying an absent session is fine (the store returns nil either way).
	for range 2 {
		rec := h.send("DELETE", "/v1/sessions/"+testSID, nil)
		if rec.Code != http.StatusNoContent || rec.Body.Len() != 0 {
			t.Errorf("DELETE: status %d, body %q; want 204 and none", rec.Code, rec.Body)
		}
		if got := rec.Header().Get("X-Session-Store"); got != "postgres" {
			t.Errorf("DELETE: X-Session-Store %q", got)
		}
	}
	h.wantCalls(t, "DELETE twice", sessionCall{Method: "Delete", SID: testSID}, sessionCall{Method: "Delete", SID: testSID})
}

func TestSessionTouch(t *testing.T) {
	h := newSessionHarness(t)
	target := "/v1/sessions/" + testSID + "/touch"

	// No body: the store's TTL applies; nothing is parsed.
	rec := h.send("POST", target, nil)
	if rec.Code != http.StatusNoContent || rec.Body.Len() != 0 {
		t.Errorf("touch, no body: status %d, body %q", rec.Code, rec.Body)
	}
	h.wantCalls(t, "touch, no body", sessionCall{Method: "Touch", SID: testSID})
	if s := h.store.Sessions(); len(s) != 1 || len(s[0].Raw) != 0 || !s[0].Expires.IsZero() {
		t.Errorf("touch, no body: Touch got %+v, want the zero Session", s)
	}

	h.store.Reset()
	body := []byte(`{"cookie":{"expires":null}}`)
	rec = h.send("POST", target, body)
	if rec.Code != http.StatusNoContent {
		t.Errorf("touch with a body: status %d", rec.Code)
	}
	h.wantCalls(t, "touch with a body", sessionCall{Method: "Parse", Raw: string(body)}, sessionCall{Method: "Touch", SID: testSID, Raw: string(body)})

	h.store.Reset()
	rec = h.send("POST", target, []byte("[1]"))
	if rec.Code != http.StatusBadRequest {
		t.Errorf("touch with an array: status %d", rec.Code)
	} else if code, _ := errorJSON(t, rec); code != "bad_session" {
		t.Errorf("touch with an array: code %q", code)
	}
	h.wantCalls(t, "touch with an array", sessionCall{Method: "Parse", Raw: "[1]"})

	h.store.Reset()
	h.store.err = fmt.Errorf("touch: %w", sessions.ErrNotFound)
	rec = h.send("POST", target, nil)
	if rec.Code != http.StatusNotFound {
		t.Errorf("touch of an absent session: status %d, want 404", rec.Code)
	} else if code, _ := errorJSON(t, rec); code != "not_found" {
		t.Errorf("touch of an absent session: code %q", code)
	}
}

func TestSessionErrors(t *testing.T) {
	const secret = "dial tcp 10.1.2.3:5432: password authentication failed for user app_secret_user"
	tests := []struct {
		name   string
		err    error
		status int
		code   string
	}{
		{"not found", sessions.ErrNotFound, 404, "not_found"},
		{"not found wrapped", fmt.Errorf("get: %w", sessions.ErrNotFound), 404, "not_found"},
		{"unavailable", fmt.Errorf("%w: %s", sessions.ErrUnavailable, secret), 503, "sessions_unavailable"},
		{"plain error", errors.New(secret), 500, "internal"},
	}
	for _, tt := range tests {
		for _, r := range sessionRequests(testSID) {
			if tt.status == 404 && (r.method == "DELETE" || r.method == "PUT") {
				continue // the store never says not found to a write or a destroy
			}
			t.Run(tt.name+" "+r.method+" "+r.target, func(t *testing.T) {
				h := newSessionHarness(t)
				h.store.err = tt.err
				h.store.from = sessions.FromPostgres
				rec := h.send(r.method, r.target, r.body)
				if rec.Code != tt.status {
					t.Fatalf("status %d, want %d (%s)", rec.Code, tt.status, rec.Body)
				}
				code, msg := errorJSON(t, rec)
				if code != tt.code {
					t.Errorf("code %q, want %q", code, tt.code)
				}
				if strings.Contains(msg, "10.1.2.3") || strings.Contains(msg, "app_secret_user") {
					t.Errorf("message leaks the store's error: %q", msg)
				}
				if got := rec.Header().Get("X-Session-Store"); got != "postgres" {
					t.Errorf("X-Session-Store %q, want the store that answered", got)
				}
				retry := rec.Header().Get("Retry-After")
				if tt.status == 503 && retry != "1" {
					t.Errorf("503 without Retry-After: 1 (got %q)", retry)
				}
				if tt.status != 503 && retry != "" {
					t.Errorf("%d with Retry-After %q", rec.Code, retry)
				}
				if tt.status >= 500 && !strings.Contains(h.log.String(), "app_secret_user") {
					t.Errorf("a %d left no trace of its cause in the log:\n%s", rec.Code, h.log)
				}
			})
		}
	}
}

func TestSessionClientGone(t *testing.T) {
	h := newSessionHarness(t)
	h.store.err = context.Canceled
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	req := httptest.NewRequest("GET", "/v1/sessions/"+testSID, nil).WithContext(ctx)
	rec := httptest.NewRecorder()
	h.h.ServeHTTP(rec, req)
	if rec.Code != 499 {
		t.Errorf("status %d, want 499", rec.Code)
	}
}

func TestSessionWrongMethods(t *testing.T) {
	h := newSessionHarness(t)
	for _, tt := range []struct {
		target, allow string
		methods       []string
	}{
		{"/v1/sessions/" + testSID, "GET, HEAD, PUT, DELETE", []string{"POST", "PATCH", "OPTIONS", "TRACE", "PROPFIND"}},
		{"/v1/sessions/" + testSID + "/touch", "POST", []string{"GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"}},
	} {
		for _, method := range tt.methods {
			h.store.Reset()
			rec := h.send(method, tt.target, []byte(`{}`))
			if rec.Code != http.StatusMethodNotAllowed {
				t.Errorf("%s %s: status %d, want 405", method, tt.target, rec.Code)
				continue
			}
			if allow := rec.Header().Get("Allow"); allow != tt.allow {
				t.Errorf("%s %s: Allow %q, want %q", method, tt.target, allow, tt.allow)
			}
			if method != "HEAD" {
				if code, _ := errorJSON(t, rec); code != "method_not_allowed" {
					t.Errorf("%s %s: code %q", method, tt.target, code)
				}
			}
			h.wantCalls(t, method+" "+tt.target)
		}
	}
}

func TestSessionQueryRejected(t *testing.T) {
	h := newSessionHarness(t)
	for _, q := range []string{"x=1", "sid=abc", "%zz", "a=%zz", "a=1;b=2", "a=1&a=2", "=1", "ttl=60"} {
		for _, r := range sessionRequests(testSID) {
			target := r.target + "?" + q
			h.store.Reset()
			rec := h.send(r.method, target, r.body)
			if rec.Code != http.StatusBadRequest {
				t.Errorf("%s %s: status %d, want 400", r.method, target, rec.Code)
				continue
			}
			if code, _ := errorJSON(t, rec); code != "bad_query" {
				t.Errorf("%s %s: code %q, want bad_query", r.method, target, code)
			}
			h.wantCalls(t, r.method+" "+target)
		}
	}
}

// TestSessionContentsNeverLogged: neither a session's body nor its id (a bearer credential)
// reaches the log, on success or on any error.
func TestSessionContentsNeverLogged(t *testing.T) {
	const (
		marker    = "s3cr3t-sess-value"
		secretSID = "SIDs3cr3tS1D"
	)
	body := []byte(`{"cookie":{},"user":"` + marker + `"}`)
	h := newSessionHarness(t)
	h.store.body = body
	do := func(method, target string, body []byte) {
		t.Helper()
		h.store.Reset()
		if rec := h.send(method, target, body); rec.Code == 0 {
			t.Fatalf("%s %s: no answer", method, target)
		}
	}
	run := func() {
		do("GET", "/v1/sessions/"+secretSID, nil)
		do("PUT", "/v1/sessions/"+secretSID, body)
		do("POST", "/v1/sessions/"+secretSID+"/touch", body)
		do("DELETE", "/v1/sessions/"+secretSID, nil)
		do("PUT", "/v1/sessions/"+secretSID, []byte(`["`+marker+`"]`))                              // 400
		do("PUT", "/v1/sessions/"+secretSID, []byte(`{"u":"`+marker+strings.Repeat("x", 100)+`"}`)) // 413
		do("PUT", "/v1/sessions/"+secretSID+"?"+marker+"=1", body)                                  // bad query
		do("PUT", "/v1/sessions/"+secretSID+"%20"+marker, body)                                     // bad sid
		do("PATCH", "/v1/sessions/"+secretSID, body)                                                // 405
	}
	run()
	h.store.err = fmt.Errorf("%w: connection refused", sessions.ErrUnavailable)
	run()
	h.store.err = errors.New("boom")
	run()

	out := h.log.String()
	for _, v := range []string{marker, secretSID} {
		if strings.Contains(out, v) {
			t.Errorf("log contains %q:\n%s", v, out)
		}
	}
	// The log did record these requests, so the check above looked at something.
	for _, want := range []string{`"route":"PUT /v1/sessions/{sid}"`, "session store unavailable", "session request failed", `"status":413`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s:\n%s", want, out)
		}
	}
}
