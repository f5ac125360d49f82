package cachepolicy

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// shippedIDPattern is the id_pattern of every policy in configs/cachecar.yaml.
const shippedIDPattern = "^[1-9][0-9]{0,18}$"

func mustPolicy(t testing.TB, key string, params []string, idPattern string) *Policy {
	t.Helper()
	p, err := NewPolicy("course", key, params, 10*time.Minute, idPattern, "SELECT $1::text", "")
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestParseTemplate(t *testing.T) {
	list := []string{"tenant_id", "status", "after", "limit"}
	tests := []struct {
		key     string
		params  []string
		values  []string
		want    string // rendered, when the template is valid
		wantErr string // substring of the error, when it is not
	}{
		{key: "course:{id}", params: []string{"id"}, values: []string{"5"}, want: "course:5"},
		{key: "{id}", params: []string{"id"}, values: []string{"5"}, want: "5"},
		{key: "{id}:tail", params: []string{"id"}, values: []string{"5"}, want: "5:tail"},
		{key: "a:{id}:b", params: []string{"id"}, values: []string{""}, want: "a::b"},
		{key: "plain", params: nil, values: nil, want: "plain"},
		{key: "", params: nil, values: nil, want: ""},
		{key: "dispatches:list:{tenant_id}:{status}:{after}:{limit}", params: list,
			values: []string{"7", "-", "0", "20"}, want: "dispatches:list:7:-:0:20"},
		{key: "dl:{limit}:{after}:{status}:{tenant_id}", params: list,
			values: []string{"7", "active", "100", "5"}, want: "dl:5:100:active:7"},
		{key: "{tenant_id}{status}{after}{limit}", params: list,
			values: []string{"1", "2", "3", "4"}, want: "1234"},
		{key: "x:{id}", params: []string{"id"}, values: []string{"{id}"}, want: "x:{id}"},

		{key: "course:{id", params: []string{"id"}, wantErr: "unbalanced brace"},
		{key: "course:id}", params: []string{"id"}, wantErr: "unbalanced brace"},
		{key: "course:}{id}", params: []string{"id"}, wantErr: "unbalanced brace"},
		{key: "course:{id}}", params: []string{"id"}, wantErr: "unbalanced brace"},
		{key: "course:{id}{", params: []string{"id"}, wantErr: "unbalanced brace"},
		{key: "}", params: nil, wantErr: "unbalanced brace"},
		{key: "{", params: nil, wantErr: "unbalanced brace"},
		{key: "{{id}}", params: []string{"id"}, wantErr: "unknown placeholder {{id}"},
		{key: "course:{}", params: []string{"id"}, wantErr: "unknown placeholder {}"},
		{key: "course:{foo}", params: []string{"id"}, wantErr: "unknown placeholder {foo}"},
		{key: "course:{ID}", params: []string{"id"}, wantErr: "unknown placeholder {ID}"},
		{key: "course:{ id}", params: []string{"id"}, wantErr: "unknown placeholder { id}"},
		{key: "course:{id}:{tenant_id}", params: []string{"id"}, wantErr: "unknown placeholder {tenant_id}"},
		{key: "course:", params: []string{"id"}, wantErr: "missing placeholder {id}"},
		{key: "plain", params: []string{"id"}, wantErr: "missing placeholder {id}"},
		{key: "dl:{tenant_id}:{status}:{after}", params: list, wantErr: "missing placeholder {limit}"},
		{key: "course:{id}:{id}", params: []string{"id"}, wantErr: "placeholder {id} appears twice"},
		{key: "{id}{id}", params: []string{"id"}, wantErr: "appears twice"},
		{key: "x", params: []string{"id", "id"}, wantErr: "missing placeholder {id}"},
	}
	for _, tt := range tests {
		tmpl, err := ParseTemplate(tt.key, tt.params)
		if tt.wantErr != "" {
			if err == nil {
				t.Errorf("ParseTemplate(%q, %q) succeeded; want error %q", tt.key, tt.params, tt.wantErr)
			} else if !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), strconv.Quote(tt.key)) {
				t.Errorf("ParseTemplate(%q, %q) = %v; want the key and %q", tt.key, tt.params, err, tt.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("ParseTemplate(%q, %q): %v", tt.key, tt.params, err)
			continue
		}
		if got := tmpl.Render(tt.values...); got != tt.want {
			t.Errorf("%q.Render(%q) = %q, want %q", tt.key, tt.values, got, tt.want)
		}
		if tmpl.String() != tt.key {
			t.Errorf("String() = %q, want %q", tmpl.String(), tt.key)
		}
	}
}

// TestTemplateRenderConcurrent: a template is shared by every request, so rendering it from many
// goroutines at once must give each its own key.
func TestTemplateRenderConcurrent(t *testing.T) {
	tmpl, err := ParseTemplate("course:{id}", []string{"id"})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan bool)
	for i := range 8 {
		go func() {
			ok := true
			for j := range 1000 {
				v := strconv.Itoa(i*1000 + j)
				ok = ok && tmpl.Render(v) == "course:"+v
			}
			done <- ok
		}()
	}
	for range 8 {
		if !<-done {
			t.Error("a concurrent render went wrong")
		}
	}
}

func TestNewPolicyChecksTemplatePatternAndTTL(t *testing.T) {
	p, err := NewPolicy("course", "course:{id}", []string{"id"}, 10*time.Minute, shippedIDPattern, "SELECT 1", "SELECT 2")
	if err != nil {
		t.Fatal(err)
	}
	if p.Name != "course" || p.TTL != 10*time.Minute || p.SQL != "SELECT 1" || p.BatchSQL != "SELECT 2" ||
		p.Key.String() != "course:{id}" || p.ID.String() != shippedIDPattern {
		t.Errorf("policy %+v", p)
	}
	for _, tt := range []struct {
		name, key, pattern string
		ttl                time.Duration
		want               string
	}{
		{"bad key", "course:{id", shippedIDPattern, time.Minute, "policy course: key"},
		{"bad pattern", "course:{id}", "^[0-9$", time.Minute, "policy course: id pattern"},
		{"zero ttl", "course:{id}", shippedIDPattern, 0, "ttl must be positive"},
		{"negative ttl", "course:{id}", shippedIDPattern, -time.Second, "ttl must be positive"},
	} {
		if _, err := NewPolicy("course", tt.key, []string{"id"}, tt.ttl, tt.pattern, "SELECT 1", ""); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: err %v, want %q", tt.name, err, tt.want)
		}
	}
}

func TestParseID(t *testing.T) {
	shipped := mustPolicy(t, "course:{id}", []string{"id"}, shippedIDPattern)
	// A looser pattern shows that ParseID's own checks hold whatever the configured rule lets
	// through: the key is rendered from the number, never from the text.
	loose := mustPolicy(t, "course:{id}", []string{"id"}, "^[0-9]+$")
	signed := mustPolicy(t, "course:{id}", []string{"id"}, "^[-+]?[0-9]+$")

	tests := []struct {
		p    *Policy
		in   string
		want int64 // 0: an *InputError
	}{
		{shipped, "1", 1},
		{shipped, "9", 9},
		{shipped, "10", 10},
		{shipped, "12345", 12345},
		{shipped, "9223372036854775807", 9223372036854775807},
		{shipped, "", 0},
		{shipped, "0", 0},
		{shipped, "00", 0},
		{shipped, "007", 0},
		{shipped, "-1", 0},
		{shipped, "-0", 0},
		{shipped, "+1", 0},
		{shipped, " 1", 0},
		{shipped, "1 ", 0},
		{shipped, "\t1", 0},
		{shipped, "1\n", 0},
		{shipped, "\n1", 0},
		{shipped, "1.5", 0},
		{shipped, "1e3", 0},
		{shipped, "0x10", 0},
		{shipped, "1_000", 0},
		{shipped, "abc", 0},
		{shipped, "*", 0},
		{shipped, ":", 0},
		{shipped, "1:2", 0},
		{shipped, "1*", 0},
		{shipped, "\x00", 0},
		{shipped, "1\x00", 0},
		{shipped, "/", 0},
		{shipped, "1/2", 0},
		{shipped, "１２３", 0}, // full-width digits
		{shipped, "é", 0},
		{shipped, "١", 0}, // Arabic-Indic one
		{shipped, "\xff", 0},
		{shipped, "9223372036854775808", 0},
		{shipped, "9999999999999999999", 0},
		{shipped, "12345678901234567890", 0},
		{shipped, strings.Repeat("9", 65), 0},
		{loose, "007", 7},
		{loose, "0", 0},
		{loose, "000", 0},
		{loose, "9223372036854775808", 0},
		{loose, strings.Repeat("0", 64) + "1", 0}, // 65 chars: refused before parsing
		{loose, strings.Repeat("0", 63) + "1", 1},
		{signed, "-5", 0},
		{signed, "+5", 5},
		{signed, "-9223372036854775808", 0},
	}
	for _, tt := range tests {
		got, err := tt.p.ParseID("course id", tt.in)
		if tt.want == 0 {
			var in *InputError
			if !errors.As(err, &in) {
				t.Errorf("ParseID(%q) [%s] = %d, %v; want an *InputError", tt.in, tt.p.ID, got, err)
				continue
			}
			if in.Code != "bad_id" || !strings.HasPrefix(in.Message, "course id ") || in.Error() != in.Message {
				t.Errorf("ParseID(%q): %+v", tt.in, in)
			}
			if got != 0 {
				t.Errorf("ParseID(%q) returned %d with its error", tt.in, got)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseID(%q) [%s] = %d, %v; want %d", tt.in, tt.p.ID, got, err, tt.want)
		}
	}
}

// courseKeyRE is the only shape a course key may take.
var courseKeyRE = regexp.MustCompile(`^course:[1-9][0-9]*$`)

// FuzzParseID: whatever the text, ParseID either refuses it with an *InputError or returns a
// positive id whose decimal form is exactly the text, so that the key it renders stays inside
// the policy's pattern.
func FuzzParseID(f *testing.F) {
	for _, s := range []string{"1", "42", "9223372036854775807", "9223372036854775808", "0", "007", "-1", "+1", " 1",
		"1.5", "0x10", "*", ":", "\x00", "/", "１２３", "é", "1\n", strings.Repeat("9", 20)} {
		f.Add(s)
	}
	p := mustPolicy(f, "course:{id}", []string{"id"}, shippedIDPattern)
	f.Fuzz(func(t *testing.T, s string) {
		id, err := p.ParseID("course id", s)
		if err != nil {
			var in *InputError
			if !errors.As(err, &in) || in.Code != "bad_id" {
				t.Fatalf("ParseID(%q) error %T %v; want an *InputError with code bad_id", s, err, err)
			}
			if id != 0 {
				t.Fatalf("ParseID(%q) returned %d with an error", s, id)
			}
			return
		}
		if id <= 0 {
			t.Fatalf("ParseID(%q) = %d, not positive", s, id)
		}
		dec := strconv.FormatInt(id, 10)
		if dec != s {
			t.Fatalf("ParseID(%q) = %d, whose decimal form %q differs from the input", s, id, dec)
		}
		if key := p.Key.Render(dec); !courseKeyRE.MatchString(key) {
			t.Fatalf("ParseID(%q) renders key %q outside ^course:[1-9][0-9]*$", s, key)
		}
	})
}

// FuzzTemplate: any template and values; ParseTemplate never panics, and a template it accepts
// renders every value, and gives back its own text when each placeholder is rendered as itself.
// params is a comma-separated list of at most four names; values are '|'-separated.
func FuzzTemplate(f *testing.F) {
	f.Add("course:{id}", "id", "5")
	f.Add("dispatches:list:{tenant_id}:{status}:{after}:{limit}", "tenant_id,status,after,limit", "7|-|0|20")
	f.Add("{limit}{after}", "after,limit", "1|2")
	f.Add("course:{id", "id", "5")
	f.Add("}{id}", "id", "5")
	f.Add("{{id}}", "id", "5")
	f.Add("{}", "", "x")
	f.Add("{id}{id}", "id", "5")
	f.Add("a{b}c", "b,b", "1|2")
	f.Fuzz(func(t *testing.T, key, paramList, valueList string) {
		var params []string
		if paramList != "" {
			params = strings.SplitN(paramList, ",", 4)
		}
		values := strings.Split(valueList, "|")
		for len(values) < len(params) {
			values = append(values, "")
		}
		values = values[:len(params)]

		tmpl, err := ParseTemplate(key, params)
		if err != nil {
			if tmpl != nil {
				t.Fatalf("ParseTemplate(%q, %q) returned a template with error %v", key, params, err)
			}
			return
		}
		if tmpl.String() != key {
			t.Fatalf("String() = %q, want %q", tmpl.String(), key)
		}
		out := tmpl.Render(values...)
		for _, v := range values {
			if !strings.Contains(out, v) {
				t.Fatalf("ParseTemplate(%q, %q).Render(%q) = %q lacks %q", key, params, values, out, v)
			}
		}
		wantLen := len(key)
		self := make([]string, len(params))
		for i, p := range params {
			self[i] = "{" + p + "}"
			wantLen += len(values[i]) - len(self[i])
			if strings.Count(key, self[i]) < 1 {
				t.Fatalf("accepted %q without placeholder %s", key, self[i])
			}
		}
		if len(out) != wantLen {
			t.Fatalf("Render(%q) of %q is %d bytes, want %d", values, key, len(out), wantLen)
		}
		if back := tmpl.Render(self...); back != key {
			t.Fatalf("rendering %q with its own placeholders gives %q", key, back)
		}
	})
}

// TestTTLJitterSpreadsConsecutiveKeys: keys filled together (a batch, a warm-up of consecutive
// ids) must not expire together. Their TTLs spread over most of the ±10% band, and none leaves it.
func TestTTLJitterSpreadsConsecutiveKeys(t *testing.T) {
	p, err := NewPolicy("course", "course:{id}", []string{"id"}, time.Hour, `^[1-9][0-9]{0,18}$`, "SELECT 1 WHERE $1 > 0", "")
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{"", "rev6:"} {
		lo, hi := time.Duration(1<<62), time.Duration(0)
		seconds := map[time.Duration]bool{}
		for id := 100; id < 200; id++ {
			d := p.ttlFor(fmt.Sprintf("%scourse:%d", ns, id))
			if d < 54*time.Minute || d > 66*time.Minute {
				t.Fatalf("ttl %s of course %d outside 1h ±10%%", d, id)
			}
			lo, hi = min(lo, d), max(hi, d)
			seconds[d.Truncate(time.Second)] = true
		}
		// 100 uniform draws over 12 minutes: the range is over 10 minutes unless the hash is
		// broken (the plain FNV-1a spread these over 81 ms).
		if hi-lo < 10*time.Minute || len(seconds) < 85 { // 100 draws over 720 s: about 93 distinct
			t.Errorf("namespace %q: 100 consecutive ids got TTLs from %s to %s in %d distinct seconds; want a spread over most of 54m..66m", ns, lo, hi, len(seconds))
		}
	}
}
