package e2e

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	gomemcache "github.com/bradfitz/gomemcache/memcache"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

// Everything in this file serves BenchmarkAgentFullPath only: no Test
// function calls it, so the default `go test ./e2e/` run does not start any of
// it (benchmarks run only with -bench).

var (
	flagBenchNotifications = flag.Int("e2e.bench-notifications", 40,
		"BenchmarkAgentFullPath: measured notifications per size (each for its own user)")
	flagBenchEntriesPerUser = flag.Int("e2e.bench-entries-per-user", 5,
		"BenchmarkAgentFullPath: cached token entries of each notified user")
	flagBenchDeadline = flag.Duration("e2e.bench-deadline", 30*time.Second,
		"BenchmarkAgentFullPath: how long one notification's entries may take to be removed before the benchmark fails")
	flagBenchAgentArgs = flag.String("e2e.bench-agent-args", "",
		"BenchmarkAgentFullPath: extra agent flags, space-separated (e.g. \"--batch-linger=0 --second-pass-delay=300\")")
	flagBenchSizes = flag.String("e2e.bench-sizes", "1000,10000,100000",
		"BenchmarkAgentFullPath: token entries per server, comma-separated")
	flagBenchNoCatalog = flag.Bool("e2e.bench-no-catalog", false,
		"BenchmarkAgentFullPath: token bodies without a catalog (include_service_catalog = False: 1.2 KB values instead of 4.6 KB), for sizes the machine cannot hold otherwise")
)

// benchEntryTTL is the TTL of the benchmark's entries. keystonemiddleware
// uses token_cache_time (300 s); the set-up at 100,000 entries per server
// takes longer than that to finish measuring, and entries expiring during
// the run would make the sizes wrong.
const benchEntryTTL = 30 * time.Minute

// BenchmarkAgentFullPath measures, with the real bridge and agent processes
// of one region (2 memcached servers), the time from publishing a Keystone
// notification to RabbitMQ (Keystone's exchange type, routing key, AMQP
// properties and oslo envelope: the captures of internal/fixtures) to the
// last of its user's cache entries removed from the region's memcached, with
// 1,000, 10,000 and 100,000 other token entries per server (-e2e.bench-sizes),
// written by kmwtest's Go writer in keystonemiddleware's strategy-None format
// on the server python-memcache would pick. Each notification concerns its
// own user and is published after the previous one's entries are gone.
//
// Beside it, in the same run and alternating with it, the raw chain: a
// message published to RabbitMQ, consumed by a plain amqp091-go consumer in
// this process that publishes it to a JetStream stream and acks after the
// PubAck, consumed by a plain JetStream consumer that deletes one key from
// one memcached server with gomemcache: the floor of any such pipeline on
// this machine. Both are timed the same way (polling the keys every 1 ms).
//
// It reports p50/p99/max of both, the agent process's VmRSS and VmHWM after
// the run, and how long the agent took to make its live index complete. An
// entry not removed within -e2e.bench-deadline fails the benchmark.
//
//	go test -run '^$' -bench AgentFullPath -benchtime 1x -timeout 30m ./e2e/
func BenchmarkAgentFullPath(b *testing.B) {
	for _, f := range strings.Split(*flagBenchSizes, ",") {
		perServer, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || perServer < 10 {
			b.Fatalf("-e2e.bench-sizes: %q is not a number of entries (at least 10)", f)
		}
		b.Run(fmt.Sprintf("entries=%d", perServer), func(b *testing.B) {
			benchAgentFullPath(b, perServer)
		})
	}
}

func benchAgentFullPath(b *testing.B, perServer int) {
	const servers = 2
	nNotif, perUser := *flagBenchNotifications, *flagBenchEntriesPerUser
	if nNotif < 1 || perUser < 1 {
		b.Fatalf("-e2e.bench-notifications=%d and -e2e.bench-entries-per-user=%d: both must be at least 1", nNotif, perUser)
	}
	const warmUps = 3
	ctx := context.Background()

	logDir, err := os.MkdirTemp("", "ksf-e2e-bench-")
	if err != nil {
		b.Fatal(err)
	}
	var procs []*proc
	b.Cleanup(func() {
		if b.Failed() || *flagKeepLogs {
			for _, p := range procs {
				b.Log(p.logTail(60))
			}
			b.Logf("process logs kept in %s", logDir)
			return
		}
		os.RemoveAll(logDir)
	})

	// memcached: ~4.7 KB values land in a 5.x KB slab class (~1.2 KB values
	// without a catalog in a 1.5 KB one); leave slack so that nothing is
	// evicted (checked below).
	mem := perServer*9/1000 + 64
	if *flagBenchNoCatalog {
		mem = perServer*3/1000 + 64
	}
	mcs := memcachetest.StartWith(b, servers, memcachetest.Options{MemoryMB: mem})
	for _, s := range mcs {
		setCanary(b, s.Addr)
	}
	cluster, err := memcache.New(memcache.Options{Servers: memcachetest.List(mcs)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cluster.Close() })

	// The notified users: one template per notification, cycling through
	// the captured user events.
	w := newWorkload(b, uint64(perServer))
	var userTpls []*template
	for _, tpl := range w.bounded {
		kinds := tpl.slotKinds()
		if strings.HasPrefix(tpl.eventType, "identity.user.") && len(kinds) == 1 && kinds[0] == kUser {
			userTpls = append(userTpls, tpl)
		}
	}
	if len(userTpls) == 0 {
		b.Fatal("expected captured identity.user.* notifications naming only a user in internal/fixtures; found none")
	}
	gen := w.gen
	gen.NoCatalog = *flagBenchNoCatalog
	var victims []*victim
	for i := range warmUps + nNotif*b.N {
		v := &victim{tpl: userTpls[i%len(userTpls)], ids: map[kind]string{kUser: gen.ID()}}
		dom := gen.ID()
		for range perUser {
			e := gen.Entry(kmwtest.Spec{UserID: v.ids[kUser], UserDomainID: dom, ProjectID: gen.ID(), ProjectDomainID: dom,
				Roles: []kmwtest.Role{{ID: fixtureMemberRoleID, Name: "member"}}})
			v.entries = append(v.entries, e)
			v.keys = append(v.keys, kmwtest.NoneKey(e.TokenID))
		}
		victims = append(victims, v)
	}

	// Everyone else: perServer entries per server, about 5 tokens per user
	// and 3 per project, each on the server python-memcache picks.
	start := time.Now()
	var sample []string // a few unrelated keys that must survive
	count := make([]int, servers)
	pending := make([][]kmwtest.Entry, servers)
	flush := func(i int) {
		if err := kmwtest.WriteNone(ctx, cluster.Servers()[i], pending[i], benchEntryTTL); err != nil {
			b.Fatal(err)
		}
		pending[i] = pending[i][:0]
	}
	roles := []kmwtest.Role{{ID: fixtureMemberRoleID, Name: "member"}, {ID: gen.ID(), Name: "reader"}}
	var uid, pid, dom string
	for j := 0; count[0] < perServer || count[1] < perServer; j++ {
		if j%5 == 0 {
			uid, dom = gen.ID(), gen.ID()
		}
		if j%3 == 0 {
			pid = gen.ID()
		}
		e := gen.Entry(kmwtest.Spec{UserID: uid, UserDomainID: dom, ProjectID: pid, ProjectDomainID: dom, Roles: roles})
		k := kmwtest.NoneKey(e.TokenID)
		i := kmwtest.ServerFor(k, servers)
		if count[i] >= perServer {
			continue
		}
		count[i]++
		if count[i]%(perServer/10) == 0 {
			sample = append(sample, k)
		}
		pending[i] = append(pending[i], e)
		if len(pending[i]) == 2000 {
			flush(i)
		}
	}
	for i := range servers {
		flush(i)
	}
	var victimEntries int
	for _, v := range victims {
		for j, e := range v.entries {
			if err := kmwtest.WriteNone(ctx, cluster.Servers()[kmwtest.ServerFor(v.keys[j], servers)], []kmwtest.Entry{e}, benchEntryTTL); err != nil {
				b.Fatal(err)
			}
			victimEntries++
		}
	}
	for _, s := range mcs {
		st := benchMemcachedStats(b, s.Addr)
		if st["evictions"] != "0" {
			b.Fatalf("memcached %s evicted %s entries while the benchmark wrote them; expected none (raise MemoryMB)", s.Addr, st["evictions"])
		}
	}
	addrs := memcachetest.Addrs(mcs)
	if missing := benchMissing(b, addrs, allKeys(victims)); len(missing) > 0 {
		b.Fatalf("expected every notified user's %d entries cached before the run; %d are not", victimEntries, len(missing))
	}
	b.Logf("wrote %d + %d token entries on %d servers (%d victims) in %s", servers*perServer, victimEntries, servers,
		len(victims), time.Since(start).Round(time.Millisecond))

	// NATS JetStream in this process, RabbitMQ exchange as oslo.messaging
	// declares it, the bridge and one agent as separate processes.
	nopts := natsserver.Options{Listen: "127.0.0.1:-1", DataDir: b.TempDir(), ServerName: "e2e-bench-nats"}
	ns, err := natsserver.Start(nopts)
	if err != nil {
		b.Fatalf("starting the NATS server: %v", err)
	}
	b.Cleanup(ns.Shutdown)
	pub := benchStartRabbitMQ(b)

	bridge := newProc(b, logDir, "bridge", "bridge",
		"--amqp-url", pub.url,
		"--exchange", pub.exchange,
		"--queue", pub.queue,
		"--nats-url", "nats://"+ns.Addr(),
		"--stream", streamName,
		"--http-addr", "127.0.0.1:0",
		"--log-format", "json")
	agentArgs := []string{"agent",
		"--region", "regionTwo",
		"--nats-url", "nats://" + ns.Addr(),
		"--stream", streamName,
		"--memcached", memcachetest.List(mcs),
		"--strategy", "targeted",
		"--token-cache-time", "300",
		"--http-addr", "127.0.0.1:0",
		"--log-format", "json"}
	agentArgs = append(agentArgs, strings.Fields(*flagBenchAgentArgs)...)
	agent := newProc(b, logDir, "agent-regionTwo", agentArgs...)
	procs = []*proc{bridge, agent}
	b.Cleanup(func() {
		for _, p := range []*proc{agent, bridge} { // agent first, as the harness does
			if err := p.signalQuiet(); err != nil {
				b.Errorf("expected %s to exit with status 0 after SIGTERM: %v", p.name, err)
			}
		}
	})
	bridge.start(readyTimeout)
	start = time.Now()
	agent.start(readyTimeout)

	// The agent indexes every server at start (reading every value) and
	// makes its live index complete; wait for that so the measured batches
	// are the steady state.
	total := float64(servers*perServer + victimEntries)
	testutil.Eventually(b, 20*time.Minute, fmt.Sprintf("the agent's live index to hold the %v token entries", total), func() (bool, string) {
		m, err := agent.metrics()
		if err != nil {
			return false, err.Error()
		}
		n := m.sum("keystone_fanout_invalidator_index_entries")
		live := m.sum("keystone_fanout_invalidator_live_index")
		return n >= total && live == servers, fmt.Sprintf("keystone_fanout_invalidator_index_entries %v, live_index %v", n, live)
	})
	warm := time.Since(start)
	raw := benchStartRawChain(b, ns.Addr(), mcs[0].Addr)

	measure := func(v *victim) time.Duration {
		msg, _ := v.notification(time.Now())
		t0 := time.Now()
		confirm := pub.publish(ctx, b, msg)
		deadline := t0.Add(*flagBenchDeadline)
		for {
			missing := benchMissing(b, addrs, v.keys)
			if len(missing) == len(v.keys) {
				d := time.Since(t0)
				if ok, err := confirm.WaitContext(ctx); err != nil || !ok {
					b.Fatalf("RabbitMQ did not confirm the publish (ack %v): %v", ok, err)
				}
				return d
			}
			if time.Now().After(deadline) {
				b.Fatalf("expected the %d entries of user %s removed within %s of publishing %s; %d still cached%s",
					len(v.keys), v.ids[kUser], *flagBenchDeadline, v.tpl.eventType, len(v.keys)-len(missing), benchAgentNote(agent))
			}
			time.Sleep(time.Millisecond) // polling interval, not synchronisation
		}
	}
	for _, v := range victims[:warmUps] {
		measure(v)
		raw.measure(ctx, b, addrs)
	}

	var lat, rawLat []time.Duration
	b.ResetTimer()
	for i := range b.N {
		for _, v := range victims[warmUps+i*nNotif : warmUps+(i+1)*nNotif] {
			lat = append(lat, measure(v))
			rawLat = append(rawLat, raw.measure(ctx, b, addrs))
		}
	}
	b.StopTimer()

	// Targeted: the unrelated entries sampled and the canary survived.
	if missing := benchMissing(b, addrs, append(sample, canaryKey)); len(missing) > 0 {
		b.Fatalf("expected unrelated entries and the canary to survive the targeted invalidations; %d of %d sampled keys are gone: %s",
			len(missing), len(sample)+1, strings.Join(missing[:min(3, len(missing))], ", "))
	}
	rss, hwm := benchProcMemory(b, agent)

	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	sort.Slice(rawLat, func(i, j int) bool { return rawLat[i] < rawLat[j] })
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	b.ReportMetric(float64(sum)/float64(len(lat)), "ns/op")
	b.ReportMetric(ms(benchPercentile(lat, 50)), "p50_ms")
	b.ReportMetric(ms(benchPercentile(lat, 99)), "p99_ms")
	b.ReportMetric(ms(lat[len(lat)-1]), "max_ms")
	b.ReportMetric(ms(benchPercentile(rawLat, 50)), "raw_p50_ms")
	b.ReportMetric(ms(benchPercentile(rawLat, 99)), "raw_p99_ms")
	b.ReportMetric(float64(rss)/1024, "agent_VmRSS_MiB")
	b.ReportMetric(float64(hwm)/1024, "agent_VmHWM_MiB")
	b.ReportMetric(warm.Seconds(), "index_warm_s")
	q := func(l []time.Duration, p float64) time.Duration {
		return benchPercentile(l, p).Round(10 * time.Microsecond)
	}
	b.Logf("%d notifications: min %s p50 %s p90 %s p99 %s max %s; raw chain min %s p50 %s p90 %s p99 %s max %s; agent VmRSS %.1f MiB VmHWM %.1f MiB; live index complete %s after start",
		len(lat), q(lat, 0), q(lat, 50), q(lat, 90), q(lat, 99), q(lat, 100),
		q(rawLat, 0), q(rawLat, 50), q(rawLat, 90), q(rawLat, 99), q(rawLat, 100),
		float64(rss)/1024, float64(hwm)/1024, warm.Round(time.Millisecond))
}

// benchRawChain is the raw chain of BenchmarkAgentFullPath: RabbitMQ ->
// amqp091-go consumer -> JetStream publish (ack after the PubAck) ->
// JetStream consumer -> one gomemcache delete.
type benchRawChain struct {
	pub    *benchPublisher
	mc     *gomemcache.Client
	n      int
	suffix string
}

func benchStartRawChain(b *testing.B, natsAddr, mcAddr string) *benchRawChain {
	b.Helper()
	pub := benchStartRabbitMQ(b)
	r := &benchRawChain{pub: pub, mc: gomemcache.New(mcAddr), suffix: randomSuffix()}
	nc, err := nats.Connect("nats://" + natsAddr)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "RAW", Subjects: []string{"raw.>"}, Storage: jetstream.FileStorage})
	if err != nil {
		b.Fatalf("creating the raw chain's stream: %v", err)
	}
	cons, err := stream.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{Durable: "raw", AckPolicy: jetstream.AckExplicitPolicy})
	if err != nil {
		b.Fatal(err)
	}
	cc, err := cons.Consume(func(m jetstream.Msg) {
		if err := r.mc.Delete(string(m.Data())); err != nil && !errors.Is(err, gomemcache.ErrCacheMiss) {
			_ = m.Nak()
			return
		}
		_ = m.Ack()
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(cc.Stop)
	conn, err := amqp.Dial(pub.url)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		b.Fatal(err)
	}
	q, err := ch.QueueDeclare(pub.queue, false, true, false, false, nil)
	if err != nil {
		b.Fatal(err)
	}
	if err := ch.QueueBind(q.Name, "raw", pub.exchange, false, nil); err != nil {
		b.Fatal(err)
	}
	deliveries, err := ch.Consume(q.Name, "", false, false, false, false, nil)
	if err != nil {
		b.Fatal(err)
	}
	go func() {
		for d := range deliveries {
			if _, err := js.Publish(ctx, "raw.key", d.Body); err != nil {
				_ = d.Nack(false, true)
				continue
			}
			_ = d.Ack(false)
		}
	}()
	return r
}

// measure stores a key, publishes its name to RabbitMQ and times until the
// key is gone, polling as the agent's measurement does.
func (r *benchRawChain) measure(ctx context.Context, b *testing.B, addrs []string) time.Duration {
	b.Helper()
	r.n++
	key := fmt.Sprintf("ksf-e2e-raw-%s-%d", r.suffix, r.n)
	if err := r.mc.Set(&gomemcache.Item{Key: key, Value: []byte("x"), Expiration: 600}); err != nil {
		b.Fatal(err)
	}
	t0 := time.Now()
	c, err := r.pub.ch.PublishWithDeferredConfirmWithContext(ctx, r.pub.exchange, "raw", false, false, amqp.Publishing{Body: []byte(key)})
	if err != nil {
		b.Fatal(err)
	}
	deadline := t0.Add(*flagBenchDeadline)
	for {
		if missing := benchMissing(b, addrs, []string{key}); len(missing) == 1 {
			d := time.Since(t0)
			if ok, err := c.WaitContext(ctx); err != nil || !ok {
				b.Fatalf("RabbitMQ did not confirm the raw publish (ack %v): %v", ok, err)
			}
			return d
		}
		if time.Now().After(deadline) {
			b.Fatalf("the raw chain did not delete %s within %s", key, *flagBenchDeadline)
		}
		time.Sleep(time.Millisecond) // polling interval, not synchronisation
	}
}

// benchPercentile is the nearest-rank percentile of sorted durations.
func benchPercentile(sorted []time.Duration, p float64) time.Duration {
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

// benchMissing returns the keys that none of the servers holds.
func benchMissing(b *testing.B, servers, keys []string) []string {
	b.Helper()
	found, err := presentIn(servers, keys)
	if err != nil {
		b.Fatalf("reading memcached: %v", err)
	}
	var out []string
	for _, k := range keys {
		if _, ok := found[k]; !ok {
			out = append(out, k)
		}
	}
	return out
}

// benchMemcachedStats returns memcached's "stats".
func benchMemcachedStats(b *testing.B, addr string) map[string]string {
	b.Helper()
	c, r, err := mcDial(addr)
	if err != nil {
		b.Fatalf("memcached %s: %v", addr, err)
	}
	defer c.Close()
	if _, err := fmt.Fprint(c, "stats\r\n"); err != nil {
		b.Fatalf("memcached %s: %v", addr, err)
	}
	out := map[string]string{}
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			b.Fatalf("memcached %s: reading stats: %v", addr, err)
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "END" {
			return out
		}
		if f := strings.Fields(line); len(f) == 3 && f[0] == "STAT" {
			out[f[1]] = f[2]
		}
	}
}

// benchProcMemory reads VmRSS and VmHWM (kB) of the running process p.
func benchProcMemory(b *testing.B, p *proc) (rss, hwm int64) {
	b.Helper()
	p.mu.Lock()
	cmd := p.cmd
	p.mu.Unlock()
	if cmd == nil {
		b.Fatalf("%s is not running; expected to read its memory", p.name)
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if err != nil {
		b.Fatalf("%s: %v", p.name, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "VmRSS" && k != "VmHWM") {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			b.Fatalf("%s: /proc status %s: %q", p.name, k, v)
		}
		if k == "VmRSS" {
			rss = n
		} else {
			hwm = n
		}
	}
	if rss == 0 || hwm == 0 {
		b.Fatalf("%s: expected VmRSS and VmHWM in /proc/%d/status; saw %d and %d kB", p.name, cmd.Process.Pid, rss, hwm)
	}
	return rss, hwm
}

// benchAgentNote summarises the agent's invalidation counters, for failure
// messages.
func benchAgentNote(agent *proc) string {
	m, err := agent.metrics()
	if err != nil {
		return fmt.Sprintf(" (agent metrics: %v)", err)
	}
	return fmt.Sprintf(" (agent: invalidations %v, entries removed %v, server errors %v)",
		m.sum("keystone_fanout_agent_invalidations_total"), m.sum("keystone_fanout_invalidator_entries_removed_total"),
		m.sum("keystone_fanout_invalidator_server_errors_total"))
}

// benchPublisher publishes to the benchmark's own exchange as
// oslo.messaging does, with publisher confirms.
type benchPublisher struct {
	url, exchange, queue string
	ch                   *amqp.Channel
}

func benchStartRabbitMQ(b *testing.B) *benchPublisher {
	b.Helper()
	suffix := randomSuffix()
	p := &benchPublisher{url: testutil.AMQPURL(), exchange: "ksf-e2e-bench-" + suffix, queue: "ksf-e2e-bench-" + suffix}
	conn, err := amqp.DialConfig(p.url, amqp.Config{Properties: amqp.Table{"connection_name": "ksf-e2e-bench-publisher-" + suffix}})
	if err != nil {
		b.Fatalf("RabbitMQ at %s is required by the end-to-end benchmarks: %v", p.url, err)
	}
	b.Cleanup(func() {
		// Runs after the processes stopped (registered before them).
		if ch, err := conn.Channel(); err == nil {
			if _, err := ch.QueueDelete(p.queue, false, false, false); err != nil {
				b.Logf("cleanup: deleting queue %s: %v", p.queue, err)
				ch, _ = conn.Channel()
			}
			if ch != nil {
				if err := ch.ExchangeDelete(p.exchange, false, false); err != nil {
					b.Logf("cleanup: deleting exchange %s: %v", p.exchange, err)
				}
			}
		}
		conn.Close()
	})
	if p.ch, err = conn.Channel(); err != nil {
		b.Fatal(err)
	}
	if err := p.ch.Confirm(false); err != nil {
		b.Fatal(err)
	}
	if err := p.ch.ExchangeDeclare(p.exchange, "topic", false, false, false, false, nil); err != nil {
		b.Fatalf("declaring exchange %s: %v", p.exchange, err)
	}
	return p
}

// publish sends m and returns its confirmation, without waiting for it.
func (p *benchPublisher) publish(ctx context.Context, b *testing.B, m amqpMessage) *amqp.DeferredConfirmation {
	b.Helper()
	pb := m.props
	pb.Body = m.body
	c, err := p.ch.PublishWithDeferredConfirmWithContext(ctx, p.exchange, m.routingKey, false, false, pb)
	if err != nil {
		b.Fatalf("publishing to RabbitMQ: %v", err)
	}
	return c
}
