package sessions

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"
)

// testStore is a Store with only what Parse, ttlSeconds and expireUnix read: no servers.
func testStore() *Store {
	return &Store{opts: Options{MaxBody: 100, TTL: time.Hour}}
}

// roomyStore takes the real express-session shapes, which are over 100 bytes.
func roomyStore() *Store {
	return &Store{opts: Options{MaxBody: 1024, TTL: time.Hour}}
}

// wantInputError fails unless err is an *InputError with code; it returns it.
func wantInputError(t *testing.T, err error, code string) *InputError {
	t.Helper()
	var in *InputError
	if !errors.As(err, &in) {
		t.Fatalf("error %v (%T), want *InputError %s", err, err, code)
	}
	if in.Code != code {
		t.Errorf("Code %q, want %q", in.Code, code)
	}
	if in.Message == "" || in.Error() != in.Message {
		t.Errorf("Message %q, Error() %q: want the same non-empty text", in.Message, in.Error())
	}
	return in
}

func TestCheckSID(t *testing.T) {
	valid := []string{
		"Wm1dYXo2dmjT-Q_Ri8b3sHhVZp4cTF4b", // uid-safe(24), what express-session generates
		"a", "Z", "0", "-", "_", ".", "a.b-c_d", "AZaz09",
		strings.Repeat("a", 256),
	}
	for _, sid := range valid {
		if err := CheckSID(sid); err != nil {
			t.Errorf("CheckSID(%q) = %v, want nil", sid, err)
		}
	}
	invalid := []string{
		"", strings.Repeat("a", 257), strings.Repeat("b", 1000),
		" ", "a b", " a", "a ", "a\tb", "/", "a/b", "../x", "%", "%2F", "a%20b", "*", "a*", ":", "sess:a", "a:b",
		"é", "caf\u00e9", "ａ", "\u2028", "a\x00", "\x00", "abc\n", "\nabc", "abc\r\n", "a+b", "a=b", "a?b", "a#b",
		"a\"b", "a\\b", "{a}", "\xff",
	}
	for _, sid := range invalid {
		t.Run("", func(t *testing.T) {
			err := CheckSID(sid)
			if err == nil {
				t.Fatalf("CheckSID(%q) = nil, want an error", sid)
			}
			in := wantInputError(t, err, "bad_sid")
			if in.TooLarge {
				t.Errorf("CheckSID(%q): TooLarge set", sid)
			}
			if len(sid) > 3 && strings.Contains(in.Message, sid) {
				t.Errorf("CheckSID(%q): message echoes the sid: %q", sid, in.Message)
			}
		})
	}
}

func TestParseValid(t *testing.T) {
	at := func(s string) time.Time {
		t.Helper()
		v, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	tests := []struct {
		name    string
		body    string
		expires time.Time // zero: the store's TTL applies
	}{
		// The three shapes SEMANTICS.md shows express-session writing.
		{"default cookie", `{"cookie":{"originalMaxAge":null,"expires":null,"httpOnly":true,"path":"/"},"views":1}`, time.Time{}},
		{"maxAge cookie", `{"cookie":{"originalMaxAge":3600000,"expires":"2026-11-26T02:09:30.981Z","httpOnly":true,"path":"/"},"views":1}`,
			time.Date(2026, 11, 26, 2, 9, 30, 981_000_000, time.UTC)},
		{"all attrs", `{"cookie":{"originalMaxAge":1000,"partitioned":true,"priority":"high","expires":"2026-11-26T01:09:31.986Z","secure":true,"httpOnly":true,"domain":"example.test","path":"/","sameSite":"lax"},"views":1}`,
			time.Date(2026, 11, 26, 1, 9, 31, 986_000_000, time.UTC)},
		{"no cookie", `{"views":1}`, time.Time{}},
		{"empty object", `{}`, time.Time{}},
		{"cookie null", `{"cookie":null,"v":2}`, time.Time{}},
		{"cookie without expires", `{"cookie":{},"v":2}`, time.Time{}},
		{"expires false", `{"cookie":{"expires":false}}`, time.Time{}},
		{"expires without milliseconds", `{"cookie":{"expires":"2030-01-01T00:00:00Z"}}`, time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)},
		{"expires .000", `{"cookie":{"expires":"2000-01-01T00:00:00.000Z"},"x":1}`, time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)},
		{"expires with offset", `{"cookie":{"expires":"2030-01-01T01:00:00.250+01:00"}}`, time.Date(2030, 1, 1, 0, 0, 0, 250_000_000, time.UTC)},
		{"whitespace and key order", " \n\t{ \"z\" : 1 ,\"cookie\" : { \"path\":\"/\", \"expires\" : \"2026-11-26T02:09:30.981Z\" } , \"a\":[1, 2] }\r\n ",
			at("2026-11-26T02:09:30.981Z")},
		{"escapes left as sent", `{"esc":"\u00e9\/\u2028<>&\u0001\"\\","n":1.0,"big":1e21}`, time.Time{}},
		{"raw utf-8", `{"name":"Zoë <admin> & co"}`, time.Time{}},
		{"duplicate cookie, last wins as in JSON.parse", `{"cookie":"x","cookie":{"expires":"2030-01-01T00:00:00.000Z"}}`,
			time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			body := []byte(tt.body)
			sent := bytes.Clone(body)
			sess, err := roomyStore().Parse(body)
			if err != nil {
				t.Fatalf("Parse(%s): %v", tt.body, err)
			}
			if !bytes.Equal(sess.Raw, sent) {
				t.Errorf("Raw changed:\n got %q\nwant %q", sess.Raw, sent)
			}
			if !bytes.Equal(body, sent) {
				t.Errorf("Parse modified its input: %q", body)
			}
			if !sess.Expires.Equal(tt.expires) || sess.Expires.IsZero() != tt.expires.IsZero() {
				t.Errorf("Expires %v, want %v", sess.Expires, tt.expires)
			}
		})
	}
}

func TestParseInvalid(t *testing.T) {
	tests := []struct {
		name, body, code string
	}{
		{"empty", ``, "bad_session"},
		{"blank", " \n\t ", "bad_session"},
		{"not JSON", `not json`, "bad_session"},
		{"truncated", `{"cookie":{}`, "bad_session"},
		{"trailing garbage", `{"a":1}x`, "bad_session"},
		{"two objects", `{"a":1}{"b":2}`, "bad_session"},
		{"single quotes", `{'a':1}`, "bad_session"},
		{"array", `[]`, "bad_session"},
		{"array of a session", `[{"cookie":{}}]`, "bad_session"},
		{"string", `"{}"`, "bad_session"},
		{"number", `42`, "bad_session"},
		{"null", `null`, "bad_session"},
		{"true", `true`, "bad_session"},
		{"cookie a string", `{"cookie":"x"}`, "bad_cookie"},
		{"cookie a number", `{"cookie":5}`, "bad_cookie"},
		{"cookie an array", `{"cookie":[]}`, "bad_cookie"},
		{"cookie true", `{"cookie":true}`, "bad_cookie"},
		{"expires a number", `{"cookie":{"expires":1795658952000}}`, "bad_cookie"},
		{"expires garbage", `{"cookie":{"expires":"garbage-expires-text"}}`, "bad_cookie"},
		{"expires a date only", `{"cookie":{"expires":"2026-11-26"}}`, "bad_cookie"},
		{"expires toUTCString", `{"cookie":{"expires":"Thu, 26 Nov 2026 02:09:30 GMT"}}`, "bad_cookie"},
		{"expires without zone", `{"cookie":{"expires":"2026-11-26T02:09:30.981"}}`, "bad_cookie"},
		{"expires an object", `{"cookie":{"expires":{}}}`, "bad_cookie"},
		{"expires true", `{"cookie":{"expires":true}}`, "bad_cookie"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sess, err := testStore().Parse([]byte(tt.body))
			if err == nil {
				t.Fatalf("Parse(%s) = %+v, want an error", tt.body, sess)
			}
			in := wantInputError(t, err, tt.code)
			if in.TooLarge {
				t.Error("TooLarge set on a malformed body")
			}
			if sess.Raw != nil || !sess.Expires.IsZero() {
				t.Errorf("Parse returned %+v with its error", sess)
			}
			if strings.Contains(in.Message, "garbage-expires-text") {
				t.Errorf("message echoes the body: %q", in.Message)
			}
		})
	}
}

func TestParseTooLarge(t *testing.T) {
	exact := `{"pad":"` + strings.Repeat("x", 100-len(`{"pad":""}`)) + `"}`
	if sess, err := testStore().Parse([]byte(exact)); err != nil || string(sess.Raw) != exact {
		t.Errorf("Parse of exactly MaxBody bytes = %+v, %v; want it accepted", sess, err)
	}
	for _, body := range []string{
		`{"pad":"` + strings.Repeat("x", 101-len(`{"pad":""}`)) + `"}`, // MaxBody+1, valid JSON
		strings.Repeat("x", 101), // size is checked first
		`{"a":"` + strings.Repeat("y", 1<<16) + `"}`,
	} {
		sess, err := testStore().Parse([]byte(body))
		if err == nil {
			t.Fatalf("Parse of %d bytes = %+v, want too_large", len(body), sess)
		}
		in := wantInputError(t, err, "too_large")
		if !in.TooLarge {
			t.Errorf("%d bytes: TooLarge not set", len(body))
		}
		if !strings.Contains(in.Message, "100") {
			t.Errorf("message %q does not state the limit", in.Message)
		}
	}
}

// TestParseEmptyExpiresUsesTTL: connect-redis and connect-pg-simple test cookie.expires for
// truthiness, so "" (like null and false, which Parse accepts) means "no expires: the TTL
// applies" (SEMANTICS.md, getTTL: "expires missing/null/\"\"").
func TestParseEmptyExpiresUsesTTL(t *testing.T) {
	body := `{"cookie":{"expires":""},"v":1}`
	sess, err := testStore().Parse([]byte(body))
	if err != nil {
		t.Fatalf("Parse(%s): %v; connect-redis and connect-pg-simple treat \"\" as no expires", body, err)
	}
	if !sess.Expires.IsZero() || string(sess.Raw) != body {
		t.Errorf("Parse(%s) = %+v", body, sess)
	}
}

// TestParseRejectsInvalidUTF8: the session goes into a PostgreSQL json column, which refuses
// bytes that are not UTF-8 (SQLSTATE 22021). Parse must answer 400 rather than let Put fail
// on PostgreSQL, where the error becomes ErrUnavailable: a 503 with Retry-After that a client
// would retry for ever.
func TestParseRejectsInvalidUTF8(t *testing.T) {
	for _, body := range []string{"{\"a\":\"\xff\"}", "{\"a\":\"\xc3\"}", "{\"\xed\xa0\x80\":1}"} {
		sess, err := testStore().Parse([]byte(body))
		if err == nil {
			t.Errorf("Parse(%q) = %+v, want bad_session: PostgreSQL rejects it", body, sess)
			continue
		}
		wantInputError(t, err, "bad_session")
	}
}

// fixedNow is the set time of SEMANTICS.md's PostgreSQL observation (2026-11-26 01:09:13.629 UTC,
// Unix 1795655353.629), so that some expected values are the ones connect-pg-simple wrote.
var fixedNow = time.Date(2026, 11, 26, 1, 9, 13, 629_000_000, time.UTC)

// fixedNowWhole is a now with no fraction of a second: nothing to round.
var fixedNowWhole = time.Date(2026, 11, 26, 1, 9, 13, 0, time.UTC)

func TestTTLAndExpire(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		name    string
		now     time.Time
		ttl     time.Duration // the store's TTL
		expires time.Time     // zero: no cookie.expires
		wantTTL int64         // connect-redis: ceil((expires_ms - now_ms)/1000), else the TTL
		wantExp int64         // connect-pg-simple: ceil(expires_ms/1000), else ceil(now_ms/1000 + ttl)
	}{
		// SEMANTICS.md s1: expires 02:09:11.608 was stored with expire 02:09:12.
		{"observed s1", fixedNow, time.Hour, time.Date(2026, 11, 26, 2, 9, 11, 608_000_000, time.UTC), 3598, 1795658952},
		{"an hour and 0.4 s", fixedNow, time.Hour, fixedNow.Add(time.Hour + 400*ms), 3601, 1795658955},
		{"an hour exactly", fixedNow, time.Hour, fixedNow.Add(time.Hour), 3600, 1795658954},
		{"an hour, all on the second", fixedNowWhole, time.Hour, fixedNowWhole.Add(time.Hour), 3600, 1795658953},
		{"1 ms ahead", fixedNow, time.Hour, fixedNow.Add(ms), 1, 1795655354},
		{"999 ms ahead", fixedNow, time.Hour, fixedNow.Add(999 * ms), 1, 1795655355},
		{"1000 ms ahead", fixedNow, time.Hour, fixedNow.Add(1000 * ms), 1, 1795655355},
		{"1001 ms ahead", fixedNow, time.Hour, fixedNow.Add(1001 * ms), 2, 1795655355},
		// ttl <= 0: connect-redis deletes instead of SET; connect-pg-simple writes the past expire.
		{"expires now", fixedNow, time.Hour, fixedNow, 0, 1795655354},
		{"1 ms ago", fixedNow, time.Hour, fixedNow.Add(-ms), 0, 1795655354},
		{"1.5 s ago", fixedNow, time.Hour, fixedNow.Add(-1500 * ms), -1, 1795655353},
		// SEMANTICS.md s4: written with expire 946684800.
		{"year 2000", fixedNow, time.Hour, time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC), -848970553, 946684800},
		// No cookie.expires: the TTL. SEMANTICS.md s3 (ttl 120) was stored with expire 01:11:14.
		{"no expires, observed s3", fixedNow, 120 * time.Second, time.Time{}, 120, 1795655474},
		{"no expires, an hour", fixedNow, time.Hour, time.Time{}, 3600, 1795658954},
		{"no expires, a day", fixedNow, 24 * time.Hour, time.Time{}, 86400, 1795741754},
		{"no expires, on the second", fixedNowWhole, time.Hour, time.Time{}, 3600, 1795658953},
		// Date.now() has no fraction of a millisecond: 0.5 ms past the second is still on it.
		{"no expires, 0.5 ms past the second", fixedNowWhole.Add(500 * time.Microsecond), time.Hour, time.Time{}, 3600, 1795658953},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := &Store{opts: Options{MaxBody: 100, TTL: tt.ttl}}
			sess := Session{Raw: []byte(`{}`), Expires: tt.expires}
			if got := s.ttlSeconds(sess, tt.now); got != tt.wantTTL {
				t.Errorf("ttlSeconds = %d, want %d", got, tt.wantTTL)
			}
			if got := s.expireUnix(sess, tt.now); got != tt.wantExp {
				t.Errorf("expireUnix = %d (%v), want %d (%v)", got, time.Unix(got, 0).UTC(), tt.wantExp, time.Unix(tt.wantExp, 0).UTC())
			}
		})
	}
}

// TestTTLFromParsedCookie runs the whole path: the ISO text express-session writes, parsed, then
// the TTL and expire computed from it.
func TestTTLFromParsedCookie(t *testing.T) {
	s := roomyStore()
	sess, err := s.Parse([]byte(`{"cookie":{"originalMaxAge":3600000,"expires":"2026-11-26T02:09:11.608Z","httpOnly":true,"path":"/"},"views":1}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := s.ttlSeconds(sess, fixedNow); got != 3598 {
		t.Errorf("ttlSeconds = %d, want 3598", got)
	}
	if got := s.expireUnix(sess, fixedNow); got != 1795658952 {
		t.Errorf("expireUnix = %d, want 1795658952", got)
	}
	sess, err = s.Parse([]byte(`{"cookie":{"originalMaxAge":null,"expires":null,"httpOnly":true,"path":"/"},"views":3}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := s.ttlSeconds(sess, fixedNow); got != 3600 {
		t.Errorf("no expires: ttlSeconds = %d, want the TTL, 3600", got)
	}
}

// TestTTLSecondsSubMillisecondNow: connect-redis subtracts Date.now(), a whole number of
// milliseconds (the current millisecond, rounded down). time.Now has nanoseconds, so the
// difference must be taken between whole milliseconds too; truncating the nanosecond
// difference instead makes it one millisecond short whenever now is inside a millisecond.
func TestTTLSecondsSubMillisecondNow(t *testing.T) {
	s := testStore()
	inside := fixedNow.Add(500 * time.Microsecond) // Date.now() at this instant is still fixedNow's millisecond
	tests := []struct {
		expires time.Time
		want    int64
	}{
		{fixedNow.Add(1001 * time.Millisecond), 2}, // 1001 ms for connect-redis: ceil(1.001) = 2
		{fixedNow.Add(time.Millisecond), 1},        // 1 ms: connect-redis SETs with EX 1; 0 would delete
		{fixedNow.Add(time.Hour + time.Millisecond), 3601},
		{fixedNow.Add(2 * time.Second), 2}, // whole seconds are not affected
	}
	for _, tt := range tests {
		if got := s.ttlSeconds(Session{Expires: tt.expires}, inside); got != tt.want {
			t.Errorf("expires %v, now %v: ttlSeconds = %d, want %d (connect-redis with Date.now() = %d)",
				tt.expires.Format(time.RFC3339Nano), inside.Format(time.RFC3339Nano), got, tt.want, inside.UnixMilli())
		}
	}
}

func TestExpireNowUnix(t *testing.T) {
	for _, tt := range []struct {
		now  time.Time
		want int64
	}{
		{fixedNowWhole, 1795655353},
		{fixedNowWhole.Add(time.Millisecond), 1795655354},
		{fixedNowWhole.Add(999 * time.Millisecond), 1795655354},
		{fixedNowWhole.Add(time.Second), 1795655354},
		{fixedNow, 1795655354},
		// Math.ceil(Date.now()/1000): Date.now() drops the fraction of a millisecond first.
		{fixedNowWhole.Add(999 * time.Microsecond), 1795655353},
		{time.Unix(0, 0), 0},
	} {
		if got := nowUnix(tt.now); got != tt.want {
			t.Errorf("nowUnix(%s) = %d, want %d", tt.now.Format(time.RFC3339Nano), got, tt.want)
		}
	}
}
