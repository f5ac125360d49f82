package main

// The files in deploy/ against the binary they deploy: ports, probe paths, environment names,
// configuration, memory sizing and metric names must be what cachecar really serves, reads and
// exports, so that renaming any of them in code fails here rather than in a cluster.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cachecar/cachecar/configs"
	"github.com/cachecar/cachecar/internal/testenv"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/model"
	"go.yaml.in/yaml/v3"
)

const deployDir = "../../deploy"

// The Kubernetes objects, as far as the tests read them.

type k8sObject struct {
	APIVersion string `yaml:"apiVersion"`
	Kind       string `yaml:"kind"`
	Metadata   struct {
		Name   string            `yaml:"name"`
		Labels map[string]string `yaml:"labels"`
	} `yaml:"metadata"`
	Data       map[string]string `yaml:"data"`
	StringData map[string]string `yaml:"stringData"`
	Spec       yaml.Node         `yaml:"spec"`

	file string
}

type k8sDeployment struct {
	Selector struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	} `yaml:"selector"`
	Template struct {
		Metadata struct {
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"metadata"`
		Spec k8sPodSpec `yaml:"spec"`
	} `yaml:"template"`
}

type k8sPodSpec struct {
	TerminationGracePeriodSeconds *int               `yaml:"terminationGracePeriodSeconds"`
	EnableServiceLinks            *bool              `yaml:"enableServiceLinks"`
	SecurityContext               k8sSecurityContext `yaml:"securityContext"`
	InitContainers                []k8sContainer     `yaml:"initContainers"`
	Containers                    []k8sContainer     `yaml:"containers"`
	Volumes                       []k8sVolume        `yaml:"volumes"`
}

type k8sContainer struct {
	Name          string   `yaml:"name"`
	Image         string   `yaml:"image"`
	RestartPolicy string   `yaml:"restartPolicy"`
	Command       []string `yaml:"command"`
	Args          []string `yaml:"args"`
	Env           []k8sEnv `yaml:"env"`
	Ports         []struct {
		Name          string `yaml:"name"`
		ContainerPort int    `yaml:"containerPort"`
	} `yaml:"ports"`
	StartupProbe   *k8sProbe `yaml:"startupProbe"`
	LivenessProbe  *k8sProbe `yaml:"livenessProbe"`
	ReadinessProbe *k8sProbe `yaml:"readinessProbe"`
	Resources      struct {
		Requests map[string]string `yaml:"requests"`
		Limits   map[string]string `yaml:"limits"`
	} `yaml:"resources"`
	SecurityContext *k8sSecurityContext `yaml:"securityContext"`
	VolumeMounts    []struct {
		Name      string `yaml:"name"`
		MountPath string `yaml:"mountPath"`
		ReadOnly  bool   `yaml:"readOnly"`
	} `yaml:"volumeMounts"`
}

type k8sEnv struct {
	Name      string  `yaml:"name"`
	Value     *string `yaml:"value"`
	ValueFrom *struct {
		SecretKeyRef *struct {
			Name string `yaml:"name"`
			Key  string `yaml:"key"`
		} `yaml:"secretKeyRef"`
		ResourceFieldRef *struct {
			ContainerName string `yaml:"containerName"`
			Resource      string `yaml:"resource"`
		} `yaml:"resourceFieldRef"`
	} `yaml:"valueFrom"`
}

type k8sProbe struct {
	HTTPGet *struct {
		Path string `yaml:"path"`
		Port any    `yaml:"port"` // a number or a container port's name
	} `yaml:"httpGet"`
	PeriodSeconds    int `yaml:"periodSeconds"`
	TimeoutSeconds   int `yaml:"timeoutSeconds"`
	FailureThreshold int `yaml:"failureThreshold"`
}

type k8sSecurityContext struct {
	RunAsNonRoot             *bool  `yaml:"runAsNonRoot"`
	RunAsUser                *int64 `yaml:"runAsUser"`
	ReadOnlyRootFilesystem   *bool  `yaml:"readOnlyRootFilesystem"`
	AllowPrivilegeEscalation *bool  `yaml:"allowPrivilegeEscalation"`
	Capabilities             struct {
		Drop []string `yaml:"drop"`
	} `yaml:"capabilities"`
	SeccompProfile struct {
		Type string `yaml:"type"`
	} `yaml:"seccompProfile"`
}

type k8sKeyPath struct {
	Key  string `yaml:"key"`
	Path string `yaml:"path"`
}

type k8sVolume struct {
	Name      string `yaml:"name"`
	ConfigMap *struct {
		Name  string       `yaml:"name"`
		Items []k8sKeyPath `yaml:"items"`
	} `yaml:"configMap"`
	Secret *struct {
		SecretName string       `yaml:"secretName"`
		Items      []k8sKeyPath `yaml:"items"`
	} `yaml:"secret"`
}

type k8sService struct {
	Selector map[string]string `yaml:"selector"`
	Ports    []struct {
		Name       string `yaml:"name"`
		Port       int    `yaml:"port"`
		TargetPort any    `yaml:"targetPort"`
	} `yaml:"ports"`
}

// k8sAPIVersions are the kinds the manifests may hold, with their API versions.
var k8sAPIVersions = map[string]string{
	"Deployment": "apps/v1",
	"ConfigMap":  "v1",
	"Secret":     "v1",
	"Service":    "v1",
}

// readYAMLDocs decodes every document of a (multi-document) YAML file into nodes.
func readYAMLDocs(t *testing.T, path string) []*yaml.Node {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	var docs []*yaml.Node
	for {
		var n yaml.Node
		err := dec.Decode(&n)
		if errors.Is(err, io.EOF) {
			return docs
		}
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if len(n.Content) > 0 && n.Content[0].Kind != yaml.ScalarNode { // skip empty documents
			docs = append(docs, &n)
		}
	}
}

// k8sObjects reads every manifest under deploy/kubernetes.
func k8sObjects(t *testing.T) []*k8sObject {
	t.Helper()
	var objs []*k8sObject
	err := filepath.WalkDir(filepath.Join(deployDir, "kubernetes"), func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || (filepath.Ext(path) != ".yaml" && filepath.Ext(path) != ".yml") {
			return err
		}
		for i, doc := range readYAMLDocs(t, path) {
			o := &k8sObject{file: fmt.Sprintf("%s#%d", strings.TrimPrefix(path, deployDir+"/"), i)}
			if err := doc.Decode(o); err != nil {
				t.Fatalf("%s: %v", o.file, err)
			}
			objs = append(objs, o)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) == 0 {
		t.Fatal("no manifests under deploy/kubernetes")
	}
	return objs
}

// knownEnv lists the environment variables cachecar reads: CACHECAR_<KEY> for every key of the
// embedded defaults (the same list configs.Load accepts), the platform's names, CACHECAR_CONFIG
// (run's --config) and the Go runtime's GOMEMLIMIT.
func knownEnv(t *testing.T) map[string]bool {
	t.Helper()
	var defaults map[string]any
	if err := yaml.Unmarshal(configs.DefaultYAML, &defaults); err != nil {
		t.Fatal(err)
	}
	env := map[string]bool{"CACHECAR_CONFIG": true, "GOMEMLIMIT": true}
	var walk func(prefix string, m map[string]any)
	walk = func(prefix string, m map[string]any) {
		for k, v := range m {
			if sub, ok := v.(map[string]any); ok {
				walk(prefix+k+".", sub)
				continue
			}
			env[configs.EnvName(prefix+k)] = true
		}
	}
	walk("", defaults)
	for name := range platformEnv {
		env[name] = true
	}
	return env
}

// platformEnv are the platform's own variable names, each with a value and what it must change:
// TestDeployPlatformEnv keeps this list true to configs.Load.
var platformEnv = map[string]struct {
	value string
	check func(*configs.Config) bool
}{
	"DATABASE_URL":      {"postgres://u:p@db.example:5432/x", func(c *configs.Config) bool { return c.Database.URL == "postgres://u:p@db.example:5432/x" }},
	"REDIS_HOST":        {"valkey.example", func(c *configs.Config) bool { return slices.Equal(c.Valkey.Addrs, []string{"valkey.example:6379"}) }},
	"REDIS_PORT":        {"6380", func(c *configs.Config) bool { return slices.Equal(c.Valkey.Addrs, []string{"127.0.0.1:6380"}) }},
	"REDIS_PASSWORD":    {"secret", func(c *configs.Config) bool { return c.Valkey.Password == "secret" }},
	"CACHE_TTL_DEFAULT": {"7", func(c *configs.Config) bool { return c.Cache.TTLDefault == 7*time.Second }},
	"ADMIN_TOKEN":       {"token-0123456789abcdef", func(c *configs.Config) bool { return c.Admin.Token == "token-0123456789abcdef" }},
}

func TestDeployPlatformEnv(t *testing.T) {
	for name, p := range platformEnv {
		cfg, err := configs.Load(configs.Source{Getenv: envFunc(map[string]string{name: p.value})})
		if err != nil || !p.check(cfg) {
			t.Errorf("%s=%s: not read as the platform's name (err %v)", name, p.value, err)
		}
	}
}

func listenPort(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("listen address %q: %v", addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("listen address %q: %v", addr, err)
	}
	return n
}

// parseBytes reads a memory quantity with the given unit suffixes (longest first).
func parseBytes(t *testing.T, s string, units []string, mult map[string]int64) int64 {
	t.Helper()
	for _, u := range units {
		if num, ok := strings.CutSuffix(s, u); ok {
			n, err := strconv.ParseInt(num, 10, 64)
			if err != nil {
				t.Fatalf("memory quantity %q: %v", s, err)
			}
			return n * mult[u]
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatalf("memory quantity %q: unknown unit", s)
	}
	return n
}

// k8sBytes reads a Kubernetes memory quantity (256Mi, 1G).
func k8sBytes(t *testing.T, s string) int64 {
	return parseBytes(t, s, []string{"Ki", "Mi", "Gi", "Ti", "k", "M", "G", "T"}, map[string]int64{
		"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12})
}

// goMemLimitBytes reads a GOMEMLIMIT value (256MiB).
func goMemLimitBytes(t *testing.T, s string) int64 {
	return parseBytes(t, s, []string{"KiB", "MiB", "GiB", "TiB", "B"}, map[string]int64{
		"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "B": 1})
}

// dockerBytes reads a Docker memory size (256m).
func dockerBytes(t *testing.T, s string) int64 {
	return parseBytes(t, strings.ToLower(s), []string{"kb", "mb", "gb", "k", "m", "g", "b"}, map[string]int64{
		"kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "b": 1})
}

// checkMemory checks a memory limit against the tier: the binary refuses a tier that does not
// fit the limit with 64 MiB to spare, and resident memory reaches up to 2 x tier + 64 MiB.
func checkMemory(t *testing.T, where string, tier, limit int64) {
	t.Helper()
	if limit < 2*tier+64<<20 {
		t.Errorf("%s: memory limit %d bytes is below 2 x cache.tier_max_bytes (%d) + 64 MiB", where, limit, tier)
	}
}

// dockerfileUID is the numeric user of the image's final stage.
func dockerfileUID(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(deployDir, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	var user string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && strings.EqualFold(f[0], "USER") {
			user = f[1]
		}
	}
	uid, err := strconv.ParseInt(strings.Split(user, ":")[0], 10, 64)
	if err != nil || uid == 0 {
		t.Fatalf("Dockerfile: USER %q must be a numeric non-root uid (runAsNonRoot can verify only numbers)", user)
	}
	return uid
}

func TestDeployDockerfile(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(deployDir, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	var froms []string
	var entrypoint, expose string
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch strings.ToUpper(f[0]) {
		case "FROM":
			img := f[1]
			if strings.HasPrefix(img, "--platform") {
				img = f[2]
			}
			froms = append(froms, img)
		case "ENTRYPOINT":
			entrypoint = strings.Join(f[1:], " ")
		case "EXPOSE":
			expose = strings.Join(f[1:], " ")
		}
	}
	if len(froms) < 2 {
		t.Errorf("Dockerfile: %d stages, want a multi-stage build", len(froms))
	}
	if final := froms[len(froms)-1]; !strings.HasPrefix(final, "gcr.io/distroless/static") && final != "scratch" {
		t.Errorf("Dockerfile: final stage %q, want distroless/static or scratch", final)
	}
	if !strings.Contains(text, "CGO_ENABLED=0") || !strings.Contains(text, "./cmd/cachecar") {
		t.Error("Dockerfile: want a static build (CGO_ENABLED=0) of ./cmd/cachecar")
	}
	if entrypoint != `["/cachecar"]` {
		t.Errorf("Dockerfile: ENTRYPOINT %s, want [\"/cachecar\"]", entrypoint)
	}
	dockerfileUID(t)
	def, err := configs.Load(configs.Source{})
	if err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{def.Server.Listen, def.Health.Listen, def.Admin.Listen} {
		if p := strconv.Itoa(listenPort(t, addr)); !slices.Contains(strings.Fields(expose), p) {
			t.Errorf("Dockerfile: EXPOSE %s lacks the default port %s", expose, p)
		}
	}
}

// configMapFile writes the ConfigMap's cachecar.yaml to a temporary file and returns its path,
// the ConfigMap and the admin.token_file it names.
func configMapFile(t *testing.T, objs []*k8sObject) (path string, cm *k8sObject, tokenFile string) {
	t.Helper()
	for _, o := range objs {
		if o.Kind == "ConfigMap" && o.Data["cachecar.yaml"] != "" {
			if cm != nil {
				t.Fatalf("two ConfigMaps with cachecar.yaml: %s and %s", cm.file, o.file)
			}
			cm = o
		}
	}
	if cm == nil {
		t.Fatal("no ConfigMap with a cachecar.yaml key")
	}
	path = filepath.Join(t.TempDir(), "cachecar.yaml")
	if err := os.WriteFile(path, []byte(cm.Data["cachecar.yaml"]), 0o600); err != nil {
		t.Fatal(err)
	}
	var raw struct {
		Admin struct {
			TokenFile string `yaml:"token_file"`
		} `yaml:"admin"`
	}
	if err := yaml.Unmarshal([]byte(cm.Data["cachecar.yaml"]), &raw); err != nil {
		t.Fatalf("%s: cachecar.yaml: %v", cm.file, err)
	}
	return path, cm, raw.Admin.TokenFile
}

// tokenStandIn is a file standing in for the mounted admin token, which configs.Load reads.
func tokenStandIn(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "admin-token")
	if err := os.WriteFile(p, []byte("stand-in-token-0123456789abcdef\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func literalEnv(c k8sContainer) map[string]string {
	m := map[string]string{}
	for _, e := range c.Env {
		if e.Value != nil {
			m[e.Name] = *e.Value
		}
	}
	return m
}

// k8sShared is what every Deployment is checked against.
type k8sShared struct {
	known      map[string]bool // the environment variables cachecar reads
	uid        int64           // the image's user
	def        *configs.Config // the defaults
	cm         *k8sObject      // the ConfigMap holding cachecar.yaml
	cmPath     string          // its cachecar.yaml, written to a temporary file
	cmCfg      *configs.Config // what that loads to
	tokenFile  string          // the admin.token_file it names
	token      string          // a file standing in for the mounted token
	secret     *k8sObject
	secretKeys map[string]bool
}

func TestDeployKubernetes(t *testing.T) {
	objs := k8sObjects(t)
	byKind := map[string][]*k8sObject{}
	for _, o := range objs {
		want, ok := k8sAPIVersions[o.Kind]
		switch {
		case o.Kind == "":
			t.Errorf("%s: no kind", o.file)
		case !ok:
			t.Errorf("%s: unexpected kind %q", o.file, o.Kind)
		case o.APIVersion != want:
			t.Errorf("%s: %s apiVersion %q, want %q", o.file, o.Kind, o.APIVersion, want)
		}
		if o.Metadata.Name == "" {
			t.Errorf("%s: no metadata.name", o.file)
		}
		byKind[o.Kind] = append(byKind[o.Kind], o)
	}

	k := &k8sShared{known: knownEnv(t), uid: dockerfileUID(t), token: tokenStandIn(t), secretKeys: map[string]bool{}}
	var err error
	if k.def, err = configs.Load(configs.Source{}); err != nil {
		t.Fatal(err)
	}
	k.cmPath, k.cm, k.tokenFile = configMapFile(t, objs)
	// The ConfigMap alone, with a stand-in for the mounted token: loads with no problem.
	if k.cmCfg, err = configs.Load(configs.Source{File: k.cmPath, Sets: []string{"admin.token_file=" + k.token}}); err != nil {
		t.Fatalf("%s: cachecar.yaml does not load: %v", k.cm.file, err)
	}
	if k.tokenFile == "" {
		t.Errorf("%s: cachecar.yaml sets no admin.token_file (the admin token comes from the Secret, mounted)", k.cm.file)
	}
	if len(byKind["Secret"]) != 1 {
		t.Fatalf("%d Secrets, want 1", len(byKind["Secret"]))
	}
	k.secret = byKind["Secret"][0]
	for key := range k.secret.StringData {
		k.secretKeys[key] = true
	}
	for key := range k.secret.Data {
		k.secretKeys[key] = true
	}

	var native, plain int
	var podLabels []map[string]string
	for _, o := range byKind["Deployment"] {
		labels, isNative := checkDeployment(t, k, o)
		podLabels = append(podLabels, labels)
		if isNative {
			native++
		} else {
			plain++
		}
	}
	if native != 1 || plain != 1 {
		t.Errorf("Deployments: %d with cachecar as a native sidecar and %d as a plain container, want one of each", native, plain)
	}

	// The metrics Service selects the pods and targets the health port.
	for _, o := range byKind["Service"] {
		var s k8sService
		if err := o.Spec.Decode(&s); err != nil {
			t.Fatalf("%s: %v", o.file, err)
		}
		selects := slices.ContainsFunc(podLabels, func(l map[string]string) bool {
			for key, v := range s.Selector {
				if l[key] != v {
					return false
				}
			}
			return len(s.Selector) > 0
		})
		if !selects {
			t.Errorf("%s: selector %v matches no Deployment's pods", o.file, s.Selector)
		}
		for _, p := range s.Ports {
			if tp := fmt.Sprint(p.TargetPort); tp != "health" && tp != strconv.Itoa(listenPort(t, k.cmCfg.Health.Listen)) {
				t.Errorf("%s: port %s targets %v, not the health port", o.file, p.Name, p.TargetPort)
			}
		}
	}
	if len(byKind["Service"]) == 0 {
		t.Error("no Service: the metrics port needs a Service or is left to pod annotations alone")
	}
}

// checkDeployment checks one Deployment and returns its pods' labels and whether cachecar runs
// in it as a native sidecar.
func checkDeployment(t *testing.T, k *k8sShared, o *k8sObject) (labels map[string]string, native bool) {
	t.Helper()
	var d k8sDeployment
	if err := o.Spec.Decode(&d); err != nil {
		t.Fatalf("%s: %v", o.file, err)
	}
	pod := d.Template.Spec
	for key, v := range d.Selector.MatchLabels {
		if d.Template.Metadata.Labels[key] != v {
			t.Errorf("%s: selector %s=%s does not match the pod template's labels", o.file, key, v)
		}
	}
	if len(d.Selector.MatchLabels) == 0 {
		t.Errorf("%s: no selector", o.file)
	}
	cc, native := cachecarContainer(t, o.file, pod)
	configPath := checkCachecarMounts(t, k, o.file, pod, cc)

	// The effective configuration: the ConfigMap plus the container's literal env, with the
	// stand-in token file.
	env := literalEnv(cc)
	env["CACHECAR_ADMIN_TOKEN_FILE"] = k.token
	cfg, err := configs.Load(configs.Source{File: k.cmPath, Getenv: envFunc(env)})
	if err != nil {
		t.Fatalf("%s: cachecar's configuration does not load: %v", o.file, err)
	}
	// The container's own arguments, through run's flag parsing, with check-config for serve.
	args := append(append([]string{}, cc.Command...), cc.Args...)
	if len(args) == 0 || args[0] != "serve" {
		t.Errorf("%s: cachecar's arguments %q, want serve first", o.file, args)
	} else {
		ccArgs := append([]string{"check-config"}, args[1:]...)
		for i, a := range ccArgs {
			if a == configPath {
				ccArgs[i] = k.cmPath
			}
		}
		var out bytes.Buffer
		if err := run(context.Background(), ccArgs, envFunc(env), &out, &out); err != nil {
			t.Errorf("%s: cachecar %q: %v\n%s", o.file, ccArgs, err, &out)
		}
	}

	checkCachecarEnv(t, k, o.file, pod, cc)
	checkCachecarProbes(t, k, o.file, cc, cfg)
	ann := d.Template.Metadata.Annotations
	if ann["prometheus.io/scrape"] != "true" || ann["prometheus.io/port"] != strconv.Itoa(listenPort(t, cfg.Health.Listen)) || ann["prometheus.io/path"] != "/metrics" {
		t.Errorf("%s: prometheus.io annotations %v, want scrape true on the health port's /metrics", o.file, ann)
	}

	// The app reaches cachecar's read API on loopback, at server.listen's port.
	for _, c := range pod.Containers {
		if c.Name == "cachecar" {
			continue
		}
		for _, e := range c.Env {
			if e.Value == nil {
				continue
			}
			if u, err := url.Parse(*e.Value); err == nil && (u.Hostname() == "127.0.0.1" || u.Hostname() == "localhost") {
				if p, _ := strconv.Atoi(u.Port()); p != listenPort(t, cfg.Server.Listen) {
					t.Errorf("%s: %s env %s=%s does not reach server.listen %s", o.file, c.Name, e.Name, *e.Value, cfg.Server.Listen)
				}
			}
		}
	}

	// Resources: requests, and a memory limit that holds the tier.
	req, lim := cc.Resources.Requests, cc.Resources.Limits
	if req["cpu"] == "" || req["memory"] == "" || lim["memory"] == "" {
		t.Errorf("%s: cachecar resources %v / %v: want cpu and memory requests and a memory limit", o.file, req, lim)
	} else {
		limit := k8sBytes(t, lim["memory"])
		checkMemory(t, o.file, cfg.Cache.TierMaxBytes, limit)
		if r := k8sBytes(t, req["memory"]); r > limit {
			t.Errorf("%s: memory request %s above the limit %s", o.file, req["memory"], lim["memory"])
		}
	}

	// Shutdown: the grace period lets cachecar drain; as a plain container, cachecar gets
	// SIGTERM with the app and must keep answering it meanwhile.
	if g := pod.TerminationGracePeriodSeconds; g == nil {
		t.Errorf("%s: no terminationGracePeriodSeconds", o.file)
	} else if need := cfg.Server.DrainDelay + cfg.Server.ShutdownTimeout + 5*time.Second; time.Duration(*g)*time.Second < need {
		t.Errorf("%s: terminationGracePeriodSeconds %d is shorter than drain_delay %s + shutdown_timeout %s + 5s", o.file, *g, cfg.Server.DrainDelay, cfg.Server.ShutdownTimeout)
	}
	if !native && cfg.Server.DrainDelay == 0 {
		t.Errorf("%s: as a plain container cachecar gets SIGTERM with the app; server.drain_delay 0 stops it while the app still drains", o.file)
	}
	checkSecurity(t, k, o.file, pod)
	return d.Template.Metadata.Labels, native
}

// cachecarContainer finds cachecar in the pod: a native sidecar (an init container with
// restartPolicy Always and a startup probe that gates the app) or a plain container.
func cachecarContainer(t *testing.T, file string, pod k8sPodSpec) (cc k8sContainer, native bool) {
	t.Helper()
	found := 0
	for _, c := range pod.InitContainers {
		if c.Name == "cachecar" {
			cc, native = c, true
			found++
			if c.RestartPolicy != "Always" {
				t.Errorf("%s: init container cachecar has restartPolicy %q, want Always (a native sidecar)", file, c.RestartPolicy)
			}
			if c.StartupProbe == nil {
				t.Errorf("%s: the native sidecar has no startupProbe: nothing holds the app back until cachecar answers", file)
			}
		}
	}
	for _, c := range pod.Containers {
		if c.Name == "cachecar" {
			cc = c
			found++
			if c.RestartPolicy != "" {
				t.Errorf("%s: plain container cachecar sets restartPolicy %q", file, c.RestartPolicy)
			}
		}
	}
	if found != 1 {
		t.Fatalf("%s: %d containers named cachecar, want 1", file, found)
	}
	if !slices.ContainsFunc(pod.Containers, func(c k8sContainer) bool { return c.Name != "cachecar" }) {
		t.Errorf("%s: want an app container beside cachecar", file)
	}
	return cc, native
}

// checkCachecarEnv: every name one cachecar reads, secrets from the Secret and never literal,
// GOMEMLIMIT from the memory limit, no Service links.
func checkCachecarEnv(t *testing.T, k *k8sShared, file string, pod k8sPodSpec, cc k8sContainer) {
	t.Helper()
	var gomemlimit bool
	for _, e := range cc.Env {
		if !k.known[e.Name] {
			t.Errorf("%s: env %s is not a variable cachecar reads (CACHECAR_<config key>, the platform's names, CACHECAR_CONFIG, GOMEMLIMIT)", file, e.Name)
		}
		if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
			if ref := e.ValueFrom.SecretKeyRef; ref.Name != k.secret.Metadata.Name || !k.secretKeys[ref.Key] {
				t.Errorf("%s: env %s refers to secret %s key %s, which %s does not have", file, e.Name, ref.Name, ref.Key, k.secret.file)
			}
		}
		if e.Name == "GOMEMLIMIT" {
			gomemlimit = true
			if ref := e.ValueFrom; ref == nil || ref.ResourceFieldRef == nil || ref.ResourceFieldRef.Resource != "limits.memory" ||
				(ref.ResourceFieldRef.ContainerName != "" && ref.ResourceFieldRef.ContainerName != "cachecar") {
				t.Errorf("%s: GOMEMLIMIT must come from cachecar's limits.memory (resourceFieldRef)", file)
			}
		}
		if e.Value != nil && (e.Name == "DATABASE_URL" || strings.HasSuffix(e.Name, "_PASSWORD") || strings.HasSuffix(e.Name, "_TOKEN")) {
			t.Errorf("%s: env %s holds a secret in plain text; take it from the Secret", file, e.Name)
		}
	}
	if !gomemlimit {
		t.Errorf("%s: cachecar has no GOMEMLIMIT", file)
	}
	if pod.EnableServiceLinks == nil || *pod.EnableServiceLinks {
		t.Errorf("%s: enableServiceLinks must be false: a Service named redis would inject REDIS_PORT=tcp://..., which cachecar reads", file)
	}
}

// checkCachecarMounts checks cachecar's volumes: the ConfigMap at the path its --config names,
// the admin token where admin.token_file expects it, the manifests directory, all read-only.
// It returns the configuration file's path in the container.
func checkCachecarMounts(t *testing.T, k *k8sShared, file string, pod k8sPodSpec, cc k8sContainer) string {
	t.Helper()
	vols := map[string]k8sVolume{}
	for _, v := range pod.Volumes {
		vols[v.Name] = v
	}
	mounted := map[string]string{} // file path in the container -> "configmap:key" or "secret:key"
	var mountPaths []string
	for _, m := range cc.VolumeMounts {
		v, ok := vols[m.Name]
		if !ok {
			t.Errorf("%s: cachecar mounts volume %s, which the pod does not have", file, m.Name)
			continue
		}
		if !m.ReadOnly {
			t.Errorf("%s: cachecar mounts %s read-write; it writes nothing", file, m.MountPath)
		}
		mountPaths = append(mountPaths, m.MountPath)
		switch {
		case v.ConfigMap != nil:
			if v.ConfigMap.Name != k.cm.Metadata.Name {
				t.Errorf("%s: volume %s is ConfigMap %s, want %s", file, v.Name, v.ConfigMap.Name, k.cm.Metadata.Name)
			}
			for _, it := range v.ConfigMap.Items {
				mounted[m.MountPath+"/"+it.Path] = "configmap:" + it.Key
			}
		case v.Secret != nil:
			if v.Secret.SecretName != k.secret.Metadata.Name {
				t.Errorf("%s: volume %s is Secret %s, want %s", file, v.Name, v.Secret.SecretName, k.secret.Metadata.Name)
			}
			for _, it := range v.Secret.Items {
				if !k.secretKeys[it.Key] {
					t.Errorf("%s: volume %s mounts key %s, which %s does not have", file, v.Name, it.Key, k.secret.file)
				}
				mounted[m.MountPath+"/"+it.Path] = "secret:" + it.Key
			}
		}
	}
	configPath := literalEnv(cc)["CACHECAR_CONFIG"]
	args := append(append([]string{}, cc.Command...), cc.Args...)
	for i, a := range args {
		if a == "--config" && i+1 < len(args) {
			configPath = args[i+1]
		}
	}
	if mounted[configPath] != "configmap:cachecar.yaml" {
		t.Errorf("%s: cachecar's config %q is not the mounted ConfigMap key cachecar.yaml (mounted: %v)", file, configPath, mounted)
	}
	if k.tokenFile != "" && !strings.HasPrefix(mounted[k.tokenFile], "secret:") {
		t.Errorf("%s: admin.token_file %s is not a mounted Secret key (mounted: %v)", file, k.tokenFile, mounted)
	}
	if !slices.Contains(mountPaths, k.cmCfg.Manifests.Dir) {
		t.Errorf("%s: manifests.dir %s is not a volume mounted in cachecar", file, k.cmCfg.Manifests.Dir)
	}
	return configPath
}

// checkCachecarProbes: the declared port is the health port the configuration listens on (the
// default one, reachable by the kubelet), and the probes ask it for the paths that mean
// liveness and readiness. TestDeployMatchesRunningSidecar asks a running sidecar for them.
func checkCachecarProbes(t *testing.T, k *k8sShared, file string, cc k8sContainer, cfg *configs.Config) {
	t.Helper()
	health := listenPort(t, cfg.Health.Listen)
	ports := map[string]int{}
	for _, p := range cc.Ports {
		ports[p.Name] = p.ContainerPort
		if p.ContainerPort != health {
			t.Errorf("%s: containerPort %d (%s) is not the health port %s; the read API and admin port listen on loopback", file, p.ContainerPort, p.Name, cfg.Health.Listen)
		}
	}
	if host, _, _ := net.SplitHostPort(cfg.Health.Listen); host != "0.0.0.0" && host != "" && host != "::" {
		t.Errorf("%s: health.listen %s is not reachable by the kubelet's probes", file, cfg.Health.Listen)
	}
	if health != listenPort(t, k.def.Health.Listen) {
		t.Errorf("%s: health port %s differs from the default %s", file, cfg.Health.Listen, k.def.Health.Listen)
	}
	for _, pr := range []struct {
		what, path string
		p          *k8sProbe
		required   bool
	}{
		{"liveness", "/health", cc.LivenessProbe, true},
		{"readiness", "/ready", cc.ReadinessProbe, true},
		{"startup", "/health", cc.StartupProbe, false},
	} {
		p := pr.p
		if p == nil || p.HTTPGet == nil {
			if pr.required {
				t.Errorf("%s: cachecar has no %s httpGet probe", file, pr.what)
			}
			continue
		}
		if p.HTTPGet.Path != pr.path {
			t.Errorf("%s: %s probe on %s, want %s", file, pr.what, p.HTTPGet.Path, pr.path)
		}
		port := 0
		switch v := p.HTTPGet.Port.(type) {
		case int:
			port = v
		case string:
			port = ports[v]
		}
		if port != health {
			t.Errorf("%s: %s probe port %v is not the health port %s", file, pr.what, p.HTTPGet.Port, cfg.Health.Listen)
		}
		if p.HTTPGet.Path == "/ready" && time.Duration(p.TimeoutSeconds)*time.Second <= cfg.Health.CheckTimeout {
			t.Errorf("%s: %s probe timeoutSeconds %d must exceed health.check_timeout %s, which bounds /ready's database check", file, pr.what, p.TimeoutSeconds, cfg.Health.CheckTimeout)
		}
	}
}

// checkSecurity: every container non-root (cachecar as the image's uid), read-only root
// filesystem, no privilege escalation, no capabilities, the runtime's seccomp profile.
func checkSecurity(t *testing.T, k *k8sShared, file string, pod k8sPodSpec) {
	t.Helper()
	podSC := pod.SecurityContext
	if podSC.RunAsNonRoot == nil || !*podSC.RunAsNonRoot || podSC.SeccompProfile.Type != "RuntimeDefault" {
		t.Errorf("%s: pod securityContext wants runAsNonRoot and seccompProfile RuntimeDefault", file)
	}
	for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
		sc := c.SecurityContext
		if sc == nil {
			t.Errorf("%s: container %s has no securityContext", file, c.Name)
			continue
		}
		if sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
			t.Errorf("%s: container %s: runAsNonRoot must be true", file, c.Name)
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s: container %s: readOnlyRootFilesystem must be true", file, c.Name)
		}
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("%s: container %s: allowPrivilegeEscalation must be false", file, c.Name)
		}
		if !slices.Equal(sc.Capabilities.Drop, []string{"ALL"}) {
			t.Errorf("%s: container %s: capabilities.drop %v, want [ALL]", file, c.Name, sc.Capabilities.Drop)
		}
		if sc.SeccompProfile.Type != "RuntimeDefault" && podSC.SeccompProfile.Type != "RuntimeDefault" {
			t.Errorf("%s: container %s: no RuntimeDefault seccomp profile", file, c.Name)
		}
		if c.Name == "cachecar" && (sc.RunAsUser == nil || *sc.RunAsUser != k.uid) {
			t.Errorf("%s: cachecar runAsUser %v, want the image's uid %d", file, sc.RunAsUser, k.uid)
		}
	}
}

// interpolate resolves compose's ${VAR:-default} and ${VAR} with the defaults only.
func interpolate(s string) string {
	return regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}`).ReplaceAllString(s, "$2")
}

type composeService struct {
	Image string `yaml:"image"`
	Build *struct {
		Context    string `yaml:"context"`
		Dockerfile string `yaml:"dockerfile"`
	} `yaml:"build"`
	Command     []string          `yaml:"command"`
	Environment map[string]string `yaml:"environment"`
	Ports       []string          `yaml:"ports"`
	MemLimit    string            `yaml:"mem_limit"`
	ReadOnly    bool              `yaml:"read_only"`
	CapDrop     []string          `yaml:"cap_drop"`
	Healthcheck *struct {
		Test []string `yaml:"test"`
	} `yaml:"healthcheck"`
	DependsOn map[string]struct {
		Condition string `yaml:"condition"`
	} `yaml:"depends_on"`
}

func TestDeployCompose(t *testing.T) {
	docs := readYAMLDocs(t, filepath.Join(deployDir, "compose.yaml"))
	if len(docs) != 1 {
		t.Fatalf("compose.yaml: %d documents, want 1", len(docs))
	}
	var compose struct {
		Services map[string]composeService `yaml:"services"`
	}
	if err := docs[0].Decode(&compose); err != nil {
		t.Fatalf("compose.yaml: %v", err)
	}
	known := knownEnv(t)
	svc := compose.Services
	for _, name := range []string{"postgres", "valkey", "cachecar"} {
		if _, ok := svc[name]; !ok {
			t.Fatalf("compose.yaml: no %s service", name)
		}
	}
	for _, dep := range []string{"postgres", "valkey"} {
		if hc := svc[dep].Healthcheck; hc == nil || len(hc.Test) == 0 {
			t.Errorf("compose.yaml: %s has no healthcheck", dep)
		}
		if svc["cachecar"].DependsOn[dep].Condition != "service_healthy" {
			t.Errorf("compose.yaml: cachecar does not wait for %s to be healthy", dep)
		}
	}
	v := svc["valkey"]
	if !strings.HasPrefix(v.Image, "valkey/valkey:") {
		t.Errorf("compose.yaml: valkey image %q, want valkey/valkey", v.Image)
	}
	i := slices.Index(v.Command, "--requirepass")
	if i < 0 || i+1 >= len(v.Command) || interpolate(v.Command[i+1]) == "" {
		t.Fatalf("compose.yaml: valkey runs without --requirepass: %q", v.Command)
	}
	password := v.Command[i+1]

	for name, s := range svc {
		if s.Build == nil && !strings.HasPrefix(s.Image, "cachecar") {
			continue // not cachecar
		}
		// Every service running the binary: built from deploy/Dockerfile, known env names, a
		// configuration that loads.
		if s.Build == nil || s.Build.Context != ".." || s.Build.Dockerfile != "deploy/Dockerfile" {
			t.Errorf("compose.yaml: %s is not built from deploy/Dockerfile with the repo root as context", name)
		} else if _, err := os.Stat(filepath.Join(deployDir, s.Build.Context, s.Build.Dockerfile)); err != nil {
			t.Errorf("compose.yaml: %s: %v", name, err)
		}
		env := map[string]string{}
		for k, val := range s.Environment {
			if !known[k] {
				t.Errorf("compose.yaml: %s: env %s is not a variable cachecar reads", name, k)
			}
			env[k] = interpolate(val)
		}
		if !s.ReadOnly || !slices.Equal(s.CapDrop, []string{"ALL"}) {
			t.Errorf("compose.yaml: %s: want read_only: true and cap_drop: [ALL]", name)
		}
		if hc := s.Healthcheck; hc != nil && len(hc.Test) > 0 && hc.Test[0] != "CMD" {
			t.Errorf("compose.yaml: %s: healthcheck %q needs a shell, which the distroless image does not have", name, hc.Test)
		}
		cfg, err := configs.Load(configs.Source{Getenv: envFunc(env)})
		if err != nil {
			t.Errorf("compose.yaml: %s: configuration does not load: %v", name, err)
			continue
		}
		if u, err := url.Parse(cfg.Database.URL); err != nil || u.Hostname() != "postgres" {
			t.Errorf("compose.yaml: %s: database.url host is not the postgres service", name)
		}
		if name != "cachecar" {
			continue
		}
		if s.Environment["REDIS_PASSWORD"] != password {
			t.Errorf("compose.yaml: cachecar's REDIS_PASSWORD %q is not valkey's --requirepass %q", s.Environment["REDIS_PASSWORD"], password)
		}
		if !slices.Equal(cfg.Valkey.Addrs, []string{"valkey:6379"}) {
			t.Errorf("compose.yaml: cachecar's valkey.addrs %v, want the valkey service", cfg.Valkey.Addrs)
		}
		listens := map[int]string{}
		for _, a := range []string{cfg.Server.Listen, cfg.Health.Listen, cfg.Admin.Listen} {
			listens[listenPort(t, a)] = a
		}
		for _, p := range s.Ports {
			parts := strings.Split(p, ":")
			cp, _ := strconv.Atoi(parts[len(parts)-1])
			addr, ok := listens[cp]
			switch {
			case !ok:
				t.Errorf("compose.yaml: cachecar publishes %s, which is none of its listen ports", p)
			case !strings.HasPrefix(addr, "0.0.0.0:"):
				t.Errorf("compose.yaml: cachecar publishes %s, but it listens on %s, unreachable from outside the container", p, addr)
			}
			if len(parts) != 3 || parts[0] != "127.0.0.1" {
				t.Errorf("compose.yaml: cachecar publishes %s beyond the host's loopback", p)
			}
		}
		if cp := listenPort(t, cfg.Health.Listen); !slices.ContainsFunc(s.Ports, func(p string) bool { return strings.HasSuffix(p, ":"+strconv.Itoa(cp)) }) {
			t.Errorf("compose.yaml: cachecar's health port %d is not published", cp)
		}
		if s.MemLimit == "" || env["GOMEMLIMIT"] == "" {
			t.Errorf("compose.yaml: cachecar wants mem_limit and GOMEMLIMIT")
		} else {
			limit := dockerBytes(t, s.MemLimit)
			checkMemory(t, "compose.yaml: cachecar", cfg.Cache.TierMaxBytes, limit)
			if gl := goMemLimitBytes(t, env["GOMEMLIMIT"]); gl > limit || cfg.Cache.TierMaxBytes+64<<20 > gl {
				t.Errorf("compose.yaml: GOMEMLIMIT %s must be at most mem_limit %s and hold the tier plus 64 MiB", env["GOMEMLIMIT"], s.MemLimit)
			}
		}
	}
}

// Prometheus rules and the dashboard.

type alertRule struct {
	Alert       string            `yaml:"alert"`
	Record      string            `yaml:"record"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

func alertRules(t *testing.T) []alertRule {
	t.Helper()
	docs := readYAMLDocs(t, filepath.Join(deployDir, "prometheus", "alerts.yaml"))
	var rules []alertRule
	for _, d := range docs {
		var f struct {
			Groups []struct {
				Name  string      `yaml:"name"`
				Rules []alertRule `yaml:"rules"`
			} `yaml:"groups"`
		}
		if err := d.Decode(&f); err != nil {
			t.Fatalf("alerts.yaml: %v", err)
		}
		for _, g := range f.Groups {
			rules = append(rules, g.Rules...)
		}
	}
	if len(rules) == 0 {
		t.Fatal("alerts.yaml: no rules")
	}
	return rules
}

func TestDeployAlertRules(t *testing.T) {
	rules := alertRules(t)
	byName := map[string]alertRule{}
	for _, r := range rules {
		if r.Alert == "" || strings.TrimSpace(r.Expr) == "" {
			t.Errorf("alerts.yaml: rule %q without alert name or expr", r.Alert+r.Record)
			continue
		}
		if _, dup := byName[r.Alert]; dup {
			t.Errorf("alerts.yaml: %s twice", r.Alert)
		}
		byName[r.Alert] = r
		if sev := r.Labels["severity"]; sev != "warning" && sev != "critical" {
			t.Errorf("alerts.yaml: %s severity %q, want warning or critical", r.Alert, sev)
		}
		if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
			t.Errorf("alerts.yaml: %s wants a summary and a description", r.Alert)
		}
	}
	// The design's alerts and the ones issue 7 adds: the metric each must watch, for how long.
	for _, want := range []struct {
		alert, metric, forDur string
		contains              []string
	}{
		{"CachecarValkeyDown", "cachecar_valkey_up", "5m", []string{"== 0"}},
		{"CachecarLowHitRate", "cachecar_cache_lookups_total", "10m", []string{`result="hit"`, "< 0.5"}},
		{"CachecarHighLatency", "cachecar_http_request_duration_seconds_bucket", "5m", []string{"histogram_quantile(0.95", "> 0.2"}},
		{"CachecarInvalidationListenerDown", "cachecar_invalidation_listener_up", "30s", []string{"== 0"}},
		{"CachecarValkeyCircuitOpen", "cachecar_valkey_circuit_state", "1m", nil},
		{"CachecarInvalidationLagHigh", "cachecar_invalidation_lag_seconds_bucket", "", []string{"histogram_quantile(0.99"}},
		{"CachecarSessionStoreFallback", "cachecar_session_store_active", "", []string{`store="postgres"`}},
	} {
		r, ok := byName[want.alert]
		if !ok {
			t.Errorf("alerts.yaml: no %s", want.alert)
			continue
		}
		if !slices.ContainsFunc(promqlRefs(r.Expr).metrics, func(m metricRef) bool { return m.name == want.metric }) {
			t.Errorf("alerts.yaml: %s does not use %s: %s", want.alert, want.metric, r.Expr)
		}
		for _, s := range want.contains {
			if !strings.Contains(r.Expr, s) {
				t.Errorf("alerts.yaml: %s: expr lacks %q: %s", want.alert, s, r.Expr)
			}
		}
		if want.forDur != "" {
			got, err1 := model.ParseDuration(r.For)
			exp, err2 := model.ParseDuration(want.forDur)
			if err1 != nil || err2 != nil || got != exp {
				t.Errorf("alerts.yaml: %s for %q, want %s", want.alert, r.For, want.forDur)
			}
		}
	}
}

// TestDeployPromtool runs Prometheus' own check of the rules. promtool comes from Debian's
// prometheus package; with CI=true a missing promtool fails, since make test installs it.
func TestDeployPromtool(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("promtool not found: make test installs it (from Debian's prometheus package); CI=true does not skip")
		}
		t.Skip("promtool not found (Debian: the prometheus package, or make test): deploy/prometheus/alerts.yaml not checked by Prometheus itself")
	}
	out, err := exec.Command(promtool, "check", "rules", filepath.Join(deployDir, "prometheus", "alerts.yaml")).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
}

type grafanaPanel struct {
	ID         int            `json:"id"`
	Type       string         `json:"type"`
	Title      string         `json:"title"`
	Datasource map[string]any `json:"datasource"`
	Targets    []struct {
		Expr       string         `json:"expr"`
		RefID      string         `json:"refId"`
		Datasource map[string]any `json:"datasource"`
	} `json:"targets"`
	Panels []grafanaPanel `json:"panels"`
}

type grafanaDashboard struct {
	Title      string `json:"title"`
	UID        string `json:"uid"`
	Templating struct {
		List []struct {
			Name       string         `json:"name"`
			Type       string         `json:"type"`
			Query      any            `json:"query"`
			Datasource map[string]any `json:"datasource"`
		} `json:"list"`
	} `json:"templating"`
	Panels []grafanaPanel `json:"panels"`
}

func dashboard(t *testing.T) grafanaDashboard {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(deployDir, "grafana", "cachecar.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d grafanaDashboard
	dec := json.NewDecoder(bytes.NewReader(b))
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("cachecar.json: %v", err)
	}
	return d
}

// dashboardQueries returns every PromQL query of the dashboard by where it is: panel targets
// and the templating variables' label_values selectors.
func dashboardQueries(t *testing.T, d grafanaDashboard) map[string]string {
	t.Helper()
	q := map[string]string{}
	var walk func([]grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			for _, tg := range p.Targets {
				q[fmt.Sprintf("panel %q target %s", p.Title, tg.RefID)] = tg.Expr
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	labelValues := regexp.MustCompile(`^\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$`)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		s, _ := v.Query.(string)
		if m, ok := v.Query.(map[string]any); ok {
			s, _ = m["query"].(string)
		}
		if m := labelValues.FindStringSubmatch(s); m != nil {
			// The selector is PromQL; the label must be on it (checked with the selector's).
			q[fmt.Sprintf("variable %s", v.Name)] = fmt.Sprintf("sum by (%s) (%s)", m[2], m[1])
		} else {
			t.Errorf("cachecar.json: variable %s: query %q is not label_values(selector, label)", v.Name, s)
		}
	}
	return q
}

func TestDeployDashboard(t *testing.T) {
	d := dashboard(t)
	if d.Title == "" || d.UID == "" {
		t.Error("cachecar.json: wants a title and a uid")
	}
	dsVar := ""
	for _, v := range d.Templating.List {
		if v.Type == "datasource" && v.Query == "prometheus" {
			dsVar = v.Name
		}
	}
	if dsVar == "" {
		t.Fatal("cachecar.json: no Prometheus data source variable")
	}
	wantDS := "${" + dsVar + "}"
	ids := map[int]bool{}
	var walk func([]grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			if ids[p.ID] {
				t.Errorf("cachecar.json: panel id %d twice", p.ID)
			}
			ids[p.ID] = true
			if p.Type != "row" {
				if p.Datasource["uid"] != wantDS {
					t.Errorf("cachecar.json: panel %q data source %v, want %s", p.Title, p.Datasource, wantDS)
				}
				if len(p.Targets) == 0 {
					t.Errorf("cachecar.json: panel %q has no query", p.Title)
				}
			}
			for _, tg := range p.Targets {
				if tg.Datasource != nil && tg.Datasource["uid"] != wantDS {
					t.Errorf("cachecar.json: panel %q target %s data source %v", p.Title, tg.RefID, tg.Datasource)
				}
				if strings.TrimSpace(tg.Expr) == "" {
					t.Errorf("cachecar.json: panel %q target %s has no expr", p.Title, tg.RefID)
				}
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)

	// What issue 7 asks the dashboard to show, by the series each needs.
	queries := dashboardQueries(t, d)
	all := ""
	used := map[string]bool{}
	for _, q := range queries {
		all += q + "\n"
		for _, m := range promqlRefs(q).metrics {
			used[m.name] = true
		}
	}
	for _, m := range []string{
		"cachecar_cache_lookups_total",                  // hit rate per policy
		"cachecar_http_request_duration_seconds_bucket", // latency percentiles
		"cachecar_db_queries_total",                     // database queries avoided
		"cachecar_invalidation_lag_seconds_bucket",      // invalidation lag
		"cachecar_valkey_up", "cachecar_valkey_circuit_state", "cachecar_invalidation_listener_up",
		"cachecar_tier_entries", "cachecar_tier_bytes",
	} {
		if !used[m] {
			t.Errorf("cachecar.json: no panel uses %s", m)
		}
	}
	for _, s := range []string{"sum by (policy)", "histogram_quantile(0.5,", "histogram_quantile(0.95,", "histogram_quantile(0.99,"} {
		if !strings.Contains(all, s) {
			t.Errorf("cachecar.json: no query has %q", s)
		}
	}
}

// A small reader of PromQL, enough to find the metric names, their label matchers and the
// grouping labels of an expression without Prometheus' parser.

type metricRef struct {
	name   string
	labels []string
}

type promRefs struct {
	metrics  []metricRef
	grouping []string // by, without, on, ignoring, group_left/right labels
}

var promKeywords = map[string]bool{"and": true, "or": true, "unless": true, "bool": true, "offset": true, "atan2": true}

// promAggregations may be followed by a grouping clause before their parenthesis.
var promAggregations = map[string]bool{
	"sum": true, "min": true, "max": true, "avg": true, "group": true, "stddev": true, "stdvar": true, "count": true,
	"count_values": true, "bottomk": true, "topk": true, "quantile": true, "limitk": true, "limit_ratio": true,
}
var promGrouping = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true}

func isIdentStart(c byte) bool {
	return c == '_' || c == ':' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
}

func isIdent(c byte) bool { return isIdentStart(c) || (c >= '0' && c <= '9') }

func promqlRefs(expr string) promRefs {
	var r promRefs
	s := expr
	skipSpace := func(i int) int {
		for i < len(s) && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r') {
			i++
		}
		return i
	}
	skipString := func(i int) int { // s[i] is the opening quote
		q := s[i]
		for i++; i < len(s) && s[i] != q; i++ {
			if s[i] == '\\' && q != '`' {
				i++
			}
		}
		return i + 1
	}
	// labelList reads "(a, b)" starting at s[i] == '('.
	labelList := func(i int) ([]string, int) {
		end := strings.IndexByte(s[i:], ')')
		if end < 0 {
			return nil, len(s)
		}
		var out []string
		for _, l := range strings.Split(s[i+1:i+end], ",") {
			if l = strings.TrimSpace(l); l != "" {
				out = append(out, l)
			}
		}
		return out, i + end + 1
	}
	// matchers reads "{a="x", b=~"y"}" starting at s[i] == '{'.
	matchers := func(i int) ([]string, int) {
		var out []string
		i++
		for i < len(s) && s[i] != '}' {
			i = skipSpace(i)
			switch {
			case i < len(s) && isIdentStart(s[i]):
				j := i
				for j < len(s) && isIdent(s[j]) {
					j++
				}
				out = append(out, s[i:j])
				i = j
			case i < len(s) && (s[i] == '"' || s[i] == '\'' || s[i] == '`'):
				i = skipString(i)
			default:
				i++
			}
		}
		return out, i + 1
	}
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '"' || c == '\'' || c == '`':
			i = skipString(i)
		case c == '[': // a range or subquery: durations and Grafana's $__rate_interval
			end := strings.IndexByte(s[i:], ']')
			if end < 0 {
				return r
			}
			i += end + 1
		case c == '$': // a Grafana variable
			i++
			if i < len(s) && s[i] == '{' {
				i += strings.IndexByte(s[i:], '}') + 1
				continue
			}
			for i < len(s) && isIdent(s[i]) {
				i++
			}
		case c >= '0' && c <= '9' || c == '.': // numbers and durations
			for i < len(s) && (isIdent(s[i]) || s[i] == '.') {
				i++
			}
		case c == '{': // a selector without a metric name
			_, i = matchers(i)
		case isIdentStart(c):
			j := i
			for j < len(s) && isIdent(s[j]) {
				j++
			}
			word := s[i:j]
			next := skipSpace(j)
			switch {
			case promGrouping[word] && next < len(s) && s[next] == '(':
				var ls []string
				ls, i = labelList(next)
				r.grouping = append(r.grouping, ls...)
			case promKeywords[word] || promGrouping[word] || promAggregations[word]:
				i = j
			case next < len(s) && s[next] == '(': // a function or an aggregation
				i = j
			default:
				m := metricRef{name: word}
				i = j
				if next < len(s) && s[next] == '{' {
					m.labels, i = matchers(next)
				}
				r.metrics = append(r.metrics, m)
			}
		default:
			i++
		}
	}
	return r
}

func TestDeployPromQLReader(t *testing.T) {
	r := promqlRefs(`histogram_quantile(0.95, sum by (namespace, job, le) (rate(cachecar_http_request_duration_seconds_bucket{job=~"$job", route!="a,b}"}[$__rate_interval]))) > 0.2 and on (job) x_total offset 5m`)
	got := fmt.Sprint(r.metrics, r.grouping)
	want := "[{cachecar_http_request_duration_seconds_bucket [job route]} {x_total []}] [namespace job le job]"
	if got != want {
		t.Errorf("promqlRefs: %s, want %s", got, want)
	}
}

// registeredMetrics maps every metric serve registers to its label names, from the registry's
// descriptors: vectors without samples included, which /metrics does not list.
func registeredMetrics(t *testing.T, reg *prometheus.Registry) map[string][]string {
	t.Helper()
	ch := make(chan *prometheus.Desc)
	go func() { reg.Describe(ch); close(ch) }()
	fq := regexp.MustCompile(`^Desc\{fqName: "([^"]+)"`)
	constLabels := regexp.MustCompile(`constLabels: \{([^{}]*)\}`)
	varLabels := regexp.MustCompile(`variableLabels: \{([^{}]*)\}\}$`)
	out := map[string][]string{}
	for d := range ch {
		s := d.String()
		m := fq.FindStringSubmatch(s)
		if m == nil {
			t.Fatalf("descriptor %s: no fqName", s)
		}
		var labels []string
		if c := constLabels.FindStringSubmatch(s); c != nil && c[1] != "" {
			for _, kv := range strings.Split(c[1], ",") {
				labels = append(labels, strings.SplitN(kv, "=", 2)[0])
			}
		}
		if v := varLabels.FindStringSubmatch(s); v != nil && v[1] != "" {
			for _, l := range strings.Split(v[1], ",") {
				labels = append(labels, strings.TrimSuffix(strings.TrimPrefix(l, "c("), ")"))
			}
		}
		out[m[1]] = labels
	}
	return out
}

// targetLabels are the labels Prometheus adds to every scraped series (job, instance) and the
// ones Kubernetes service discovery commonly adds by relabelling.
var targetLabels = []string{"job", "instance", "namespace", "pod"}

// checkPromQL reports the metric names and labels of expr that the binary does not export.
func checkPromQL(t *testing.T, where, expr string, registered map[string][]string) {
	t.Helper()
	refs := promqlRefs(expr)
	if len(refs.metrics) == 0 {
		t.Errorf("%s: no metric in %q", where, expr)
	}
	all := append([]string{"__name__"}, targetLabels...)
	for _, m := range refs.metrics {
		labels, ok := registered[m.name]
		if !ok {
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if base, cut := strings.CutSuffix(m.name, suffix); cut {
					if labels, ok = registered[base]; ok && suffix == "_bucket" {
						labels = append(slices.Clone(labels), "le")
					}
					if ok {
						break
					}
				}
			}
		}
		if !ok {
			t.Errorf("%s: metric %s is not registered by cachecar", where, m.name)
			continue
		}
		all = append(all, labels...)
		for _, l := range m.labels {
			if !slices.Contains(labels, l) && !slices.Contains(targetLabels, l) && l != "__name__" {
				t.Errorf("%s: %s has no label %s (labels: %v)", where, m.name, l, labels)
			}
		}
	}
	for _, l := range refs.grouping {
		if !slices.Contains(all, l) {
			t.Errorf("%s: grouping label %s is on none of the expression's metrics", where, l)
		}
	}
}

// deployProbePaths lists every probe path of the manifests, and the scrape path.
func deployProbePaths(t *testing.T) []string {
	t.Helper()
	paths := map[string]bool{}
	for _, o := range k8sObjects(t) {
		if o.Kind != "Deployment" {
			continue
		}
		var d k8sDeployment
		if err := o.Spec.Decode(&d); err != nil {
			t.Fatal(err)
		}
		if p := d.Template.Metadata.Annotations["prometheus.io/path"]; p != "" {
			paths[p] = true
		}
		for _, c := range append(d.Template.Spec.InitContainers, d.Template.Spec.Containers...) {
			if c.Name != "cachecar" {
				continue
			}
			for _, p := range []*k8sProbe{c.StartupProbe, c.LivenessProbe, c.ReadinessProbe} {
				if p != nil && p.HTTPGet != nil {
					paths[p.HTTPGet.Path] = true
				}
			}
		}
	}
	out := make([]string, 0, len(paths))
	for p := range paths {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// TestDeployMatchesRunningSidecar starts a sidecar as the manifests run it (Valkey, PostgreSQL
// with triggers) and checks that every probe path answers 200 and that every metric and label
// the alerts and the dashboard use is one it registers. Not parallel: it swaps newRegistry.
func TestDeployMatchesRunningSidecar(t *testing.T) {
	var reg *prometheus.Registry
	orig := newRegistry
	t.Cleanup(func() { newRegistry = orig }) // runs after the sidecar's own cleanup stopped it
	newRegistry = func() *prometheus.Registry {
		reg = orig()
		return reg
	}
	dbURL := referenceDB(t)
	addr, prefix := testenv.Valkey(t)
	s := startSidecar(t, map[string]string{"DATABASE_URL": dbURL, "CACHECAR_VALKEY_ADDRS": addr, "CACHECAR_NAMESPACE": prefix})
	if reg == nil {
		t.Fatal("serve did not make its registry through newRegistry")
	}

	paths := deployProbePaths(t)
	for _, want := range []string{"/health", "/ready", "/metrics"} {
		if !slices.Contains(paths, want) {
			t.Errorf("the manifests probe or scrape no %s (they use %v)", want, paths)
		}
	}
	for _, p := range paths {
		if r, b := get(t, s.health+p); r.StatusCode != http.StatusOK {
			t.Errorf("GET %s on the health port: %d %s", p, r.StatusCode, b)
		}
	}

	registered := registeredMetrics(t, reg)
	// The series the alerts and the dashboard are built on, as named in code: a rename there
	// must show here even if the files were renamed along with it by mistake.
	for _, m := range []string{
		"cachecar_valkey_up", "cachecar_cache_lookups_total", "cachecar_http_request_duration_seconds",
		"cachecar_invalidation_listener_up", "cachecar_valkey_circuit_state", "cachecar_invalidation_lag_seconds",
		"cachecar_session_store_active", "cachecar_db_queries_total", "cachecar_tier_entries", "cachecar_tier_bytes",
	} {
		if _, ok := registered[m]; !ok {
			t.Errorf("cachecar registers no %s", m)
		}
	}
	for _, r := range alertRules(t) {
		checkPromQL(t, "alerts.yaml: "+r.Alert, r.Expr, registered)
	}
	for where, q := range dashboardQueries(t, dashboard(t)) {
		checkPromQL(t, "cachecar.json: "+where, q, registered)
	}
	// The metrics endpoint the annotations point at is the registry's: one of its series.
	_, body := get(t, s.health+"/metrics")
	sc := bufio.NewScanner(strings.NewReader(body))
	found := false
	for sc.Scan() {
		found = found || strings.HasPrefix(sc.Text(), "cachecar_build_info{")
	}
	if !found {
		t.Error("/metrics does not serve cachecar_build_info")
	}
}
