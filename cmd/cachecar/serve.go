package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/cachecar/cachecar/admin"
	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/cachecar/cachecar/configs"
	"github.com/cachecar/cachecar/internal/scorm"
	"github.com/cachecar/cachecar/invalidation"
	"github.com/cachecar/cachecar/proxy"
	"github.com/cachecar/cachecar/sessions"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/rs/zerolog"
	"github.com/valkey-io/valkey-go"
)

// newRegistry makes serve's metrics registry. Tests replace it to see every metric the binary
// registers, vectors without samples included (which /metrics does not list).
var newRegistry = prometheus.NewRegistry

// serve runs the sidecar until ctx ends, then drains and returns nil.
func serve(ctx context.Context, cfg *configs.Config, stdout io.Writer) error {
	level, _ := zerolog.ParseLevel(cfg.Log.Level)
	lw := newLogWriter(stdout)
	defer lw.Close()
	log := zerolog.New(lw).Level(level).With().Timestamp().Logger()

	reg := newRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	buildInfo := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "cachecar_build_info", Help: "Always 1; the version label says which build runs.",
	}, []string{"version"})
	buildInfo.WithLabelValues(buildVersion()).Set(1)
	reg.MustRegister(buildInfo)

	pool, err := newPool(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	loader := cachepolicy.NewPG(pool)

	pol, err := compilePolicies(cfg)
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	spec, err := invalidationSpec(cfg, pol)
	if err != nil {
		return &exitError{code: 2, err: err}
	}

	// One password and one TLS configuration for both Valkey clients, the cache's and the
	// sessions'.
	valkeyPassword, err := cfg.Valkey.EffectivePassword()
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	valkeyTLS, err := cfg.Valkey.TLS.ClientConfig()
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	if valkeyTLS != nil && valkeyTLS.InsecureSkipVerify && len(cfg.Valkey.Addrs) > 0 {
		log.Warn().Msg("valkey.tls.insecure_skip_verify is true: Valkey's certificate is not verified, so anyone on the network path can pose as the server and read or change the cache and the sessions")
	}
	dbPassword, err := cfg.Database.FilePassword()
	if err != nil {
		return &exitError{code: 2, err: err}
	}

	cm := cachepolicy.NewMetrics(reg)
	var store *cachepolicy.Store
	var valkeyPinger admin.Pinger
	switch {
	case !cfg.Cache.Enabled:
		log.Warn().Msg("cache.enabled is false: every read goes to PostgreSQL")
	case len(cfg.Valkey.Addrs) == 0 && cfg.Cache.TierMaxBytes > 0:
		store = cachepolicy.NewMemoryStore(int(cfg.Cache.TierMaxBytes), log.With().Str("component", "cache").Logger(), cm)
		log.Info().Int64("bytes", cfg.Cache.TierMaxBytes).Msg("valkey.addrs is empty: caching in this process's memory alone (one sidecar; nothing shared)")
	case len(cfg.Valkey.Addrs) == 0:
		log.Warn().Msg("valkey.addrs is empty and cache.tier_max_bytes is 0: no cache, every read goes to PostgreSQL")
	default:
		store = cachepolicy.NewStore(cachepolicy.StoreOptions{
			Addrs: cfg.Valkey.Addrs, Username: cfg.Valkey.Username, Password: valkeyPassword, TLS: valkeyTLS,
			DB: cfg.Valkey.DB, Timeout: cfg.Valkey.Timeout, DialTimeout: cfg.Valkey.DialTimeout,
			ReconnectMax: cfg.Valkey.ReconnectMax, MaxFlushDelay: cfg.Valkey.MaxFlushDelay,
			TierSize:         int(cfg.Cache.TierMaxBytes),
			BreakerThreshold: cfg.Valkey.BreakerThreshold, BreakerMinOpen: cfg.Valkey.BreakerOpen, BreakerMaxOpen: cfg.Valkey.BreakerOpenMax,
			ProbeKey: cfg.Namespace + "cachecar:health",
		}, log.With().Str("component", "valkey").Logger(), cm)
		defer store.Close()
		if err := store.Connect(); err != nil {
			log.Warn().Err(err).Msg("valkey unreachable at start-up; serving from PostgreSQL and retrying")
		} else {
			log.Info().Strs("addrs", cfg.Valkey.Addrs).Bool("tls", valkeyTLS != nil).Msg("valkey connected")
		}
		valkeyPinger = store
	}
	memoryCache := store != nil && store.Memory()
	if store != nil {
		reg.MustRegister(
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cachecar_tier_entries", Help: "Entries in the in-process tier."},
				func() float64 { _, st := store.Tier(); return float64(st.Entries) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cachecar_tier_bytes", Help: "Memory the in-process tier's chunks take, in bytes."},
				func() float64 { _, st := store.Tier(); return float64(st.Bytes) }),
		)
	}

	// Invalidation runs when there is a shared cache to keep fresh and policies that ask for it.
	useListener := store != nil && len(spec.Rules) > 0
	switch {
	case useListener:
		// A schema that cannot work (a policy naming a missing column, triggers not installed)
		// stops start-up with the reason, when PostgreSQL can be asked now. When it cannot, the
		// listener keeps asking, and reads of invalidated policies bypass the cache meanwhile.
		vctx, cancel := context.WithTimeout(ctx, cfg.Database.ConnectTimeout+cfg.Health.CheckTimeout)
		err := verifyTriggers(vctx, pool, spec)
		cancel()
		if invalidation.IsSchemaError(err) {
			return &exitError{code: 2, err: err}
		}
		if err != nil {
			// The reason (refused, timed out, a certificate that does not match sslmode) is
			// said once here; health and the listener's retries only say "unreachable".
			log.Warn().Err(err).Msg("postgresql unreachable at start-up; not ready until it answers")
		}
	case store != nil && !cfg.Invalidation.Enabled:
		log.Warn().Msg("invalidation.enabled is false: cached entries are served until their TTL ends, whatever PostgreSQL changes")
	case store != nil:
		log.Warn().Msg("no policy has invalidate_on: cached entries are served until their TTL ends")
	}
	res := cachepolicy.New(cachepolicy.Options{
		Namespace:    cfg.Namespace,
		QueryTimeout: cfg.Database.QueryTimeout,
		Invalidation: useListener,
		Policies:     []*cachepolicy.Policy{pol.Tenant, pol.Course, pol.Dispatch, pol.DispatchList, pol.TenantStats},
		MaxLoads:     max(cfg.Database.MaxLoads, int(cfg.Database.MaxConns)),
		LeaseWait:    cfg.Cache.LeaseWait,
	}, store, loader, log, cm)
	defer res.Close() // before the pool and the log writer close (defers run last first)
	var listener *invalidation.Listener
	if useListener {
		listener = invalidation.New(invalidation.Options{
			URL:            cfg.Invalidation.EffectiveListenURL(cfg.Database.URL),
			AllowPooler:    cfg.Database.SessionPooler,
			Password:       dbPassword,
			ConnectTimeout: cfg.Database.ConnectTimeout,
			ReconnectMax:   cfg.Invalidation.ReconnectMax,
			PingInterval:   cfg.Invalidation.PingInterval,
			CacheTimeout:   max(cfg.Valkey.Timeout, time.Second),
			ResyncTimeout:  time.Minute,
		}, spec, res, log.With().Str("component", "invalidation").Logger(), reg)
	}
	manifestPolicy, err := cachepolicy.NewPolicy("manifest", cfg.Manifests.Key, configs.ManifestParams, cfg.Manifests.TTL, `^.+$`, "", "")
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	var sess *sessions.Store
	if cfg.Sessions.Enabled && !cfg.Sessions.DeleteUnknown && cfg.Sessions.Migration == "" {
		log.Warn().Msg("sessions.delete_unknown is false without sessions.migration: PostgreSQL still decides, so a session an app destroyed in Valkey alone (connect-redis) comes back from its row; apps writing Valkey directly need sessions.migration: connect-redis")
	}
	if cfg.Sessions.Enabled {
		var dial func() (valkey.Client, error)
		var local *cachepolicy.LocalCopies
		if len(cfg.Valkey.Addrs) > 0 {
			opt := valkey.ClientOption{
				InitAddress: cfg.Valkey.Addrs, Username: cfg.Valkey.Username, Password: valkeyPassword, TLSConfig: valkeyTLS,
				SelectDB: cfg.Valkey.DB, DisableCache: true, ClientName: "cachecar-sessions",
				RetryDelay:       cachepolicy.RetryDelay, // fail over to PostgreSQL at once, as the cache's client
				Dialer:           net.Dialer{Timeout: cfg.Valkey.DialTimeout, KeepAlive: 30 * time.Second},
				ConnWriteTimeout: cfg.Valkey.Timeout * 20,
			}
			if cfg.SessionTierUsed() {
				local = cachepolicy.NewLocalCopies(int(cfg.Sessions.TierMaxBytes))
			}
			var warned bool
			dial = func() (valkey.Client, error) {
				if local == nil {
					return valkey.NewClient(opt)
				}
				c, err := valkey.NewClient(local.Option(opt))
				if errors.Is(err, valkey.ErrNoCache) {
					if !warned {
						warned = true
						log.Warn().Err(err).Msg("valkey does not support client tracking (RESP3 CLIENT TRACKING): session reads go to Valkey every time")
					}
					c, err = valkey.NewClient(opt)
				}
				return c, err
			}
		}
		sess = sessions.New(sessions.Options{
			Prefix:          cfg.Namespace + cfg.Sessions.Prefix,
			SentinelKey:     cfg.Namespace + "cachecar:sessions:epoch",
			TTL:             cfg.Sessions.TTL,
			Table:           sessions.TableName(cfg.Sessions.Schema, cfg.Sessions.Table),
			MaxBody:         cfg.Sessions.MaxBodyBytes,
			Timeout:         cfg.Valkey.Timeout,
			RefreshInterval: cfg.Sessions.RefreshInterval,
			PruneInterval:   cfg.Sessions.PruneInterval,
			DeleteUnknown:   cfg.Sessions.DeleteUnknown,
			ReadPostgres:    cfg.Sessions.Migration == "connect-pg-simple",
			ValkeyOnly:      cfg.Sessions.Migration == "connect-redis",
			Local:           sessionCopies(local),
			PostgresCopies:  postgresCopies(cfg),
			Listen:          listenConn(cfg, dbPassword, "cachecar-session-copies"),
			AllowPooler:     cfg.Database.SessionPooler,
			DB:              res.DatabaseBreaker(),
		}, dial, pool, log.With().Str("component", "sessions").Logger(), reg)
		defer sess.Close()
	}
	var sessRoutes *proxy.Sessions
	if sess != nil {
		sessRoutes = &proxy.Sessions{Store: sess, MaxBody: cfg.Sessions.MaxBodyBytes}
	}
	api := proxy.New(proxy.Options{
		Sessions:     sessRoutes,
		AccessSample: cfg.Log.AccessSample,
		Manifests: &proxy.Manifests{
			Dir:    cfg.Manifests.Dir,
			Policy: manifestPolicy,
			Limits: scorm.Options{MaxManifestBytes: cfg.Manifests.MaxManifestBytes, MaxEntries: cfg.Manifests.MaxEntries},
			Reader: res,
		},
	}, res, pol, log, reg)
	healthOpts := admin.HealthOptions{CheckTimeout: cfg.Health.CheckTimeout, CacheEnabled: cfg.Cache.Enabled, Pprof: cfg.Health.Pprof, Cache: res, MemoryCache: memoryCache}
	if listener != nil {
		healthOpts.Listener = listener
	}
	if sess != nil {
		healthOpts.Sessions = sess
	}
	adminToken, err := cfg.Admin.AdminToken()
	if err != nil {
		return &exitError{code: 2, err: err}
	}
	var adminLn net.Listener
	var adminSrv *http.Server
	adminCtx, cancelAdmin := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelAdmin()
	if adminToken != "" {
		if adminLn, err = net.Listen("tcp", cfg.Admin.Listen); err != nil {
			return fmt.Errorf("admin.listen: %w", err)
		}
		if host, _, _ := net.SplitHostPort(cfg.Admin.Listen); !isLoopback(host) {
			log.Warn().Str("admin", cfg.Admin.Listen).Msg("the admin port listens beyond loopback: anyone who can reach it and has the token can clear the cache")
		}
		healthOpts.AdminAddr = adminLn.Addr().String()
		adminPolicies := byName(pol)
		adminPolicies["manifest"] = manifestPolicy
		warmSQL := map[string]string{}
		for name, pc := range cfg.Policies.Named() {
			warmSQL[name] = pc.WarmSQL
		}
		backend := "none"
		switch {
		case store != nil && store.Memory():
			backend = "memory"
		case store != nil:
			backend = "valkey"
			if on, _ := store.Tier(); on || cfg.Cache.TierMaxBytes > 0 {
				backend = "valkey+tier"
			}
		}
		var vinfo admin.ValkeyInfo
		if store != nil && !store.Memory() {
			vinfo = store
		}
		sessionPrefix := ""
		if cfg.Sessions.Enabled && len(cfg.Valkey.Addrs) > 0 {
			sessionPrefix = cfg.Sessions.Prefix
		}
		var ls admin.ListenerStatus
		if listener != nil {
			ls = listener
		}
		adm := admin.NewAdmin(admin.AdminOptions{
			Token: adminToken, ClearRate: cfg.Admin.ClearRate, ClearBurst: cfg.Admin.ClearBurst, WarmMaxIDs: cfg.Admin.WarmMaxIDs,
			Namespace: cfg.Namespace, SessionPrefix: sessionPrefix, SessionSentinel: cfg.Namespace + "cachecar:sessions:epoch",
			Policies: adminPolicies, WarmSQL: warmSQL, Listener: ls, Backend: backend,
		}, res, vinfo, log.With().Str("component", "admin").Logger())
		adminSrv = &http.Server{
			// Admin requests (a clear, a warm-up) run under a context that shutdown cancels:
			// they must not outlive the Valkey client and pool they use.
			BaseContext:       func(net.Listener) context.Context { return adminCtx },
			Handler:           adm.Handler(),
			ReadHeaderTimeout: 5 * time.Second,
			// OPTIONS * reaches the handler, which answers it in JSON like any request.
			DisableGeneralOptionsHandler: true,
			WriteTimeout:                 10 * time.Minute, // a clear of millions of keys, a long warm-up
			IdleTimeout:                  cfg.Server.IdleTimeout,
		}
	}
	health := admin.NewHealth(healthOpts, loader, valkeyPinger, reg)

	apiLn, err := net.Listen("tcp", cfg.Server.Listen)
	if err != nil {
		return fmt.Errorf("server.listen: %w", err)
	}
	healthLn, err := net.Listen("tcp", cfg.Health.Listen)
	if err != nil {
		apiLn.Close()
		return fmt.Errorf("health.listen: %w", err)
	}
	apiSrv := &http.Server{
		Handler:           api.Handler(),
		ReadHeaderTimeout: cfg.Server.ReadHeaderTimeout,
		// OPTIONS * reaches the handler, which answers it in JSON like any request.
		DisableGeneralOptionsHandler: true,
		WriteTimeout:                 cfg.Server.WriteTimeout,
		IdleTimeout:                  cfg.Server.IdleTimeout,
		MaxHeaderBytes:               64 << 10,
		ErrorLog:                     nil,
	}
	healthSrv := &http.Server{
		// OPTIONS * keeps net/http's empty 200 here: some load balancers probe with it.
		Handler:           health.Handler(),
		ReadHeaderTimeout: 5 * time.Second,
		WriteTimeout:      10 * time.Second,
		IdleTimeout:       cfg.Server.IdleTimeout,
	}

	bgCtx, stopBg := context.WithCancel(context.WithoutCancel(ctx))
	var bg sync.WaitGroup
	if store != nil {
		bg.Add(1)
		go func() { defer bg.Done(); store.Run(bgCtx) }()
	}
	bg.Add(1)
	go func() { defer bg.Done(); res.ProbeDatabase(bgCtx, loader.Ping) }()
	if listener != nil {
		bg.Add(1)
		go func() { defer bg.Done(); listener.Run(bgCtx) }()
	}
	if sess != nil {
		bg.Add(1)
		go func() { defer bg.Done(); sess.Run(bgCtx) }()
	}
	if store != nil && !store.Memory() {
		bg.Add(1)
		go func() {
			defer bg.Done()
			checkValkeyMemory(bgCtx, store, cfg.Sessions.Enabled, log)
		}()
	}
	if cfg.Admin.WarmOnStart {
		bg.Add(1)
		go func() {
			defer bg.Done()
			warmOnStart(bgCtx, cfg, res, pol, log)
		}()
	}
	serveErr := make(chan error, 3)
	for _, s := range []struct {
		srv *http.Server
		ln  net.Listener
	}{{apiSrv, apiLn}, {healthSrv, healthLn}, {adminSrv, adminLn}} {
		if s.srv == nil {
			continue
		}
		go func() {
			if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				serveErr <- err
			}
		}()
	}
	health.SetState(admin.Serving)
	log.Info().
		Str("version", buildVersion()).
		Str("api", apiLn.Addr().String()).
		Str("health", healthLn.Addr().String()).
		Str("admin", healthOpts.AdminAddr).
		Bool("cache", store != nil).
		Msg("listening")

	var runErr error
	select {
	case <-ctx.Done():
		log.Info().Msg("shutting down: readiness off, draining requests")
	case runErr = <-serveErr:
		log.Error().Err(runErr).Msg("server failed; shutting down")
	}
	health.SetState(admin.Draining)
	if cfg.Server.DrainDelay > 0 && runErr == nil {
		time.Sleep(cfg.Server.DrainDelay)
	}
	sdCtx, cancel := context.WithTimeout(context.Background(), cfg.Server.ShutdownTimeout)
	defer cancel()
	if adminSrv != nil {
		cancelAdmin() // a running clear or warm-up stops between batches
		adminSrv.Shutdown(sdCtx)
	}
	if err := apiSrv.Shutdown(sdCtx); err != nil {
		// Past server.shutdown_timeout: the requests still running are cut. Their loads are
		// cancelled and their connections closed; their access-log lines are still written
		// before the log writer closes.
		log.Warn().Err(err).Dur("shutdown_timeout", cfg.Server.ShutdownTimeout).Msg("read API did not drain in time: cancelling the loads in flight and closing the connections")
		res.Close()
		apiSrv.Close()
		wctx, cancelWait := context.WithTimeout(context.Background(), 2*time.Second)
		if !api.Wait(wctx) {
			log.Warn().Msg("requests still running after their loads were cancelled; exiting without their access-log lines")
		}
		cancelWait()
	}
	healthSrv.Shutdown(sdCtx)
	stopBg()
	bg.Wait()
	log.Info().Msg("stopped")
	return runErr
}

// compilePolicies turns the configured policies into the resolver's.
func compilePolicies(cfg *configs.Config) (proxy.Policies, error) {
	var out proxy.Policies
	targets := map[string]**cachepolicy.Policy{
		"tenant": &out.Tenant, "course": &out.Course, "dispatch": &out.Dispatch,
		"dispatch_list": &out.DispatchList, "tenant_stats": &out.TenantStats,
	}
	for name, pc := range cfg.Policies.Named() {
		p, err := cachepolicy.NewPolicy(name, pc.Key, configs.PolicyParams[name], pc.EffectiveTTL(cfg.Cache.TTLDefault),
			pc.IDPattern, pc.SQL, pc.BatchSQL)
		if err != nil {
			return out, err
		}
		p.StaleWhileRevalidate, p.StaleIfError = pc.StaleWhileRevalidate, pc.StaleIfError
		p.NegativeTTL, p.RefreshAhead = pc.NegativeTTL, pc.RefreshAhead
		*targets[name] = p
	}
	return out, nil
}

// verifyTriggers checks the tables and triggers of spec on one pooled connection.
func verifyTriggers(ctx context.Context, pool *pgxpool.Pool, spec invalidation.Spec) error {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	return invalidation.Verify(ctx, conn, spec)
}

// isLoopback reports whether host (of a listen address) is a loopback name or address.
func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// checkValkeyMemory logs Valkey's memory limit and eviction policy once it answers, with a
// warning for a setting that lets Valkey grow without bound or evict sessions.
func checkValkeyMemory(ctx context.Context, store *cachepolicy.Store, sessions bool, log zerolog.Logger) {
	for wait := 100 * time.Millisecond; ; wait = min(wait*2, 10*time.Second) {
		mi, err := store.MemoryInfo(ctx)
		if err == nil {
			log.Info().Int64("maxmemory", mi.MaxMemory).Str("maxmemory_policy", mi.MaxMemoryPolicy).
				Int64("used_memory", mi.UsedMemory).Int64("evicted_keys", mi.EvictedKeys).Msg("valkey memory")
			for _, w := range cachepolicy.MemoryWarnings(mi, sessions) {
				log.Warn().Msg(w)
			}
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// warmOnStart reads, in the background, the ids of every policy's warm_sql through the cache.
func warmOnStart(ctx context.Context, cfg *configs.Config, res *cachepolicy.Resolver, pol proxy.Policies, log zerolog.Logger) {
	// Until invalidation is live, reads of invalidated policies do not fill: wait for it.
	for !res.Live() {
		select {
		case <-ctx.Done():
			return
		case <-time.After(50 * time.Millisecond):
		}
	}
	policies := byName(pol)
	for name, pc := range cfg.Policies.Named() {
		if pc.WarmSQL == "" {
			continue
		}
		p := policies[name]
		ids, err := res.WarmIDs(ctx, pc.WarmSQL, cfg.Admin.WarmMaxIDs)
		if err != nil {
			log.Warn().Err(err).Str("policy", name).Msg("warm query failed; no warm-up for this policy")
			continue
		}
		admin.Warm(ctx, res, p, ids, log.With().Str("component", "warm").Logger())
	}
}

// sessionCopies is local as the sessions store takes it: a nil interface, not a nil pointer in
// one, when there is no tier.
func sessionCopies(local *cachepolicy.LocalCopies) sessions.LocalCopies {
	if local == nil {
		return nil
	}
	return local
}

// postgresCopies is the bound of the sessions' copies of PostgreSQL's answers; 0 keeps none.
func postgresCopies(cfg *configs.Config) int64 {
	if !cfg.SessionPostgresCopiesUsed() {
		return 0
	}
	return cfg.Sessions.TierMaxBytes
}

// listenConn dials a LISTEN connection as the invalidation listener does: to
// invalidation.listen_url (else database.url), a direct session, since LISTEN does not survive
// transaction pooling.
func listenConn(cfg *configs.Config, password, name string) func(context.Context) (*pgx.Conn, error) {
	return func(ctx context.Context) (*pgx.Conn, error) {
		c, err := pgx.ParseConfig(cfg.Invalidation.EffectiveListenURL(cfg.Database.URL))
		if err != nil {
			return nil, errors.New("invalidation.listen_url is not a valid PostgreSQL URL")
		}
		c.ConnectTimeout = cfg.Database.ConnectTimeout
		if password != "" {
			c.Password = password
		}
		c.RuntimeParams["application_name"] = name
		return pgx.ConnectConfig(ctx, c)
	}
}
