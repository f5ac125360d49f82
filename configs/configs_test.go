package configs

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/internal/testenv"
)

// env is a getenv over a fixed map, so that no test reads the real environment.
func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

// writeFile writes a config file into the test's temporary directory.
func writeFile(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "cachecar.yaml")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func mustLoad(t *testing.T, src Source) *Config {
	t.Helper()
	cfg, err := Load(src)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return cfg
}

// problems loads src and returns its problems, failing unless Load returned a *ProblemsError.
func problems(t *testing.T, src Source) []string {
	t.Helper()
	cfg, err := Load(src)
	if err == nil {
		t.Fatalf("Load succeeded (%+v); want a *ProblemsError", cfg)
	}
	var pe *ProblemsError
	if !errors.As(err, &pe) {
		t.Fatalf("Load error is %T (%v); want *ProblemsError", err, err)
	}
	if len(pe.Problems) == 0 {
		t.Fatal("ProblemsError lists no problems")
	}
	return pe.Problems
}

// hasProblem reports whether one problem contains every one of subs.
func hasProblem(list []string, subs ...string) bool {
	for _, p := range list {
		all := true
		for _, s := range subs {
			all = all && strings.Contains(p, s)
		}
		if all {
			return true
		}
	}
	return false
}

func TestDefaults(t *testing.T) {
	cfg := mustLoad(t, Source{})
	tests := []struct {
		name string
		got  any
		want any
	}{
		{"namespace", cfg.Namespace, ""},
		{"server.listen", cfg.Server.Listen, "127.0.0.1:8080"},
		{"server.read_header_timeout", cfg.Server.ReadHeaderTimeout, 5 * time.Second},
		{"server.write_timeout", cfg.Server.WriteTimeout, 15 * time.Second},
		{"server.idle_timeout", cfg.Server.IdleTimeout, 120 * time.Second},
		{"server.drain_delay", cfg.Server.DrainDelay, time.Duration(0)},
		{"server.shutdown_timeout", cfg.Server.ShutdownTimeout, 15 * time.Second},
		{"health.listen", cfg.Health.Listen, "0.0.0.0:8081"},
		{"health.check_timeout", cfg.Health.CheckTimeout, time.Second},
		{"admin.listen", cfg.Admin.Listen, "127.0.0.1:8082"},
		{"admin.token", cfg.Admin.Token, ""},
		{"database.url", cfg.Database.URL, "postgres://cachecar:cachecar@127.0.0.1:5432/cachecar?sslmode=disable"},
		{"database.max_conns", cfg.Database.MaxConns, int32(16)},
		{"database.connect_timeout", cfg.Database.ConnectTimeout, 2 * time.Second},
		{"database.query_timeout", cfg.Database.QueryTimeout, 5 * time.Second},
		{"valkey.addrs", cfg.Valkey.Addrs, []string{"127.0.0.1:6379"}},
		{"valkey.password", cfg.Valkey.Password, ""},
		{"valkey.password_file", cfg.Valkey.PasswordFile, ""},
		{"valkey.tls", cfg.Valkey.TLS, ValkeyTLSConfig{}},
		{"database.password_file", cfg.Database.PasswordFile, ""},
		{"valkey.db", cfg.Valkey.DB, 0},
		{"valkey.timeout", cfg.Valkey.Timeout, 50 * time.Millisecond},
		{"valkey.dial_timeout", cfg.Valkey.DialTimeout, time.Second},
		{"valkey.reconnect_max", cfg.Valkey.ReconnectMax, 5 * time.Second},
		{"cache.enabled", cfg.Cache.Enabled, true},
		{"cache.ttl_default", cfg.Cache.TTLDefault, 5 * time.Minute},
		{"log.level", cfg.Log.Level, "info"},
		{"log.access_sample", cfg.Log.AccessSample, 1.0},
		{"policies.course.key", cfg.Policies.Course.Key, "course:{id}"},
		{"policies.course.ttl", cfg.Policies.Course.TTL, 10 * time.Minute},
		{"policies.course.id_pattern", cfg.Policies.Course.IDPattern, "^[1-9][0-9]{0,18}$"},
		{"policies.tenant.key", cfg.Policies.Tenant.Key, "tenant:{id}"},
		{"policies.tenant.ttl", cfg.Policies.Tenant.TTL, time.Hour},
		{"policies.dispatch.key", cfg.Policies.Dispatch.Key, "dispatch:{id}"},
		{"policies.dispatch.ttl", cfg.Policies.Dispatch.TTL, 5 * time.Minute},
		{"policies.dispatch_list.key", cfg.Policies.DispatchList.Key, "dispatches:list:{tenant_id}:{status}:{after}:{limit}"},
		{"policies.dispatch_list.ttl", cfg.Policies.DispatchList.TTL, 5 * time.Minute},
		{"policies.tenant_stats.key", cfg.Policies.TenantStats.Key, "dashboard:stats:{tenant_id}"},
		{"policies.tenant_stats.ttl", cfg.Policies.TenantStats.TTL, time.Minute},
	}
	for _, tt := range tests {
		if !reflect.DeepEqual(tt.got, tt.want) {
			t.Errorf("%s = %#v, want %#v", tt.name, tt.got, tt.want)
		}
	}
	for name, p := range cfg.Policies.Named() {
		if strings.TrimSpace(p.SQL) == "" {
			t.Errorf("policies.%s.sql is empty", name)
		}
	}
	if cfg.Policies.Course.BatchSQL == "" {
		t.Error("policies.course.batch_sql is empty")
	}
}

// TestDefaultsIgnoreProcessEnv: a Source with no Getenv reads no environment at all, even when the
// process has CACHECAR_ variables set.
func TestDefaultsIgnoreProcessEnv(t *testing.T) {
	t.Setenv("CACHECAR_SERVER_LISTEN", "127.0.0.1:1")
	t.Setenv("REDIS_HOST", "elsewhere")
	cfg := mustLoad(t, Source{})
	if cfg.Server.Listen != "127.0.0.1:8080" || cfg.Valkey.Addrs[0] != "127.0.0.1:6379" {
		t.Fatalf("Load(Source{}) read the process environment: listen %q, addrs %v", cfg.Server.Listen, cfg.Valkey.Addrs)
	}
}

func TestPrecedence(t *testing.T) {
	type layers struct {
		file string
		env  map[string]string
		sets []string
	}
	tests := []struct {
		name string
		in   layers
		get  func(*Config) any
		want any
	}{
		{"ttl default", layers{}, func(c *Config) any { return c.Policies.Course.TTL }, 10 * time.Minute},
		{"ttl file over default",
			layers{file: "policies:\n  course:\n    ttl: 20m\n"},
			func(c *Config) any { return c.Policies.Course.TTL }, 20 * time.Minute},
		{"ttl env over file",
			layers{file: "policies:\n  course:\n    ttl: 20m\n", env: map[string]string{"CACHECAR_POLICIES_COURSE_TTL": "30m"}},
			func(c *Config) any { return c.Policies.Course.TTL }, 30 * time.Minute},
		{"ttl flag over env over file",
			layers{file: "policies:\n  course:\n    ttl: 20m\n", env: map[string]string{"CACHECAR_POLICIES_COURSE_TTL": "30m"}, sets: []string{"policies.course.ttl=40m"}},
			func(c *Config) any { return c.Policies.Course.TTL }, 40 * time.Minute},
		{"ttl flag over default",
			layers{sets: []string{"policies.course.ttl=40m"}},
			func(c *Config) any { return c.Policies.Course.TTL }, 40 * time.Minute},
		{"last --set wins",
			layers{sets: []string{"policies.course.ttl=40m", "policies.course.ttl=41m"}},
			func(c *Config) any { return c.Policies.Course.TTL }, 41 * time.Minute},
		{"--set key is case- and space-insensitive",
			layers{sets: []string{" Policies.Course.TTL =42m"}},
			func(c *Config) any { return c.Policies.Course.TTL }, 42 * time.Minute},
		{"listen file over default",
			layers{file: "server:\n  listen: 127.0.0.1:9001\n"},
			func(c *Config) any { return c.Server.Listen }, "127.0.0.1:9001"},
		{"listen env over file",
			layers{file: "server:\n  listen: 127.0.0.1:9001\n", env: map[string]string{"CACHECAR_SERVER_LISTEN": "127.0.0.1:9002"}},
			func(c *Config) any { return c.Server.Listen }, "127.0.0.1:9002"},
		{"listen flag over env",
			layers{file: "server:\n  listen: 127.0.0.1:9001\n", env: map[string]string{"CACHECAR_SERVER_LISTEN": "127.0.0.1:9002"}, sets: []string{"server.listen=127.0.0.1:9003"}},
			func(c *Config) any { return c.Server.Listen }, "127.0.0.1:9003"},
		{"a variable getenv reads as empty is unset",
			layers{file: "server:\n  listen: 127.0.0.1:9001\n", env: map[string]string{"CACHECAR_SERVER_LISTEN": ""}},
			func(c *Config) any { return c.Server.Listen }, "127.0.0.1:9001"},
		{"admin.listen may equal server.listen while the admin port is off (no token)",
			layers{sets: []string{"admin.listen=127.0.0.1:8080"}},
			func(c *Config) any { return c.Admin.Listen }, "127.0.0.1:8080"},
		{"REDIS_PORT alone on a file listing one host twice",
			layers{file: "valkey:\n  addrs: [h:7000, h:7001]\n", env: map[string]string{"REDIS_PORT": "7002"}},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"h:7002"}},
		{"env set to the empty string clears the file's value",
			layers{file: "namespace: \"file:\"\n", env: map[string]string{"CACHECAR_NAMESPACE": EmptyEnv}},
			func(c *Config) any { return c.Namespace }, ""},
		{"CACHECAR_VALKEY_ADDRS set to the empty string: no Valkey",
			layers{env: map[string]string{"CACHECAR_VALKEY_ADDRS": EmptyEnv}},
			func(c *Config) any { return len(c.Valkey.Addrs) }, 0},
		{"platform names set to the empty string are unset",
			layers{file: "valkey:\n  addrs: [file:6379]\n", env: map[string]string{"REDIS_HOST": EmptyEnv, "REDIS_PORT": EmptyEnv}},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"file:6379"}},
		{"REDIS_PORT alone keeps the file's hosts",
			layers{file: "valkey:\n  addrs: [filehost:7000, other:7002]\n", env: map[string]string{"REDIS_PORT": "7001"}},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"filehost:7001", "other:7001"}},
		{"DATABASE_URL over file",
			layers{file: "database:\n  url: postgres://file@h/db\n", env: map[string]string{"DATABASE_URL": "postgres://env@h/db"}},
			func(c *Config) any { return c.Database.URL }, "postgres://env@h/db"},
		{"CACHECAR_DATABASE_URL over DATABASE_URL",
			layers{env: map[string]string{"DATABASE_URL": "postgres://platform@h/db", "CACHECAR_DATABASE_URL": "postgres://own@h/db"}},
			func(c *Config) any { return c.Database.URL }, "postgres://own@h/db"},
		{"flag over DATABASE_URL",
			layers{env: map[string]string{"DATABASE_URL": "postgres://platform@h/db"}, sets: []string{"database.url=postgres://flag@h/db"}},
			func(c *Config) any { return c.Database.URL }, "postgres://flag@h/db"},
		{"REDIS_PASSWORD over file",
			layers{file: "valkey:\n  password: file\n", env: map[string]string{"REDIS_PASSWORD": "env"}},
			func(c *Config) any { return c.Valkey.Password }, "env"},
		{"CACHECAR_VALKEY_PASSWORD over REDIS_PASSWORD",
			layers{env: map[string]string{"REDIS_PASSWORD": "platform", "CACHECAR_VALKEY_PASSWORD": "own"}},
			func(c *Config) any { return c.Valkey.Password }, "own"},
		{"CACHE_TTL_DEFAULT over file",
			layers{file: "cache:\n  ttl_default: 1m\n", env: map[string]string{"CACHE_TTL_DEFAULT": "120"}},
			func(c *Config) any { return c.Cache.TTLDefault }, 2 * time.Minute},
		{"CACHECAR_CACHE_TTL_DEFAULT over CACHE_TTL_DEFAULT",
			layers{env: map[string]string{"CACHE_TTL_DEFAULT": "120", "CACHECAR_CACHE_TTL_DEFAULT": "3m"}},
			func(c *Config) any { return c.Cache.TTLDefault }, 3 * time.Minute},
		{"flag over CACHE_TTL_DEFAULT",
			layers{env: map[string]string{"CACHE_TTL_DEFAULT": "120"}, sets: []string{"cache.ttl_default=4m"}},
			func(c *Config) any { return c.Cache.TTLDefault }, 4 * time.Minute},
		{"ADMIN_TOKEN over file",
			layers{file: "admin:\n  token: file-token-0123456789\n", env: map[string]string{"ADMIN_TOKEN": "env-token-0123456789"}},
			func(c *Config) any { return c.Admin.Token }, "env-token-0123456789"},
		{"REDIS_HOST over file",
			layers{file: "valkey:\n  addrs: [file:6379]\n", env: map[string]string{"REDIS_HOST": "envhost"}},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"envhost:6379"}},
		{"CACHECAR_VALKEY_ADDRS over REDIS_HOST",
			layers{env: map[string]string{"REDIS_HOST": "platform", "REDIS_PORT": "6380", "CACHECAR_VALKEY_ADDRS": "own1:6379, own2:6379"}},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"own1:6379", "own2:6379"}},
		{"flag list over env list",
			layers{env: map[string]string{"CACHECAR_VALKEY_ADDRS": "env:6379"}, sets: []string{"valkey.addrs=f1:1, f2:2"}},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"f1:1", "f2:2"}},
		{"file list given as a string",
			layers{file: "valkey:\n  addrs: \"a:1,b:2\"\n"},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"a:1", "b:2"}},
		{"env list after a file string",
			layers{file: "valkey:\n  addrs: \"a:1\"\n", env: map[string]string{"CACHECAR_VALKEY_ADDRS": "c:3, d:4"}},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"c:3", "d:4"}},
		{"bool from env",
			layers{env: map[string]string{"CACHECAR_CACHE_ENABLED": "false"}},
			func(c *Config) any { return c.Cache.Enabled }, false},
		{"int from flag",
			layers{sets: []string{"database.max_conns=3"}},
			func(c *Config) any { return c.Database.MaxConns }, int32(3)},
		{"float from env",
			layers{env: map[string]string{"CACHECAR_LOG_ACCESS_SAMPLE": "0.25"}},
			func(c *Config) any { return c.Log.AccessSample }, 0.25},
		{"--set value may contain '='",
			layers{sets: []string{"database.url=host=h password=p dbname=d"}},
			func(c *Config) any { return c.Database.URL }, "host=h password=p dbname=d"},
		{"zero ttl in the file means ttl_default",
			layers{file: "policies:\n  course:\n    ttl: 0\n"},
			func(c *Config) any { return c.Policies.Course.EffectiveTTL(c.Cache.TTLDefault) }, 5 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := Source{Getenv: env(tt.in.env), Sets: tt.in.sets}
			if tt.in.file != "" {
				src.File = writeFile(t, tt.in.file)
			}
			cfg := mustLoad(t, src)
			if got := tt.get(cfg); !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %#v, want %#v", got, tt.want)
			}
		})
	}
}

func TestPlatformEnv(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		get  func(*Config) any
		want any
	}{
		{"REDIS_HOST alone uses port 6379", map[string]string{"REDIS_HOST": "redis.internal"},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"redis.internal:6379"}},
		{"REDIS_HOST and REDIS_PORT", map[string]string{"REDIS_HOST": "redis.internal", "REDIS_PORT": "6390"},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"redis.internal:6390"}},
		{"REDIS_PORT alone uses loopback", map[string]string{"REDIS_PORT": "6390"},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"127.0.0.1:6390"}},
		{"REDIS_HOST IPv6", map[string]string{"REDIS_HOST": "::1"},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"[::1]:6379"}},
		{"REDIS_PASSWORD", map[string]string{"REDIS_PASSWORD": "s3cret"},
			func(c *Config) any { return c.Valkey.Password }, "s3cret"},
		{"CACHE_TTL_DEFAULT seconds", map[string]string{"CACHE_TTL_DEFAULT": "300"},
			func(c *Config) any { return c.Cache.TTLDefault }, 300 * time.Second},
		{"CACHE_TTL_DEFAULT with spaces", map[string]string{"CACHE_TTL_DEFAULT": " 90 "},
			func(c *Config) any { return c.Cache.TTLDefault }, 90 * time.Second},
		{"DATABASE_URL", map[string]string{"DATABASE_URL": "postgres://app:pw@db:5432/app"},
			func(c *Config) any { return c.Database.URL }, "postgres://app:pw@db:5432/app"},
		{"DATABASE_URL as key=value DSN", map[string]string{"DATABASE_URL": "host=db user=app dbname=app"},
			func(c *Config) any { return c.Database.URL }, "host=db user=app dbname=app"},
		{"ADMIN_TOKEN", map[string]string{"ADMIN_TOKEN": "tok-0123456789abcdef"},
			func(c *Config) any { return c.Admin.Token }, "tok-0123456789abcdef"},
		{"CACHECAR_POLICIES_COURSE_TTL", map[string]string{"CACHECAR_POLICIES_COURSE_TTL": "90s"},
			func(c *Config) any { return c.Policies.Course.TTL }, 90 * time.Second},
		{"CACHECAR_POLICIES_DISPATCH_LIST_KEY", map[string]string{"CACHECAR_POLICIES_DISPATCH_LIST_KEY": "dl:{tenant_id}:{status}:{after}:{limit}"},
			func(c *Config) any { return c.Policies.DispatchList.Key }, "dl:{tenant_id}:{status}:{after}:{limit}"},
		{"CACHECAR_VALKEY_ADDRS comma list", map[string]string{"CACHECAR_VALKEY_ADDRS": "a:6379,b:6380, c:6381 ,"},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"a:6379", "b:6380", "c:6381"}},
		{"CACHECAR_VALKEY_ADDRS wins over REDIS_HOST", map[string]string{"REDIS_HOST": "platform", "CACHECAR_VALKEY_ADDRS": "own:6379"},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"own:6379"}},
		{"CACHECAR_VALKEY_ADDRS list with spaces wins over REDIS_HOST", map[string]string{"REDIS_HOST": "platform", "CACHECAR_VALKEY_ADDRS": "a:1, b:2"},
			func(c *Config) any { return c.Valkey.Addrs }, []string{"a:1", "b:2"}},
		{"CACHECAR_NAMESPACE", map[string]string{"CACHECAR_NAMESPACE": "app1:"},
			func(c *Config) any { return c.Namespace }, "app1:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := mustLoad(t, Source{Getenv: env(tt.env)})
			if got := tt.get(cfg); !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %#v, want %#v", got, tt.want)
			}
		})
	}
}

func TestEnvOnlyConfig(t *testing.T) {
	certs := testenv.NewCerts(t)
	e := map[string]string{
		"DATABASE_URL":      "postgres://app:dbpw@db.internal:5432/app?sslmode=require",
		"REDIS_HOST":        "redis.internal",
		"REDIS_PORT":        "6380",
		"REDIS_PASSWORD":    "redispw",
		"CACHE_TTL_DEFAULT": "600",
		"ADMIN_TOKEN":       "admintoken-0123456789",

		"CACHECAR_NAMESPACE":                              "app1:",
		"CACHECAR_SERVER_LISTEN":                          "127.0.0.1:18080",
		"CACHECAR_SERVER_READ_HEADER_TIMEOUT":             "3s",
		"CACHECAR_SERVER_WRITE_TIMEOUT":                   "20s",
		"CACHECAR_SERVER_IDLE_TIMEOUT":                    "60s",
		"CACHECAR_SERVER_DRAIN_DELAY":                     "5s",
		"CACHECAR_SERVER_SHUTDOWN_TIMEOUT":                "25s",
		"CACHECAR_HEALTH_LISTEN":                          "0.0.0.0:18081",
		"CACHECAR_HEALTH_CHECK_TIMEOUT":                   "2s",
		"CACHECAR_ADMIN_LISTEN":                           "127.0.0.1:18082",
		"CACHECAR_DATABASE_MAX_CONNS":                     "32",
		"CACHECAR_DATABASE_CONNECT_TIMEOUT":               "3s",
		"CACHECAR_DATABASE_QUERY_TIMEOUT":                 "4s",
		"CACHECAR_VALKEY_USERNAME":                        "cachecar",
		"CACHECAR_VALKEY_DB":                              "2",
		"CACHECAR_VALKEY_TIMEOUT":                         "80ms",
		"CACHECAR_VALKEY_DIAL_TIMEOUT":                    "2s",
		"CACHECAR_VALKEY_RECONNECT_MAX":                   "10s",
		"CACHECAR_CACHE_ENABLED":                          "true",
		"CACHECAR_LOG_LEVEL":                              "debug",
		"CACHECAR_LOG_ACCESS_SAMPLE":                      "0.5",
		"CACHECAR_POLICIES_TENANT_TTL":                    "2h",
		"CACHECAR_POLICIES_COURSE_KEY":                    "c:{id}",
		"CACHECAR_POLICIES_COURSE_TTL":                    "15m",
		"CACHECAR_POLICIES_COURSE_ID_PATTERN":             "^[1-9][0-9]{0,9}$",
		"CACHECAR_POLICIES_COURSE_SQL":                    "SELECT 'x'",
		"CACHECAR_POLICIES_COURSE_BATCH_SQL":              "SELECT 1, 'x'",
		"CACHECAR_POLICIES_DISPATCH_TTL":                  "7m",
		"CACHECAR_POLICIES_DISPATCH_LIST_TTL":             "8m",
		"CACHECAR_POLICIES_TENANT_STATS_TTL":              "2m",
		"CACHECAR_POLICIES_TENANT_STATS_KEY":              "stats:{tenant_id}",
		"CACHECAR_POLICIES_TENANT_STATS_ID_PATTERN":       "^[1-9][0-9]*$",
		"CACHECAR_HEALTH_PPROF":                           "true",
		"CACHECAR_VALKEY_MAX_FLUSH_DELAY":                 "0s",
		"CACHECAR_MANIFESTS_DIR":                          "/srv/scorm",
		"CACHECAR_MANIFESTS_KEY":                          "m:{mtime}:{filename}",
		"CACHECAR_MANIFESTS_TTL":                          "30m",
		"CACHECAR_MANIFESTS_MAX_MANIFEST_BYTES":           "1048576",
		"CACHECAR_MANIFESTS_MAX_ENTRIES":                  "500",
		"CACHECAR_POLICIES_COURSE_INVALIDATE_ON":          "courses(id=id) course_versions(id=course_id)",
		"CACHECAR_POLICIES_TENANT_INVALIDATE_ON":          "none",
		"CACHECAR_INVALIDATION_ENABLED":                   "false",
		"CACHECAR_INVALIDATION_LISTEN_URL":                "postgres://listen:lpw@db.internal:5432/app",
		"CACHECAR_INVALIDATION_CHANNEL":                   "app1_inv",
		"CACHECAR_INVALIDATION_RECONNECT_MAX":             "7s",
		"CACHECAR_INVALIDATION_PING_INTERVAL":             "9s",
		"CACHECAR_INVALIDATION_MAX_ROWS":                  "500",
		"CACHECAR_SESSIONS_ENABLED":                       "true",
		"CACHECAR_SESSIONS_PREFIX":                        "s:",
		"CACHECAR_SESSIONS_TTL":                           "24h",
		"CACHECAR_SESSIONS_TABLE":                         "user_sessions",
		"CACHECAR_SESSIONS_SCHEMA":                        "auth",
		"CACHECAR_SESSIONS_MAX_BODY_BYTES":                "1024",
		"CACHECAR_SESSIONS_REFRESH_INTERVAL":              "1s",
		"CACHECAR_SESSIONS_PRUNE_INTERVAL":                "5m",
		"CACHECAR_SESSIONS_DELETE_UNKNOWN":                "false",
		"CACHECAR_SESSIONS_MIGRATION":                     "connect-redis",
		"CACHECAR_SESSIONS_TIER_MAX_BYTES":                "67108864",
		"CACHECAR_DATABASE_MAX_LOADS":                     "40",
		"CACHECAR_ADMIN_CLEAR_RATE":                       "2",
		"CACHECAR_ADMIN_CLEAR_BURST":                      "5",
		"CACHECAR_ADMIN_WARM_MAX_IDS":                     "500",
		"CACHECAR_ADMIN_WARM_ON_START":                    "true",
		"CACHECAR_POLICIES_COURSE_WARM_SQL":               "SELECT 1",
		"CACHECAR_DATABASE_MIN_CONNS":                     "2",
		"CACHECAR_VALKEY_BREAKER_THRESHOLD":               "3",
		"CACHECAR_VALKEY_BREAKER_OPEN":                    "100ms",
		"CACHECAR_VALKEY_BREAKER_OPEN_MAX":                "2s",
		"CACHECAR_CACHE_TIER_MAX_BYTES":                   "33554432",
		"CACHECAR_CACHE_LEASE_WAIT":                       "300ms",
		"CACHECAR_POLICIES_COURSE_STALE_WHILE_REVALIDATE": "20s",
		"CACHECAR_POLICIES_COURSE_STALE_IF_ERROR":         "1h",
		"CACHECAR_POLICIES_COURSE_NEGATIVE_TTL":           "5s",
		"CACHECAR_POLICIES_COURSE_REFRESH_AHEAD":          "0.5",
		"CACHECAR_VALKEY_TLS_ENABLED":                     "true",
		"CACHECAR_VALKEY_TLS_CA_FILE":                     certs.CAFile,
		"CACHECAR_VALKEY_TLS_CERT_FILE":                   certs.ClientCert,
		"CACHECAR_VALKEY_TLS_KEY_FILE":                    certs.ClientKey,
		"CACHECAR_VALKEY_TLS_SERVER_NAME":                 "redis.internal",
		"CACHECAR_VALKEY_TLS_INSECURE_SKIP_VERIFY":        "true",
	}
	cfg := mustLoad(t, Source{Getenv: env(e)})
	want := Config{
		Namespace: "app1:",
		Server: ServerConfig{Listen: "127.0.0.1:18080", ReadHeaderTimeout: 3 * time.Second, WriteTimeout: 20 * time.Second,
			IdleTimeout: time.Minute, DrainDelay: 5 * time.Second, ShutdownTimeout: 25 * time.Second},
		Health:   HealthConfig{Listen: "0.0.0.0:18081", CheckTimeout: 2 * time.Second, Pprof: true},
		Admin:    AdminConfig{Listen: "127.0.0.1:18082", Token: "admintoken-0123456789", ClearRate: 2, ClearBurst: 5, WarmMaxIDs: 500, WarmOnStart: true},
		Database: DatabaseConfig{URL: e["DATABASE_URL"], MaxConns: 32, MinConns: 2, MaxLoads: 40, ConnectTimeout: 3 * time.Second, QueryTimeout: 4 * time.Second},
		Valkey: ValkeyConfig{Addrs: []string{"redis.internal:6380"}, Username: "cachecar", Password: "redispw", DB: 2,
			Timeout: 80 * time.Millisecond, DialTimeout: 2 * time.Second, ReconnectMax: 10 * time.Second,
			BreakerThreshold: 3, BreakerOpen: 100 * time.Millisecond, BreakerOpenMax: 2 * time.Second,
			TLS: ValkeyTLSConfig{Enabled: true, CAFile: certs.CAFile, CertFile: certs.ClientCert, KeyFile: certs.ClientKey,
				ServerName: "redis.internal", InsecureSkipVerify: true}},
		Cache: CacheConfig{Enabled: true, TTLDefault: 10 * time.Minute, TierMaxBytes: 32 << 20, LeaseWait: 300 * time.Millisecond},
		Log:   LogConfig{Level: "debug", AccessSample: 0.5},
		Manifests: Manifests{Dir: "/srv/scorm", Key: "m:{mtime}:{filename}", TTL: 30 * time.Minute,
			MaxManifestBytes: 1 << 20, MaxEntries: 500},
		Invalidation: InvalidationConfig{Enabled: false, ListenURL: "postgres://listen:lpw@db.internal:5432/app", Channel: "app1_inv",
			ReconnectMax: 7 * time.Second, PingInterval: 9 * time.Second, MaxRows: 500},
		Sessions: SessionsConfig{Enabled: true, Prefix: "s:", TTL: 24 * time.Hour, Table: "user_sessions", Schema: "auth",
			MaxBodyBytes: 1024, RefreshInterval: time.Second, PruneInterval: 5 * time.Minute, DeleteUnknown: false, Migration: "connect-redis", TierMaxBytes: 64 << 20},
	}
	def := mustLoad(t, Source{})
	want.Policies = def.Policies
	want.Policies.Tenant.TTL = 2 * time.Hour
	want.Policies.Course = Policy{Key: "c:{id}", TTL: 15 * time.Minute, IDPattern: "^[1-9][0-9]{0,9}$", SQL: "SELECT 'x'", BatchSQL: "SELECT 1, 'x'",
		InvalidateOn:         []Dependency{{Table: "courses", Columns: map[string]string{"id": "id"}}, {Table: "course_versions", Columns: map[string]string{"id": "course_id"}}},
		StaleWhileRevalidate: 20 * time.Second, StaleIfError: time.Hour, NegativeTTL: 5 * time.Second, RefreshAhead: 0.5, WarmSQL: "SELECT 1"}
	want.Policies.Tenant.InvalidateOn = []Dependency{}
	want.Policies.Dispatch.TTL = 7 * time.Minute
	want.Policies.DispatchList.TTL = 8 * time.Minute
	want.Policies.TenantStats.TTL = 2 * time.Minute
	want.Policies.TenantStats.Key = "stats:{tenant_id}"
	want.Policies.TenantStats.IDPattern = "^[1-9][0-9]*$"
	if !reflect.DeepEqual(*cfg, want) {
		t.Fatalf("env-only config:\n got %+v\nwant %+v", *cfg, want)
	}
}

func TestCacheTTLDefaultBad(t *testing.T) {
	for _, v := range []string{"abc", "0", "-5", "1.5", "5m", "300s", "0x10", "99999999999999", "9223372036854775808"} {
		t.Run(v, func(t *testing.T) {
			list := problems(t, Source{Getenv: env(map[string]string{"CACHE_TTL_DEFAULT": v})})
			if !hasProblem(list, "CACHE_TTL_DEFAULT", "positive whole number of seconds") {
				t.Fatalf("problems %q do not name CACHE_TTL_DEFAULT", list)
			}
		})
	}
}

func TestProblems(t *testing.T) {
	tests := []struct {
		name string
		file string // written to a file when not empty
		path string // used as the file path when not empty (overrides file)
		env  map[string]string
		sets []string
		want [][]string // each: substrings one problem must contain
	}{
		{name: "unknown top-level key", file: "bogus: 1\n",
			want: [][]string{{"unknown key", `"bogus"`}}},
		{name: "unknown nested key", file: "server:\n  listen: 127.0.0.1:8080\n  lisen: x\n",
			want: [][]string{{"unknown key", `"server.lisen"`}}},
		{name: "unknown policy", file: "policies:\n  lesson:\n    key: \"lesson:{id}\"\n",
			want: [][]string{{"unknown key", `"policies.lesson.key"`}}},
		{name: "invalidate_on unknown placeholder, bad table and column, extra key",
			file: "policies:\n  course:\n    invalidate_on:\n      - {table: Courses, columns: {course_id: id}, when: always}\n      - {table: courses, columns: {id: \"id; drop\"}}\n      - {table: courses}\n",
			want: [][]string{
				{"policies.course.invalidate_on[0].table", `"Courses"`},
				{"policies.course.invalidate_on[0].columns", "{course_id} cannot be bound"},
				{"policies.course.invalidate_on[0]", `unknown key "when"`},
				{"policies.course.invalidate_on[1].columns.id", "identifier"},
				{"policies.course.invalidate_on[2].columns", "at least one"},
			}},
		{name: "invalidate_on binding a request placeholder", sets: []string{"policies.dispatch_list.invalidate_on=dispatches(tenant_id=tenant_id,status=status)"},
			want: [][]string{{"policies.dispatch_list.invalidate_on[0].columns", "{status} cannot be bound", "bindable: {tenant_id}"}}},
		{name: "invalidate_on text form", sets: []string{"policies.tenant.invalidate_on=tenants(id)"},
			want: [][]string{{"policies.tenant.invalidate_on", "placeholder=column"}}},
		{name: "invalidation values", env: map[string]string{"CACHECAR_INVALIDATION_CHANNEL": "bad-channel",
			"CACHECAR_INVALIDATION_MAX_ROWS": "0", "CACHECAR_INVALIDATION_PING_INTERVAL": "0s", "CACHECAR_INVALIDATION_LISTEN_URL": "postgres://a b@%zz"},
			want: [][]string{{"invalidation.channel"}, {"invalidation.max_rows"}, {"invalidation.ping_interval"}, {"invalidation.listen_url"}}},
		{name: "sessions values", env: map[string]string{"CACHECAR_SESSIONS_PREFIX": "sess *", "CACHECAR_SESSIONS_TTL": "0s",
			"CACHECAR_SESSIONS_MAX_BODY_BYTES": "1", "CACHECAR_SESSIONS_TABLE": "bad-name", "CACHECAR_SESSIONS_SCHEMA": "x;y"},
			want: [][]string{{"sessions.prefix"}, {"sessions.ttl"}, {"sessions.max_body_bytes"}, {"sessions.table"}, {"sessions.schema"}}},
		{name: "sessions migration", env: map[string]string{"CACHECAR_SESSIONS_MIGRATION": "connect-redis"},
			want: [][]string{{"sessions.delete_unknown must be false"}}},
		{name: "sessions migration unknown", env: map[string]string{"CACHECAR_SESSIONS_MIGRATION": "memcached"},
			want: [][]string{{"sessions.migration", "memcached"}}},
		{name: "key starting with a placeholder", sets: []string{"policies.course.key={id}:course"},
			want: [][]string{{"policies.course.key", "literal text"}}},
		{name: "bad duration in file", file: "valkey:\n  timeout: fast\n",
			want: [][]string{{"valkey.timeout", "duration"}}},
		{name: "bare number duration in file", file: "policies:\n  course:\n    ttl: 600\n",
			want: [][]string{{"policies.course.ttl", "no unit"}}},
		{name: "bad duration in env", env: map[string]string{"CACHECAR_SERVER_WRITE_TIMEOUT": "15"},
			want: [][]string{{"server.write_timeout", "missing unit"}}},
		{name: "negative duration", sets: []string{"valkey.timeout=-1s"},
			want: [][]string{{"valkey.timeout", "must be a positive duration"}}},
		{name: "zero duration", sets: []string{"database.query_timeout=0s"},
			want: [][]string{{"database.query_timeout", "must be a positive duration"}}},
		{name: "negative policy ttl", sets: []string{"policies.tenant.ttl=-1m"},
			want: [][]string{{"policies.tenant.ttl", "negative"}}},
		{name: "negative drain delay", sets: []string{"server.drain_delay=-1s"},
			want: [][]string{{"server.drain_delay", "negative"}}},
		{name: "query timeout not below write timeout", sets: []string{"database.query_timeout=20s"},
			want: [][]string{{"database.query_timeout", "server.write_timeout"}}},
		{name: "bad address: no port", sets: []string{"server.listen=localhost"},
			want: [][]string{{"server.listen", "host:port"}}},
		{name: "bad address: port range", file: "health:\n  listen: 127.0.0.1:99999\n",
			want: [][]string{{"health.listen", "0 to 65535"}}},
		{name: "bad address: port not a number", sets: []string{"admin.listen=127.0.0.1:http"},
			want: [][]string{{"admin.listen", "port"}}},
		{name: "bad address: space in host", env: map[string]string{"REDIS_HOST": "bad host"},
			want: [][]string{{"valkey.addrs[0]", "bad host"}}},
		{name: "bad address: REDIS_PORT", env: map[string]string{"REDIS_HOST": "h", "REDIS_PORT": "abc"},
			want: [][]string{{"valkey.addrs[0]", "port"}}},
		{name: "bad address: second of a list", env: map[string]string{"CACHECAR_VALKEY_ADDRS": "a:1,b"},
			want: [][]string{{"valkey.addrs[1]", "host:port"}}},
		{name: "bad address: port in REDIS_HOST", env: map[string]string{"REDIS_HOST": "127.0.0.1:6380"},
			want: [][]string{{"valkey.addrs[0]", "not an IPv6 address"}}},
		{name: "two ports on one address", sets: []string{"server.listen=127.0.0.1:9100", "health.listen=0.0.0.0:9100"},
			want: [][]string{{"server.listen and health.listen", "own address"}}},
		{name: "admin port on the read port", env: map[string]string{"ADMIN_TOKEN": "tok-0123456789abcdef"}, sets: []string{"admin.listen=127.0.0.1:8080"},
			want: [][]string{{"server.listen and admin.listen", "own address"}}},
		{name: "check-config's placeholders as secrets", env: map[string]string{"ADMIN_TOKEN": "<redacted-admin-token>", "REDIS_PASSWORD": "<redacted>", "DATABASE_URL": "postgres://app:<redacted>@db/app"},
			want: [][]string{{"admin.token", "placeholder"}, {"valkey.password", "placeholder"}, {"database.url", "placeholder"}}},
		{name: "bool, number and duration set to the empty string", env: map[string]string{"CACHECAR_INVALIDATION_ENABLED": EmptyEnv,
			"CACHECAR_CACHE_TIER_MAX_BYTES": EmptyEnv, "CACHECAR_LOG_ACCESS_SAMPLE": EmptyEnv, "CACHECAR_VALKEY_TIMEOUT": EmptyEnv},
			want: [][]string{{"CACHECAR_INVALIDATION_ENABLED", "empty string"}, {"CACHECAR_CACHE_TIER_MAX_BYTES", "empty string"},
				{"CACHECAR_LOG_ACCESS_SAMPLE", "empty string"}, {"CACHECAR_VALKEY_TIMEOUT", "empty string"}}},
		{name: "bad value named with its problem", sets: []string{"valkey.timeout=fast"},
			want: [][]string{{"valkey.timeout", `"fast"`, "want a duration"}}},
		{name: "a section given a value", file: "server: 5\n",
			want: [][]string{{`"server" is a section`}}},
		{name: "sessions prefix over cachecar's keys", sets: []string{"sessions.prefix=cachecar:"},
			want: [][]string{{"sessions.prefix", "cachecar's own keys"}}},
		{name: "sessions prefix a prefix of cachecar's keys", sets: []string{"sessions.prefix=cach"},
			want: [][]string{{"sessions.prefix", "cachecar's own keys"}}},
		{name: "sessions ttl under a second", sets: []string{"sessions.ttl=500ms"},
			want: [][]string{{"sessions.ttl", "whole number of seconds"}}},
		{name: "sessions ttl not whole seconds", sets: []string{"sessions.ttl=1500ms"},
			want: [][]string{{"sessions.ttl", "whole number of seconds"}}},
		{name: "prune interval under a second", sets: []string{"sessions.prune_interval=1ms"},
			want: [][]string{{"sessions.prune_interval", "at least 1s"}}},
		{name: "tier below fastcache's minimum", sets: []string{"cache.tier_max_bytes=1048576"},
			want: [][]string{{"cache.tier_max_bytes", "32 MiB"}}},
		{name: "negative stale windows", sets: []string{"policies.course.stale_while_revalidate=-1s", "policies.tenant.stale_if_error=-5m", "policies.dispatch.negative_ttl=-1s"},
			want: [][]string{{"policies.course.stale_while_revalidate", "negative"}, {"policies.tenant.stale_if_error", "negative"}, {"policies.dispatch.negative_ttl", "negative"}}},
		{name: "refresh ahead of a whole TTL", sets: []string{"policies.tenant_stats.refresh_ahead=1"},
			want: [][]string{{"policies.tenant_stats.refresh_ahead", "below 1"}}},
		{name: "valkey timeout 0", sets: []string{"valkey.timeout=0s"},
			want: [][]string{{"valkey.timeout", "must be a positive duration"}}},
		{name: "negative idle connections", sets: []string{"database.min_conns=-1"},
			want: [][]string{{"database.min_conns", "negative"}}},
		{name: "bulkhead of 0", sets: []string{"database.max_loads=0"},
			want: [][]string{{"database.max_loads", "at least 1"}}},
		{name: "lease wait past the query timeout", sets: []string{"cache.lease_wait=10s"},
			want: [][]string{{"cache.lease_wait", "database.query_timeout"}}},
		{name: "breaker open times reversed", sets: []string{"valkey.breaker_open=2s", "valkey.breaker_open_max=1s"},
			want: [][]string{{"valkey.breaker_open_max", "valkey.breaker_open"}}},
		{name: "breaker threshold 0", sets: []string{"valkey.breaker_threshold=0"},
			want: [][]string{{"valkey.breaker_threshold", "at least 1"}}},
		{name: "manifest key without literal text", sets: []string{"manifests.key={filename}:{mtime}"},
			want: [][]string{{"manifests.key", "literal text"}}},
		{name: "policy keys over sessions or cachecar's keys", sets: []string{"policies.course.key=sess:c:{id}", "policies.tenant.key=cachecar:t:{id}"},
			want: [][]string{{"policies.course.key", "sessions.prefix"}, {"policies.tenant.key", "cachecar's own keys"}}},
		{name: "admin token too short", sets: []string{"admin.token=short"},
			want: [][]string{{"admin.token", "at least 16"}}},
		{name: "admin token twice", sets: []string{"admin.token=a", "admin.token_file=/etc/hostname"},
			want: [][]string{{"admin.token and admin.token_file", "not both"}}},
		{name: "admin token file missing", sets: []string{"admin.token_file=/nonexistent/token"},
			want: [][]string{{"admin.token_file", "no such file"}}},
		{name: "admin clear limits", sets: []string{"admin.clear_rate=0", "admin.clear_burst=0", "admin.warm_max_ids=0"},
			want: [][]string{{"admin.clear_rate", "positive"}, {"admin.clear_burst", "at least 1"}, {"admin.warm_max_ids", "from 1"}}},
		{name: "valkey password twice", env: map[string]string{"REDIS_PASSWORD": "pw"}, sets: []string{"valkey.password_file=/etc/hostname"},
			want: [][]string{{"valkey.password (REDIS_PASSWORD) and valkey.password_file", "not both"}}},
		{name: "password files missing, and the URL's password", sets: []string{"valkey.password_file=/nonexistent/vk", "database.password_file=/nonexistent/db"},
			want: [][]string{{"valkey.password_file", "/nonexistent/vk", "no such file"}, {"database.password_file", "/nonexistent/db", "no such file"},
				{"database.url (DATABASE_URL) and database.password_file", "the URL has a password"}}},
		{name: "listen url with a password and a password file", sets: []string{"database.url=postgres://app@db/app",
			"database.password_file=/etc/hostname", "invalidation.listen_url=host=db user=app password=pw"},
			want: [][]string{{"invalidation.listen_url and database.password_file", "the URL has a password"}}},
		{name: "valkey tls: CA not PEM, certificate without key", sets: []string{"valkey.tls.enabled=true", "valkey.tls.ca_file=/etc/hostname",
			"valkey.tls.cert_file=/nonexistent/client.pem"},
			want: [][]string{{"valkey.tls.ca_file", "no PEM certificate", "/etc/hostname"}, {"valkey.tls.cert_file and valkey.tls.key_file", "set both"}}},
		{name: "valkey tls: key without certificate", env: map[string]string{"CACHECAR_VALKEY_TLS_ENABLED": "true", "CACHECAR_VALKEY_TLS_KEY_FILE": "/etc/hostname"},
			want: [][]string{{"valkey.tls.cert_file and valkey.tls.key_file", "or neither"}}},
		{name: "valkey tls: files missing", sets: []string{"valkey.tls.enabled=true", "valkey.tls.ca_file=/nonexistent/ca.pem",
			"valkey.tls.cert_file=/nonexistent/c.pem", "valkey.tls.key_file=/nonexistent/k.pem"},
			want: [][]string{{"valkey.tls.ca_file", "/nonexistent/ca.pem", "no such file"}, {"valkey.tls.cert_file and valkey.tls.key_file", "/nonexistent/c.pem", "no such file"}}},
		{name: "valkey tls settings while disabled", file: "valkey:\n  tls:\n    ca_file: /etc/hostname\n    insecure_skip_verify: true\n",
			want: [][]string{{"valkey.tls.ca_file, valkey.tls.insecure_skip_verify", "valkey.tls.enabled is false"}}},
		{name: "valkey tls enabled not a bool", env: map[string]string{"CACHECAR_VALKEY_TLS_ENABLED": "please"},
			want: [][]string{{"valkey.tls.enabled"}}},
		{name: "empty listen", sets: []string{"server.listen="},
			want: [][]string{{"server.listen", "host:port"}}},
		{name: "not YAML", file: "server: [unclosed\n\tlisten: ::: {\n",
			want: [][]string{{"not valid YAML"}}},
		{name: "YAML but not a mapping", file: "- just\n- a list\n",
			want: [][]string{{"not valid YAML"}}},
		{name: "missing file", path: "/nonexistent/dir/cachecar.yaml",
			want: [][]string{{"config file", "/nonexistent/dir/cachecar.yaml"}}},
		{name: "--set without =", sets: []string{"server.listen"},
			want: [][]string{{"--set", `"server.listen"`, "key=value"}}},
		{name: "--set unknown key", sets: []string{"server.lsten=127.0.0.1:1"},
			want: [][]string{{"--set", "unknown key", `"server.lsten"`}}},
		{name: "--set a section", sets: []string{"server=x"},
			want: [][]string{{"--set", "unknown key", `"server"`}}},
		{name: "bad int", sets: []string{"database.max_conns=lots"},
			want: [][]string{{"database.max_conns"}}},
		{name: "max_conns zero", sets: []string{"database.max_conns=0"},
			want: [][]string{{"database.max_conns", "at least 1"}}},
		{name: "bad bool", env: map[string]string{"CACHECAR_CACHE_ENABLED": "maybe"},
			want: [][]string{{"cache.enabled"}}},
		{name: "negative db", sets: []string{"valkey.db=-1"},
			want: [][]string{{"valkey.db", "negative"}}},
		{name: "bad log level", sets: []string{"log.level=verbose"},
			want: [][]string{{"log.level", `"verbose"`}}},
		{name: "access sample out of range", sets: []string{"log.access_sample=1.5"},
			want: [][]string{{"log.access_sample", "between 0 and 1"}}},
		{name: "empty database url", sets: []string{"database.url="},
			want: [][]string{{"database.url", "must be set"}}},
		{name: "bad database url", sets: []string{"database.url=postgres://u@h:notaport/db"},
			want: [][]string{{"database.url", "not a valid"}}},
		{name: "glob in namespace", sets: []string{"namespace=app*"},
			want: [][]string{{"namespace", "glob"}}},
		{name: "missing batch sql", sets: []string{"policies.course.batch_sql="},
			want: [][]string{{"policies.course.batch_sql", "must be set"}}},
		{name: "missing sql", sets: []string{"policies.tenant.sql= "},
			want: [][]string{{"policies.tenant.sql", "must be set"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := Source{Getenv: env(tt.env), Sets: tt.sets}
			switch {
			case tt.path != "":
				src.File = tt.path
			case tt.file != "":
				src.File = writeFile(t, tt.file)
			}
			list := problems(t, src)
			for _, w := range tt.want {
				if !hasProblem(list, w...) {
					t.Errorf("no problem contains all of %q; problems:\n  %s", w, strings.Join(list, "\n  "))
				}
			}
		})
	}
}

// TestProblemsAllAtOnce: start-up lists every problem, not just the first.
func TestProblemsAllAtOnce(t *testing.T) {
	file := writeFile(t, "server:\n  listen: nope\nvalkey:\n  timeout: fast\nbogus: true\n")
	list := problems(t, Source{
		File:   file,
		Getenv: env(map[string]string{"CACHE_TTL_DEFAULT": "abc"}),
		Sets:   []string{"log.level=loud"},
	})
	want := [][]string{
		{"server.listen", `"nope"`},
		{"valkey.timeout", "duration"},
		{"unknown key", `"bogus"`},
		{"CACHE_TTL_DEFAULT"},
		{"log.level", `"loud"`},
	}
	for _, w := range want {
		if !hasProblem(list, w...) {
			t.Errorf("no problem contains all of %q; problems:\n  %s", w, strings.Join(list, "\n  "))
		}
	}
	if len(list) != len(want) {
		t.Errorf("%d problems, want %d (one per mistake):\n  %s", len(list), len(want), strings.Join(list, "\n  "))
	}

	var pe *ProblemsError
	_, err := Load(Source{Sets: []string{"server.listen=a", "health.listen=b", "admin.listen=c"}})
	if !errors.As(err, &pe) {
		t.Fatalf("err = %v, want *ProblemsError", err)
	}
	msg := err.Error()
	for _, s := range []string{"server.listen", "health.listen", "admin.listen"} {
		if !strings.Contains(msg, s) {
			t.Errorf("error message lacks %q:\n%s", s, msg)
		}
	}
	if len(pe.Problems) != 3 {
		t.Errorf("%d problems, want 3: %q", len(pe.Problems), pe.Problems)
	}
}

// TestDecodeFailureIsOneProblem: a value that does not decode is reported once, by its key,
// and not again as the zero value it leaves behind.
func TestDecodeFailureIsOneProblem(t *testing.T) {
	list := problems(t, Source{Sets: []string{"valkey.timeout=fast"}})
	if len(list) != 1 || !strings.HasPrefix(list[0], "valkey.timeout: ") {
		t.Fatalf("problems = %q, want exactly one starting with valkey.timeout", list)
	}
}

func TestPolicyKeyValidation(t *testing.T) {
	tests := []struct {
		name string
		sets []string
		want []string // substrings of one problem; nil: loads fine
	}{
		{"default course key", []string{"policies.course.key=course:{id}"}, nil},
		{"custom prefix", []string{"policies.course.key=lms:v2:course:{id}"}, nil},
		{"list key reordered", []string{"policies.dispatch_list.key=dl:{limit}:{after}:{status}:{tenant_id}"}, nil},
		{"missing placeholder", []string{"policies.course.key=course:"}, []string{"policies.course.key", "{id}", "exactly once"}},
		{"missing list placeholder", []string{"policies.dispatch_list.key=dl:{tenant_id}:{status}:{after}"}, []string{"policies.dispatch_list.key", "{limit}", "exactly once"}},
		{"duplicate placeholder", []string{"policies.course.key=course:{id}:{id}"}, []string{"policies.course.key", "{id}", "exactly once"}},
		{"unknown placeholder", []string{"policies.course.key=course:{id}:{tenant_id}"}, []string{"policies.course.key", "unknown placeholder {tenant_id}"}},
		{"wrong placeholder", []string{"policies.tenant_stats.key=stats:{id}"}, []string{"policies.tenant_stats.key", "{tenant_id}"}},
		{"upper-case placeholder", []string{"policies.course.key=course:{ID}"}, []string{"policies.course.key"}},
		{"unbalanced open brace", []string{"policies.course.key=course:{id}{"}, []string{"policies.course.key", "unbalanced"}},
		{"unbalanced close brace", []string{"policies.course.key=course}:{id}"}, []string{"policies.course.key", "unbalanced"}},
		{"empty braces", []string{"policies.course.key=course:{}{id}"}, []string{"policies.course.key", "unbalanced"}},
		{"empty key", []string{"policies.course.key="}, []string{"policies.course.key", "must be set"}},
		{"glob star", []string{"policies.course.key=course*:{id}"}, []string{"policies.course.key", "glob"}},
		{"glob question mark", []string{"policies.course.key=course?:{id}"}, []string{"policies.course.key", "glob"}},
		{"glob class", []string{"policies.course.key=course[a]:{id}"}, []string{"policies.course.key", "glob"}},
		{"backslash", []string{`policies.course.key=course\:{id}`}, []string{"policies.course.key", "glob"}},
		{"space", []string{"policies.course.key=course {id}"}, []string{"policies.course.key", "spaces"}},
		{"id pattern unanchored", []string{"policies.course.id_pattern=[0-9]+"}, []string{"policies.course.id_pattern", "anchored"}},
		{"id pattern start only", []string{"policies.course.id_pattern=^[0-9]+"}, []string{"policies.course.id_pattern", "anchored"}},
		{"id pattern end only", []string{"policies.course.id_pattern=[0-9]+$"}, []string{"policies.course.id_pattern", "anchored"}},
		{"id pattern alternation only looks anchored", []string{"policies.course.id_pattern=^[1-9]|[0-9]$"}, []string{"policies.course.id_pattern", "anchored"}},
		{"id pattern multi-line", []string{"policies.course.id_pattern=(?m)^[1-9][0-9]*$"}, []string{"policies.course.id_pattern", "anchored"}},
		{"id pattern grouped alternation", []string{"policies.course.id_pattern=^(?:[1-9]|[1-9][0-9])$"}, nil},
		{"id pattern matches *", []string{"policies.course.id_pattern=^.+$"}, []string{"policies.course.id_pattern", "'*'"}},
		{"id pattern matches :", []string{"policies.course.id_pattern=^[0-9:]+$"}, []string{"policies.course.id_pattern", "':'"}},
		{"id pattern matches empty", []string{"policies.course.id_pattern=^[0-9]*$"}, []string{"policies.course.id_pattern", "empty"}},
		{"id pattern does not compile", []string{"policies.course.id_pattern=^[0-9$"}, []string{"policies.course.id_pattern", "missing closing"}},
		{"id pattern empty", []string{"policies.course.id_pattern="}, []string{"policies.course.id_pattern", "must be set"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := Source{Sets: tt.sets}
			if tt.want == nil {
				mustLoad(t, src)
				return
			}
			list := problems(t, src)
			if !hasProblem(list, tt.want...) {
				t.Fatalf("no problem contains all of %q; problems:\n  %s", tt.want, strings.Join(list, "\n  "))
			}
		})
	}
}

func TestRedacted(t *testing.T) {
	const (
		dbPass     = "dbSECRETpw"
		valkeyPass = "vkSECRETpw"
		token      = "tokSECRET-0123456789"
	)
	tests := []struct {
		name  string
		dbURL string
	}{
		{"url", "postgres://app:" + dbPass + "@db:5432/app?sslmode=disable"},
		{"url with password parameter", "postgres://app@db:5432/app?sslmode=disable&password=" + dbPass},
		{"key=value dsn", "host=db user=app password=" + dbPass + " dbname=app"},
		{"quoted dsn", "host=db user=app password='" + dbPass + " x' dbname=app"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := mustLoad(t, Source{Getenv: env(map[string]string{
				"DATABASE_URL": tt.dbURL, "REDIS_PASSWORD": valkeyPass, "ADMIN_TOKEN": token,
			})})
			r := cfg.Redacted()
			dump := strings.Join([]string{r.Database.URL, r.Valkey.Password, r.Admin.Token}, " ") + " " +
				strings.ReplaceAll(strings.ReplaceAll(stringify(r), "\n", " "), "\t", " ")
			for _, secret := range []string{dbPass, valkeyPass, token, "SECRET"} {
				if strings.Contains(dump, secret) {
					t.Errorf("redacted config contains %q: %s", secret, dump)
				}
			}
			if r.Valkey.Password != "<redacted>" || r.Admin.Token != "<redacted-admin-token>" {
				t.Errorf("password %q, token %q: want <redacted> and <redacted-admin-token>", r.Valkey.Password, r.Admin.Token)
			}
			if !strings.Contains(r.Database.URL, "db") {
				t.Errorf("redacted url %q lost the host", r.Database.URL)
			}
			// Redacted copies: the original keeps its secrets, and the lists are not shared.
			if cfg.Valkey.Password != valkeyPass || cfg.Admin.Token != token || cfg.Database.URL != tt.dbURL {
				t.Error("Redacted modified the original config")
			}
			r.Valkey.Addrs[0] = "changed:1"
			if cfg.Valkey.Addrs[0] == "changed:1" {
				t.Error("Redacted shares valkey.addrs with the original")
			}
		})
	}
	// Empty secrets stay empty: "<redacted>" would suggest one is set.
	r := mustLoad(t, Source{}).Redacted()
	if r.Valkey.Password != "" || r.Admin.Token != "" {
		t.Errorf("empty secrets redacted to %q, %q; want empty", r.Valkey.Password, r.Admin.Token)
	}
}

// stringify renders every string field of c, so that a secret anywhere in it is found.
func stringify(c Config) string {
	var b strings.Builder
	var walk func(v reflect.Value)
	walk = func(v reflect.Value) {
		switch v.Kind() {
		case reflect.String:
			b.WriteString(v.String())
			b.WriteByte(' ')
		case reflect.Struct:
			for i := range v.NumField() {
				walk(v.Field(i))
			}
		case reflect.Slice:
			for i := range v.Len() {
				walk(v.Index(i))
			}
		}
	}
	walk(reflect.ValueOf(c))
	return b.String()
}

func TestRedactURL(t *testing.T) {
	tests := []struct {
		in, want string
	}{
		{"postgres://app:pw@db:5432/app", "postgres://app:<redacted>@db:5432/app"},
		{"postgresql://app:pw@db/app?sslmode=require", "postgresql://app:<redacted>@db/app?sslmode=require"},
		{"postgres://app@db/app", "postgres://app@db/app"},
		{"postgres://db/app", "postgres://db/app"},
		{"postgres://app:@db/app", "postgres://app:<redacted>@db/app"},
		{"postgres://app:p%40ss@db/app", "postgres://app:<redacted>@db/app"},
		{"postgres://app:pw@h1:5432,h2:5433/app", "postgres://app:<redacted>@h1:5432,h2:5433/app"},
		{"postgres://app:pw@[::1]:5432/app", "postgres://app:<redacted>@[::1]:5432/app"},
		{"postgres://app@db/app?password=pw&sslmode=disable", "postgres://app@db/app?password=<redacted>&sslmode=disable"},
		{"postgres://app:pw@db/app?password=pw2", "postgres://app:<redacted>@db/app?password=<redacted>"},
		{"postgres://db/app?sslpassword=kp&application_name=x", "postgres://db/app?sslpassword=<redacted>&application_name=x"},
		{"postgres://db/app?pass%77ord=pw", "postgres://db/app?pass%77ord=<redacted>"},
		// Malformed: an unencoded '/' or '@' in the password. Nothing of it may show.
		{"postgres://app:pa/ss@db/app", "postgres://<redacted>"},
		{"postgres://app:p@ss@db/app", "postgres://<redacted>"},
		{"host=db user=app password=pw dbname=app", "host=db user=app password=<redacted> dbname=app"},
		{"password=pw", "password=<redacted>"},
		{"host=db password = pw user=app", "host=db password = <redacted> user=app"},
		{"host=db password='my pw' user=app", "host=db password=<redacted> user=app"},
		{`host=db password='it\'s pw' user=app`, "host=db password=<redacted> user=app"},
		{`host=db password=p\ w user=app`, "host=db password=<redacted> user=app"},
		{"host=db sslpassword=kp password=pw", "host=db sslpassword=<redacted> password=<redacted>"},
		{"host=db application_name='password=x' user=app", "host=db application_name='password=x' user=app"},
		{"host=db\tpassword=pw\nuser=app", "host=db\tpassword=<redacted>\nuser=app"},
		{"host=db password='unterminated", "host=db password=<redacted>"},
		{"host=db oops", "host=db <redacted>"},
		{"", ""},
	}
	for _, tt := range tests {
		if got := RedactURL(tt.in); got != tt.want {
			t.Errorf("RedactURL(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestEnvName(t *testing.T) {
	for key, want := range map[string]string{
		"server.listen":              "CACHECAR_SERVER_LISTEN",
		"policies.course.ttl":        "CACHECAR_POLICIES_COURSE_TTL",
		"policies.dispatch_list.key": "CACHECAR_POLICIES_DISPATCH_LIST_KEY",
		"namespace":                  "CACHECAR_NAMESPACE",
	} {
		if got := EnvName(key); got != want {
			t.Errorf("EnvName(%q) = %q, want %q", key, got, want)
		}
	}
}

func TestCheckAddr(t *testing.T) {
	tests := []struct {
		in string
		ok bool
	}{
		{"127.0.0.1:8080", true},
		{":8080", true},
		{"0.0.0.0:0", true},
		{"[::1]:6379", true},
		{"redis.internal:6379", true},
		{"127.0.0.1:65535", true},
		{"", false},
		{"127.0.0.1", false},
		{"127.0.0.1:", false},
		{"127.0.0.1:65536", false},
		{"127.0.0.1:-1", false},
		{"127.0.0.1:http", false},
		{"::1:6379", false},
		{"[127.0.0.1:6380]:6379", false}, // REDIS_HOST=127.0.0.1:6380
		{"[redis:6380]:6379", false},
		{"[fe80::1%eth0]:6379", true},
		{"bad host:1", false},
		{"a/b:1", false},
		{`a\b:1`, false},
	}
	for _, tt := range tests {
		if err := CheckAddr(tt.in); (err == nil) != tt.ok {
			t.Errorf("CheckAddr(%q) = %v, want ok=%v", tt.in, err, tt.ok)
		}
	}
}

func TestEffectiveTTL(t *testing.T) {
	if got := (Policy{TTL: time.Minute}).EffectiveTTL(time.Hour); got != time.Minute {
		t.Errorf("EffectiveTTL with own ttl = %v", got)
	}
	if got := (Policy{}).EffectiveTTL(time.Hour); got != time.Hour {
		t.Errorf("EffectiveTTL without own ttl = %v", got)
	}
}

// TestPolicyParamsMatchNamed: every policy has its placeholders listed in PolicyParams, so
// that its key is validated.
func TestPolicyParamsMatchNamed(t *testing.T) {
	var p Policies
	named := p.Named()
	if len(named) != len(PolicyParams) {
		t.Fatalf("Named has %d policies, PolicyParams %d", len(named), len(PolicyParams))
	}
	for name := range named {
		if _, ok := PolicyParams[name]; !ok {
			t.Errorf("policy %q has no PolicyParams entry", name)
		}
	}
}

func TestManifestsAndFlushDelayProblems(t *testing.T) {
	for _, tc := range []struct {
		set  []string
		want string
	}{
		{[]string{"manifests.key=scorm:{filename}"}, "must contain {mtime} exactly once"},
		{[]string{"manifests.key=scorm:{filename}:{mtime}:{id}"}, "unknown placeholder {id}"},
		{[]string{"manifests.dir="}, "manifests.dir: must be set"},
		{[]string{"manifests.max_manifest_bytes=0"}, "manifests.max_manifest_bytes: must be positive"},
		{[]string{"manifests.max_entries=-1"}, "manifests.max_entries: must be positive"},
		{[]string{"manifests.ttl=0s"}, "manifests.ttl: must be a positive duration"},
		{[]string{"valkey.max_flush_delay=5ms"}, "valkey.max_flush_delay: must be from 0 to 1ms"},
	} {
		_, err := Load(Source{Sets: tc.set})
		var pe *ProblemsError
		if !errors.As(err, &pe) || !strings.Contains(pe.Error(), tc.want) {
			t.Errorf("%v: got %v, want a problem containing %q", tc.set, err, tc.want)
		}
	}
}

func TestTierLargerThanMemoryLimit(t *testing.T) {
	old := MemoryLimit
	MemoryLimit = func() (int64, string) { return 96 << 20, "cgroup memory.max" }
	t.Cleanup(func() { MemoryLimit = old })
	_, err := Load(Source{Sets: []string{"cache.tier_max_bytes=67108864"}})
	var pe *ProblemsError
	if !errors.As(err, &pe) || len(pe.Problems) != 1 || !strings.Contains(pe.Problems[0], "cache.tier_max_bytes") || !strings.Contains(pe.Problems[0], "cgroup memory.max") {
		t.Fatalf("tier of 64 MiB in a 96 MiB limit: %v", err)
	}
	// The sessions' tiers (32 MiB each by default) count too: the copies of Valkey's answers and
	// those of PostgreSQL's.
	_, err = Load(Source{Sets: []string{"cache.tier_max_bytes=33554432"}})
	if !errors.As(err, &pe) || len(pe.Problems) != 1 || !strings.Contains(pe.Problems[0], "cache.tier_max_bytes (33554432) and sessions.tier_max_bytes (33554432, counted once per session tier in use: 67108864)") {
		t.Fatalf("tiers of 32 MiB and 2 x 32 MiB in a 96 MiB limit: %v", err)
	}
	for _, sets := range [][]string{
		{"cache.tier_max_bytes=33554432", "sessions.tier_max_bytes=0"},
		{"cache.tier_max_bytes=33554432", "sessions.enabled=false"},
		{"cache.tier_max_bytes=0", "sessions.migration=connect-pg-simple"},                              // PostgreSQL's copies only
		{"cache.tier_max_bytes=0", "sessions.migration=connect-redis", "sessions.delete_unknown=false"}, // Valkey's copies only
	} {
		if _, err := Load(Source{Sets: sets}); err != nil {
			t.Fatalf("%v in a 96 MiB limit: %v", sets, err)
		}
	}
	noValkey := func(k string) string {
		if k == "CACHECAR_VALKEY_ADDRS" {
			return " "
		}
		return ""
	}
	if cfg, err := Load(Source{Getenv: noValkey, Sets: []string{"cache.tier_max_bytes=0"}}); err != nil || len(cfg.Valkey.Addrs) != 0 {
		t.Fatalf("no Valkey (PostgreSQL's copies only) in a 96 MiB limit: %v", err)
	}
	for _, sets := range [][]string{
		{"cache.tier_max_bytes=0"}, // both session tiers
		{"cache.tier_max_bytes=33554432", "sessions.migration=connect-pg-simple"},
		{"cache.tier_max_bytes=33554432", "sessions.migration=connect-redis", "sessions.delete_unknown=false"},
	} {
		if _, err := Load(Source{Sets: sets}); err == nil {
			t.Fatalf("%v in a 96 MiB limit: no problem reported", sets)
		}
	}
}

func TestSessionsTierSize(t *testing.T) {
	cfg, err := Load(Source{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Sessions.TierMaxBytes != MinTierBytes {
		t.Fatalf("default sessions.tier_max_bytes %d, want %d", cfg.Sessions.TierMaxBytes, MinTierBytes)
	}
	if _, err := Load(Source{Sets: []string{"sessions.refresh_interval=6s"}}); err == nil || !strings.Contains(err.Error(), "sessions.refresh_interval: at most 5s") {
		t.Fatalf("sessions.refresh_interval=6s: %v", err)
	}
	for _, bad := range []string{"1", "-1", "33554431", "1099511627777"} {
		_, err := Load(Source{Sets: []string{"sessions.tier_max_bytes=" + bad}})
		var pe *ProblemsError
		if !errors.As(err, &pe) || len(pe.Problems) != 1 || !strings.Contains(pe.Problems[0], "sessions.tier_max_bytes") {
			t.Fatalf("sessions.tier_max_bytes=%s: %v", bad, err)
		}
	}
}

func TestValkeyTLSConfig(t *testing.T) {
	certs := testenv.NewCerts(t)
	other := testenv.NewCerts(t)
	load := func(t *testing.T, sets ...string) (*Config, []string) {
		t.Helper()
		cfg, err := Load(Source{Sets: sets})
		var pe *ProblemsError
		if errors.As(err, &pe) {
			return nil, pe.Problems
		}
		if err != nil {
			t.Fatal(err)
		}
		return cfg, nil
	}

	t.Run("off", func(t *testing.T) {
		cfg, _ := load(t)
		if tc, err := cfg.Valkey.TLS.ClientConfig(); tc != nil || err != nil {
			t.Fatalf("TLS off: %v %v, want nil, nil", tc, err)
		}
	})
	t.Run("system roots", func(t *testing.T) {
		cfg, list := load(t, "valkey.tls.enabled=true")
		if list != nil {
			t.Fatal(list)
		}
		tc, err := cfg.Valkey.TLS.ClientConfig()
		if err != nil || tc == nil || tc.RootCAs != nil || len(tc.Certificates) != 0 || tc.InsecureSkipVerify || tc.MinVersion != tls.VersionTLS12 {
			t.Fatalf("%+v %v", tc, err)
		}
	})
	t.Run("CA, client certificate, server name", func(t *testing.T) {
		cfg, list := load(t, "valkey.tls.enabled=true", "valkey.tls.ca_file="+certs.CAFile, "valkey.tls.cert_file="+certs.ClientCert,
			"valkey.tls.key_file="+certs.ClientKey, "valkey.tls.server_name=redis.internal")
		if list != nil {
			t.Fatal(list)
		}
		tc, err := cfg.Valkey.TLS.ClientConfig()
		if err != nil || tc.RootCAs == nil || len(tc.Certificates) != 1 || tc.ServerName != "redis.internal" || tc.MinVersion != tls.VersionTLS12 {
			t.Fatalf("%+v %v", tc, err)
		}
		// The pool holds the CA: the server certificate it signed verifies against it.
		leaf, err := x509.ParseCertificate(mustPEM(t, certs.ServerCert))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: tc.RootCAs, DNSName: "localhost"}); err != nil {
			t.Fatalf("the server certificate does not verify against ca_file's pool: %v", err)
		}
	})
	for _, c := range []struct {
		name string
		sets []string
		want []string
	}{
		{"key of another certificate", []string{"valkey.tls.cert_file=" + certs.ClientCert, "valkey.tls.key_file=" + other.ClientKey},
			[]string{"valkey.tls.cert_file and valkey.tls.key_file", "private key does not match"}},
		{"certificate in the key file", []string{"valkey.tls.cert_file=" + certs.ClientCert, "valkey.tls.key_file=" + certs.ClientCert},
			[]string{"valkey.tls.cert_file and valkey.tls.key_file"}},
		{"key in the CA file", []string{"valkey.tls.ca_file=" + certs.ClientKey},
			[]string{"valkey.tls.ca_file", "no PEM certificate"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, list := load(t, append([]string{"valkey.tls.enabled=true"}, c.sets...)...)
			if len(list) != 1 || !hasProblem(list, c.want...) {
				t.Fatalf("problems %q, want one containing %q", list, c.want)
			}
		})
	}
}

func mustPEM(t *testing.T, file string) []byte {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(b)
	if block == nil {
		t.Fatalf("no PEM in %s", file)
	}
	return block.Bytes
}

func TestPasswordFiles(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	vk, db := write("vk", "  vk-pw\n"), write("db", "db-pw\r\n")

	// Env only, as a pod with mounted Secrets sets it: the URL carries no password.
	cfg := mustLoad(t, Source{Getenv: env(map[string]string{"DATABASE_URL": "postgres://app@db:5432/app?sslmode=verify-full",
		"CACHECAR_DATABASE_PASSWORD_FILE": db, "CACHECAR_VALKEY_PASSWORD_FILE": vk})})
	if cfg.Valkey.PasswordFile != vk || cfg.Database.PasswordFile != db || cfg.Valkey.Password != "" {
		t.Fatalf("valkey %q %q, database %q", cfg.Valkey.PasswordFile, cfg.Valkey.Password, cfg.Database.PasswordFile)
	}
	if pw, err := cfg.Valkey.EffectivePassword(); pw != "vk-pw" || err != nil {
		t.Fatalf("valkey password %q %v, want the file's, trimmed", pw, err)
	}
	if pw, err := cfg.Database.FilePassword(); pw != "db-pw" || err != nil {
		t.Fatalf("database password %q %v, want the file's, trimmed", pw, err)
	}
	// Redacted output names the files; it has no passwords to hide.
	if r := cfg.Redacted(); r.Valkey.PasswordFile != vk || r.Database.PasswordFile != db || strings.Contains(stringify(r), "-pw") {
		t.Fatalf("redacted: %+v", r.Valkey)
	}
	// Without a file, the plain value.
	if pw, err := mustLoad(t, Source{Getenv: env(map[string]string{"REDIS_PASSWORD": "plain"})}).Valkey.EffectivePassword(); pw != "plain" || err != nil {
		t.Fatalf("valkey.password: %q %v", pw, err)
	}
	if pw, err := mustLoad(t, Source{}).Database.FilePassword(); pw != "" || err != nil {
		t.Fatalf("no database.password_file: %q %v, want \"\"", pw, err)
	}

	blank := write("blank", " \n")
	for _, c := range []struct {
		name string
		env  map[string]string
		want []string // "" for no problem
	}{
		{"empty valkey file", map[string]string{"CACHECAR_VALKEY_PASSWORD_FILE": blank}, []string{"valkey.password_file", "is empty"}},
		{"empty database file", map[string]string{"DATABASE_URL": "postgres://app@db/app", "CACHECAR_DATABASE_PASSWORD_FILE": blank},
			[]string{"database.password_file", "is empty"}},
		{"URL with a password parameter", map[string]string{"DATABASE_URL": "postgres://app@db/app?password=x", "CACHECAR_DATABASE_PASSWORD_FILE": db},
			[]string{"database.url (DATABASE_URL) and database.password_file"}},
		{"DSN with a password", map[string]string{"DATABASE_URL": "host=db user=app password='a b'", "CACHECAR_DATABASE_PASSWORD_FILE": db},
			[]string{"database.url (DATABASE_URL) and database.password_file"}},
		{"DSN with only an sslpassword", map[string]string{"DATABASE_URL": "host=db user=app sslpassword=k", "CACHECAR_DATABASE_PASSWORD_FILE": db}, nil},
		{"listen URL without a password", map[string]string{"DATABASE_URL": "postgres://app@db/app", "CACHECAR_DATABASE_PASSWORD_FILE": db,
			"CACHECAR_INVALIDATION_LISTEN_URL": "postgres://app@db-direct/app"}, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Load(Source{Getenv: env(c.env)})
			if c.want == nil {
				if err != nil {
					t.Fatalf("problems: %v", err)
				}
				return
			}
			var pe *ProblemsError
			if !errors.As(err, &pe) || len(pe.Problems) != 1 || !hasProblem(pe.Problems, c.want...) {
				t.Fatalf("%v, want one problem containing %q", err, c.want)
			}
		})
	}
}

// TestGetenv: a variable set to the empty string reads as EmptyEnv, an unset one as "".
func TestGetenv(t *testing.T) {
	t.Setenv("CACHECAR_TEST_GETENV_EMPTY", "")
	t.Setenv("CACHECAR_TEST_GETENV_SET", "x")
	if got := Getenv("CACHECAR_TEST_GETENV_EMPTY"); got != EmptyEnv {
		t.Errorf("set to empty: got %q, want EmptyEnv", got)
	}
	if got := Getenv("CACHECAR_TEST_GETENV_SET"); got != "x" {
		t.Errorf("set: got %q, want x", got)
	}
	if got := Getenv("CACHECAR_TEST_GETENV_UNSET_NOWHERE"); got != "" {
		t.Errorf("unset: got %q, want empty", got)
	}
	// Through Load, with the process environment: CACHECAR_VALKEY_ADDRS= runs without Valkey.
	t.Setenv("CACHECAR_VALKEY_ADDRS", "")
	cfg := mustLoad(t, Source{Getenv: func(k string) string {
		if strings.HasPrefix(k, "CACHECAR_VALKEY_") {
			return Getenv(k)
		}
		return env(nil)(k)
	}})
	if len(cfg.Valkey.Addrs) != 0 {
		t.Errorf("CACHECAR_VALKEY_ADDRS set to empty: addrs %q, want none", cfg.Valkey.Addrs)
	}
}

// The memory limit is the lowest of GOMEMLIMIT and the container's cgroup limit, v2 or v1; an
// unlimited cgroup ("max", or v1's page-rounded 2^63) is no limit.
func TestMemoryLimitSources(t *testing.T) {
	files := func(m map[string]string) func(string) ([]byte, error) {
		return func(path string) ([]byte, error) {
			if v, ok := m[path]; ok {
				return []byte(v), nil
			}
			return nil, os.ErrNotExist
		}
	}
	const v2, v1 = "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"
	for _, tc := range []struct {
		name    string
		goLimit int64
		files   map[string]string
		want    int64
		src     string
	}{
		{"nothing", math.MaxInt64, nil, 0, ""},
		{"v2 unlimited", math.MaxInt64, map[string]string{v2: "max\n"}, 0, ""},
		{"v1 unlimited", math.MaxInt64, map[string]string{v1: "9223372036854771712\n"}, 0, ""},
		{"v2", math.MaxInt64, map[string]string{v2: "268435456\n"}, 256 << 20, "cgroup memory.max"},
		{"v1", math.MaxInt64, map[string]string{v1: "134217728\n"}, 128 << 20, "cgroup v1 memory.limit_in_bytes"},
		{"GOMEMLIMIT lower", 100 << 20, map[string]string{v1: "134217728\n"}, 100 << 20, "GOMEMLIMIT"},
		{"cgroup lower", 200 << 20, map[string]string{v2: "134217728"}, 128 << 20, "cgroup memory.max"},
		{"garbage", math.MaxInt64, map[string]string{v2: "lots", v1: "-1"}, 0, ""},
	} {
		lim, src := memoryLimit(tc.goLimit, files(tc.files))
		if lim != tc.want || src != tc.src {
			t.Errorf("%s: memoryLimit = %d, %q; want %d, %q", tc.name, lim, src, tc.want, tc.src)
		}
	}
}
