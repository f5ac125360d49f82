package sessions

import (
	"fmt"

	"github.com/jackc/pgx/v5"
)

// StateSQL creates the tables behind the epoch and the tombstones (a migration of
// internal/schema).
// Rows are keyed by the store (its sentinel key, namespace included), so that deployments with
// different namespaces sharing one database keep separate epochs and tombstones.
const StateSQL = `CREATE TABLE IF NOT EXISTS cachecar_session_state (
	store text PRIMARY KEY,
	epoch text NOT NULL
);
CREATE TABLE IF NOT EXISTS cachecar_session_tombstones (
	store        text        NOT NULL,
	sid          varchar     NOT NULL,
	destroyed_at timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (store, sid)
);`

// TableName returns connect-pg-simple's table, quoted as it quotes it, schema-qualified when
// schema is set.
func TableName(schema, table string) string {
	if schema == "" {
		return pgx.Identifier{table}.Sanitize()
	}
	return pgx.Identifier{schema, table}.Sanitize()
}

// TableSQL creates connect-pg-simple's table if it is absent, as its table.sql does: the same
// columns, primary key and expire index (named as connect-pg-simple names them for "session").
func TableSQL(schema, table string) string {
	create := ""
	if schema != "" {
		create = "CREATE SCHEMA IF NOT EXISTS " + pgx.Identifier{schema}.Sanitize() + ";\n"
	}
	return create + fmt.Sprintf(`CREATE TABLE IF NOT EXISTS %s (
	"sid" varchar NOT NULL COLLATE "default",
	"sess" json NOT NULL,
	"expire" timestamp(6) NOT NULL,
	CONSTRAINT %s PRIMARY KEY ("sid") NOT DEFERRABLE INITIALLY IMMEDIATE
);
CREATE INDEX IF NOT EXISTS %s ON %s ("expire");`, TableName(schema, table),
		pgx.Identifier{table + "_pkey"}.Sanitize(), pgx.Identifier{"IDX_" + table + "_expire"}.Sanitize(), TableName(schema, table))
}
