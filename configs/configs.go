// Package configs defines cachecar's configuration, its documented defaults, and how it is
// loaded (file, environment, flags) and validated.
package configs

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	_ "embed"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"net/url"
	"os"
	"reflect"
	"regexp"
	"regexp/syntax"
	"runtime/debug"
	"slices"
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
	Namespace    string             `mapstructure:"namespace"`
	Server       ServerConfig       `mapstructure:"server"`
	Health       HealthConfig       `mapstructure:"health"`
	Admin        AdminConfig        `mapstructure:"admin"`
	Database     DatabaseConfig     `mapstructure:"database"`
	Valkey       ValkeyConfig       `mapstructure:"valkey"`
	Cache        CacheConfig        `mapstructure:"cache"`
	Log          LogConfig          `mapstructure:"log"`
	Policies     Policies           `mapstructure:"policies"`
	Manifests    Manifests          `mapstructure:"manifests"`
	Invalidation InvalidationConfig `mapstructure:"invalidation"`
	Sessions     SessionsConfig     `mapstructure:"sessions"`
}

// SessionsConfig is the session store: Valkey first, PostgreSQL as the durable store of record.
type SessionsConfig struct {
	// Enabled serves /v1/sessions/...
	Enabled bool `mapstructure:"enabled"`
	// Prefix is connect-redis's key prefix, after the namespace.
	Prefix string `mapstructure:"prefix"`
	// TTL is the lifetime of a session whose cookie has no expires.
	TTL time.Duration `mapstructure:"ttl"`
	// Table and Schema name connect-pg-simple's table (Schema empty: the search_path).
	Table  string `mapstructure:"table"`
	Schema string `mapstructure:"schema"`
	// MaxBodyBytes bounds a session's JSON (413 beyond).
	MaxBodyBytes int64 `mapstructure:"max_body_bytes"`
	// RefreshInterval is how often each sidecar checks whether Valkey may be trusted.
	RefreshInterval time.Duration `mapstructure:"refresh_interval"`
	// PruneInterval is how often expired rows are deleted.
	PruneInterval time.Duration `mapstructure:"prune_interval"`
	// DeleteUnknown lets a reconciliation delete Valkey sessions PostgreSQL does not have.
	DeleteUnknown bool `mapstructure:"delete_unknown"`
	// Migration is "", "connect-redis" or "connect-pg-simple": the store some apps still use
	// directly during a rolling migration to cachecar.
	Migration string `mapstructure:"migration"`
	// TierMaxBytes bounds each of the sessions' in-process tiers (tracked copies of session
	// keys; copies of PostgreSQL's answers, kept correct by the table's notify triggers); 0
	// turns both off.
	TierMaxBytes int64 `mapstructure:"tier_max_bytes"`
}

// InvalidationConfig is the LISTEN/NOTIFY invalidation: the triggers migrate installs and the
// listener that applies their notifications.
type InvalidationConfig struct {
	// Enabled false serves cached entries until their TTL ends, whatever PostgreSQL changes.
	Enabled bool `mapstructure:"enabled"`
	// ListenURL is the listener's own connection; empty uses database.url.
	ListenURL string `mapstructure:"listen_url"`
	// Channel is the NOTIFY channel the triggers send on.
	Channel string `mapstructure:"channel"`
	// ReconnectMax caps the back-off between listener connection attempts.
	ReconnectMax time.Duration `mapstructure:"reconnect_max"`
	// PingInterval is how long the listener waits for a notification before it checks that its
	// connection still works.
	PingInterval time.Duration `mapstructure:"ping_interval"`
	// MaxRows is the most rows one statement's notifications name one by one; a statement that
	// changes more sends one table-wide message instead.
	MaxRows int `mapstructure:"max_rows"`
}

// EffectiveListenURL is the listener's connection URL.
func (c InvalidationConfig) EffectiveListenURL(databaseURL string) string {
	if c.ListenURL != "" {
		return c.ListenURL
	}
	return databaseURL
}

// Manifests configures the parsed SCORM manifest route.
type Manifests struct {
	Dir              string        `mapstructure:"dir"`
	Key              string        `mapstructure:"key"`
	TTL              time.Duration `mapstructure:"ttl"`
	MaxManifestBytes int64         `mapstructure:"max_manifest_bytes"`
	MaxEntries       int           `mapstructure:"max_entries"`
}

// ManifestParams are the placeholders of manifests.key.
var ManifestParams = []string{"filename", "mtime"}

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
	Pprof        bool          `mapstructure:"pprof"`
}

// AdminConfig is the admin port; it is closed while no token is configured.
type AdminConfig struct {
	Listen string `mapstructure:"listen"`
	Token  string `mapstructure:"token"`
	// TokenFile names a file holding the token (a mounted Kubernetes Secret).
	TokenFile string `mapstructure:"token_file"`
	// ClearRate and ClearBurst limit pattern clears.
	ClearRate  float64 `mapstructure:"clear_rate"`
	ClearBurst int     `mapstructure:"clear_burst"`
	// WarmMaxIDs bounds one warm request (and a warm query's ids).
	WarmMaxIDs int `mapstructure:"warm_max_ids"`
	// WarmOnStart warms every policy with a warm_sql at start-up.
	WarmOnStart bool `mapstructure:"warm_on_start"`
}

// AdminToken returns the admin token: admin.token, or the trimmed contents of admin.token_file.
// "" means the admin port stays closed.
func (c AdminConfig) AdminToken() (string, error) {
	if c.TokenFile == "" {
		return strings.TrimSpace(c.Token), nil
	}
	b, err := os.ReadFile(c.TokenFile)
	if err != nil {
		return "", fmt.Errorf("admin.token_file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// DatabaseConfig is the PostgreSQL connection.
type DatabaseConfig struct {
	URL string `mapstructure:"url"`
	// PasswordFile names a file holding the password of every PostgreSQL connection (the pool,
	// the invalidation listener, migrate): a mounted Kubernetes Secret. Empty: the URL's own
	// password, or libpq's PGPASSWORD and passfile, as pgx reads them.
	PasswordFile string `mapstructure:"password_file"`
	// SessionPooler accepts connections through a pooler that pins each client to a server
	// connection (PgBouncer's session pooling); without it a pooler is refused.
	SessionPooler bool  `mapstructure:"session_pooler"`
	MaxConns      int32 `mapstructure:"max_conns"`
	// MinConns are kept open while idle, so that a sudden fall-through to PostgreSQL (Valkey
	// gone) does not wait on new connections.
	MinConns int32 `mapstructure:"min_conns"`
	// MaxLoads bounds the loads running at once (the bulkhead); past it reads answer 503.
	MaxLoads       int           `mapstructure:"max_loads"`
	ConnectTimeout time.Duration `mapstructure:"connect_timeout"`
	QueryTimeout   time.Duration `mapstructure:"query_timeout"`
}

// FilePassword returns the trimmed contents of database.password_file, which replaces the
// password of every PostgreSQL connection; "" when no file is set.
func (c DatabaseConfig) FilePassword() (string, error) {
	if c.PasswordFile == "" {
		return "", nil
	}
	return readSecretFile("database.password_file", c.PasswordFile)
}

// ValkeyConfig is the shared cache. No Addrs means no shared cache.
type ValkeyConfig struct {
	Addrs    []string `mapstructure:"addrs"`
	Username string   `mapstructure:"username"`
	Password string   `mapstructure:"password"`
	// PasswordFile names a file holding the password instead (a mounted Kubernetes Secret).
	// Set Password or PasswordFile, not both.
	PasswordFile string `mapstructure:"password_file"`
	// TLS is TLS for every connection to Valkey.
	TLS          ValkeyTLSConfig `mapstructure:"tls"`
	DB           int             `mapstructure:"db"`
	Timeout      time.Duration   `mapstructure:"timeout"`
	DialTimeout  time.Duration   `mapstructure:"dial_timeout"`
	ReconnectMax time.Duration   `mapstructure:"reconnect_max"`
	// MaxFlushDelay is valkey-go's MaxFlushDelay; 0 flushes at once.
	MaxFlushDelay time.Duration `mapstructure:"max_flush_delay"`
	// BreakerThreshold failed calls in a row open the circuit breaker for BreakerOpen, doubling
	// up to BreakerOpenMax while its probes fail.
	BreakerThreshold int           `mapstructure:"breaker_threshold"`
	BreakerOpen      time.Duration `mapstructure:"breaker_open"`
	BreakerOpenMax   time.Duration `mapstructure:"breaker_open_max"`
}

// EffectivePassword returns valkey.password, or the trimmed contents of valkey.password_file.
func (c ValkeyConfig) EffectivePassword() (string, error) {
	if c.PasswordFile == "" {
		return c.Password, nil
	}
	return readSecretFile("valkey.password_file", c.PasswordFile)
}

// readSecretFile returns the contents of a mounted secret without surrounding whitespace (the
// newline editors and `kubectl create secret --from-file` leave). An empty file is an error:
// running without the password it was meant to hold would only fail later, less clearly.
func readSecretFile(key, path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", key, err)
	}
	s := strings.TrimSpace(string(b))
	if s == "" {
		return "", fmt.Errorf("%s: %s is empty", key, path)
	}
	return s, nil
}

// ValkeyTLSConfig is TLS for every connection to Valkey (the cache's and the sessions').
type ValkeyTLSConfig struct {
	// Enabled connects with TLS; false connects in plain TCP and the other keys must be empty.
	Enabled bool `mapstructure:"enabled"`
	// CAFile is a PEM bundle of the CAs that may sign the server's certificate; empty: the
	// system's roots.
	CAFile string `mapstructure:"ca_file"`
	// CertFile and KeyFile are a PEM client certificate and its private key, for a server that
	// asks for one (tls-auth-clients yes); both or neither.
	CertFile string `mapstructure:"cert_file"`
	KeyFile  string `mapstructure:"key_file"`
	// ServerName is the name the server's certificate must be valid for; empty: the host of
	// each address in valkey.addrs.
	ServerName string `mapstructure:"server_name"`
	// InsecureSkipVerify accepts any server certificate (the connection is encrypted but not
	// authenticated); serve logs a warning at start-up.
	InsecureSkipVerify bool `mapstructure:"insecure_skip_verify"`
}

// ClientConfig builds the TLS configuration of the Valkey clients from the files it names:
// nil when TLS is off. The error joins every problem found, each naming its key.
func (c ValkeyTLSConfig) ClientConfig() (*tls.Config, error) {
	if !c.Enabled {
		var set []string
		for _, kv := range []struct{ key, val string }{{"ca_file", c.CAFile}, {"cert_file", c.CertFile},
			{"key_file", c.KeyFile}, {"server_name", c.ServerName}} {
			if kv.val != "" {
				set = append(set, "valkey.tls."+kv.key)
			}
		}
		if c.InsecureSkipVerify {
			set = append(set, "valkey.tls.insecure_skip_verify")
		}
		if len(set) > 0 {
			// Settings that look like TLS but leave the connection in plain text.
			return nil, fmt.Errorf("%s: set, but valkey.tls.enabled is false, so Valkey would be reached without TLS; enable TLS or remove them", strings.Join(set, ", "))
		}
		return nil, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: c.ServerName, InsecureSkipVerify: c.InsecureSkipVerify}
	var problems []error
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			problems = append(problems, fmt.Errorf("valkey.tls.ca_file: %w", err))
		} else if pool := x509.NewCertPool(); !pool.AppendCertsFromPEM(pem) {
			problems = append(problems, fmt.Errorf("valkey.tls.ca_file: no PEM certificate in %s", c.CAFile))
		} else {
			tc.RootCAs = pool
		}
	}
	switch {
	case (c.CertFile == "") != (c.KeyFile == ""):
		problems = append(problems, errors.New("valkey.tls.cert_file and valkey.tls.key_file: set both (a client certificate and its private key) or neither"))
	case c.CertFile != "":
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			problems = append(problems, fmt.Errorf("valkey.tls.cert_file and valkey.tls.key_file: %w", err))
		} else {
			tc.Certificates = []tls.Certificate{cert}
		}
	}
	if len(problems) > 0 {
		return nil, errors.Join(problems...)
	}
	return tc, nil
}

// CacheConfig switches caching and holds the default TTL.
type CacheConfig struct {
	Enabled    bool          `mapstructure:"enabled"`
	TTLDefault time.Duration `mapstructure:"ttl_default"`
	// TierMaxBytes is the in-process tier's memory; 0 turns it off.
	TierMaxBytes int64 `mapstructure:"tier_max_bytes"`
	// LeaseWait is how long a reader waits for another reader's fill before loading itself.
	LeaseWait time.Duration `mapstructure:"lease_wait"`
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
	BatchSQL  string        `mapstructure:"batch_sql,omitempty"`
	// InvalidateOn lists the tables whose changes make this policy's entries stale.
	InvalidateOn []Dependency `mapstructure:"invalidate_on"`
	// StaleWhileRevalidate and StaleIfError are the RFC 5861 windows past the TTL.
	StaleWhileRevalidate time.Duration `mapstructure:"stale_while_revalidate"`
	StaleIfError         time.Duration `mapstructure:"stale_if_error"`
	// NegativeTTL is how long a "not found" is cached; 0 caches none.
	NegativeTTL time.Duration `mapstructure:"negative_ttl"`
	// RefreshAhead is the fraction of the TTL after which a read refreshes the entry in the
	// background; 0 is off.
	RefreshAhead float64 `mapstructure:"refresh_ahead"`
	// WarmSQL returns the ids (one bigint column) to warm: the admin port's warm requests that
	// name no ids, and admin.warm_on_start.
	WarmSQL string `mapstructure:"warm_sql"`
}

// Dependency says that a change to a row of Table makes stale the keys whose placeholders equal
// the row's columns: Columns maps a key placeholder to a column of the table. When Columns binds
// every placeholder of the key, the change names exactly one key; when it binds only some (the
// dispatch list's {tenant_id}), it names every key sharing those values, through a tag set.
type Dependency struct {
	Table   string            `mapstructure:"table" yaml:"table"`
	Columns map[string]string `mapstructure:"columns" yaml:"columns"`
	// Unknown collects keys that are neither table nor columns, so they can be reported.
	Unknown map[string]any `mapstructure:",remain" yaml:"-"`
}

// PolicyParams lists, per policy name, the placeholders its key must contain.
var PolicyParams = map[string][]string{
	"tenant":        {"id"},
	"course":        {"id"},
	"dispatch":      {"id"},
	"dispatch_list": {"tenant_id", "status", "after", "limit"},
	"tenant_stats":  {"tenant_id"},
}

// BindableParams lists, per policy, the placeholders invalidate_on may bind to a column: the ids.
// The others ({status}, {after}, {limit} of the list) describe the request, not a row, and are
// covered by the tag of the ids they come with.
var BindableParams = map[string][]string{
	"tenant":        {"id"},
	"course":        {"id"},
	"dispatch":      {"id"},
	"dispatch_list": {"tenant_id"},
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
	// lists are the keys whose default is a list. It is decided from the defaults, not from the
	// current value, because the file or REDIS_HOST may already have replaced the value with a
	// string or a []string, and a list key must still split and trim "a:1, b:2" whatever set it.
	lists := map[string]bool{}
	// text are the keys that may be empty: strings (not durations) and lists. A bool, a number
	// or a duration set to the empty string would decode as false or 0 without a word.
	text := map[string]bool{}
	for _, k := range v.AllKeys() {
		known[k] = true
		switch def := v.Get(k).(type) {
		case []any:
			text[k] = true
			// invalidate_on is a list of maps; its text form (ParseDependencies) has its own
			// syntax.
			lists[k] = !strings.HasSuffix(k, ".invalidate_on")
		case string:
			_, err := time.ParseDuration(def)
			text[k] = err != nil
		}
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
			switch {
			case known[k]:
			case isSection(known, k):
				problems = append(problems, fmt.Sprintf("%s: %q is a section of keys (%s.…), not a value", src.File, k, k))
			default:
				problems = append(problems, fmt.Sprintf("%s: unknown key %q", src.File, k))
			}
		}
		if err := v.MergeConfig(bytes.NewReader(raw)); err != nil {
			return nil, &ProblemsError{[]string{fmt.Sprintf("config file %s: %v", src.File, err)}}
		}
	}

	if src.Getenv != nil {
		problems = append(problems, applyEnv(v, known, lists, text, src.Getenv)...)
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
			setString(v, k, val, lists[k])
		}
	}

	var cfg Config
	dec := func(dc *mapstructure.DecoderConfig) {
		dc.ErrorUnused = false
		dc.WeaklyTypedInput = true
		dc.DecodeHook = mapstructure.ComposeDecodeHookFunc(
			bareNumberDurationHook,
			dependenciesHook,
			mapstructure.StringToTimeDurationHookFunc(),
			mapstructure.StringToSliceHookFunc(","),
		)
	}
	failed := map[string]bool{}
	if err := v.Unmarshal(&cfg, dec); err != nil {
		problems = append(problems, decodeProblems(err, failed, v.Get)...)
	}
	// A key that failed to decode is left at its zero value; validating that zero would add a
	// second, misleading problem ("must be positive, got 0s") for the same mistake.
	for _, prob := range cfg.validate() {
		if k, _, ok := strings.Cut(prob, ":"); ok && failed[k] {
			continue
		}
		problems = append(problems, prob)
	}
	if len(problems) > 0 {
		return nil, &ProblemsError{problems}
	}
	return &cfg, nil
}

// isSection reports whether k names a section of known keys (server, not server.listen).
func isSection(known map[string]bool, k string) bool {
	for key := range known {
		if strings.HasPrefix(key, k+".") {
			return true
		}
	}
	return false
}

// applyEnv sets every known key found in the environment: the platform's names first, then the
// CACHECAR_ names, so that the more specific CACHECAR_ name wins.
func applyEnv(v *viper.Viper, known, lists, text map[string]bool, getenv func(string) string) []string {
	var problems []string
	// The platform's names count only when not empty: deployment templates render an unset one
	// as empty.
	platform := func(name string) string { val, _ := lookup(getenv, name); return val }
	if u := platform("DATABASE_URL"); u != "" {
		v.Set("database.url", u)
	}
	host, port := platform("REDIS_HOST"), platform("REDIS_PORT")
	switch {
	case host != "":
		if port == "" {
			port = "6379"
		}
		v.Set("valkey.addrs", []string{net.JoinHostPort(host, port)})
	case port != "":
		// The port alone moves the addresses the file (or the default) names to that port.
		var addrs []string
		for _, a := range v.GetStringSlice("valkey.addrs") {
			if h, _, err := net.SplitHostPort(strings.TrimSpace(a)); err == nil && !slices.Contains(addrs, net.JoinHostPort(h, port)) {
				addrs = append(addrs, net.JoinHostPort(h, port))
			}
		}
		if len(addrs) == 0 {
			addrs = []string{net.JoinHostPort("127.0.0.1", port)}
		}
		v.Set("valkey.addrs", addrs)
	}
	if p := platform("REDIS_PASSWORD"); p != "" {
		v.Set("valkey.password", p)
	}
	if t := platform("ADMIN_TOKEN"); t != "" {
		v.Set("admin.token", t)
	}
	if s := platform("CACHE_TTL_DEFAULT"); s != "" {
		n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
		// The upper bound keeps n seconds from overflowing a time.Duration into a negative or
		// tiny TTL.
		if err != nil || n <= 0 || n > math.MaxInt64/int64(time.Second) {
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
		val, ok := lookup(getenv, name)
		switch {
		case !ok:
		case val == "" && !text[k]:
			problems = append(problems, fmt.Sprintf("%s is set to the empty string: %s needs a value (unset the variable to keep the file's or the default)", name, k))
		default:
			setString(v, k, val, lists[k])
		}
	}
	return problems
}

// EnvName is the CACHECAR_ environment variable of a config key.
func EnvName(key string) string {
	return "CACHECAR_" + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// EmptyEnv is what Getenv returns for a variable set to the empty string, so that a getenv
// func(string) string can tell "set to nothing" (CACHECAR_VALKEY_ADDRS=, no Valkey) from unset.
const EmptyEnv = "\x00(set, empty)"

// Getenv is os.Getenv, except that a variable set to the empty string reads as EmptyEnv.
func Getenv(name string) string {
	val, ok := os.LookupEnv(name)
	if ok && val == "" {
		return EmptyEnv
	}
	return val
}

// lookup reads name through getenv: unset, or set (EmptyEnv: set to the empty string).
func lookup(getenv func(string) string, name string) (string, bool) {
	switch val := getenv(name); val {
	case "":
		return "", false
	case EmptyEnv:
		return "", true
	default:
		return val, true
	}
}

// setString sets a key from text; list keys take comma-separated values.
func setString(v *viper.Viper, key, val string, isList bool) {
	if isList {
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

// dependenciesHook reads invalidate_on from text, the form environment variables and --set use:
// "tenants(id=id) dispatches(tenant_id=tenant_id)", or "none" for no dependency.
func dependenciesHook(f, t reflect.Type, data any) (any, error) {
	if t != reflect.TypeOf([]Dependency(nil)) || f.Kind() != reflect.String {
		return data, nil
	}
	return ParseDependencies(data.(string))
}

var dependencyRE = regexp.MustCompile(`^([^()\s]+)\(([^()]*)\)$`)

// ParseDependencies parses the text form of invalidate_on (see dependenciesHook).
func ParseDependencies(s string) ([]Dependency, error) {
	s = strings.TrimSpace(s)
	if s == "none" {
		return []Dependency{}, nil
	}
	var out []Dependency
	for _, item := range strings.Fields(s) {
		m := dependencyRE.FindStringSubmatch(item)
		if m == nil {
			return nil, fmt.Errorf("%q: want table(placeholder=column,...), e.g. tenants(id=id), or none", item)
		}
		d := Dependency{Table: m[1], Columns: map[string]string{}}
		for _, pair := range strings.Split(m[2], ",") {
			k, v, ok := strings.Cut(pair, "=")
			if !ok || k == "" || v == "" {
				return nil, fmt.Errorf("%q: want placeholder=column, got %q", item, pair)
			}
			d.Columns[k] = v
		}
		out = append(out, d)
	}
	if len(out) == 0 {
		return nil, errors.New(`empty: write "none" for no dependency`)
	}
	return out, nil
}

// bareNumberDurationHook refuses a bare number where a duration is expected: YAML `ttl: 600`
// would otherwise decode as 600ns, a TTL nobody means. 0 stays allowed (it is 0 in any unit).
func bareNumberDurationHook(f, t reflect.Type, data any) (any, error) {
	if t != reflect.TypeOf(time.Duration(0)) {
		return data, nil
	}
	switch f.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64,
		reflect.Float32, reflect.Float64:
		if reflect.ValueOf(data).IsZero() {
			return time.Duration(0), nil
		}
		return nil, fmt.Errorf("%v has no unit: write a duration such as %vs or %vms", data, data, data)
	}
	return data, nil
}

// decodeProblems splits mapstructure's aggregated error into one problem per field, each named
// by its key, and records the keys that failed in failed.
func decodeProblems(err error, failed map[string]bool, value func(string) any) []string {
	var out []string
	var joined interface{ Unwrap() []error }
	if errors.As(err, &joined) {
		for _, e := range joined.Unwrap() {
			out = append(out, decodeProblems(e, failed, value)...)
		}
		return out
	}
	var de *mapstructure.DecodeError
	if errors.As(err, &de) {
		failed[de.Name()] = true
		why := errors.Unwrap(de).Error()
		if w, ok := strings.CutPrefix(why, "time: "); ok {
			why = w + " (want a duration such as 50ms, 2s, 5m or 1h)"
		}
		if val, ok := value(de.Name()).(string); ok {
			return []string{fmt.Sprintf("%s: %q: %s", de.Name(), val, why)}
		}
		return []string{fmt.Sprintf("%s: %s", de.Name(), why)}
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
	listens := []struct{ key, val string }{{"server.listen", c.Server.Listen}, {"health.listen", c.Health.Listen}}
	if tok, err := c.Admin.AdminToken(); err == nil && tok != "" {
		listens = append(listens, struct{ key, val string }{"admin.listen", c.Admin.Listen})
	}
	for i := range listens {
		for _, b := range listens[i+1:] {
			if listenClash(listens[i].val, b.val) {
				p = append(p, fmt.Sprintf("%s and %s: both listen on %s and %s; each port needs its own address", listens[i].key, b.key, listens[i].val, b.val))
			}
		}
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
	if c.Valkey.MaxFlushDelay < 0 || c.Valkey.MaxFlushDelay > time.Millisecond {
		p = append(p, fmt.Sprintf("valkey.max_flush_delay: must be from 0 to 1ms, got %s", c.Valkey.MaxFlushDelay))
	}
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
	if c.Admin.Token != "" && c.Admin.TokenFile != "" {
		p = append(p, "admin.token and admin.token_file: set one of them, not both")
	} else if tok, err := c.Admin.AdminToken(); err != nil {
		p = append(p, err.Error())
	} else if c.Admin.TokenFile != "" && tok == "" {
		p = append(p, "admin.token_file: the file is empty")
	} else if c.Admin.Token != "" && tok == "" {
		p = append(p, "admin.token: only whitespace")
	} else if tok != "" && len(tok) < MinAdminToken {
		key := "admin.token (ADMIN_TOKEN)"
		if c.Admin.TokenFile != "" {
			key = "admin.token_file"
		}
		p = append(p, fmt.Sprintf("%s: the token must be at least %d characters (e.g. openssl rand -hex 32)", key, MinAdminToken))
	}
	// check-config prints secrets as placeholders; a file made from its output must not start
	// with a placeholder as the admin token (anyone could guess it) or as a password.
	for _, sec := range []struct{ key, val string }{
		{"admin.token (ADMIN_TOKEN)", c.Admin.Token},
		{"valkey.password (REDIS_PASSWORD)", c.Valkey.Password},
		{"database.url (DATABASE_URL)", c.Database.URL},
		{"invalidation.listen_url", c.Invalidation.ListenURL},
	} {
		if strings.Contains(sec.val, redactedPrefix) {
			p = append(p, fmt.Sprintf("%s: holds the placeholder check-config prints in place of a secret; replace it with the secret, or delete it and set the secret from the environment or a *_file key", sec.key))
		}
	}
	if c.Valkey.Password != "" && c.Valkey.PasswordFile != "" {
		p = append(p, "valkey.password (REDIS_PASSWORD) and valkey.password_file: set one of them, not both")
	} else if _, err := c.Valkey.EffectivePassword(); err != nil {
		p = append(p, err.Error())
	}
	if _, err := c.Valkey.TLS.ClientConfig(); err != nil {
		var joined interface{ Unwrap() []error }
		if errors.As(err, &joined) {
			for _, e := range joined.Unwrap() {
				p = append(p, e.Error())
			}
		} else {
			p = append(p, err.Error())
		}
	}
	if c.Database.PasswordFile != "" {
		if _, err := c.Database.FilePassword(); err != nil {
			p = append(p, err.Error())
		}
		// The file replaces the password of every connection: a URL naming its own would be
		// silently overridden, so one of the two is a mistake.
		if urlHasPassword(c.Database.URL) {
			p = append(p, "database.url (DATABASE_URL) and database.password_file: the URL has a password; set one of them, not both")
		}
		if c.Invalidation.ListenURL != "" && urlHasPassword(c.Invalidation.ListenURL) {
			p = append(p, "invalidation.listen_url and database.password_file: the URL has a password; set one of them, not both (the file's applies to the listener too)")
		}
	}
	if c.Admin.ClearRate <= 0 {
		p = append(p, fmt.Sprintf("admin.clear_rate: must be positive (clears per second), got %v", c.Admin.ClearRate))
	}
	if c.Admin.ClearBurst < 1 {
		p = append(p, fmt.Sprintf("admin.clear_burst: must be at least 1, got %d", c.Admin.ClearBurst))
	}
	if c.Admin.WarmMaxIDs < 1 || c.Admin.WarmMaxIDs > 1000000 {
		p = append(p, fmt.Sprintf("admin.warm_max_ids: must be from 1 to 1000000, got %d", c.Admin.WarmMaxIDs))
	}
	if c.Database.MinConns < 0 {
		p = append(p, fmt.Sprintf("database.min_conns: must not be negative, got %d", c.Database.MinConns))
	}
	if c.Database.MaxLoads < 1 {
		p = append(p, fmt.Sprintf("database.max_loads: must be at least 1, got %d", c.Database.MaxLoads))
	}
	if c.Valkey.BreakerThreshold < 1 {
		p = append(p, fmt.Sprintf("valkey.breaker_threshold: must be at least 1, got %d", c.Valkey.BreakerThreshold))
	}
	positive("valkey.breaker_open", c.Valkey.BreakerOpen)
	if c.Valkey.BreakerOpenMax < c.Valkey.BreakerOpen {
		p = append(p, fmt.Sprintf("valkey.breaker_open_max (%s) must not be shorter than valkey.breaker_open (%s)", c.Valkey.BreakerOpenMax, c.Valkey.BreakerOpen))
	}
	if c.Cache.TierMaxBytes != 0 && (c.Cache.TierMaxBytes < MinTierBytes || c.Cache.TierMaxBytes > 1<<40) {
		p = append(p, fmt.Sprintf("cache.tier_max_bytes: must be 0 (no in-process tier) or from %d (32 MiB) to 1 TiB, got %d", MinTierBytes, c.Cache.TierMaxBytes))
	}
	if c.Sessions.TierMaxBytes != 0 && (c.Sessions.TierMaxBytes < MinTierBytes || c.Sessions.TierMaxBytes > 1<<40) {
		p = append(p, fmt.Sprintf("sessions.tier_max_bytes: must be 0 (no in-process tier for sessions) or from %d (32 MiB) to 1 TiB, got %d", MinTierBytes, c.Sessions.TierMaxBytes))
	}
	if tiers := c.tierBytes(); tiers > 0 {
		if lim, src := MemoryLimit(); lim > 0 && tiers+64<<20 > lim {
			p = append(p, fmt.Sprintf("cache.tier_max_bytes (%d) and sessions.tier_max_bytes (%d, counted once per session tier in use: %d) do not fit the memory limit of %d bytes (%s) with 64 MiB for everything else (raise the limit, or lower the tiers: sessions.tier_max_bytes: 0 keeps no session in memory)", c.Cache.TierMaxBytes, c.Sessions.TierMaxBytes, c.sessionTierBytes(), lim, src))
		}
	}
	if c.Cache.LeaseWait < 0 || (c.Database.QueryTimeout > 0 && 2*c.Cache.LeaseWait > c.Database.QueryTimeout) {
		// The wait comes out of the load's time: the load that may follow needs the rest.
		p = append(p, fmt.Sprintf("cache.lease_wait: must be from 0 to half of database.query_timeout (%s), got %s", c.Database.QueryTimeout, c.Cache.LeaseWait))
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
		p = append(p, named[name].validate("policies."+name, PolicyParams[name], BindableParams[name])...)
	}
	if c.Manifests.Dir == "" {
		p = append(p, "manifests.dir: must be set")
	}
	if c.Manifests.MaxManifestBytes <= 0 {
		p = append(p, "manifests.max_manifest_bytes: must be positive")
	}
	if c.Manifests.MaxEntries <= 0 {
		p = append(p, "manifests.max_entries: must be positive")
	}
	if c.Manifests.TTL <= 0 {
		p = append(p, "manifests.ttl: must be a positive duration")
	}
	p = append(p, validateKey("manifests.key", c.Manifests.Key, ManifestParams)...)
	p = append(p, c.keySpaceProblems()...)
	if !identRE.MatchString(c.Invalidation.Channel) {
		p = append(p, fmt.Sprintf("invalidation.channel: %q must be a lower-case SQL identifier (letters, digits, _; at most 63)", c.Invalidation.Channel))
	}
	positive("invalidation.reconnect_max", c.Invalidation.ReconnectMax)
	positive("invalidation.ping_interval", c.Invalidation.PingInterval)
	if c.Invalidation.MaxRows < 1 || c.Invalidation.MaxRows > 1000000 {
		p = append(p, fmt.Sprintf("invalidation.max_rows: must be from 1 to 1000000, got %d", c.Invalidation.MaxRows))
	}
	if c.Sessions.Prefix == "" || strings.ContainsAny(c.Sessions.Prefix, "*?[]\\ \n\r\t") {
		p = append(p, "sessions.prefix: must be set, without glob characters, backslashes or spaces")
	}
	if c.Sessions.TTL < time.Second || c.Sessions.TTL%time.Second != 0 {
		// Valkey's EX and connect-redis's ttl are whole seconds: 500ms would store nothing (a
		// TTL of 0 deletes) while the PUT is acknowledged.
		p = append(p, fmt.Sprintf("sessions.ttl: must be a whole number of seconds, at least 1s, got %s", c.Sessions.TTL))
	}
	positive("sessions.refresh_interval", c.Sessions.RefreshInterval)
	if c.Sessions.RefreshInterval > 5*time.Second {
		// Its checks bound how long a missed write goes unseen, and a sidecar migrating from
		// connect-redis sets its flag on them: the others end the migration after 30 s without.
		p = append(p, fmt.Sprintf("sessions.refresh_interval: at most 5s, got %s", c.Sessions.RefreshInterval))
	}
	if c.Sessions.PruneInterval < time.Second {
		p = append(p, fmt.Sprintf("sessions.prune_interval: at least 1s, got %s", c.Sessions.PruneInterval))
	}
	if c.Sessions.MaxBodyBytes < 2 || c.Sessions.MaxBodyBytes > 16<<20 {
		p = append(p, fmt.Sprintf("sessions.max_body_bytes: must be from 2 to 16777216, got %d", c.Sessions.MaxBodyBytes))
	}
	if !identRE.MatchString(c.Sessions.Table) && !sessionTableRE.MatchString(c.Sessions.Table) {
		p = append(p, fmt.Sprintf("sessions.table: %q must be a table name (letters, digits, _; at most 63)", c.Sessions.Table))
	}
	switch c.Sessions.Migration {
	case "", "connect-redis", "connect-pg-simple":
	default:
		p = append(p, fmt.Sprintf("sessions.migration: %q is not one of \"\", connect-redis, connect-pg-simple", c.Sessions.Migration))
	}
	if c.Sessions.Migration == "connect-redis" && c.Sessions.DeleteUnknown {
		p = append(p, "sessions.delete_unknown must be false while sessions.migration is connect-redis: the sessions connect-redis writes are not in PostgreSQL")
	}
	if c.Sessions.Schema != "" && !sessionTableRE.MatchString(c.Sessions.Schema) {
		p = append(p, fmt.Sprintf("sessions.schema: %q must be a schema name (letters, digits, _; at most 63)", c.Sessions.Schema))
	}
	if c.Invalidation.ListenURL != "" {
		if _, err := pgxpool.ParseConfig(c.Invalidation.ListenURL); err != nil {
			p = append(p, "invalidation.listen_url: not a valid PostgreSQL URL or DSN")
		}
	}
	if c.Policies.Course.BatchSQL == "" {
		p = append(p, "policies.course.batch_sql: must be set")
	}
	return p
}

func (pol *Policy) validate(prefix string, params, bindable []string) []string {
	p := validateKey(prefix+".key", pol.Key, params)
	if pol.TTL < 0 {
		p = append(p, prefix+".ttl: must not be negative")
	}
	if pol.StaleWhileRevalidate < 0 {
		p = append(p, prefix+".stale_while_revalidate: must not be negative")
	}
	if pol.StaleIfError < 0 {
		p = append(p, prefix+".stale_if_error: must not be negative")
	}
	if pol.NegativeTTL < 0 {
		p = append(p, prefix+".negative_ttl: must not be negative")
	}
	if pol.RefreshAhead < 0 || pol.RefreshAhead >= 1 {
		p = append(p, fmt.Sprintf("%s.refresh_ahead: must be 0 (off) or a fraction of the TTL below 1, got %v", prefix, pol.RefreshAhead))
	}
	if pol.IDPattern == "" {
		p = append(p, prefix+".id_pattern: must be set")
	} else if re, err := regexp.Compile(pol.IDPattern); err != nil {
		p = append(p, fmt.Sprintf("%s.id_pattern: %v", prefix, err))
	} else if !anchored(pol.IDPattern) {
		p = append(p, prefix+".id_pattern: must be anchored with ^ and $ around the whole pattern (^(?:a|b)$, not ^a|b$)")
	} else if re.MatchString("") || re.MatchString("*") || re.MatchString(":") {
		p = append(p, prefix+".id_pattern: must not match empty ids, '*' or ':'")
	}
	if strings.TrimSpace(pol.SQL) == "" {
		p = append(p, prefix+".sql: must be set")
	}
	if m := placeholderRE.FindStringIndex(pol.Key); m != nil && m[0] == 0 {
		// Resync after a listener gap deletes a policy's keys by their literal prefix.
		p = append(p, prefix+".key: must start with literal text (like \"course:\"), not a placeholder")
	}
	for i, d := range pol.InvalidateOn {
		name := fmt.Sprintf("%s.invalidate_on[%d]", prefix, i)
		for k := range d.Unknown {
			p = append(p, fmt.Sprintf("%s: unknown key %q (known: table, columns)", name, k))
		}
		if !identRE.MatchString(d.Table) {
			p = append(p, fmt.Sprintf("%s.table: %q must be a lower-case SQL identifier (letters, digits, _; at most 63)", name, d.Table))
		}
		if len(d.Columns) == 0 {
			p = append(p, name+".columns: must map at least one key placeholder to a column")
		}
		for ph, col := range d.Columns {
			if !slices.Contains(bindable, ph) {
				p = append(p, fmt.Sprintf("%s.columns: {%s} cannot be bound to a column (bindable: {%s})", name, ph, strings.Join(bindable, "}, {")))
			}
			if !identRE.MatchString(col) {
				p = append(p, fmt.Sprintf("%s.columns.%s: %q must be a lower-case SQL identifier", name, ph, col))
			}
		}
	}
	return p
}

// keySpaceProblems checks that every cache key space (the literal text a policy's or the
// manifests' key starts with) is its own: not empty, not cachecar's internal keys, and not
// overlapping the sessions' prefix. A clear of a policy's keys must never reach sessions or the
// keys that vouch for them.
func (c *Config) keySpaceProblems() []string {
	var p []string
	spaces := map[string]string{"manifests.key": literalPrefix(c.Manifests.Key)}
	for name, pol := range c.Policies.Named() {
		spaces["policies."+name+".key"] = literalPrefix(pol.Key)
	}
	names := make([]string, 0, len(spaces))
	for n := range spaces {
		names = append(names, n)
	}
	sort.Strings(names)
	overlap := func(a, b string) bool { return strings.HasPrefix(a, b) || strings.HasPrefix(b, a) }
	if c.Sessions.Prefix != "" && overlap(c.Sessions.Prefix, "cachecar:") {
		// A reconciliation deletes the keys under the prefix that PostgreSQL does not know: tag
		// sets and the sessions' own epoch among them.
		p = append(p, fmt.Sprintf("sessions.prefix: %q overlaps cachecar's own keys (cachecar:...)", c.Sessions.Prefix))
	}
	for _, n := range names {
		pre := spaces[n]
		switch {
		case pre == "":
			if n == "manifests.key" { // the policies' own check says this for them
				p = append(p, n+": must start with literal text (like \"scorm:manifest:\"), not a placeholder")
			}
		case overlap(pre, "cachecar:"):
			p = append(p, fmt.Sprintf("%s: %q overlaps cachecar's own keys (cachecar:...)", n, pre))
		case c.Sessions.Prefix != "" && overlap(pre, c.Sessions.Prefix):
			p = append(p, fmt.Sprintf("%s: %q overlaps sessions.prefix %q: a clear of the cache could reach sessions", n, pre, c.Sessions.Prefix))
		}
	}
	return p
}

// literalPrefix is the text of a key template before its first placeholder.
func literalPrefix(key string) string {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		return key[:i]
	}
	return key
}

// identRE is a lower-case, unquoted SQL identifier: what triggers, tables, columns and the
// channel may be named, so that none needs quoting rules to be safe in generated SQL.
var identRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

// sessionTableRE allows mixed case, as connect-pg-simple's tableName and schemaName do (they
// are quoted).
var sessionTableRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]{0,62}$`)

// validateKey checks a key template: set, no glob characters, each of params exactly once and
// no other placeholder, so that two different reads never share a key.
func validateKey(name, key string, params []string) []string {
	if key == "" {
		return []string{name + ": must be set"}
	}
	var p []string
	if strings.ContainsAny(key, "*?[]\\ \n\r\t") {
		p = append(p, name+": must not contain glob characters, backslashes or spaces")
	}
	found := map[string]int{}
	for _, m := range placeholderRE.FindAllStringSubmatch(key, -1) {
		found[m[1]]++
	}
	for _, want := range params {
		if found[want] != 1 {
			p = append(p, fmt.Sprintf("%s: %q must contain {%s} exactly once", name, key, want))
		}
		delete(found, want)
	}
	for extra := range found {
		p = append(p, fmt.Sprintf("%s: unknown placeholder {%s} (known: {%s})", name, extra, strings.Join(params, "}, {")))
	}
	if rest := placeholderRE.ReplaceAllString(key, ""); strings.ContainsAny(rest, "{}") {
		p = append(p, fmt.Sprintf("%s: %q has an unbalanced brace", name, key))
	}
	return p
}

// anchored reports whether every match of pattern must span the whole input: the pattern is a
// concatenation that starts at the beginning of the text and ends at its end. Checking the
// text for a leading ^ and trailing $ is not enough: ^1|2$ is an alternation of two unanchored
// halves, and (?m)^1$ matches "x\n1".
func anchored(pattern string) bool {
	re, err := syntax.Parse(pattern, syntax.Perl)
	if err != nil {
		return false
	}
	re = re.Simplify()
	return re.Op == syntax.OpConcat && len(re.Sub) >= 2 &&
		re.Sub[0].Op == syntax.OpBeginText && re.Sub[len(re.Sub)-1].Op == syntax.OpEndText
}

// listenClash reports whether listening on a and on b would collide: the same port (not 0) on the
// same host, or on any host when either listens on every address. Names are not resolved.
func listenClash(a, b string) bool {
	ha, pa, errA := net.SplitHostPort(a)
	hb, pb, errB := net.SplitHostPort(b)
	if errA != nil || errB != nil || pa != pb || pa == "0" {
		return false
	}
	wildcard := func(h string) bool { return h == "" || h == "0.0.0.0" || h == "::" }
	return ha == hb || wildcard(ha) || wildcard(hb)
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
	if strings.Contains(host, ":") {
		// Only an IPv6 address has a colon in its host ("[::1]:6379"). "[127.0.0.1:6380]:6379"
		// is what REDIS_HOST=127.0.0.1:6380 becomes: a host with the port in it.
		if _, err := netip.ParseAddr(host); err != nil {
			return fmt.Errorf("%q: the host %q has a colon but is not an IPv6 address (a port in the host? REDIS_HOST takes the host alone, REDIS_PORT the port)", s, host)
		}
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
	if c.Admin.Token != "" {
		// Long enough to pass the length check, so that the only problem it shows is the placeholder.
		out.Admin.Token = redactedPrefix + "-admin-token>"
	}
	out.Database.URL = RedactURL(c.Database.URL)
	out.Invalidation.ListenURL = RedactURL(c.Invalidation.ListenURL)
	return out
}

// redactedMark replaces every secret in Redacted's output; every placeholder starts with
// redactedPrefix, which validation refuses as a secret.
const (
	redactedMark   = "<redacted>"
	redactedPrefix = "<redacted"
)

// RedactURL masks the passwords of a PostgreSQL URL or key=value DSN: the URL's userinfo
// password, and in both forms the value of every password and sslpassword parameter. Where a
// malformed string makes it impossible to tell where a password ends, it masks more, never less.
func RedactURL(u string) string {
	return maskURL(u, secretParam)
}

// urlHasPassword reports whether a PostgreSQL URL or DSN names a password itself (userinfo or
// a password parameter), as opposed to leaving it to PGPASSWORD, a passfile or
// database.password_file. Where masking cannot tell, it says yes.
func urlHasPassword(u string) bool {
	return maskURL(u, func(key string) bool { return strings.EqualFold(key, "password") }) != u
}

// maskURL masks the URL's userinfo password and the values of the parameters secret names.
func maskURL(u string, secret func(key string) bool) string {
	if i := strings.Index(u, "://"); i >= 0 {
		return redactURLForm(u[:i+3], u[i+3:], secret)
	}
	return redactDSN(u, secret)
}

// redactURLForm reads the URL as pgx and libpq do: the userinfo ends at the first '@' before any
// '/', and the query is '&'-separated key=value pairs.
func redactURLForm(scheme, p string, secret func(string) bool) string {
	var b strings.Builder
	b.WriteString(scheme)
	if i := strings.IndexAny(p, "@/"); i >= 0 && p[i] == '@' {
		user, _, hasPassword := strings.Cut(p[:i], ":")
		b.WriteString(user)
		if hasPassword {
			b.WriteString(":" + redactedMark)
		}
		b.WriteByte('@')
		p = p[i+1:]
	}
	// An '@' left after the userinfo means the parts cannot be told apart (an unencoded '/'
	// or '@' in the password strands the rest of it after the host): hide everything.
	if strings.IndexByte(p, '@') >= 0 {
		return scheme + redactedMark
	}
	base, query, hasQuery := strings.Cut(p, "?")
	b.WriteString(base)
	if !hasQuery {
		return b.String()
	}
	b.WriteByte('?')
	for i, pair := range strings.Split(query, "&") {
		if i > 0 {
			b.WriteByte('&')
		}
		rawKey, _, hasValue := strings.Cut(pair, "=")
		key, err := url.PathUnescape(rawKey)
		if hasValue && (err != nil || secret(key)) {
			b.WriteString(rawKey + "=" + redactedMark)
			continue
		}
		b.WriteString(pair)
	}
	return b.String()
}

// redactDSN walks a libpq key=value string (values bare or single-quoted, with backslash
// escapes) and masks the secret values, keeping everything else as written.
func redactDSN(s string, secret func(string) bool) string {
	const space = " \t\n\r\v\f"
	var b strings.Builder
	rest := s
	for {
		t := strings.TrimLeft(rest, space)
		b.WriteString(rest[:len(rest)-len(t)])
		rest = t
		if rest == "" {
			return b.String()
		}
		eq := strings.IndexByte(rest, '=')
		if eq < 0 {
			// Not key=value: nothing here can be told apart from a password.
			return b.String() + redactedMark
		}
		key := strings.TrimSpace(rest[:eq])
		b.WriteString(rest[:eq+1])
		rest = rest[eq+1:]
		t = strings.TrimLeft(rest, space)
		b.WriteString(rest[:len(rest)-len(t)])
		rest = t
		end := 0
		if rest != "" && rest[0] == '\'' {
			for end = 1; end < len(rest) && rest[end] != '\''; end++ {
				if rest[end] == '\\' {
					end++
				}
			}
			if end >= len(rest) {
				return b.String() + redactedMark // unterminated quote
			}
			end++
		} else {
			for ; end < len(rest) && !strings.ContainsRune(space, rune(rest[end])); end++ {
				if rest[end] == '\\' {
					end++
				}
			}
			end = min(end, len(rest))
		}
		if secret(key) {
			b.WriteString(redactedMark)
		} else {
			b.WriteString(rest[:end])
		}
		rest = rest[end:]
	}
}

// secretParam reports whether a connection parameter holds a secret.
func secretParam(key string) bool {
	return strings.EqualFold(key, "password") || strings.EqualFold(key, "sslpassword")
}

// MinAdminToken is the shortest admin token accepted.
const MinAdminToken = 16

// MinTierBytes is the smallest in-process tier (cachepolicy.MinTierSize: fastcache's 512 buckets
// of 64 KiB).
const MinTierBytes = 32 << 20

// MemoryLimit returns the memory this process may use and where the limit comes from: GOMEMLIMIT,
// or the cgroup's limit (a container's: memory.max under cgroup v2, memory.limit_in_bytes under
// v1), whichever is lower; 0 when none is set. A variable so that tests can set a limit.
var MemoryLimit = func() (int64, string) { return memoryLimit(debug.SetMemoryLimit(-1), os.ReadFile) }

// cgroupLimits are the files a container's memory limit is read from, v2 first.
var cgroupLimits = []struct{ path, name string }{
	{"/sys/fs/cgroup/memory.max", "cgroup memory.max"},
	{"/sys/fs/cgroup/memory/memory.limit_in_bytes", "cgroup v1 memory.limit_in_bytes"},
}

// memoryLimit is MemoryLimit from the runtime's limit (math.MaxInt64 when GOMEMLIMIT is unset)
// and the cgroup files as read reads them. An unlimited cgroup writes "max" (v2) or a number
// near 2^63 rounded down to the page size (v1): neither is a limit.
func memoryLimit(goLimit int64, read func(string) ([]byte, error)) (int64, string) {
	var lim int64
	src := ""
	if goLimit > 0 && goLimit < math.MaxInt64 {
		lim, src = goLimit, "GOMEMLIMIT"
	}
	for _, f := range cgroupLimits {
		b, err := read(f.path)
		if err != nil {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		if err != nil || n <= 0 || n >= 1<<62 {
			continue
		}
		if lim == 0 || n < lim {
			lim, src = n, f.name
		}
	}
	return lim, src
}

// tierBytes is the memory both in-process tiers may take, when their sizes are valid: the
// cache's and, when session reads can use it, the sessions'.
func (c *Config) tierBytes() int64 {
	var n int64
	if c.Cache.TierMaxBytes >= MinTierBytes && c.Cache.TierMaxBytes <= 1<<40 {
		n += c.Cache.TierMaxBytes
	}
	return n + c.sessionTierBytes()
}

// sessionTierBytes is the memory of the sessions' two tiers, each bounded by
// sessions.tier_max_bytes, when its size is valid: the tracked copies of Valkey's answers when
// they can be used (SessionTierUsed), and the copies of PostgreSQL's (SessionPostgresCopiesUsed).
func (c *Config) sessionTierBytes() int64 {
	if c.Sessions.TierMaxBytes < MinTierBytes || c.Sessions.TierMaxBytes > 1<<40 {
		return 0
	}
	var n int64
	if c.SessionTierUsed() {
		n += c.Sessions.TierMaxBytes
	}
	if c.SessionPostgresCopiesUsed() {
		n += c.Sessions.TierMaxBytes
	}
	return n
}

// SessionPostgresCopiesUsed reports whether session reads PostgreSQL serves can be answered from
// copies in memory (kept correct by the session table's notify triggers): sessions on, not
// migrating from connect-redis (PostgreSQL is not the truth then), and a size that is not 0.
func (c *Config) SessionPostgresCopiesUsed() bool {
	return c.Sessions.Enabled && c.Sessions.Migration != "connect-redis" && c.Sessions.TierMaxBytes > 0
}

// SessionTierUsed reports whether session reads can use the sessions' in-process tier: sessions
// on, Valkey configured, reads not all from PostgreSQL (migration connect-pg-simple), and a
// size that is not 0.
func (c *Config) SessionTierUsed() bool {
	return c.Sessions.Enabled && len(c.Valkey.Addrs) > 0 && c.Sessions.Migration != "connect-pg-simple" && c.Sessions.TierMaxBytes > 0
}
