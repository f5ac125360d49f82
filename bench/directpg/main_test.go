package main

import "testing"

// The session route runs the query cachecar's session store runs, on a quoted, optionally
// schema-qualified table.
func TestSessionQuery(t *testing.T) {
	for table, want := range map[string]string{
		"session":           `SELECT sess::text FROM "session" WHERE sid = $1 AND expire >= to_timestamp($2)`,
		"app.user_sessions": `SELECT sess::text FROM "app"."user_sessions" WHERE sid = $1 AND expire >= to_timestamp($2)`,
		`we"ird`:            `SELECT sess::text FROM "we""ird" WHERE sid = $1 AND expire >= to_timestamp($2)`,
	} {
		if got := sessionQuery(table); got != want {
			t.Errorf("sessionQuery(%q) = %s, want %s", table, got, want)
		}
	}
}
