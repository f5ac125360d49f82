-- Demo data for the reference schema, generated inside PostgreSQL so that a million rows load in
-- seconds. Deterministic: ids and values derive from generate_series through fixed primes, so two
-- loads produce the same data (timestamps aside). Run only on empty tables.

INSERT INTO tenants (name, slug, plan, settings, created_at, updated_at)
SELECT 'Tenant ' || i,
       'tenant-' || i,
       (ARRAY['starter', 'standard', 'enterprise'])[1 + i % 3],
       jsonb_build_object('locale', (ARRAY['en-GB', 'en-US', 'fr-FR', 'de-DE'])[1 + i % 4],
                          'max_learners', 100 * (1 + i % 20),
                          'branding', jsonb_build_object('color', '#' || lpad(to_hex((i * 2654435761) % 16777216), 6, '0'))),
       now() - (i || ' days')::interval,
       now() - (i || ' hours')::interval
FROM generate_series(1, 50) AS i;

INSERT INTO courses (tenant_id, title, description, version, scorm_package, status, created_at, updated_at)
SELECT 1 + i % 50,
       (ARRAY['Safety', 'Privacy', 'Leadership', 'Compliance', 'Onboarding', 'Security', 'Ethics', 'First Aid'])[1 + i % 8]
           || ' ' || (ARRAY['Basics', 'Essentials', 'Advanced', 'Refresher', 'Masterclass'])[1 + (i / 8) % 5]
           || ' #' || i,
       'Course ' || i || ': a generated demo course for cachecar. ' || repeat('Learn, practise, pass. ', 1 + i % 6),
       1 + i % 4,
       (ARRAY['intro-to-safety-scorm12.zip', 'data-privacy-2004-4th.zip', 'leadership-2004-3rd.zip',
              'compliance-basics-scorm12.zip', 'onboarding-2004-4th.zip'])[1 + i % 5],
       (ARRAY['published', 'published', 'published', 'draft', 'archived'])[1 + (i * 7) % 5],
       now() - ((i % 900) || ' days')::interval,
       now() - ((i % 90) || ' days')::interval
FROM generate_series(1, 5000) AS i;

INSERT INTO dispatches (tenant_id, course_id, destination, status, license_limit, expires_at, created_at, updated_at)
SELECT c.tenant_id,
       c.id,
       'org-' || (1 + (i * 31) % 2000) || '.example',
       (ARRAY['active', 'active', 'active', 'paused', 'expired', 'revoked'])[1 + (i * 13) % 6],
       CASE WHEN i % 4 = 0 THEN NULL ELSE 10 * (1 + i % 50) END,
       now() + (((i * 17) % 730) - 180 || ' days')::interval,
       now() - ((i % 700) || ' days')::interval,
       now() - ((i % 70) || ' days')::interval
FROM generate_series(1, 200000) AS i
JOIN courses c ON c.id = 1 + (i::bigint * 7919) % 5000;

INSERT INTO registrations (tenant_id, dispatch_id, course_id, learner_id, status, score, created_at, updated_at, completed_at)
SELECT d.tenant_id,
       d.id,
       d.course_id,
       'learner-' || (1 + (i::bigint * 48271) % 250000),
       s.status,
       CASE WHEN s.status IN ('completed', 'passed', 'failed') THEN ((i::bigint * 97) % 10001) / 100.0 END,
       now() - (((i::bigint * 7) % 86400 * 60) || ' seconds')::interval,
       now() - (((i::bigint * 3) % 86400 * 30) || ' seconds')::interval,
       CASE WHEN s.status IN ('completed', 'passed') THEN now() - ((i % 30) || ' days')::interval END
FROM generate_series(1, 1000000) AS i
JOIN dispatches d ON d.id = 1 + (i::bigint * 104729) % 200000
CROSS JOIN LATERAL (SELECT (ARRAY['not_attempted', 'incomplete', 'incomplete', 'completed', 'passed', 'passed', 'failed'])[1 + (i * 11) % 7] AS status) s;

ANALYZE tenants;
ANALYZE courses;
ANALYZE dispatches;
ANALYZE registrations;
