package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime/debug"
	"strings"
	"time"

	"github.com/cachecar/cachecar/configs"
	"go.yaml.in/yaml/v3"
)

// version is set at build time with -ldflags "-X main.version=..."; otherwise it comes from the
// module's build info.
var version = ""

// exitError carries a process exit code; its message has already been printed when quiet.
type exitError struct {
	code  int
	err   error
	quiet bool
}

func (e *exitError) Error() string { return e.err.Error() }

func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if !ee.quiet {
			fmt.Fprintln(stderr, "cachecar:", ee.err)
		}
		return ee.code
	}
	fmt.Fprintln(stderr, "cachecar:", err)
	return 1
}

const usage = `usage: cachecar [command] [flags]

commands:
  serve         run the sidecar (default)
  migrate       apply cachecar's migrations and install the invalidation triggers;
                --reference-schema and --demo-data for the demo; --print-sql prints the
                trigger SQL for the configured policies instead of touching the database
  check-config  print the effective configuration (secrets redacted); exit 2 listing every problem
  healthcheck   ask the running sidecar's /ready on health.listen (loopback); exit 0 when ready,
                1 otherwise: a container healthcheck for images without a shell or curl
  version       print the version

migrate flags:
  --reference-schema    create the reference schema (tenants, courses, dispatches, registrations)
                        where absent
  --demo-data           the reference schema and, into empty tables, the demo data
  --print-sql           print the SQL migrate would apply (cachecar's tables, the session table,
                        the triggers) and exit without touching the database

flags (every command):
  --config FILE         YAML configuration file (also CACHECAR_CONFIG)
  --set KEY=VALUE       override any key, e.g. --set policies.course.ttl=30s (repeatable)
  --listen ADDR         server.listen
  --health-listen ADDR  health.listen
  --database-url URL    database.url
  --log-level LEVEL     log.level
`

// run is the whole program: main only adds the process's signals, args, env and streams.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	cmd := "serve"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	fs := flag.NewFlagSet("cachecar "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	var sets multiFlag
	configFile := fs.String("config", strings.TrimPrefix(getenv("CACHECAR_CONFIG"), configs.EmptyEnv), "")
	fs.Var(&sets, "set", "")
	named := map[string]*string{
		"server.listen": fs.String("listen", "", ""),
		"health.listen": fs.String("health-listen", "", ""),
		"database.url":  fs.String("database-url", "", ""),
		"log.level":     fs.String("log-level", "", ""),
	}
	reference := fs.Bool("reference-schema", false, "")
	demo := fs.Bool("demo-data", false, "")
	printSQL := fs.Bool("print-sql", false, "")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return &exitError{code: 2, err: err, quiet: true}
	}
	if fs.NArg() > 0 {
		return &exitError{code: 2, err: fmt.Errorf("unexpected argument %q\n%s", fs.Arg(0), usage)}
	}
	if (*reference || *demo || *printSQL) && cmd != "migrate" {
		return &exitError{code: 2, err: fmt.Errorf("--reference-schema, --demo-data and --print-sql belong to migrate")}
	}
	if cmd == "version" {
		fmt.Fprintln(stdout, "cachecar", buildVersion())
		return nil
	}
	if cmd != "serve" && cmd != "migrate" && cmd != "check-config" && cmd != "healthcheck" {
		return &exitError{code: 2, err: fmt.Errorf("unknown command %q\n%s", cmd, usage)}
	}
	for key, v := range named {
		if *v != "" {
			sets = append(sets, key+"="+*v)
		}
	}
	cfg, err := configs.Load(configs.Source{File: *configFile, Getenv: getenv, Sets: sets})
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	switch cmd {
	case "check-config":
		b, err := yaml.Marshal(configYAML(cfg.Redacted()))
		if err != nil {
			return err
		}
		_, err = stdout.Write(b)
		return err
	case "healthcheck":
		return healthcheck(ctx, cfg.Health.Listen, cfg.Health.CheckTimeout, stdout)
	case "migrate":
		if *printSQL {
			return printTriggerSQL(cfg, stdout)
		}
		return migrate(ctx, cfg, *reference, *demo, stdout)
	default:
		return serve(ctx, cfg, stdout)
	}
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func buildVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		rev, dirty := "", false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
		if rev != "" {
			if len(rev) > 12 {
				rev = rev[:12]
			}
			if dirty {
				rev += "-dirty"
			}
			return "dev-" + rev
		}
		if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			return bi.Main.Version
		}
	}
	return "dev"
}

// healthcheck asks /ready on the health port, through loopback when the port listens on every
// address, and fails unless it answers 200.
func healthcheck(ctx context.Context, listen string, timeout time.Duration, stdout io.Writer) error {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return &exitError{code: 2, err: fmt.Errorf("health.listen: %w", err)}
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
		if ip != nil && ip.To4() == nil {
			host = "::1"
		}
	}
	ctx, cancel := context.WithTimeout(ctx, timeout+time.Second)
	defer cancel()
	url := "http://" + net.JoinHostPort(host, port) + "/ready"
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return &exitError{code: 1, err: fmt.Errorf("healthcheck %s: %w", url, err)}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if resp.StatusCode != http.StatusOK {
		return &exitError{code: 1, err: fmt.Errorf("healthcheck %s: %d %s", url, resp.StatusCode, strings.TrimSpace(string(body)))}
	}
	fmt.Fprintf(stdout, "%s\n", strings.TrimSpace(string(body)))
	return nil
}
