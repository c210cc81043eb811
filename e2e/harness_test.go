package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/tcpproxy"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

// streamName is the bridge's default stream; every test has its own NATS.
const streamName = stream.DefaultName

// readyTimeout bounds how long a process may take to become ready.
const readyTimeout = 60 * time.Second

// envOptions shape one test's deployment.
type envOptions struct {
	// regions is the number of agent regions; default -e2e.regions.
	regions int
	// serversPerRegion is the number of memcached servers of each region;
	// default 2.
	serversPerRegion int
	// cluster runs a 3-node NATS cluster (stream replicas 3) instead of one
	// server.
	cluster bool
	// bridges is the number of bridge processes; default 1.
	bridges int
	// strategy is the agents' --strategy; default targeted.
	strategy string
	// agentArgs and bridgeArgs are extra flags.
	agentArgs, bridgeArgs []string
	// wan, when not nil, puts every region in its own network namespace
	// behind a simulated WAN link, with its own leaf node (wan_test.go).
	wan *wanOptions
	// tls runs every link over TLS with certificates the test makes (see
	// tls_test.go): NATS with client certificates, memcached over TLS
	// (the test itself uses a plain listener), RabbitMQ through a
	// TLS-terminating proxy. Single NATS server only.
	tls bool
}

// env is one test's deployment: regionOne's RabbitMQ exchange (declared as
// oslo.messaging does, uniquely named) and bridge processes, NATS JetStream
// (in this test process, file storage), and per region memcached processes,
// a keystonemiddleware cache writing to them and an agent process.
type env struct {
	t      *testing.T
	o      envOptions
	logDir string
	suffix string

	amqpURL   string // the test's own, direct
	exchange  string
	queue     string
	pub       *publisher
	amqpProxy *tcpproxy.Proxy // the bridges' path to RabbitMQ
	tls       *tlsEnv         // nil unless envOptions.tls

	nodes []*natsNode
	nc    *nats.Conn // the test's own connection, for checks
	js    jetstream.JetStream

	bridges []*proc
	regions []*region
	work    *workload

	mu   sync.Mutex
	sent []sentMsg
}

// natsNode is one NATS server of the test.
type natsNode struct {
	mu   sync.Mutex
	srv  *natsserver.Server
	opts natsserver.Options
	addr string
	down bool
}

// region is one region: its memcached servers, the middleware's cache in
// front of them, its agent and the agent's path to NATS.
type region struct {
	name      string
	servers   []*memcachetest.Server
	cache     *kmwtest.Cache
	natsProxy []*tcpproxy.Proxy // one per NATS node
	agent     *proc
	wan       *wanRegion // with envOptions.wan
}

// sentMsg is a published AMQP message and what must become of it.
type sentMsg struct {
	outcome
}

var wordNumbers = []string{"Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten",
	"Eleven", "Twelve", "Thirteen", "Fourteen", "Fifteen", "Sixteen", "Seventeen", "Eighteen", "Nineteen", "Twenty"}

// regionName is Keystone's style of region name: regionTwo, regionThree...
func regionName(i int) string {
	if i < len(wordNumbers) {
		return "region" + wordNumbers[i]
	}
	return "region" + strconv.Itoa(i)
}

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9_-]+`)

// newEnv starts a deployment and returns when every process is ready.
func newEnv(t *testing.T, o envOptions) *env {
	t.Helper()
	if o.regions == 0 {
		o.regions = *flagRegions
	}
	if o.serversPerRegion == 0 {
		o.serversPerRegion = 2
	}
	if o.bridges == 0 {
		o.bridges = 1
	}
	if o.strategy == "" {
		o.strategy = "targeted"
	}
	e := &env{t: t, o: o, suffix: randomSuffix()}
	e.work = newWorkload(t, uint64(time.Now().UnixNano()))
	dir, err := os.MkdirTemp("", "ksf-e2e-"+unsafeChars.ReplaceAllString(t.Name(), "_")+"-")
	if err != nil {
		t.Fatal(err)
	}
	e.logDir = dir
	// Registered first, so it runs last: after every process has stopped.
	t.Cleanup(e.reportLogs)
	if o.tls {
		e.tls = newTLSEnv(t)
	}

	e.startNATS()
	e.startRabbitMQ()

	start := time.Now()
	if o.wan != nil {
		e.startWANRegions()
	} else {
		e.startRegions()
	}
	t.Logf("%d regions x %d memcached servers and their keystonemiddleware caches started in %s",
		o.regions, o.serversPerRegion, time.Since(start).Round(time.Millisecond))

	t.Cleanup(e.stopProcesses)
	for i := range o.bridges {
		e.addBridge(i)
	}
	for _, b := range e.bridges {
		b.startNoWait()
	}
	for _, b := range e.bridges {
		b.waitReady(readyTimeout)
	}
	start = time.Now()
	for _, r := range e.regions {
		r.agent.startNoWait()
	}
	for _, r := range e.regions {
		r.agent.waitReady(readyTimeout)
	}
	t.Logf("%d bridge(s) and %d agents ready (agents in %s); logs in %s", len(e.bridges), len(e.regions),
		time.Since(start).Round(time.Millisecond), e.logDir)
	return e
}

func (e *env) reportLogs() {
	if e.t.Failed() {
		for _, p := range e.allProcs() {
			e.t.Log(p.logTail(80))
		}
		e.t.Logf("process logs kept in %s", e.logDir)
		return
	}
	if *flagKeepLogs {
		e.t.Logf("process logs kept in %s", e.logDir)
		return
	}
	os.RemoveAll(e.logDir)
}

func (e *env) allProcs() []*proc {
	out := append([]*proc(nil), e.bridges...)
	for _, r := range e.regions {
		if r.agent != nil {
			out = append(out, r.agent)
		}
	}
	return out
}

// stopProcesses stops every process with SIGTERM, agents first, and
// reports those that do not exit with status 0 (graceful shutdown).
func (e *env) stopProcesses() {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var bad []string
	stop := func(ps []*proc) {
		for _, p := range ps {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := p.signalQuiet(); err != nil {
					mu.Lock()
					bad = append(bad, fmt.Sprintf("%s: %v", p.name, err))
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
	}
	var agents []*proc
	for _, r := range e.regions {
		if r.agent != nil {
			agents = append(agents, r.agent)
		}
	}
	stop(agents)
	stop(e.bridges)
	if len(bad) > 0 {
		e.t.Errorf("expected every process to exit with status 0 after SIGTERM; %s", strings.Join(bad, "; "))
	}
}

// signalQuiet stops the process at the end of a test: SIGTERM, SIGKILL after
// 45s. It returns why the stop was not clean (nil for status 0).
func (p *proc) signalQuiet() error {
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	if cmd == nil {
		p.mu.Unlock()
		return nil
	}
	p.expected = true
	p.mu.Unlock()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(45 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
		return fmt.Errorf("did not stop within 45s of SIGTERM; killed")
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exitErr != nil {
		return fmt.Errorf("exited with %v after SIGTERM", p.exitErr)
	}
	return nil
}

// ---- NATS ----

func (e *env) startNATS() {
	t := e.t
	t.Helper()
	if !e.o.cluster {
		o := natsserver.Options{Listen: "127.0.0.1:-1", DataDir: t.TempDir(), ServerName: "e2e-nats"}
		e.o.wan.configure(&o)
		if e.tls != nil {
			o.TLS = e.tls.serverConfig(t)
		}
		srv, err := natsserver.Start(o)
		if err != nil {
			t.Fatalf("starting the NATS server: %v", err)
		}
		n := &natsNode{srv: srv, opts: o, addr: srv.Addr()}
		e.nodes = []*natsNode{n}
	} else {
		for _, srv := range testutil.StartNATSCluster(t, 3, "e2e-"+e.suffix, e.o.wan.configure) {
			e.nodes = append(e.nodes, &natsNode{srv: srv, opts: srv.Options(), addr: srv.Addr()})
		}
	}
	t.Cleanup(func() {
		for _, n := range e.nodes {
			n.shutdown()
		}
	})
	nc, err := nats.Connect(e.natsURL(), append(e.tls.natsOptions(t), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond), nats.Name("e2e-checks"))...)
	if err != nil {
		t.Fatalf("connecting to the test's NATS: %v", err)
	}
	t.Cleanup(nc.Close)
	e.nc = nc
	e.js, err = jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 60*time.Second, "JetStream to be available", func() (bool, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := e.js.AccountInfo(ctx)
		return err == nil, fmt.Sprint(err)
	})
}

// natsURL lists every node's client URL.
func (e *env) natsURL() string {
	var urls []string
	for _, n := range e.nodes {
		urls = append(urls, "nats://"+n.addr)
	}
	return strings.Join(urls, ",")
}

func (n *natsNode) shutdown() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.down {
		n.srv.Shutdown()
		n.down = true
	}
}

// restart starts the node again on the same client address and data
// directory.
func (n *natsNode) restart(t testing.TB) {
	t.Helper()
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.down {
		n.srv.Shutdown()
	}
	o := n.opts
	o.Listen = n.addr
	var err error
	for attempt := 0; attempt < 50; attempt++ {
		var srv *natsserver.Server
		if srv, err = natsserver.Start(o); err == nil {
			n.srv, n.down = srv, false
			return
		}
		time.Sleep(100 * time.Millisecond) // the port may linger briefly after a shutdown
	}
	t.Fatalf("restarting NATS server %s on %s: %v", o.ServerName, n.addr, err)
}

// ---- RabbitMQ ----

// publisher publishes to the test's exchange as oslo.messaging does, with
// publisher confirms.
type publisher struct {
	mu       sync.Mutex
	conn     *amqp.Connection
	ch       *amqp.Channel
	exchange string
}

func (e *env) startRabbitMQ() {
	t := e.t
	t.Helper()
	e.amqpURL = testutil.AMQPURL()
	e.exchange = "ksf-e2e-" + e.suffix
	e.queue = "ksf-e2e-" + e.suffix
	conn, err := amqp.DialConfig(e.amqpURL, amqp.Config{Properties: amqp.Table{"connection_name": "ksf-e2e-publisher-" + e.suffix}})
	if err != nil {
		t.Fatalf("RabbitMQ at %s is required by the end-to-end tests: %v", e.amqpURL, err)
	}
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.Confirm(false); err != nil {
		t.Fatal(err)
	}
	// As oslo.messaging declares Keystone's control_exchange.
	if err := ch.ExchangeDeclare(e.exchange, "topic", false, false, false, false, nil); err != nil {
		t.Fatalf("declaring exchange %s: %v", e.exchange, err)
	}
	e.pub = &publisher{conn: conn, ch: ch, exchange: e.exchange}
	t.Cleanup(func() {
		// After the processes stopped (registered before them).
		c, err := amqp.Dial(e.amqpURL)
		if err != nil {
			t.Errorf("cleanup: connecting to RabbitMQ: %v", err)
			return
		}
		defer c.Close()
		cc, err := c.Channel()
		if err != nil {
			return
		}
		if _, err := cc.QueueDelete(e.queue, false, false, false); err != nil {
			t.Logf("cleanup: deleting queue %s: %v", e.queue, err)
			cc, _ = c.Channel()
		}
		if cc != nil {
			if err := cc.ExchangeDelete(e.exchange, false, false); err != nil {
				t.Logf("cleanup: deleting exchange %s: %v", e.exchange, err)
			}
		}
		e.pub.mu.Lock()
		e.pub.conn.Close()
		e.pub.mu.Unlock()
	})
	u, err := url.Parse(e.amqpURL)
	if err != nil {
		t.Fatalf("KEYSTONE_FANOUT_TEST_AMQP_URL %q: %v", e.amqpURL, err)
	}
	target := u.Host
	if u.Port() == "" {
		target = net.JoinHostPort(u.Hostname(), "5672")
	}
	if e.tls != nil {
		// The machine's RabbitMQ is shared and listens without TLS: the
		// test terminates TLS in a proxy in front of it instead of
		// reconfiguring it.
		e.amqpProxy, err = tcpproxy.StartTLS(target, e.tls.proxyConfig(t))
	} else {
		e.amqpProxy, err = tcpproxy.Start(target)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.amqpProxy.Close() })
}

// reopen dials RabbitMQ again when the publisher's connection is closed: a
// set-up of many regions on a saturated machine can outlast its heartbeats.
// Call with p.mu held.
func (p *publisher) reopen(url string) error {
	if !p.conn.IsClosed() && !p.ch.IsClosed() {
		return nil
	}
	conn, err := amqp.Dial(url)
	if err != nil {
		return fmt.Errorf("reconnecting the test's publisher to RabbitMQ: %w", err)
	}
	ch, err := conn.Channel()
	if err == nil {
		err = ch.Confirm(false)
	}
	if err != nil {
		conn.Close()
		return fmt.Errorf("reconnecting the test's publisher to RabbitMQ: %w", err)
	}
	p.conn.Close()
	p.conn, p.ch = conn, ch
	return nil
}

// bridgeAMQPURL is the broker URL through the test's proxy.
func (e *env) bridgeAMQPURL() string {
	u, _ := url.Parse(e.amqpURL)
	u.Host = e.amqpProxy.Addr()
	if e.tls != nil {
		u.Scheme = "amqps"
	}
	return u.String()
}

// publish sends msgs at rate per second (0: as fast as confirms allow),
// records each as sent with its outcome, and returns once RabbitMQ confirmed
// them all. onSent, when not nil, is called after each publish.
func (e *env) publish(ctx context.Context, msgs []amqpMessage, outs []outcome, rate float64, onSent func(i int)) error {
	p := e.pub
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.reopen(e.amqpURL); err != nil {
		return err
	}
	var tick *time.Ticker
	if rate > 0 {
		tick = time.NewTicker(time.Duration(float64(time.Second) / rate))
		defer tick.Stop()
	}
	var pending []*amqp.DeferredConfirmation
	wait := func() error {
		for _, c := range pending {
			ok, err := c.WaitContext(ctx)
			if err != nil {
				return fmt.Errorf("waiting for RabbitMQ's confirm: %w", err)
			}
			if !ok {
				return errors.New("RabbitMQ nacked a publish")
			}
		}
		pending = pending[:0]
		return nil
	}
	for i, m := range msgs {
		if tick != nil {
			select {
			case <-tick.C:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		pb := m.props
		pb.Body = m.body
		c, err := p.ch.PublishWithDeferredConfirmWithContext(ctx, p.exchange, m.routingKey, false, false, pb)
		if err != nil {
			return fmt.Errorf("publishing to RabbitMQ: %w", err)
		}
		e.mu.Lock()
		e.sent = append(e.sent, sentMsg{outcome: outs[i]})
		e.mu.Unlock()
		pending = append(pending, c)
		if onSent != nil {
			onSent(i)
		}
		if len(pending) >= 256 {
			if err := wait(); err != nil {
				return err
			}
		}
	}
	return wait()
}

// publishNow publishes and fails the test on error.
func (e *env) publishNow(msgs []amqpMessage, outs []outcome) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := e.publish(ctx, msgs, outs, 0, nil); err != nil {
		e.t.Fatal(err)
	}
}

// burst publishes in the background at rate; wait returns its error.
type burst struct {
	done chan struct{}
	err  error
	n    int
	sent int
	mu   sync.Mutex
}

func (e *env) startBurst(msgs []amqpMessage, outs []outcome, rate float64) *burst {
	b := &burst{done: make(chan struct{}), n: len(msgs)}
	go func() {
		defer close(b.done)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		b.err = e.publish(ctx, msgs, outs, rate, func(i int) {
			b.mu.Lock()
			b.sent = i + 1
			b.mu.Unlock()
		})
	}()
	return b
}

func (b *burst) published() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.sent
}

func (b *burst) wait(t testing.TB) {
	t.Helper()
	select {
	case <-b.done:
	case <-time.After(6 * time.Minute):
		t.Fatalf("the burst of %d notifications did not finish within 6 minutes (%d sent)", b.n, b.published())
	}
	if b.err != nil {
		t.Fatalf("publishing the burst: %v (%d of %d sent)", b.err, b.published(), b.n)
	}
}

// ---- regions ----

func (e *env) startRegions() {
	t := e.t
	for i := range e.o.regions {
		r := &region{name: regionName(i + 2)}
		r.servers = memcachetest.StartWith(t, e.o.serversPerRegion, e.tls.memcachedOptions())
		for _, n := range e.nodes {
			px, err := tcpproxy.Start(n.addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { px.Close() })
			r.natsProxy = append(r.natsProxy, px)
		}
		e.regions = append(e.regions, r)
	}
	// The middleware caches start in parallel: each is a python process.
	var wg sync.WaitGroup
	for _, r := range e.regions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r.cache = kmwtest.Start(t, serverAddrs(r), kmwtest.None, "", 0)
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	for _, r := range e.regions {
		for _, s := range r.servers {
			setCanary(t, s.PlainAddr)
		}
		var urls []string
		for _, px := range r.natsProxy {
			urls = append(urls, "nats://"+px.Addr())
		}
		args := []string{"agent",
			"--region", r.name,
			"--nats-url", strings.Join(urls, ","),
			"--stream", streamName,
			"--memcached", e.tls.memcachedList(t, r),
			"--strategy", e.o.strategy,
			"--token-cache-time", "300",
			// A short late write-back window: tests cache entries of users
			// right after earlier notifications that concern them (a shared
			// domain or project), with tokens issued long before, which the
			// default 15 s window would remove as validations written back
			// late. TestStaleWriteBackAfterFirstPass sets its own.
			"--late-write-back-window", "500ms",
			"--http-addr", "127.0.0.1:0",
			"--log-format", "json",
		}
		args = append(args, e.tls.agentArgs(t, r.name)...)
		args = append(args, e.o.agentArgs...)
		r.agent = newProc(t, e.logDir, "agent-"+r.name, args...)
	}
}

func (e *env) addBridge(i int) *proc {
	args := []string{"bridge",
		"--amqp-url", e.bridgeAMQPURL(),
		"--exchange", e.exchange,
		"--queue", e.queue,
		"--nats-url", e.natsURL(),
		"--stream", streamName,
		"--http-addr", "127.0.0.1:0",
		"--log-format", "json",
	}
	if e.o.cluster {
		args = append(args, "--stream-replicas", "3")
	}
	args = append(args, e.tls.bridgeArgs(e.t, fmt.Sprintf("bridge-%d", i+1))...)
	args = append(args, e.o.bridgeArgs...)
	p := newProc(e.t, e.logDir, fmt.Sprintf("bridge-%d", i+1), args...)
	e.bridges = append(e.bridges, p)
	return p
}

// writeEntries caches entries in every region through keystonemiddleware and
// checks that each was stored.
func (e *env) writeEntries(entries []kmwtest.Entry) {
	e.t.Helper()
	if msg := e.cacheEntries(entries); msg != "" {
		e.t.Fatal(msg)
	}
}

// cacheEntries caches entries in every region through keystonemiddleware and
// returns, when some could not be stored, what happened (empty otherwise).
// An entry the middleware could not store (its memcached server went down
// during the write) is not cached anywhere: it cannot go stale.
func (e *env) cacheEntries(entries []kmwtest.Entry) string {
	unstored := e.cacheEntriesReport(entries)
	var out []string
	for tok, where := range unstored {
		out = append(out, fmt.Sprintf("%s: keystonemiddleware could not store token %s…", where, tok[:12]))
	}
	sort.Strings(out)
	return strings.Join(out, "; ")
}

// cacheEntriesReport caches entries in every region and returns the tokens
// that some region's middleware could not store, with the region and the
// server it tried. python-memcache gives up on a key after 10 tries of its
// rehash when a server of the list is down: the middleware then does not
// cache that validation (nothing stale can come of it).
func (e *env) cacheEntriesReport(entries []kmwtest.Entry) map[string]string {
	out := map[string]string{}
	if len(entries) == 0 {
		return out
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, r := range e.regions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, w := range r.cache.Write(entries) {
				if !w.Stored {
					mu.Lock()
					out[w.TokenID] = fmt.Sprintf("%s (server %q)", r.name, w.Server)
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return out
}

// canaryKey is a non-token key set on every memcached server: no strategy
// but flush may remove it.
const canaryKey = "ksf-e2e/canary"

func setCanary(t testing.TB, addr string) {
	t.Helper()
	if err := mcSet(addr, canaryKey, []byte("not a token")); err != nil {
		t.Fatalf("setting the canary key on memcached %s: %v", addr, err)
	}
}

// restartMemcached restarts one server of a region (empty cache) and sets its
// canary again.
func (e *env) restartMemcached(r *region, i int) {
	e.t.Helper()
	r.servers[i].Restart()
	setCanary(e.t, r.servers[i].PlainAddr)
}

func (e *env) region(name string) *region {
	for _, r := range e.regions {
		if r.name == name {
			return r
		}
	}
	e.t.Fatalf("no region %s", name)
	return nil
}

// sentSnapshot returns what was published so far.
func (e *env) sentSnapshot() []sentMsg {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]sentMsg(nil), e.sent...)
}
