package invalidation

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// payloadVersion is the "v" of the messages the current triggers send. A trigger installed by
// another version of cachecar sends another value; the listener refuses what it cannot read
// rather than guess, and migrate's check stops start-up until the triggers are current.
const payloadVersion = 1

// maxPayload is PostgreSQL's NOTIFY payload limit (8000 bytes) less a margin: the trigger
// chunks rows so that no message exceeds it.
const maxPayload = 7900

// Change is one decoded notification: a statement's changed rows of one table, or (All) the
// whole table.
type Change struct {
	Table string
	Op    string // INSERT, UPDATE, DELETE, TRUNCATE
	// At is when the trigger ran (clock_timestamp() inside the writing transaction, just before
	// its commit for a single statement): the start of the invalidation lag.
	At time.Time
	// Columns names the values of each row, in order.
	Columns []string
	// Rows hold each changed row's values of Columns as text ("" for NULL), the old and new
	// versions of an updated row both, without duplicates.
	Rows [][]string
	// All is set when the statement changed too many rows to name (or TRUNCATE): every key
	// depending on Table is stale.
	All bool
}

type wireChange struct {
	V   *int              `json:"v"`
	T   string            `json:"t"`
	Op  string            `json:"op"`
	TS  int64             `json:"ts"` // microseconds since the Unix epoch
	C   []string          `json:"c"`
	R   []json.RawMessage `json:"r"`
	All bool              `json:"all"`
}

// errMalformed marks a payload that is not a message of cachecar's triggers.
var errMalformed = errors.New("malformed payload")

// ParseChange decodes a notification payload. Anything that is not exactly a message of the
// current triggers is an error wrapping errMalformed; it never yields a partial Change.
func ParseChange(payload string) (Change, error) {
	if len(payload) > 8000 {
		return Change{}, fmt.Errorf("%w: %d bytes", errMalformed, len(payload))
	}
	// Field names are checked exactly first: encoding/json would take "V" for "v". Unmarshal
	// also refuses trailing data after the object.
	var fields map[string]json.RawMessage
	if err := json.Unmarshal([]byte(payload), &fields); err != nil {
		return Change{}, fmt.Errorf("%w: %v", errMalformed, err)
	}
	for name := range fields {
		switch name {
		case "v", "t", "op", "ts", "c", "r", "all":
		default:
			return Change{}, fmt.Errorf("%w: unknown field %.20q", errMalformed, name)
		}
	}
	var w wireChange
	if err := json.Unmarshal([]byte(payload), &w); err != nil {
		return Change{}, fmt.Errorf("%w: %v", errMalformed, err)
	}
	if w.V == nil || *w.V != payloadVersion {
		return Change{}, fmt.Errorf("%w: not version %d", errMalformed, payloadVersion)
	}
	switch w.Op {
	case "INSERT", "UPDATE", "DELETE", "TRUNCATE":
	default:
		return Change{}, fmt.Errorf("%w: unknown op %q", errMalformed, w.Op)
	}
	if w.T == "" || w.TS <= 0 {
		return Change{}, fmt.Errorf("%w: missing table or timestamp", errMalformed)
	}
	c := Change{Table: w.T, Op: w.Op, At: time.UnixMicro(w.TS), Columns: w.C, All: w.All}
	if w.All {
		if len(w.R) != 0 {
			return Change{}, fmt.Errorf("%w: table-wide message with rows", errMalformed)
		}
		return c, nil
	}
	if w.Op == "TRUNCATE" || len(w.C) == 0 || len(w.R) == 0 {
		return Change{}, fmt.Errorf("%w: no rows", errMalformed)
	}
	c.Rows = make([][]string, 0, len(w.R))
	for _, raw := range w.R {
		var vals []json.RawMessage
		if err := json.Unmarshal(raw, &vals); err != nil || len(vals) != len(w.C) {
			return Change{}, fmt.Errorf("%w: a row is not an array of %d values", errMalformed, len(w.C))
		}
		row := make([]string, len(vals))
		for i, v := range vals {
			s, err := scalar(v)
			if err != nil {
				return Change{}, err
			}
			row[i] = s
		}
		c.Rows = append(c.Rows, row)
	}
	return c, nil
}

// scalar turns one JSON value into key text: a number as written, a string's contents, null as
// "". Objects, arrays and booleans are not values a key is made of.
func scalar(v json.RawMessage) (string, error) {
	v = bytes.TrimSpace(v)
	switch {
	case len(v) == 0:
		return "", fmt.Errorf("%w: empty value", errMalformed)
	case string(v) == "null":
		return "", nil
	case v[0] == '"':
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			return "", fmt.Errorf("%w: %v", errMalformed, err)
		}
		return s, nil
	case v[0] == '-' || (v[0] >= '0' && v[0] <= '9'):
		// v is a valid JSON number (it was decoded as one): keep its text, whatever its size
		// (a numeric column can exceed float64). Whether it makes a key is the rule's call.
		return string(v), nil
	}
	return "", fmt.Errorf("%w: value %.20s is not a number, string or null", errMalformed, v)
}
