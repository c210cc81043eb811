// Package deploy_test checks what deploy/ ships, with the tools its users
// run: the alert rules with promtool (check and unit tests), every
// Kubernetes overlay with kustomize build, the Grafana dashboard as JSON, and
// that every metric they query exists in the code. A missing tool fails the
// tests: promtool comes with Debian's prometheus package
// (deploy/dev/install.sh --tests), kustomize from the Go module proxy.
package deploy_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

var update = flag.Bool("update", false, "rewrite generated files (the PrometheusRule) instead of comparing them")

// kustomizeModule is the kustomize command built from the Go module proxy.
const kustomizeModule = "sigs.k8s.io/kustomize/kustomize/v5@v5.8.1"

const (
	rulesFile      = "prometheus/keystone-fanout.rules.yaml"
	rulesTestFile  = "prometheus/keystone-fanout.rules.test.yaml"
	prometheusRule = "kubernetes/components/prometheus-rules/prometheusrule.yaml"
	dashboardFile  = "grafana/keystone-fanout.json"
	runbookFile    = "../docs/RUNBOOK.md"
)

// promtool returns promtool's path, failing the test when it is missing.
func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool is not installed: run deploy/dev/install.sh --tests (Debian's prometheus package has it): %v", err)
	}
	return p
}

func run(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out.String())
	}
	return out.String()
}

// TestPromtool: the rules load (promtool check rules) and their unit tests
// pass (promtool test rules).
func TestPromtool(t *testing.T) {
	p := promtool(t)
	run(t, "prometheus", p, "check", "rules", filepath.Base(rulesFile))
	run(t, "prometheus", p, "test", "rules", filepath.Base(rulesTestFile))
}

// rules is the part of a Prometheus rules file the tests read.
type rules struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func readRules(t *testing.T) rules {
	t.Helper()
	b, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var r rules
	if err := yaml.Unmarshal(b, &r); err != nil {
		t.Fatalf("%s: %v", rulesFile, err)
	}
	return r
}

// TestAlertsLeadToTheRunbook: every alert has a severity and a runbook_url
// naming a section of docs/RUNBOOK.md that exists.
func TestAlertsLeadToTheRunbook(t *testing.T) {
	b, err := os.ReadFile(runbookFile)
	if err != nil {
		t.Fatal(err)
	}
	anchors := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "#") {
			anchors[slug(strings.TrimLeft(line, "# "))] = true
		}
	}
	n := 0
	for _, g := range readRules(t).Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			n++
			if s := r.Labels["severity"]; s != "critical" && s != "warning" && s != "info" {
				t.Errorf("%s: severity %q, want critical, warning or info", r.Alert, s)
			}
			for _, a := range []string{"summary", "description"} {
				if r.Annotations[a] == "" {
					t.Errorf("%s: no %s", r.Alert, a)
				}
			}
			u := r.Annotations["runbook_url"]
			anchor, ok := strings.CutPrefix(u, "docs/RUNBOOK.md#")
			if !ok || !anchors[anchor] {
				t.Errorf("%s: runbook_url %q is not docs/RUNBOOK.md#<a section of it>", r.Alert, u)
			}
		}
	}
	if n < 10 {
		t.Fatalf("%d alerts in %s, want the full set", n, rulesFile)
	}
}

// slug is the anchor GitHub gives a Markdown heading.
func slug(heading string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(strings.TrimSpace(heading)) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9'):
			b.WriteRune(r)
		}
	}
	return b.String()
}

// TestPrometheusRuleMatchesRulesFile: the PrometheusRule of the Kubernetes
// component carries exactly the rules file. go test ./deploy -run
// TestPrometheusRuleMatchesRulesFile -update rewrites it.
func TestPrometheusRuleMatchesRulesFile(t *testing.T) {
	src, err := os.ReadFile(rulesFile)
	if err != nil {
		t.Fatal(err)
	}
	var want bytes.Buffer
	want.WriteString("# Generated from deploy/prometheus/keystone-fanout.rules.yaml: edit that file, then\n" +
		"# go test ./deploy -run TestPrometheusRuleMatchesRulesFile -update\n" +
		"# The Prometheus operator loads it when its ruleSelector matches these labels\n" +
		"# (many installations select release: <its Helm release>: add that label in an overlay).\n" +
		"apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: keystone-fanout\n" +
		"  labels: {app.kubernetes.io/name: keystone-fanout, role: alert-rules}\nspec:\n")
	inGroups := false
	for _, line := range strings.SplitAfter(string(src), "\n") {
		if strings.HasPrefix(line, "groups:") {
			inGroups = true
		}
		if inGroups && line != "" {
			if strings.TrimSpace(line) == "" {
				want.WriteString("\n")
			} else {
				want.WriteString("  " + line)
			}
		}
	}
	if *update {
		if err := os.WriteFile(prometheusRule, want.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(prometheusRule)
	if err != nil {
		t.Fatalf("%v (generate it: go test ./deploy -run TestPrometheusRuleMatchesRulesFile -update)", err)
	}
	if !bytes.Equal(got, want.Bytes()) {
		t.Fatalf("%s differs from %s: go test ./deploy -run TestPrometheusRuleMatchesRulesFile -update", prometheusRule, rulesFile)
	}
	// And it says the same as the file once parsed.
	var pr struct {
		Spec rules `yaml:"spec"`
	}
	if err := yaml.Unmarshal(got, &pr); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(pr.Spec) != fmt.Sprint(readRules(t)) {
		t.Fatal("the PrometheusRule's spec does not parse to the rules file")
	}
}

// metricName finds the metric names in a PromQL expression.
var metricName = regexp.MustCompile(`\b(keystone_fanout_[a-z0-9_]+|jetstream_[a-z0-9_]+|(?:go|process)_[a-z0-9_]+|up)\b`)

// exporterMetrics are the prometheus-nats-exporter (-jsz=consumers) series
// the rules and the dashboard use.
var exporterMetrics = []string{"jetstream_consumer_num_pending", "jetstream_consumer_num_ack_pending", "jetstream_consumer_num_waiting"}

// runtimeMetrics are the Go and process collectors' series that the
// dashboard uses (internal/app registers both collectors in every process).
var runtimeMetrics = []string{"process_resident_memory_bytes", "go_memstats_heap_inuse_bytes"}

var (
	codeMetricsOnce sync.Once
	codeMetricsSet  map[string]bool
	codeMetricsErr  error
)

// codeMetrics reads the metric names the Go code registers, from its
// source: full names written out ("keystone_fanout_build_info"), a prefix
// constant joined to a name (metricPrefix + "events_total"), and
// Namespace/Subsystem/Name options (const ns, sub = "keystone_fanout", "revoke").
func codeMetrics(t *testing.T) map[string]bool {
	t.Helper()
	codeMetricsOnce.Do(func() {
		full := regexp.MustCompile(`Name:\s*"(keystone_fanout_[a-z0-9_]+)"`)
		prefixConst := regexp.MustCompile(`(\w+)\s*=\s*"(keystone_fanout_[a-z0-9_]+_)"`)
		joined := regexp.MustCompile(`(\w+)\s*\+\s*"([a-z0-9_]+)"`)
		nsSub := regexp.MustCompile(`ns,\s*sub\s*=\s*"(keystone_fanout)",\s*"([a-z0-9_]+)"`)
		subName := regexp.MustCompile(`Subsystem:\s*sub,\s*Name:\s*"([a-z0-9_]+)"`)
		set := map[string]bool{}
		codeMetricsErr = filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.IsDir() && (d.Name() == ".git" || d.Name() == "testdata") {
				return filepath.SkipDir
			}
			if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return nil
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			src := string(b)
			for _, m := range full.FindAllStringSubmatch(src, -1) {
				set[m[1]] = true
			}
			prefixes := map[string]string{}
			for _, m := range prefixConst.FindAllStringSubmatch(src, -1) {
				prefixes[m[1]] = m[2]
			}
			for _, m := range joined.FindAllStringSubmatch(src, -1) {
				if p, ok := prefixes[m[1]]; ok {
					set[p+m[2]] = true
				}
			}
			if m := nsSub.FindStringSubmatch(src); m != nil {
				for _, n := range subName.FindAllStringSubmatch(src, -1) {
					set[m[1]+"_"+m[2]+"_"+n[1]] = true
				}
			}
			return nil
		})
		codeMetricsSet = set
	})
	if codeMetricsErr != nil {
		t.Fatal(codeMetricsErr)
	}
	// The reader must still understand how the code names its metrics.
	for _, n := range []string{"keystone_fanout_build_info", "keystone_fanout_bridge_received_total",
		"keystone_fanout_agent_consumer_pending", "keystone_fanout_invalidator_server_errors_total",
		"keystone_fanout_revoke_last_success_timestamp_seconds"} {
		if !codeMetricsSet[n] {
			t.Fatalf("the source reader no longer finds %s: teach codeMetrics how the code now names its metrics", n)
		}
	}
	return codeMetricsSet
}

// checkMetrics reports every metric of expr that nothing exports.
func checkMetrics(t *testing.T, where, expr string) int {
	t.Helper()
	known := codeMetrics(t)
	n := 0
	for _, m := range metricName.FindAllString(expr, -1) {
		n++
		base := m
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if s, ok := strings.CutSuffix(m, suffix); ok && known[s] {
				base = s
			}
		}
		if !known[base] && !slices.Contains(exporterMetrics, m) && !slices.Contains(runtimeMetrics, m) && m != "up" {
			t.Errorf("%s queries %s, which no code registers", where, m)
		}
	}
	return n
}

// TestRulesQueryMetricsThatExist: every metric an alert rule queries is
// registered by the code (or is prometheus-nats-exporter's, or up).
func TestRulesQueryMetricsThatExist(t *testing.T) {
	for _, g := range readRules(t).Groups {
		for _, r := range g.Rules {
			if checkMetrics(t, r.Alert+r.Record, r.Expr) == 0 {
				t.Errorf("%s: no metric found in %q", r.Alert, r.Expr)
			}
		}
	}
}

// TestGrafanaDashboard: the dashboard is JSON Grafana can import, and every
// metric its panels query exists.
func TestGrafanaDashboard(t *testing.T) {
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	type panel struct {
		Title   string `json:"title"`
		Type    string `json:"type"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
		Panels []json.RawMessage `json:"panels"`
	}
	var d struct {
		UID           string            `json:"uid"`
		Title         string            `json:"title"`
		SchemaVersion int               `json:"schemaVersion"`
		Panels        []json.RawMessage `json:"panels"`
		Templating    struct {
			List []struct {
				Name  string `json:"name"`
				Query any    `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if d.UID == "" || d.Title == "" || d.SchemaVersion == 0 {
		t.Fatalf("%s: uid %q, title %q, schemaVersion %d: want all three", dashboardFile, d.UID, d.Title, d.SchemaVersion)
	}
	queries := 0
	var walk func(raw []json.RawMessage)
	walk = func(raw []json.RawMessage) {
		for _, r := range raw {
			var p panel
			if err := json.Unmarshal(r, &p); err != nil {
				t.Fatalf("%s: a panel: %v", dashboardFile, err)
			}
			if p.Type != "row" && p.Type != "text" && len(p.Targets) == 0 {
				t.Errorf("panel %q has no query", p.Title)
			}
			for _, tg := range p.Targets {
				queries++
				if checkMetrics(t, "panel "+strconv.Quote(p.Title), tg.Expr) == 0 {
					t.Errorf("panel %q: no metric in %q", p.Title, tg.Expr)
				}
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		if q, ok := v.Query.(string); ok && strings.Contains(q, "(") {
			checkMetrics(t, "variable "+v.Name, q)
		}
	}
	if queries < 10 {
		t.Fatalf("%d queries in the dashboard, want its full set", queries)
	}
}

var (
	kustomizeOnce sync.Once
	kustomizeBin  string
	kustomizeErr  error
)

// kustomize builds the kustomize command from the Go module proxy, once.
func kustomize(t *testing.T) string {
	t.Helper()
	kustomizeOnce.Do(func() {
		gobin, err := os.MkdirTemp("", "kustomize-")
		if err != nil {
			kustomizeErr = err
			return
		}
		goCmd := filepath.Join(runtime.GOROOT(), "bin", "go")
		if _, err := os.Stat(goCmd); err != nil {
			goCmd = "go"
		}
		cmd := exec.Command(goCmd, "install", kustomizeModule)
		cmd.Dir = gobin // outside this module
		cmd.Env = append(os.Environ(), "GOBIN="+gobin, "GOTOOLCHAIN=local", "GOFLAGS=")
		out, err := cmd.CombinedOutput()
		if err != nil {
			kustomizeErr = fmt.Errorf("go install %s: %v\n%s", kustomizeModule, err, out)
			return
		}
		kustomizeBin = filepath.Join(gobin, "kustomize")
	})
	if kustomizeErr != nil {
		t.Fatalf("kustomize cannot be had from the Go module proxy: %v", kustomizeErr)
	}
	return kustomizeBin
}

// object is one Kubernetes object of a build, as parsed YAML.
type object map[string]any

func (o object) get(path ...any) any {
	var v any = map[string]any(o)
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				return nil
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

func (o object) str(path ...any) string { s, _ := o.get(path...).(string); return s }

func (o object) id() string { return o.str("kind") + "/" + o.str("metadata", "name") }

// TestKustomizeOverlays builds every overlay with kustomize and checks what
// running keystone-fanout in Kubernetes needs: probes on a non-loopback
// --http-addr, a grace period longer than --shutdown-timeout, GOMEMLIMIT
// below the memory limit, a ServiceAccount without API access, a
// NetworkPolicy and a PodMonitor, a PodDisruptionBudget for the bridge, and
// the oslo.config file each command is pointed at, mounted.
func TestKustomizeOverlays(t *testing.T) {
	overlays, err := filepath.Glob("kubernetes/overlays/*")
	if err != nil || len(overlays) < 2 {
		t.Fatalf("overlays %v (%v), want the central region's and a remote region's", overlays, err)
	}
	bin := kustomize(t)
	for _, dir := range overlays {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			out := run(t, ".", bin, "build", dir)
			objs := map[string]object{}
			dec := yaml.NewDecoder(strings.NewReader(out))
			for {
				var m map[string]any // nested mappings decode as map[string]any too
				err := dec.Decode(&m)
				o := object(m)
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatalf("kustomize build %s: %v", dir, err)
				}
				objs[o.id()] = o
			}
			checkBuild(t, objs)
		})
	}
}

func checkBuild(t *testing.T, objs map[string]object) {
	ids := make([]string, 0, len(objs))
	for id := range objs {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	if sa, ok := objs["ServiceAccount/keystone-fanout"]; !ok || sa.get("automountServiceAccountToken") != false {
		t.Errorf("ServiceAccount keystone-fanout with automountServiceAccountToken: false: missing or wrong (%v)", ids)
	}
	for _, k := range []string{"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"} {
		for _, id := range ids {
			if strings.HasPrefix(id, k+"/") {
				t.Errorf("%s: keystone-fanout needs no Kubernetes API rights", id)
			}
		}
	}
	if _, ok := objs["PodMonitor/keystone-fanout"]; !ok {
		t.Errorf("no PodMonitor (%v)", ids)
	}
	deployments := 0
	for _, id := range ids {
		d := objs[id]
		if d.str("kind") != "Deployment" {
			continue
		}
		deployments++
		component := d.str("spec", "template", "metadata", "labels", "app.kubernetes.io/component")
		t.Run(component, func(t *testing.T) { checkDeployment(t, objs, d, component) })
	}
	if deployments == 0 {
		t.Errorf("no Deployment (%v)", ids)
	}
}

func checkDeployment(t *testing.T, objs map[string]object, d object, component string) {
	pod := object(d.get("spec", "template", "spec").(map[string]any))
	if pod.get("automountServiceAccountToken") != false || pod.str("serviceAccountName") != "keystone-fanout" {
		t.Errorf("pod: serviceAccountName %q, automountServiceAccountToken %v: want keystone-fanout and false",
			pod.str("serviceAccountName"), pod.get("automountServiceAccountToken"))
	}
	if pod.get("securityContext", "runAsNonRoot") != true {
		t.Error("pod: runAsNonRoot is not true")
	}
	c := object(pod.get("containers", 0).(map[string]any))
	if img := c.str("image"); !strings.Contains(img, ":") {
		t.Errorf("image %q has no tag: set one with kustomize edit set image", img)
	}
	args, _ := c.get("args").([]any)
	if len(args) == 0 || args[0] != component {
		t.Errorf("args %v: want the %s command first", args, component)
	}
	// The environment as the container gets it: envFrom in order, then env.
	env := map[string]string{}
	for _, ef := range asList(c.get("envFrom")) {
		name := object(ef).str("configMapRef", "name")
		cm, ok := objs["ConfigMap/"+name]
		if !ok {
			t.Errorf("envFrom ConfigMap %s is not in the build", name)
			continue
		}
		for k, v := range cm.get("data").(map[string]any) {
			env[k] = fmt.Sprint(v)
		}
	}
	for _, e := range asList(c.get("env")) {
		env[object(e).str("name")] = object(e).str("value")
	}
	for _, k := range []string{"KEYSTONE_FANOUT_NATS_URL", "KEYSTONE_FANOUT_NATS_CREDS_FILE"} {
		if env[k] == "" {
			t.Errorf("%s is not set", k)
		}
	}
	if component == "agent" && env["KEYSTONE_FANOUT_REGION"] == "" {
		t.Error("KEYSTONE_FANOUT_REGION is not set")
	}
	if component == "agent" && env["KEYSTONE_FANOUT_REGION"] != d.str("spec", "template", "metadata", "labels", "keystone-fanout/region") {
		t.Errorf("the pod label keystone-fanout/region %q is not KEYSTONE_FANOUT_REGION %q (the alerts name regions by the label)",
			d.str("spec", "template", "metadata", "labels", "keystone-fanout/region"), env["KEYSTONE_FANOUT_REGION"])
	}

	// Probes on an address the kubelet reaches.
	if a := env["KEYSTONE_FANOUT_HTTP_ADDR"]; !strings.HasPrefix(a, "0.0.0.0:") && !strings.HasPrefix(a, ":") {
		t.Errorf("KEYSTONE_FANOUT_HTTP_ADDR %q: the probes need a non-loopback --http-addr such as 0.0.0.0:9090", a)
	}
	for probe, path := range map[string]string{"livenessProbe": "/healthz", "readinessProbe": "/readyz"} {
		if got := c.str(probe, "httpGet", "path"); got != path {
			t.Errorf("%s path %q, want %s", probe, got, path)
		}
	}

	// The kubelet's SIGKILL comes after --shutdown-timeout.
	shutdown, err := time.ParseDuration(env["KEYSTONE_FANOUT_SHUTDOWN_TIMEOUT"])
	if err != nil {
		t.Errorf("KEYSTONE_FANOUT_SHUTDOWN_TIMEOUT %q: %v", env["KEYSTONE_FANOUT_SHUTDOWN_TIMEOUT"], err)
	}
	grace, _ := pod.get("terminationGracePeriodSeconds").(int)
	if time.Duration(grace)*time.Second <= shutdown {
		t.Errorf("terminationGracePeriodSeconds %d is not longer than --shutdown-timeout %s", grace, shutdown)
	}

	// GOMEMLIMIT below the memory limit.
	limit, err := quantity(c.str("resources", "limits", "memory"))
	if err != nil {
		t.Errorf("memory limit: %v", err)
	}
	soft, err := quantity(strings.TrimSuffix(env["GOMEMLIMIT"], "B"))
	if err != nil {
		t.Errorf("GOMEMLIMIT %q: %v", env["GOMEMLIMIT"], err)
	}
	if soft <= 0 || soft >= limit {
		t.Errorf("GOMEMLIMIT %q is not below the memory limit %s", env["GOMEMLIMIT"], c.str("resources", "limits", "memory"))
	}

	// The oslo.config file given to --oslo-config is mounted.
	var osloFile string
	for _, a := range args {
		if s, ok := strings.CutPrefix(fmt.Sprint(a), "--oslo-config="); ok {
			osloFile = s
		}
	}
	if osloFile == "" {
		t.Error("no --oslo-config: the service's own configuration file is how settings reach keystone-fanout")
	} else if !mounted(objs, pod, c, osloFile) {
		t.Errorf("--oslo-config %s is not a file of a mounted Secret or ConfigMap", osloFile)
	}

	name := "keystone-fanout-" + component
	if np, ok := objs["NetworkPolicy/"+name]; !ok {
		t.Errorf("no NetworkPolicy %s", name)
	} else if sel := np.str("spec", "podSelector", "matchLabels", "app.kubernetes.io/component"); sel != component {
		t.Errorf("NetworkPolicy %s selects component %q", name, sel)
	}
	replicas, _ := d.get("spec", "replicas").(int)
	_, hasPDB := objs["PodDisruptionBudget/"+name]
	switch {
	case replicas > 1 && !hasPDB:
		t.Errorf("%d replicas and no PodDisruptionBudget", replicas)
	case replicas <= 1 && hasPDB:
		t.Errorf("a PodDisruptionBudget for one replica blocks every drain of its node")
	}
}

func asList(v any) []map[string]any {
	l, _ := v.([]any)
	out := make([]map[string]any, 0, len(l))
	for _, x := range l {
		if m, ok := x.(map[string]any); ok {
			out = append(out, m)
		}
	}
	return out
}

// mounted reports whether file is a key of a Secret or ConfigMap of the
// build, mounted in c at its directory.
func mounted(objs map[string]object, pod, c object, file string) bool {
	dir, base := filepath.Dir(file), filepath.Base(file)
	for _, m := range asList(c.get("volumeMounts")) {
		if object(m).str("mountPath") != dir {
			continue
		}
		for _, v := range asList(pod.get("volumes")) {
			vol := object(v)
			if vol.str("name") != object(m).str("name") {
				continue
			}
			kind, src := "Secret", vol.str("secret", "secretName")
			items := asList(vol.get("secret", "items"))
			if src == "" {
				kind, src = "ConfigMap", vol.str("configMap", "name")
				items = asList(vol.get("configMap", "items"))
			}
			o, ok := objs[kind+"/"+src]
			if !ok {
				return false
			}
			key := base
			if len(items) > 0 {
				key = ""
				for _, it := range items {
					if object(it).str("path") == base {
						key = object(it).str("key")
					}
				}
			}
			data, _ := o.get("data").(map[string]any)
			_, ok = data[key]
			return ok
		}
	}
	return false
}

// quantity parses a memory quantity such as 256Mi or 200Mi into bytes.
func quantity(s string) (int64, error) {
	for i, suffix := range []string{"Ki", "Mi", "Gi"} {
		if n, ok := strings.CutSuffix(s, suffix); ok {
			v, err := strconv.ParseInt(n, 10, 64)
			return v << (10 * (i + 1)), err
		}
	}
	return strconv.ParseInt(s, 10, 64)
}
