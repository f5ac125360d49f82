package invalidation

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

// exampleTS is the timestamp of the example messages, in microseconds since the Unix epoch.
const exampleTS = 1764115877123456

// exampleHead is the start of a message as the trigger writes it, up to the columns.
const exampleHead = `{"v":1,"t":"courses","op":"UPDATE","ts":1764115877123456,"c":["id","tenant_id"]`

func TestParseChange(t *testing.T) {
	at := time.UnixMicro(exampleTS)
	tests := []struct {
		name    string
		payload string
		want    Change
	}{
		{
			name:    "insert of one row, numbers as json_build_array writes them",
			payload: `{"v":1,"t":"courses","op":"INSERT","ts":1764115877123456,"c":["id","tenant_id"],"r":[[1, 5]]}`,
			want:    Change{Table: "courses", Op: "INSERT", At: at, Columns: []string{"id", "tenant_id"}, Rows: [][]string{{"1", "5"}}},
		},
		{
			name:    "update naming the old and the new row",
			payload: `{"v":1,"t":"courses","op":"UPDATE","ts":1764115877123456,"c":["id","tenant_id"],"r":[[1, 5],[1, 6]]}`,
			want:    Change{Table: "courses", Op: "UPDATE", At: at, Columns: []string{"id", "tenant_id"}, Rows: [][]string{{"1", "5"}, {"1", "6"}}},
		},
		{
			name:    "delete with strings, escapes and null",
			payload: `{"v":1,"t":"tenants","op":"DELETE","ts":1764115877123456,"c":["name","slug"],"r":[["O\"Brien \\ caf\u00e9","x"],["ü",null],["",""]]}`,
			want: Change{Table: "tenants", Op: "DELETE", At: at, Columns: []string{"name", "slug"},
				Rows: [][]string{{`O"Brien \ café`, "x"}, {"ü", ""}, {"", ""}}},
		},
		{
			// A key is the value's text: a number must not go through float64, or a numeric id
			// beyond 2^53 would name another key.
			name:    "numbers are kept as written",
			payload: `{"v":1,"t":"t","op":"INSERT","ts":1,"c":["a","b","c","d"],"r":[[-3, 1.50, 1e3, 12345678901234567890]]}`,
			want: Change{Table: "t", Op: "INSERT", At: time.UnixMicro(1), Columns: []string{"a", "b", "c", "d"},
				Rows: [][]string{{"-3", "1.50", "1e3", "12345678901234567890"}}},
		},
		{
			// PostgreSQL's numeric has up to 131072 digits before the point; such a value is
			// still a valid JSON number and a key as written, even beyond float64's range.
			name:    "numbers beyond float64 range",
			payload: `{"v":1,"t":"t","op":"INSERT","ts":1,"c":["a"],"r":[[1` + strings.Repeat("0", 400) + `]]}`,
			want: Change{Table: "t", Op: "INSERT", At: time.UnixMicro(1), Columns: []string{"a"},
				Rows: [][]string{{"1" + strings.Repeat("0", 400)}}},
		},
		{
			name:    "fields in any order",
			payload: `{"r":[[7]],"c":["id"],"op":"DELETE","ts":1764115877123456,"t":"x","v":1}`,
			want:    Change{Table: "x", Op: "DELETE", At: at, Columns: []string{"id"}, Rows: [][]string{{"7"}}},
		},
		{
			name:    "truncate is table-wide",
			payload: `{"v":1,"t":"courses","op":"TRUNCATE","ts":1764115877123456,"c":["id","tenant_id"],"all":true}`,
			want:    Change{Table: "courses", Op: "TRUNCATE", At: at, Columns: []string{"id", "tenant_id"}, All: true},
		},
		{
			name:    "a statement over max_rows is table-wide",
			payload: `{"v":1,"t":"courses","op":"UPDATE","ts":1764115877123456,"c":["id","tenant_id"],"all":true}`,
			want:    Change{Table: "courses", Op: "UPDATE", At: at, Columns: []string{"id", "tenant_id"}, All: true},
		},
		{
			name:    "exactly 8000 bytes",
			payload: sizedPayload(8000),
			want: Change{Table: "courses", Op: "UPDATE", At: at, Columns: []string{"id", "tenant_id"},
				Rows: [][]string{{"1", strings.Repeat("x", 8000-len(sizedPayload(0)))}}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseChange(tt.payload)
			if err != nil {
				t.Fatalf("ParseChange(%.200s): %v", tt.payload, err)
			}
			if !sameChange(got, tt.want) {
				t.Errorf("ParseChange(%.200s)\n got %+v\nwant %+v", tt.payload, got, tt.want)
			}
		})
	}
}

// sizedPayload returns a valid message of n bytes (at least its length with an empty value) whose
// second value is padding.
func sizedPayload(n int) string {
	const pre, post = exampleHead + `,"r":[[1,"`, `"]]}`
	return pre + strings.Repeat("x", max(0, n-len(pre)-len(post))) + post
}

func TestParseChangeRejects(t *testing.T) {
	rows := `,"r":[[1,5]]}`
	tests := []struct{ name, payload string }{
		{"empty", ``},
		{"not JSON", `courses 1 5`},
		{"a JSON array", `[]`},
		{"a JSON string", `"hello"`},
		{"null", `null`},
		{"empty object", `{}`},
		{"truncated", exampleHead},
		{"missing v", `{"t":"courses","op":"UPDATE","ts":1,"c":["id","tenant_id"]` + rows},
		{"v null", `{"v":null,"t":"courses","op":"UPDATE","ts":1,"c":["id","tenant_id"]` + rows},
		{"wrong version", `{"v":2,"t":"courses","op":"UPDATE","ts":1,"c":["id","tenant_id"]` + rows},
		{"version 0", `{"v":0,"t":"courses","op":"UPDATE","ts":1,"c":["id","tenant_id"]` + rows},
		{"version as string", `{"v":"1","t":"courses","op":"UPDATE","ts":1,"c":["id","tenant_id"]` + rows},
		{"version as fraction", `{"v":1.5,"t":"courses","op":"UPDATE","ts":1,"c":["id","tenant_id"]` + rows},
		{"unknown op", `{"v":1,"t":"courses","op":"MERGE","ts":1,"c":["id","tenant_id"]` + rows},
		{"lower-case op", `{"v":1,"t":"courses","op":"insert","ts":1,"c":["id","tenant_id"]` + rows},
		{"missing op", `{"v":1,"t":"courses","ts":1,"c":["id","tenant_id"]` + rows},
		{"unknown field", `{"v":1,"t":"courses","op":"UPDATE","ts":1,"x":1,"c":["id","tenant_id"]` + rows},
		// encoding/json matches names case-insensitively; the triggers only write lower case.
		{"upper-case field name", `{"V":1,"t":"courses","op":"UPDATE","ts":1,"c":["id","tenant_id"]` + rows},
		{"trailing text", exampleHead + rows + ` x`},
		{"two messages", exampleHead + rows + exampleHead + rows},
		{"trailing brace", exampleHead + rows + `}`},
		{"trailing bracket", exampleHead + rows + `]`},
		{"empty table name", `{"v":1,"t":"","op":"UPDATE","ts":1,"c":["id","tenant_id"]` + rows},
		{"missing table name", `{"v":1,"op":"UPDATE","ts":1,"c":["id","tenant_id"]` + rows},
		{"table name null", `{"v":1,"t":null,"op":"UPDATE","ts":1,"c":["id","tenant_id"]` + rows},
		{"table name a number", `{"v":1,"t":5,"op":"UPDATE","ts":1,"c":["id","tenant_id"]` + rows},
		{"ts 0", `{"v":1,"t":"courses","op":"UPDATE","ts":0,"c":["id","tenant_id"]` + rows},
		{"ts negative", `{"v":1,"t":"courses","op":"UPDATE","ts":-1,"c":["id","tenant_id"]` + rows},
		{"missing ts", `{"v":1,"t":"courses","op":"UPDATE","c":["id","tenant_id"]` + rows},
		{"ts as string", `{"v":1,"t":"courses","op":"UPDATE","ts":"1764115877123456","c":["id","tenant_id"]` + rows},
		{"ts fraction", `{"v":1,"t":"courses","op":"UPDATE","ts":1.5,"c":["id","tenant_id"]` + rows},
		{"ts beyond int64", `{"v":1,"t":"courses","op":"UPDATE","ts":99999999999999999999,"c":["id","tenant_id"]` + rows},
		{"column not a string", `{"v":1,"t":"courses","op":"UPDATE","ts":1,"c":["id",2]` + rows},
		{"no columns", `{"v":1,"t":"courses","op":"UPDATE","ts":1,"c":[],"r":[[]]}`},
		{"missing rows", exampleHead + `}`},
		{"rows null", exampleHead + `,"r":null}`},
		{"no rows", exampleHead + `,"r":[]}`},
		{"all false without rows", exampleHead + `,"all":false}`},
		{"row with too few values", exampleHead + `,"r":[[1,5],[1]]}`},
		{"row with too many values", exampleHead + `,"r":[[1,5,6]]}`},
		{"empty row", exampleHead + `,"r":[[]]}`},
		{"row null", exampleHead + `,"r":[null]}`},
		{"row a number", exampleHead + `,"r":[1,5]}`},
		{"row a string", exampleHead + `,"r":["[1, 5]"]}`},
		{"row an object", exampleHead + `,"r":[{"id":1,"tenant_id":5}]}`},
		{"value an object", exampleHead + `,"r":[[1,{"a":5}]]}`},
		{"value an array", exampleHead + `,"r":[[1,[5]]]}`},
		{"value true", exampleHead + `,"r":[[1,true]]}`},
		{"value false", exampleHead + `,"r":[[false,5]]}`},
		{"rows an object", exampleHead + `,"r":{"1":[1,5]}}`},
		{"table-wide with rows", exampleHead + `,"all":true,"r":[[1,5]]}`},
		{"all a string", exampleHead + `,"all":"true"}`},
		{"truncate with rows", `{"v":1,"t":"courses","op":"TRUNCATE","ts":1,"c":["id","tenant_id"]` + rows},
		{"truncate without all", `{"v":1,"t":"courses","op":"TRUNCATE","ts":1,"c":["id","tenant_id"]}`},
		{"truncate with all false", `{"v":1,"t":"courses","op":"TRUNCATE","ts":1,"c":["id","tenant_id"],"all":false}`},
		{"over 8000 bytes", sizedPayload(8001)},
		{"over 8000 bytes table-wide", exampleHead + `,"all":true}` + strings.Repeat(" ", 8001)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseChange(tt.payload)
			if !errors.Is(err, errMalformed) {
				t.Fatalf("ParseChange(%.200s) = %+v, %v; want an error wrapping errMalformed", tt.payload, got, err)
			}
			if !reflect.DeepEqual(got, Change{}) {
				t.Errorf("ParseChange(%.200s) returned a partial Change with its error: %+v", tt.payload, got)
			}
		})
	}
}

// FuzzParseChange checks that no payload panics the parser, that whatever it accepts is a
// Change the listener can use as it is, and that an accepted Change survives being written
// out again. Seeds are in testdata/fuzz/FuzzParseChange.
func FuzzParseChange(f *testing.F) {
	f.Fuzz(func(t *testing.T, payload string) {
		c, err := ParseChange(payload)
		if err != nil {
			if !errors.Is(err, errMalformed) {
				t.Fatalf("error %v does not wrap errMalformed", err)
			}
			if !reflect.DeepEqual(c, Change{}) {
				t.Fatalf("partial Change with error %v: %+v", err, c)
			}
			return
		}
		checkChange(t, c)

		// What is accepted is one JSON object with only the triggers' field names, exactly as
		// they write them.
		var fields map[string]json.RawMessage
		if !json.Valid([]byte(payload)) || json.Unmarshal([]byte(payload), &fields) != nil {
			t.Fatalf("accepted a payload that is not one JSON object: %+v", c)
		}
		for k := range fields {
			switch k {
			case "v", "t", "op", "ts", "c", "r", "all":
			default:
				t.Fatalf("accepted a payload with field %q: %+v", k, c)
			}
		}

		again, err := ParseChange(payload)
		if err != nil || !sameChange(c, again) {
			t.Fatalf("second parse differs: %+v, %v; first %+v", again, err, c)
		}

		// Written out again with every value as a string, it must read back the same: nothing
		// of the payload was lost or reinterpreted on the way in.
		w := map[string]any{"v": payloadVersion, "t": c.Table, "op": c.Op, "ts": c.At.UnixMicro(), "c": c.Columns}
		if c.All {
			w["all"] = true
		} else {
			w["r"] = c.Rows
		}
		b, err := json.Marshal(w)
		if err != nil {
			t.Fatalf("marshal %+v: %v", c, err)
		}
		if len(b) > 8000 { // quotes and escapes can push a message over the limit
			return
		}
		back, err := ParseChange(string(b))
		if err != nil || !sameChange(c, back) {
			t.Fatalf("round trip through %s: %+v, %v; want %+v", b, back, err, c)
		}
	})
}

// checkChange fails t unless c is something the listener can apply as it is.
func checkChange(t *testing.T, c Change) {
	t.Helper()
	switch {
	case c.Table == "":
		t.Fatalf("accepted a change without a table: %+v", c)
	case c.Op != "INSERT" && c.Op != "UPDATE" && c.Op != "DELETE" && c.Op != "TRUNCATE":
		t.Fatalf("accepted op %q", c.Op)
	case c.At.UnixMicro() <= 0:
		t.Fatalf("accepted timestamp %v", c.At)
	case c.All && len(c.Rows) != 0:
		t.Fatalf("table-wide change with rows: %+v", c)
	case !c.All && c.Op == "TRUNCATE":
		t.Fatalf("TRUNCATE that is not table-wide: %+v", c)
	case !c.All && (len(c.Rows) == 0 || len(c.Columns) == 0):
		t.Fatalf("change that names no rows and is not table-wide: %+v", c)
	}
	for i, row := range c.Rows {
		if len(row) != len(c.Columns) {
			t.Fatalf("row %d has %d values for %d columns: %+v", i, len(row), len(c.Columns), c)
		}
	}
}

// sameChange compares changes with At by instant, not by location or monotonic reading.
func sameChange(a, b Change) bool {
	return a.Table == b.Table && a.Op == b.Op && a.At.Equal(b.At) && a.All == b.All &&
		reflect.DeepEqual(a.Columns, b.Columns) && reflect.DeepEqual(a.Rows, b.Rows)
}
