// Package configs defines cachecar's configuration, its documented defaults, and how it is
// loaded (file, environment, flags) and validated.
package configs

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/viper"
)

// DefaultYAML is the embedded, commented default configuration. Every key cachecar knows is in
// it; a key absent from it is unknown.
//
//go:embed cachecar.yaml
var DefaultYAML []byte

// Config is the whole configuration of one cachecar process.
type Config struct {
	Namespace string         `mapstructure:"namespace"`
	Server    ServerConfig   `mapstructure:"server"`
	Health    HealthConfig   `mapstructure:"health"`
	Admin     AdminConfig    `mapstructure:"admin"`
	Database  DatabaseConfig `mapstructure:"database"`
	Valkey    ValkeyConfig   `mapstructure:"valkey"`
	Cache     CacheConfig    `mapstructure:"cache"`
	Log       LogConfig      `mapstructure:"log"`
	Policies  Policies       `mapstructure:"policies"`
}

// ServerConfig is the read API server.
type ServerConfig struct {
	Listen            string        `mapstructure:"listen"`
	ReadHeaderTimeout time.Duration `mapstructure:"read_header_timeout"`
	WriteTimeout      time.Duration `mapstructure:"write_timeout"`
	IdleTimeout       time.Duration `mapstructure:"idle_timeout"`
	DrainDelay        time.Duration `mapstructure:"drain_delay"`
	ShutdownTimeout   time.Duration `mapstructure:"shutdown_timeout"`
}

// HealthConfig is the health and metrics port.
type HealthConfig struct {
	Listen       string        `mapstructure:"listen"`
	CheckTimeout time.Duration `mapstructure:"check_timeout"`
}

// AdminConfig is the admin port; it is closed while Token is empty.
type AdminConfig struct {
	Listen string `mapstructure:"listen"`
	Token  string `mapstructure:"token"`
}

// DatabaseConfig is the PostgreSQL connection.
type DatabaseConfig struct {
	URL            string        `mapstructure:"url"`
	MaxConns       int32         `mapstructure:"max_conns"`
	ConnectTimeout time.Duration `mapstructure:"connect_timeout"`
	QueryTimeout   time.Duration `mapstructure:"query_timeout"`
}

// ValkeyConfig is the shared cache. No Addrs means no shared cache.
type ValkeyConfig struct {
	Addrs        []string      `mapstructure:"addrs"`
	Username     string        `mapstructure:"username"`
	Password     string        `mapstructure:"password"`
	DB           int           `mapstructure:"db"`
	Timeout      time.Duration `mapstructure:"timeout"`
	DialTimeout  time.Duration `mapstructure:"dial_timeout"`
	ReconnectMax time.Duration `mapstructure:"reconnect_max"`
}

// CacheConfig switches caching and holds the default TTL.
type CacheConfig struct {
	Enabled    bool          `mapstructure:"enabled"`
	TTLDefault time.Duration `mapstructure:"ttl_default"`
}

// LogConfig sets the log level and access-log sampling.
type LogConfig struct {
	Level        string  `mapstructure:"level"`
	AccessSample float64 `mapstructure:"access_sample"`
}

// Policies holds one policy per resource of the read API.
type Policies struct {
	Tenant       Policy `mapstructure:"tenant"`
	Course       Policy `mapstructure:"course"`
	Dispatch     Policy `mapstructure:"dispatch"`
	DispatchList Policy `mapstructure:"dispatch_list"`
	TenantStats  Policy `mapstructure:"tenant_stats"`
}

// Policy says where one resource is cached, for how long, which ids are valid and how it is
// loaded. TTL 0 means cache.ttl_default.
type Policy struct {
	Key       string        `mapstructure:"key"`
	TTL       time.Duration `mapstructure:"ttl"`
	IDPattern string        `mapstructure:"id_pattern"`
	SQL       string        `mapstructure:"sql"`
	BatchSQL  string        `mapstructure:"batch_sql"`
}

// PolicyParams lists, per policy name, the placeholders its key must contain.
var PolicyParams = map[string][]string{
	"tenant":        {"id"},
	"course":        {"id"},
	"dispatch":      {"id"},
	"dispatch_list": {"tenant_id", "status", "after", "limit"},
	"tenant_stats":  {"tenant_id"},
}

// Named returns the policies by their config names.
func (p *Policies) Named() map[string]*Policy {
	return map[string]*Policy{
		"tenant":        &p.Tenant,
		"course":        &p.Course,
		"dispatch":      &p.Dispatch,
		"dispatch_list": &p.DispatchList,
		"tenant_stats":  &p.TenantStats,
	}
}

// EffectiveTTL is the policy's TTL, or def when the policy leaves it at 0.
func (p Policy) EffectiveTTL(def time.Duration) time.Duration {
	if p.TTL > 0 {
		return p.TTL
	}
	return def
}

// ProblemsError lists every problem found in a configuration.
type ProblemsError struct{ Problems []string }

func (e *ProblemsError) Error() string {
	return "invalid configuration:\n  - " + strings.Join(e.Problems, "\n  - ")
}

// Source is where a configuration comes from besides the defaults.
type Source struct {
	// File is a YAML file to read; empty reads none.
	File string
	// Getenv looks up environment variables; nil reads none.
	Getenv func(string) string
	// Sets are key=value overrides from flags, applied last, in order.
	Sets []string
}

// Load builds the configuration: defaults, then the file, then the environment, then Sets.
// It returns a *ProblemsError naming every problem found, not just the first.
func Load(src Source) (*Config, error) {
	v := viper.New()
	v.SetConfigType("yaml")
	if err := v.ReadConfig(bytes.NewReader(DefaultYAML)); err != nil {
		return nil, fmt.Errorf("embedded defaults: %w", err)
	}
	known := map[string]bool{}
	for _, k := range v.AllKeys() {
		known[k] = true
	}
	var problems []string

	if src.File != "" {
		raw, err := os.ReadFile(src.File)
		if err != nil {
			return nil, &ProblemsError{[]string{fmt.Sprintf("config file: %v", err)}}
		}
		fv := viper.New()
		fv.SetConfigType("yaml")
		if err := fv.ReadConfig(bytes.NewReader(raw)); err != nil {
			return nil, &ProblemsError{[]string{fmt.Sprintf("config file %s is not valid YAML: %v", src.File, err)}}
		}
		for _, k := range fv.AllKeys() {
			if !known[k] {
				problems = append(problems, fmt.Sprintf("%s: unknown key %q", src.File, k))
			}
		}
		if err := v.MergeConfig(bytes.NewReader(raw)); err != nil {
			return nil, &ProblemsError{[]string{fmt.Sprintf("config file %s: %v", src.File, err)}}
		}
	}

	if src.Getenv != nil {
		problems = append(problems, applyEnv(v, known, src.Getenv)...)
	}
	for _, kv := range src.Sets {
		k, val, ok := strings.Cut(kv, "=")
		k = strings.ToLower(strings.TrimSpace(k))
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("--set %q: want key=value", kv))
		case !known[k]:
			problems = append(problems, fmt.Sprintf("--set: unknown key %q", k))
		default:
			setString(v, k, val)
		}
	}

	var cfg Config
	dec := func(dc *mapstructure.DecoderConfig) {
		dc.ErrorUnused = false
		dc.WeaklyTypedInput = true
		dc.DecodeHook = mapstructure.ComposeDecodeHookFunc(
			mapstructure.StringToTimeDurationHookFunc(),
			mapstructure.StringToSliceHookFunc(","),
		)
	}
	if err := v.Unmarshal(&cfg, dec); err != nil {
		problems = append(problems, decodeProblems(err)...)
	}
	problems = append(problems, cfg.validate()...)
	if len(problems) > 0 {
		return nil, &ProblemsError{problems}
	}
	return &cfg, nil
}

// applyEnv sets every known key found in the environment: the platform's names first, then the
// CACHECAR_ names, so that the more specific CACHECAR_ name wins.
func applyEnv(v *viper.Viper, known map[string]bool, getenv func(string) string) []string {
	var problems []string
	if u := getenv("DATABASE_URL"); u != "" {
		v.Set("database.url", u)
	}
	host, port := getenv("REDIS_HOST"), getenv("REDIS_PORT")
	if host != "" || port != "" {
		if host == "" {
			host = "127.0.0.1"
		}
		if port == "" {
			port = "6379"
		}
		v.Set("valkey.addrs", []string{net.JoinHostPort(host, port)})
	}
	if p := getenv("REDIS_PASSWORD"); p != "" {
		v.Set("valkey.password", p)
	}
	if t := getenv("ADMIN_TOKEN"); t != "" {
		v.Set("admin.token", t)
	}
	if s := getenv("CACHE_TTL_DEFAULT"); s != "" {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= 0 {
			problems = append(problems, fmt.Sprintf("CACHE_TTL_DEFAULT=%q: want a positive whole number of seconds", s))
		} else {
			v.Set("cache.ttl_default", (time.Duration(n) * time.Second).String())
		}
	}
	keys := make([]string, 0, len(known))
	for k := range known {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		name := EnvName(k)
		if val, ok := lookup(getenv, name); ok {
			setString(v, k, val)
		}
	}
	return problems
}

// EnvName is the CACHECAR_ environment variable of a config key.
func EnvName(key string) string {
	return "CACHECAR_" + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// lookup treats an empty value as unset, since getenv cannot tell them apart.
func lookup(getenv func(string) string, name string) (string, bool) {
	val := getenv(name)
	return val, val != ""
}

// setString sets a key from text; list keys take comma-separated values.
func setString(v *viper.Viper, key, val string) {
	if _, isList := v.Get(key).([]any); isList {
		var items []string
		for _, s := range strings.Split(val, ",") {
			if s = strings.TrimSpace(s); s != "" {
				items = append(items, s)
			}
		}
		v.Set(key, items)
		return
	}
	v.Set(key, val)
}

// decodeProblems splits mapstructure's aggregated error into one problem per field.
func decodeProblems(err error) []string {
	var out []string
	var joined interface{ Unwrap() []error }
	if errors.As(err, &joined) {
		for _, e := range joined.Unwrap() {
			out = append(out, decodeProblems(e)...)
		}
		return out
	}
	for _, line := range strings.Split(err.Error(), "\n") {
		line = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "*"))
		if line == "" || strings.HasSuffix(line, "error(s) decoding:") {
			continue
		}
		out = append(out, line)
	}
	return out
}

var placeholderRE = regexp.MustCompile(`\{([a-z_]+)\}`)

// validate checks values that decode fine but cannot work.
func (c *Config) validate() []string {
	var p []string
	addr := func(key, val string, allowEmpty bool) {
		if val == "" && allowEmpty {
			return
		}
		if err := CheckAddr(val); err != nil {
			p = append(p, fmt.Sprintf("%s: %v", key, err))
		}
	}
	addr("server.listen", c.Server.Listen, false)
	addr("health.listen", c.Health.Listen, false)
	addr("admin.listen", c.Admin.Listen, false)
	for i, a := range c.Valkey.Addrs {
		addr(fmt.Sprintf("valkey.addrs[%d]", i), a, false)
	}
	positive := func(key string, d time.Duration) {
		if d <= 0 {
			p = append(p, fmt.Sprintf("%s: must be a positive duration, got %s", key, d))
		}
	}
	positive("server.read_header_timeout", c.Server.ReadHeaderTimeout)
	positive("server.write_timeout", c.Server.WriteTimeout)
	positive("server.idle_timeout", c.Server.IdleTimeout)
	positive("server.shutdown_timeout", c.Server.ShutdownTimeout)
	positive("health.check_timeout", c.Health.CheckTimeout)
	positive("database.connect_timeout", c.Database.ConnectTimeout)
	positive("database.query_timeout", c.Database.QueryTimeout)
	positive("valkey.timeout", c.Valkey.Timeout)
	positive("valkey.dial_timeout", c.Valkey.DialTimeout)
	positive("valkey.reconnect_max", c.Valkey.ReconnectMax)
	positive("cache.ttl_default", c.Cache.TTLDefault)
	if c.Server.DrainDelay < 0 {
		p = append(p, "server.drain_delay: must not be negative")
	}
	if c.Server.WriteTimeout > 0 && c.Database.QueryTimeout >= c.Server.WriteTimeout {
		p = append(p, "database.query_timeout must be shorter than server.write_timeout, or slow loads are cut off mid-response")
	}
	if c.Database.URL == "" {
		p = append(p, "database.url: must be set (DATABASE_URL)")
	} else if _, err := pgxpool.ParseConfig(c.Database.URL); err != nil {
		p = append(p, "database.url: not a valid PostgreSQL URL or DSN")
	}
	if c.Database.MaxConns < 1 {
		p = append(p, fmt.Sprintf("database.max_conns: must be at least 1, got %d", c.Database.MaxConns))
	}
	if c.Valkey.DB < 0 {
		p = append(p, fmt.Sprintf("valkey.db: must not be negative, got %d", c.Valkey.DB))
	}
	switch c.Log.Level {
	case "trace", "debug", "info", "warn", "error":
	default:
		p = append(p, fmt.Sprintf("log.level: %q is not one of trace, debug, info, warn, error", c.Log.Level))
	}
	if c.Log.AccessSample < 0 || c.Log.AccessSample > 1 {
		p = append(p, fmt.Sprintf("log.access_sample: must be between 0 and 1, got %v", c.Log.AccessSample))
	}
	if strings.ContainsAny(c.Namespace, "*?[]\\ \n\r\t") {
		p = append(p, "namespace: must not contain glob characters, backslashes or spaces")
	}
	named := c.Policies.Named()
	names := make([]string, 0, len(named))
	for n := range named {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		p = append(p, named[name].validate("policies."+name, PolicyParams[name])...)
	}
	if c.Policies.Course.BatchSQL == "" {
		p = append(p, "policies.course.batch_sql: must be set")
	}
	return p
}

func (pol *Policy) validate(prefix string, params []string) []string {
	var p []string
	if pol.Key == "" {
		p = append(p, prefix+".key: must be set")
	} else {
		if strings.ContainsAny(pol.Key, "*?[]\\ \n\r\t") {
			p = append(p, prefix+".key: must not contain glob characters, backslashes or spaces")
		}
		found := map[string]int{}
		for _, m := range placeholderRE.FindAllStringSubmatch(pol.Key, -1) {
			found[m[1]]++
		}
		for _, want := range params {
			if found[want] != 1 {
				p = append(p, fmt.Sprintf("%s.key: %q must contain {%s} exactly once", prefix, pol.Key, want))
			}
			delete(found, want)
		}
		for extra := range found {
			p = append(p, fmt.Sprintf("%s.key: unknown placeholder {%s} (known: {%s})", prefix, extra, strings.Join(params, "}, {")))
		}
		if rest := placeholderRE.ReplaceAllString(pol.Key, ""); strings.ContainsAny(rest, "{}") {
			p = append(p, fmt.Sprintf("%s.key: %q has an unbalanced brace", prefix, pol.Key))
		}
	}
	if pol.TTL < 0 {
		p = append(p, prefix+".ttl: must not be negative")
	}
	if pol.IDPattern == "" {
		p = append(p, prefix+".id_pattern: must be set")
	} else if re, err := regexp.Compile(pol.IDPattern); err != nil {
		p = append(p, fmt.Sprintf("%s.id_pattern: %v", prefix, err))
	} else if !strings.HasPrefix(pol.IDPattern, "^") || !strings.HasSuffix(pol.IDPattern, "$") {
		p = append(p, prefix+".id_pattern: must be anchored with ^ and $")
	} else if re.MatchString("") || re.MatchString("*") || re.MatchString(":") {
		p = append(p, prefix+".id_pattern: must not match empty ids, '*' or ':'")
	}
	if strings.TrimSpace(pol.SQL) == "" {
		p = append(p, prefix+".sql: must be set")
	}
	return p
}

// CheckAddr reports whether s is a host:port listen or dial address.
func CheckAddr(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not host:port", s)
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("%q: port must be a number from 0 to 65535", s)
	}
	if strings.ContainsAny(host, " /\\") {
		return fmt.Errorf("%q: bad host", s)
	}
	return nil
}

// Redacted returns the configuration as YAML-ready data with secrets masked, for check-config.
func (c *Config) Redacted() Config {
	out := *c
	out.Valkey.Addrs = append([]string(nil), c.Valkey.Addrs...)
	mask := func(s string) string {
		if s == "" {
			return ""
		}
		return "<redacted>"
	}
	out.Valkey.Password = mask(c.Valkey.Password)
	out.Admin.Token = mask(c.Admin.Token)
	out.Database.URL = RedactURL(c.Database.URL)
	return out
}

// RedactURL masks the password of a PostgreSQL URL or key=value DSN.
func RedactURL(u string) string {
	if i := strings.Index(u, "://"); i >= 0 {
		rest := u[i+3:]
		at := strings.LastIndex(rest[:indexOrLen(rest, "/")], "@")
		if at >= 0 {
			cred := rest[:at]
			if user, _, ok := strings.Cut(cred, ":"); ok {
				return u[:i+3] + user + ":<redacted>" + rest[at:]
			}
		}
		return redactParam(u, "password=")
	}
	return redactParam(u, "password=")
}

func redactParam(s, param string) string {
	i := strings.Index(s, param)
	if i < 0 {
		return s
	}
	j := i + len(param)
	end := j
	for end < len(s) && s[end] != ' ' && s[end] != '&' {
		end++
	}
	return s[:j] + "<redacted>" + s[end:]
}

func indexOrLen(s, sub string) int {
	if i := strings.Index(s, sub); i >= 0 {
		return i
	}
	return len(s)
}
