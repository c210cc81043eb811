package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/tcpproxy"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

// Regions behind simulated WAN links.
//
// Each region of a WAN deployment (envOptions.wan) has its own Linux network
// namespace, joined to the test's (root) namespace by a veth pair with a
// private /30. In the namespace run the region's memcached servers, its NATS
// leaf node (a nats-server process) and its agent, which consumes through the
// leaf node the central-consumer way (--js-domain central). The central side
// stays in the root namespace on loopback: the test's NATS (with a leaf-node
// port and the JetStream domain "central"), RabbitMQ and the bridge.
//
// The WAN is the leaf node's link to the central NATS: the leaf dials, for
// each central node, a delaying proxy (internal/tcpproxy) that listens on the
// root-side veth address of its region and forwards to the node's leaf-node
// port on loopback. So the region's traffic crosses its veth, where iptables
// rules in the region's namespace drop a share of the packets (loss) or all
// of them (a partition: TCP sees silence, not resets), and the proxy, which
// delays each direction.
//
// Why the delay is a userspace proxy, and what that means: the package doc
// (doc.go).
//
// Only the leaf's link is the WAN. memcached listens on the namespace-side
// veth address, so that the region's agent (in the namespace) and the test's
// keystonemiddleware writer and checks (in the root namespace: the writer
// stands for the region's own services, which sit next to their memcached)
// reach it directly; the iptables rules match only the leaf's connections to
// the proxies' ports, so the checks see the region's cache even while the
// region is cut off from the central side.

var (
	flagWANRegions = flag.Int("e2e.wan-regions", 0,
		"run TestWANManyRegions with this many regions behind simulated WAN links (0: not run; 100 for the big variant)")
	flagWANMeasure = flag.String("e2e.wan-measure", "",
		"run TestWANMeasure at these numbers of regions, comma-separated (for example 10,100; empty: not run)")
	flagWANDelay     = flag.Duration("e2e.wan-delay", 50*time.Millisecond, "one-way delay of each region's WAN link (TestWANManyRegions, TestWANMeasure)")
	flagWANJitter    = flag.Duration("e2e.wan-jitter", 10*time.Millisecond, "jitter of the one-way delay (TestWANManyRegions, TestWANMeasure)")
	flagWANLoss      = flag.Float64("e2e.wan-loss", 0.001, "share of the WAN link's packets dropped, each direction (TestWANManyRegions, TestWANMeasure)")
	flagWANHeartbeat = flag.Duration("e2e.wan-watch-heartbeat", 100*time.Millisecond,
		"the agents' --watch-heartbeat in TestWANManyRegions and TestWANMeasure (the agent's default, 20ms, made 100 idle regions saturate 2 cores)")
)

// wanScaleAgentArgs are the extra agent flags of the flag-gated WAN tests.
func wanScaleAgentArgs() []string {
	return []string{"--watch-heartbeat", flagWANHeartbeat.String()}
}

// centralDomain is the central JetStream domain, as in deploy/nats.
const centralDomain = "central"

// wanNamePrefix starts the name of every network namespace the WAN tests
// make: ksfwan-<pid>-<n>. Leftovers of runs that were killed (their pid is
// gone) are removed by the next run.
const wanNamePrefix = "ksfwan-"

// wanOptions describe the simulated WAN link of every region.
type wanOptions struct {
	// delay and jitter are each direction's (tcpproxy.Delay).
	delay, jitter time.Duration
	// loss is the probability that a packet of the link is dropped, in each
	// direction (iptables statistic); 0.001 is 0.1 %.
	loss float64
	// leafPing is the leaf nodes' ping_interval (with ping_max 3): how soon
	// a leaf notices a silent link. Default 5s.
	leafPing time.Duration
}

// configure gives a central NATS node its leaf-node port and domain.
func (w *wanOptions) configure(o *natsserver.Options) {
	if w == nil {
		return
	}
	o.LeafListen = "127.0.0.1:-1"
	o.JetStreamDomain = centralDomain
}

// wanRegion is a region's network namespace, WAN link and leaf node.
type wanRegion struct {
	ns       string
	rootAddr string // root-side veth address: the proxies listen here
	nsAddr   string // namespace-side veth address: memcached, the agent's HTTP
	proxies  []*tcpproxy.Proxy
	leaf     *leafNode

	mu  sync.Mutex
	cut bool
}

var (
	natsServerOnce sync.Once
	natsServerBin  string
	natsServerErr  error
	wanLeftovers   sync.Once
	wanSeq         atomic.Int64 // regions made by this process
)

// buildNATSServer builds nats-server from the Go module once per test binary
// run, beside the keystone-fanout binary.
func buildNATSServer(t testing.TB) string {
	t.Helper()
	natsServerOnce.Do(func() {
		natsServerBin = filepath.Join(filepath.Dir(binary), "nats-server")
		start := time.Now()
		out, err := exec.Command(goTool(), "build", "-o", natsServerBin, "github.com/nats-io/nats-server/v2").CombinedOutput()
		if err != nil {
			natsServerErr = fmt.Errorf("building nats-server: %v\n%s", err, out)
			return
		}
		if testing.Verbose() {
			fmt.Fprintf(os.Stderr, "e2e: built %s in %s\n", natsServerBin, time.Since(start).Round(time.Millisecond))
		}
	})
	if natsServerErr != nil {
		t.Fatal(natsServerErr)
	}
	return natsServerBin
}

// run runs a command and fails the test with its output on error.
func run(t testing.TB, stdin string, name string, args ...string) {
	t.Helper()
	if out, err := runQuiet(stdin, name, args...); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

func runQuiet(stdin string, name string, args ...string) ([]byte, error) {
	cmd := exec.Command(name, args...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	return cmd.CombinedOutput()
}

var leftoverNS = regexp.MustCompile(`^` + wanNamePrefix + `(\d+)-\d+$`)

// removeWANLeftovers deletes the namespaces of earlier runs whose process is
// gone, with whatever still runs in them (the veth pairs go with them).
func removeWANLeftovers(t testing.TB) {
	out, err := runQuiet("", "ip", "netns", "list")
	if err != nil {
		t.Fatalf("ip netns list (the WAN tests need iproute2 and root): %v\n%s", err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		m := leftoverNS.FindStringSubmatch(f[0])
		if m == nil {
			continue
		}
		if pid, _ := strconv.Atoi(m[1]); pid == os.Getpid() || fileExists(fmt.Sprintf("/proc/%d", pid)) {
			continue
		}
		killNamespace(f[0])
		if out, err := runQuiet("", "ip", "netns", "del", f[0]); err != nil {
			t.Logf("removing the leftover namespace %s: %v %s", f[0], err, out)
		} else {
			t.Logf("removed the leftover namespace %s of a killed run", f[0])
		}
	}
}

// killNamespace kills the processes still running in the namespace.
func killNamespace(ns string) {
	out, _ := runQuiet("", "ip", "netns", "pids", ns)
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// wanSubnet is the /30 of a process's n-th region: 10.213.0.0/16, a /22 per
// process (by pid) and a /30 per region in it (up to 256 regions). The range
// is on no interface or route of the test machines; its addresses exist only
// on the tests' veth pairs, the namespace side inside its namespace.
func wanSubnet(n int) (root, ns string) {
	block := os.Getpid() % 64
	n %= 256
	third := block*4 + n/64
	fourth := (n % 64) * 4
	return fmt.Sprintf("10.213.%d.%d", third, fourth+1), fmt.Sprintf("10.213.%d.%d", third, fourth+2)
}

// startWANRegions makes every region's namespace, link, memcached, leaf node
// and agent process (not started).
func (e *env) startWANRegions() {
	t := e.t
	t.Helper()
	bin := buildNATSServer(t)
	wanLeftovers.Do(func() { removeWANLeftovers(t) })
	if e.o.wan.leafPing == 0 {
		e.o.wan.leafPing = 5 * time.Second
	}
	for i := range e.o.regions {
		e.regions = append(e.regions, &region{name: regionName(i + 2), wan: &wanRegion{}})
	}
	// Regions are set up in parallel, a few at a time (ip, iptables and
	// process starts).
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	errs := make([]error, len(e.regions))
	start := time.Now()
	for i, r := range e.regions {
		n := int(wanSeq.Add(1)) - 1
		r.wan.ns = fmt.Sprintf("%s%d-%d", wanNamePrefix, os.Getpid(), n)
		r.wan.rootAddr, r.wan.nsAddr = wanSubnet(n)
		veth := fmt.Sprintf("ksf%dv%d", os.Getpid(), n%1000)
		// Namespaces go last: registered first.
		t.Cleanup(func() {
			killNamespace(r.wan.ns)
			if out, err := runQuiet("", "ip", "netns", "del", r.wan.ns); err != nil {
				t.Errorf("cleanup: ip netns del %s: %v %s", r.wan.ns, err, out)
			}
		})
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			errs[i] = e.setUpWANRegion(r, veth, bin)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d region namespaces, links and leaf nodes up in %s", len(e.regions), time.Since(start).Round(time.Millisecond))
	testutil.Eventually(t, 60*time.Second, "every leaf node connected to the central NATS", func() (bool, string) {
		n := 0
		for _, node := range e.nodes {
			node.mu.Lock()
			if !node.down {
				n += node.srv.Underlying().NumLeafNodes()
			}
			node.mu.Unlock()
		}
		return n == len(e.regions), fmt.Sprintf("%d of %d leaf connections", n, len(e.regions))
	})

	// The middleware caches start in parallel: each is a python process in
	// the root namespace writing to the region's memcached over its veth.
	wg = sync.WaitGroup{}
	for _, r := range e.regions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.cache = kmwtest.Start(t, memcachetest.Addrs(r.servers), kmwtest.None, "", 0)
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	for _, r := range e.regions {
		for _, s := range r.servers {
			setCanary(t, s.Addr)
		}
		args := []string{"agent",
			"--region", r.name,
			"--nats-url", fmt.Sprintf("nats://127.0.0.1:%d", r.wan.leaf.port),
			"--js-domain", centralDomain,
			"--stream", streamName,
			"--memcached", memcachetest.List(r.servers),
			"--strategy", e.o.strategy,
			"--token-cache-time", "300",
			"--late-write-back-window", "500ms", // as startRegions, for the same reason
			"--http-addr", net.JoinHostPort(r.wan.nsAddr, "0"),
			"--log-format", "json",
		}
		args = append(args, e.o.agentArgs...)
		r.agent = newProc(t, e.logDir, "agent-"+r.name, args...)
		r.agent.wrap = []string{"ip", "netns", "exec", r.wan.ns}
	}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		// The leaf nodes of regions whose agent is not ready, a few.
		shown := 0
		for _, r := range e.regions {
			if r.wan.leaf == nil || shown == 5 {
				continue
			}
			if r.agent.running() {
				if code, _, err := httpGet("http://" + r.agent.addr() + "/readyz"); err == nil && code == 200 {
					continue
				}
			}
			t.Log(r.wan.leaf.logTail(40))
			shown++
		}
	})
}

// setUpWANRegion makes one region's namespace and veth pair, its iptables
// chain, proxies, memcached servers and leaf node.
func (e *env) setUpWANRegion(r *region, veth, natsServer string) error {
	t := e.t
	w := r.wan
	steps := [][]string{
		{"ip", "netns", "add", w.ns},
		{"ip", "link", "add", veth, "type", "veth", "peer", "name", "wan0", "netns", w.ns},
		{"ip", "addr", "add", w.rootAddr + "/30", "dev", veth},
		{"ip", "link", "set", veth, "up"},
		{"ip", "-n", w.ns, "addr", "add", w.nsAddr + "/30", "dev", "wan0"},
		{"ip", "-n", w.ns, "link", "set", "wan0", "up"},
		{"ip", "-n", w.ns, "link", "set", "lo", "up"},
	}
	for _, s := range steps {
		if out, err := runQuiet("", s[0], s[1:]...); err != nil {
			return fmt.Errorf("%s: %s: %v\n%s", r.name, strings.Join(s, " "), err, out)
		}
	}
	var ports []string
	for _, node := range e.nodes {
		px, err := tcpproxy.StartWith(node.srv.LeafAddr(), tcpproxy.Options{
			Listen: net.JoinHostPort(w.rootAddr, "0"),
			Up:     tcpproxy.Delay{Base: e.o.wan.delay, Jitter: e.o.wan.jitter},
			Down:   tcpproxy.Delay{Base: e.o.wan.delay, Jitter: e.o.wan.jitter},
		})
		if err != nil {
			return fmt.Errorf("%s: WAN proxy: %w", r.name, err)
		}
		t.Cleanup(func() { px.Close() })
		w.proxies = append(w.proxies, px)
		_, p, _ := net.SplitHostPort(px.Addr())
		ports = append(ports, p)
	}
	// The WAN chain: the leaf's connections to the proxies, both ways.
	rules := []string{"*filter", ":KSFWAN - [0:0]",
		fmt.Sprintf("-A OUTPUT -d %s/32 -p tcp -m multiport --dports %s -j KSFWAN", w.rootAddr, strings.Join(ports, ",")),
		fmt.Sprintf("-A INPUT -s %s/32 -p tcp -m multiport --sports %s -j KSFWAN", w.rootAddr, strings.Join(ports, ",")),
	}
	if e.o.wan.loss > 0 {
		rules = append(rules, fmt.Sprintf("-A KSFWAN -m statistic --mode random --probability %g -j DROP", e.o.wan.loss))
	}
	rules = append(rules, "COMMIT", "")
	if out, err := runQuiet(strings.Join(rules, "\n"), "ip", "netns", "exec", w.ns, "iptables-restore", "--noflush"); err != nil {
		return fmt.Errorf("%s: iptables-restore in %s (the WAN tests need iptables): %v\n%s", r.name, w.ns, err, out)
	}

	r.servers = memcachetest.StartWith(t, e.o.serversPerRegion, memcachetest.Options{
		Listen: w.nsAddr, Wrap: []string{"ip", "netns", "exec", w.ns}})

	var urls []string
	for _, px := range w.proxies {
		urls = append(urls, fmt.Sprintf("%q", "nats-leaf://"+px.Addr()))
	}
	dir := filepath.Join(e.logDir, "leaf-"+r.name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	w.leaf = &leafNode{name: "leaf-" + r.name, region: r.name, ns: w.ns, bin: natsServer, dir: dir,
		logPath: filepath.Join(e.logDir, "leaf-"+r.name+".log"), remotes: strings.Join(urls, ", "), ping: e.o.wan.leafPing}
	if err := w.leaf.start(); err != nil {
		return err
	}
	t.Cleanup(func() {
		if err := w.leaf.stop(syscall.SIGTERM); err != nil {
			t.Errorf("cleanup: %s: %v", w.leaf.name, err)
		}
	})
	return nil
}

// partition cuts (true) or heals (false) the region's WAN link: every packet
// of the leaf's connections to the central side is dropped, both ways, so
// TCP sees silence, not resets.
func (r *region) partition(t testing.TB, cut bool) {
	t.Helper()
	w := r.wan
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.cut == cut {
		return
	}
	op := "-I"
	if !cut {
		op = "-D"
	}
	run(t, "", "ip", "netns", "exec", w.ns, "iptables", op, "KSFWAN", "-j", "DROP")
	w.cut = cut
}

// wanBytes sums the bytes every proxy of the regions forwarded each way:
// to the central side (up) and to the regions (down).
func wanBytes(regions []*region) (up, down int64) {
	for _, r := range regions {
		for _, px := range r.wan.proxies {
			u, d := px.Bytes()
			up, down = up+u, down+d
		}
	}
	return up, down
}

// leafNode is a region's NATS leaf node: a nats-server process in the
// region's namespace, listening for its agent on the namespace's loopback,
// with its own JetStream domain (the region's name, as in
// deploy/nats/leaf-region.conf) and every central node as a remote, each
// through the region's WAN proxy.
type leafNode struct {
	name, region, ns, bin, dir, logPath string
	remotes                             string
	ping                                time.Duration

	mu     sync.Mutex
	port   int // chosen by the first start, kept by restarts
	cmd    *exec.Cmd
	exited chan struct{}
	starts int
}

func (l *leafNode) config() string {
	listen := "127.0.0.1:-1"
	if l.port != 0 {
		// The port of the first start, in the region's own namespace, where
		// nothing else listens: the agent's --nats-url stays valid.
		listen = fmt.Sprintf("127.0.0.1:%d", l.port)
	}
	return fmt.Sprintf(`server_name: %q
listen: %q
ports_file_dir: %q
# A WAN link may go silent: notice within 15-20 s, not the default 4 min.
ping_interval: %q
ping_max: 3
jetstream {
  store_dir: %q
  domain: %q
  max_memory_store: 64MB
  max_file_store: 1GB
}
leafnodes {
  reconnect: "1s"
  remotes: [ { urls: [%s] } ]
}
`, "leaf-"+l.region, listen, filepath.Join(l.dir, "ports"), l.ping.String(), filepath.Join(l.dir, "jetstream"), l.region, l.remotes)
}

// start runs the leaf node and waits until it listens (its ports file).
func (l *leafNode) start() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cmd != nil {
		return fmt.Errorf("%s: start while it runs", l.name)
	}
	portsDir := filepath.Join(l.dir, "ports")
	os.RemoveAll(portsDir)
	if err := os.MkdirAll(portsDir, 0o755); err != nil {
		return err
	}
	conf := filepath.Join(l.dir, "leaf.conf")
	if err := os.WriteFile(conf, []byte(l.config()), 0o644); err != nil {
		return err
	}
	f, err := os.OpenFile(l.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	l.starts++
	fmt.Fprintf(f, "=== %s start #%d at %s\n", l.name, l.starts, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command("ip", "netns", "exec", l.ns, l.bin, "-c", conf)
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("%s: %w", l.name, err)
	}
	exited := make(chan struct{})
	go func() {
		err := cmd.Wait()
		fmt.Fprintf(f, "=== %s exited at %s: %v\n", l.name, time.Now().Format(time.RFC3339Nano), err)
		f.Close()
		close(exited)
	}()
	l.cmd, l.exited = cmd, exited
	deadline := time.Now().Add(30 * time.Second)
	for {
		if port := readPortsFile(portsDir); port != 0 {
			l.port = port
			return nil
		}
		select {
		case <-exited:
			l.cmd = nil
			return fmt.Errorf("%s exited before listening\n%s", l.name, l.logTail(30))
		case <-time.After(20 * time.Millisecond): // polling an external process's file
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s wrote no ports file within 30s\n%s", l.name, l.logTail(30))
		}
	}
}

// readPortsFile returns the client port nats-server wrote to its ports
// file (<name>_<pid>.ports), 0 when there is none yet.
func readPortsFile(dir string) int {
	m, _ := filepath.Glob(filepath.Join(dir, "*.ports"))
	for _, p := range m {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		var ports struct {
			Nats []string `json:"nats"`
		}
		if json.Unmarshal(b, &ports) != nil || len(ports.Nats) == 0 {
			continue
		}
		if i := strings.LastIndexByte(ports.Nats[0], ':'); i >= 0 {
			if n, err := strconv.Atoi(ports.Nats[0][i+1:]); err == nil {
				return n
			}
		}
	}
	return 0
}

// stop sends sig and waits for the exit (SIGKILL after 20 s); it returns
// why a SIGTERM stop was not clean.
func (l *leafNode) stop(sig syscall.Signal) error {
	l.mu.Lock()
	cmd, exited := l.cmd, l.exited
	l.cmd = nil
	l.mu.Unlock()
	if cmd == nil {
		return nil
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-exited:
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		return fmt.Errorf("did not exit within 20s of %v; killed", sig)
	}
	if sig == syscall.SIGTERM && cmd.ProcessState != nil && !cmd.ProcessState.Success() {
		return fmt.Errorf("exited with %v after SIGTERM", cmd.ProcessState)
	}
	return nil
}

// leafStaleLine is what nats-server logs when a leaf connection's pings go
// unanswered.
const leafStaleLine = "Leafnode connection closed: Stale Connection"

// logCount counts the lines of the leaf's log that contain s.
func (l *leafNode) logCount(s string) int {
	b, _ := os.ReadFile(l.logPath)
	return strings.Count(string(b), s)
}

func (l *leafNode) logTail(n int) string {
	b, err := os.ReadFile(l.logPath)
	if err != nil {
		return fmt.Sprintf("(log %s: %v)", l.logPath, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return fmt.Sprintf("----- %s (%s) -----\n%s\n----- end of %s -----", l.name, l.logPath, strings.Join(lines, "\n"), l.name)
}

// leafConnected waits until the region's leaf node is connected to the
// central side again (a central node counts a leaf connection from it).
func (e *env) leafConnected(r *region) {
	e.t.Helper()
	testutil.Eventually(e.t, 60*time.Second, r.name+"'s leaf node connected to the central NATS", func() (bool, string) {
		var seen []string
		for _, node := range e.nodes {
			node.mu.Lock()
			if !node.down {
				lz, err := node.srv.Underlying().Leafz(nil)
				if err == nil {
					for _, l := range lz.Leafs {
						seen = append(seen, l.Name)
						if l.Name == "leaf-"+r.name {
							node.mu.Unlock()
							return true, ""
						}
					}
				}
			}
			node.mu.Unlock()
		}
		return false, fmt.Sprintf("leaf connections: %s", strings.Join(seen, ", "))
	})
}

// wanPartition is how long TestWANRegions cuts a region off: longer than
// every budget on the way that could give up or need a new connection. The
// leaf node notices a silent link after its ping budget (ping_interval 5 s,
// ping_max 3: 15-20 s) and then redials every second without limit; the
// central node replaces the stale leaf connection when the new one arrives.
// The agent's pull requests miss their heartbeats after 10 s (two of 5 s);
// then it asks for its consumer every 500 ms and pulls again as soon as the
// consumer answers. Its events' redelivery wait is 3 s, and its NATS
// client (internal/natsconn: unlimited reconnects, ping 10 s, 3 outstanding:
// 30 s) talks to the region's own leaf, which stays up. nats.go's default
// budget (60 reconnects 2 s apart) does not apply: MaxReconnects is -1
// (asserted by TestRegionCutOffFromNATS).
const wanPartition = 35 * time.Second

// TestWANRegions: three regions, each in its own network namespace behind
// a 50 ms ± 10 ms one-way link losing 0.1 % of its packets, each with its
// own leaf node (every node of the 3-node central cluster as a remote) and
// agent. During one burst of token-affecting notifications, regionTwo is
// partitioned from the central side for longer than every reconnect budget,
// regionThree's leaf node is stopped with SIGTERM and regionFour's killed
// with SIGKILL (both started again), and the central node leading the stream
// (3 replicas) is killed and stays down. The other regions finish while
// regionTwo is cut off; once healed, it catches up; then the usual end
// checks (nothing stale, nothing lost, no collateral) hold in every region.
func TestWANRegions(t *testing.T) {
	wo := &wanOptions{delay: 50 * time.Millisecond, jitter: 10 * time.Millisecond, loss: 0.001}
	e := newEnv(t, envOptions{regions: 3, cluster: true, wan: wo})
	for _, r := range e.regions {
		if len(r.wan.proxies) != len(e.nodes) {
			t.Fatalf("%s: expected its leaf node to have all %d central nodes as remotes; it has %d", r.name, len(e.nodes), len(r.wan.proxies))
		}
	}
	s := e.prepare(burstVictims, unrelatedN)
	cut, termed, killed := e.regions[0], e.regions[1], e.regions[2]
	others := e.regions[1:]

	fault := time.Now()
	cut.partition(t, true)
	t.Logf("%s partitioned from the central side", cut.name)
	// The burst lasts most of the partition.
	b := e.startBurst(s.msgs, s.outs, float64(len(s.msgs))/(wanPartition-15*time.Second).Seconds())

	e.waitStreamAtLeast(burstVictims / 8)
	if err := termed.wan.leaf.stop(syscall.SIGTERM); err != nil {
		t.Fatalf("%s: %v", termed.wan.leaf.name, err)
	}
	if err := termed.wan.leaf.start(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s's leaf node stopped with SIGTERM and started again after %d of %d notifications", termed.name, b.published(), len(s.msgs))
	e.leafConnected(termed)

	e.waitStreamAtLeast(burstVictims / 4)
	if err := killed.wan.leaf.stop(syscall.SIGKILL); err != nil {
		t.Fatalf("%s: %v", killed.wan.leaf.name, err)
	}
	if err := killed.wan.leaf.start(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s's leaf node killed with SIGKILL and started again after %d of %d notifications", killed.name, b.published(), len(s.msgs))
	e.leafConnected(killed)

	e.waitStreamAtLeast(burstVictims / 2)
	leader := e.streamLeader()
	leader.shutdown()
	t.Logf("the stream leader %s killed after %d of %d notifications (stays down)", leader.opts.ServerName, b.published(), len(s.msgs))

	b.wait(t)
	x := s.expect()
	x.regions = others
	v := e.verify(x)
	t.Logf("while %s was cut off, the other %d regions finished the burst: entries gone %s and acknowledged %s after the cut began",
		cut.name, len(others), durSince(fault, v.gone), durSince(fault, v.acked))
	if ok, _ := e.noneCached([]*region{cut}, tokenKeys(x.gone)); ok {
		t.Fatalf("expected %s, partitioned, to still hold the entries (it cannot have heard of the events); it holds none", cut.name)
	}
	// The leaf gives up its silent link within the partition: its budget
	// ran out (its own log says so).
	testutil.Eventually(t, wanPartition, cut.name+"'s leaf node to close its silent link to the central side", func() (bool, string) {
		n := cut.wan.leaf.logCount(leafStaleLine)
		return n > 0, fmt.Sprintf("%d %q lines in its log", n, leafStaleLine)
	})
	t.Logf("%s's leaf node closed its silent link %s after the partition began", cut.name, time.Since(fault).Round(time.Millisecond))
	// The partition's duration is the scenario, not a synchronisation.
	time.Sleep(time.Until(fault.Add(wanPartition)))
	if !cut.agent.running() {
		t.Fatalf("expected %s's agent to survive %s partitioned; it exited: %v", cut.name, wanPartition, cut.agent.unexpectedExits())
	}
	heal := time.Now()
	cut.partition(t, false)
	t.Logf("%s healed after %s", cut.name, heal.Sub(fault).Round(time.Millisecond))
	v = e.verify(s.expect())
	logRecovery(t, fmt.Sprintf("WAN: a region partitioned for %s during a burst, two leaf nodes restarted, the stream leader killed", wanPartition), fault, heal, v)

	// Everything still works after the faults.
	s2 := e.prepare(burstVictims/8, 0)
	e.publishNow(s2.msgs, s2.outs)
	e.verify(expect{gone: append(victimTokens(s.victims), victimTokens(s2.victims)...), kept: entryTokens(s.unrelated)})
}

// streamLeader is the central node leading the stream.
func (e *env) streamLeader() *natsNode {
	e.t.Helper()
	var leader *natsNode
	testutil.Eventually(e.t, 30*time.Second, "the stream to have a leader among the test's nodes", func() (bool, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		st, err := e.js.Stream(ctx, streamName)
		if err != nil {
			return false, err.Error()
		}
		info, err := st.Info(ctx)
		if err != nil {
			return false, err.Error()
		}
		if info.Config.Replicas != 3 || info.Cluster == nil {
			return false, fmt.Sprintf("replicas %d, cluster %+v", info.Config.Replicas, info.Cluster)
		}
		for _, n := range e.nodes {
			if n.opts.ServerName == info.Cluster.Leader {
				leader = n
				return true, ""
			}
		}
		return false, fmt.Sprintf("leader %q", info.Cluster.Leader)
	})
	return leader
}
