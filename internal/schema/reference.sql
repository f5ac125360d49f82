-- The platform's reference schema (DESIGN.md). The app owns its schema; cachecar creates this one
-- only when asked (cachecar migrate --reference-schema), for the demo and the tests.
-- Idempotent: every statement is IF NOT EXISTS.

CREATE TABLE IF NOT EXISTS tenants (
    id          bigserial PRIMARY KEY,
    name        text        NOT NULL,
    slug        text        NOT NULL UNIQUE,
    plan        text        NOT NULL DEFAULT 'standard',
    settings    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS courses (
    id             bigserial PRIMARY KEY,
    tenant_id      bigint      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    title          text        NOT NULL,
    description    text        NOT NULL DEFAULT '',
    version        integer     NOT NULL DEFAULT 1,
    scorm_package  text        NOT NULL,
    status         text        NOT NULL DEFAULT 'draft'
                   CHECK (status IN ('draft', 'published', 'archived')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS courses_tenant_id_idx ON courses (tenant_id);

CREATE TABLE IF NOT EXISTS dispatches (
    id             bigserial PRIMARY KEY,
    tenant_id      bigint      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    course_id      bigint      NOT NULL REFERENCES courses (id) ON DELETE CASCADE,
    destination    text        NOT NULL,
    status         text        NOT NULL DEFAULT 'active'
                   CHECK (status IN ('active', 'paused', 'expired', 'revoked')),
    license_limit  integer,
    expires_at     timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS dispatches_tenant_id_id_idx ON dispatches (tenant_id, id);
CREATE INDEX IF NOT EXISTS dispatches_course_id_idx ON dispatches (course_id);

CREATE TABLE IF NOT EXISTS registrations (
    id            bigserial PRIMARY KEY,
    tenant_id     bigint      NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    dispatch_id   bigint      NOT NULL REFERENCES dispatches (id) ON DELETE CASCADE,
    course_id     bigint      NOT NULL,
    learner_id    text        NOT NULL,
    status        text        NOT NULL DEFAULT 'not_attempted'
                  CHECK (status IN ('not_attempted', 'incomplete', 'completed', 'passed', 'failed')),
    score         numeric(5, 2),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz
);
-- Covers the dashboard stats aggregate (per tenant: status, score, created_at) with an index-only
-- scan: a tenant's registrations are spread over the whole table, and reading them from the heap
-- took over a second cold for 20,000 rows.
CREATE INDEX IF NOT EXISTS registrations_tenant_stats_idx ON registrations (tenant_id) INCLUDE (status, score, created_at);
-- Replaced by the index above, which serves every lookup by tenant_id.
DROP INDEX IF EXISTS registrations_tenant_id_idx;
CREATE INDEX IF NOT EXISTS registrations_dispatch_id_idx ON registrations (dispatch_id);

-- connect-pg-simple's session table, exactly as its table.sql creates it.
CREATE TABLE IF NOT EXISTS "session" (
    "sid"    varchar      NOT NULL COLLATE "default",
    "sess"   json         NOT NULL,
    "expire" timestamp(6) NOT NULL,
    CONSTRAINT "session_pkey" PRIMARY KEY ("sid") NOT DEFERRABLE INITIALLY IMMEDIATE
);
CREATE INDEX IF NOT EXISTS "IDX_session_expire" ON "session" ("expire");
