package bridge

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/fixtures"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// realisticBodies returns n bodies made from the token-affecting fixtures
// (basic and CADF, as captured), each with a fresh message_id.
func realisticBodies(tb testing.TB, n int) [][]byte {
	tb.Helper()
	all, err := fixtures.All()
	if err != nil {
		tb.Fatal(err)
	}
	var templates []map[string]any
	for _, f := range all {
		if !tokenAffecting(f.Meta.EventType) {
			continue
		}
		var env map[string]string
		if err := json.Unmarshal(f.Body, &env); err != nil {
			tb.Fatal(err)
		}
		var inner map[string]any
		if err := json.Unmarshal([]byte(env["oslo.message"]), &inner); err != nil {
			tb.Fatal(err)
		}
		templates = append(templates, inner)
	}
	out := make([][]byte, n)
	for i := range out {
		inner := templates[i%len(templates)]
		inner["message_id"] = newUUID()
		b, _ := json.Marshal(inner)
		out[i], _ = json.Marshal(map[string]string{"oslo.version": "2.0", "oslo.message": string(b)})
	}
	return out
}

// fillQueue declares a quorum queue and publishes bodies to it through the
// default exchange, waiting for confirms.
func fillQueue(tb testing.TB, r *rig, queue string, bodies [][]byte) {
	tb.Helper()
	ch := r.channel()
	if _, err := ch.QueueDeclare(queue, true, false, false, false, amqp.Table{"x-queue-type": QueueQuorum}); err != nil {
		tb.Fatal(err)
	}
	r.queues = append(r.queues, queue)
	msgs := make([]message, len(bodies))
	for i, b := range bodies {
		msgs[i] = keystoneMessage(b)
	}
	ex := r.exchange
	r.exchange = "" // the default exchange routes by queue name
	for i := range msgs {
		msgs[i].routingKey = queue
	}
	r.publish(msgs...)
	r.exchange = ex
	testutil.Eventually(tb, time.Minute, "the queue to be filled", func() (bool, string) {
		m, _ := r.queueDepth(queue)
		return m == len(bodies), "not yet"
	})
}

// rawConsume is the baseline: consume n messages with the bridge's prefetch
// and ack each one by one, nothing else. It returns the elapsed time and the
// process CPU time used, connection set-up included (as for the bridge).
func rawConsume(tb testing.TB, queue string, n, prefetch int) (elapsed, cpu time.Duration) {
	tb.Helper()
	start, cpu0 := time.Now(), cpuNow()
	defer profilePhase(tb, "raw")()
	conn, err := amqp.Dial(testutil.AMQPURL())
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		tb.Fatal(err)
	}
	if err := ch.Qos(prefetch, 0, false); err != nil {
		tb.Fatal(err)
	}
	deliveries, err := ch.Consume(queue, "", false, false, false, false, nil)
	if err != nil {
		tb.Fatal(err)
	}
	for i := 0; i < n; i++ {
		d, ok := <-deliveries
		if !ok {
			tb.Fatalf("deliveries ended after %d of %d", i, n)
		}
		if err := d.Ack(false); err != nil {
			tb.Fatal(err)
		}
	}
	return time.Since(start), cpuNow() - cpu0
}

// BenchmarkBridgeThroughput measures the bridge's sustained rate (decode,
// publish to JetStream on the embedded server, ack after PubAck) against a
// raw amqp091-go consume-and-ack loop on the same broker, both draining a
// pre-filled quorum queue of b.N realistic notifications. Run it with a
// fixed count, for example -benchtime=20000x.
func BenchmarkBridgeThroughput(b *testing.B) {
	n := b.N
	r := newRig(b)
	env := startNATS(b)
	o := r.options()
	bodies := realisticBodies(b, n)

	b.StopTimer()
	rawQueue := r.queue + "-raw"
	fillQueue(b, r, rawQueue, bodies)
	b.StartTimer()
	broker0 := brokerCPU()
	rawElapsed, rawCPU := rawConsume(b, rawQueue, n, DefaultPrefetch)
	brokerRaw := brokerCPU() - broker0
	b.StopTimer()

	bodies = realisticBodies(b, n) // fresh ids
	fillQueue(b, r, r.queue, bodies)
	reg := prometheus.NewRegistry()
	br, err := New(o, env.nc, reg, testutil.Logger(b))
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	b.StartTimer()
	stopProfile := profilePhase(b, "bridge")
	broker1 := brokerCPU()
	var mem0 runtime.MemStats
	runtime.ReadMemStats(&mem0)
	start, cpu0 := time.Now(), cpuNow()
	go func() { done <- br.Run(ctx) }()
	deadline := time.Now().Add(5 * time.Minute)
	for promtest.ToFloat64(br.m.published)+promtest.ToFloat64(br.m.duplicates) < float64(n) {
		if time.Now().After(deadline) {
			b.Fatalf("bridge published %v of %d in 5 minutes", promtest.ToFloat64(br.m.published), n)
		}
		time.Sleep(2 * time.Millisecond)
	}
	bridgeElapsed, bridgeCPU := time.Since(start), cpuNow()-cpu0
	brokerBridge := brokerCPU() - broker1
	var mem1 runtime.MemStats
	runtime.ReadMemStats(&mem1)
	stopProfile()
	b.StopTimer()
	cancel()
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	if got := env.streamCount(r.stream.Name); got != n {
		b.Fatalf("stream holds %d events, want %d", got, n)
	}

	raw := float64(n) / rawElapsed.Seconds()
	bridge := float64(n) / bridgeElapsed.Seconds()
	b.ReportMetric(raw, "raw_msgs/s")
	b.ReportMetric(bridge, "bridge_msgs/s")
	b.ReportMetric(bridge/raw, "ratio")
	// Process CPU per message (the bridge process also hosts the embedded
	// NATS server here): what the bridge's own work costs, less sensitive to
	// other load on the machine than the rates.
	b.ReportMetric(float64(rawCPU.Microseconds())/float64(n), "raw_cpu_us/msg")
	b.ReportMetric(float64(bridgeCPU.Microseconds())/float64(n), "bridge_cpu_us/msg")
	// RabbitMQ's CPU per message in each phase, when it runs on this
	// machine (other clients of the shared broker add to it).
	if broker0 >= 0 && broker1 >= 0 {
		b.ReportMetric(float64(brokerRaw.Microseconds())/float64(n), "rabbitmq_raw_cpu_us/msg")
		b.ReportMetric(float64(brokerBridge.Microseconds())/float64(n), "rabbitmq_bridge_cpu_us/msg")
	}
	// Heap allocations of the whole process (bridge, AMQP and NATS clients,
	// embedded NATS server) per message.
	b.ReportMetric(float64(mem1.Mallocs-mem0.Mallocs)/float64(n), "bridge_allocs/msg")
	b.ReportMetric(float64(mem1.TotalAlloc-mem0.TotalAlloc)/float64(n), "bridge_B/msg")
	b.ReportMetric(float64(mem1.NumGC-mem0.NumGC), "bridge_GCs")
}

// profilePhase writes a CPU profile of one phase of a benchmark to
// $KSF_BENCH_CPUPROFILE.<phase> when that variable is set (go test's own
// -cpuprofile covers the set-up too), and returns the function that stops it.
func profilePhase(tb testing.TB, phase string) (stop func()) {
	prefix := os.Getenv("KSF_BENCH_CPUPROFILE")
	if prefix == "" {
		return func() {}
	}
	f, err := os.Create(prefix + "." + phase)
	if err != nil {
		tb.Fatal(err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		tb.Fatal(err)
	}
	// Allocation profiles at both ends: compare them with
	// go tool pprof -sample_index=alloc_objects -diff_base <prefix>.<phase>.allocs0 <prefix>.<phase>.allocs1
	writeAllocs := func(suffix string) {
		runtime.GC() // the profile is as of the last collection
		f, err := os.Create(prefix + "." + phase + "." + suffix)
		if err != nil {
			tb.Fatal(err)
		}
		defer f.Close()
		if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
			tb.Fatal(err)
		}
	}
	writeAllocs("allocs0")
	return func() {
		pprof.StopCPUProfile()
		f.Close()
		writeAllocs("allocs1")
	}
}

// brokerCPU is the user and system CPU time so far of the local RabbitMQ
// (the one beam.smp process), or -1 when there is not exactly one.
func brokerCPU() time.Duration {
	dirs, _ := filepath.Glob("/proc/[0-9]*/comm")
	var found []string
	for _, comm := range dirs {
		if b, err := os.ReadFile(comm); err == nil && strings.TrimSpace(string(b)) == "beam.smp" {
			found = append(found, filepath.Dir(comm))
		}
	}
	if len(found) != 1 {
		return -1
	}
	stat, err := os.ReadFile(filepath.Join(found[0], "stat"))
	if err != nil {
		return -1
	}
	// The fields after the command name (which is in parentheses);
	// utime and stime are the 14th and 15th fields, in clock ticks (USER_HZ, 100/s).
	rest := stat[bytes.LastIndexByte(stat, ')')+1:]
	f := strings.Fields(string(rest))
	if len(f) < 13 {
		return -1
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64)
	stime, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return -1
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond
}

// cpuNow is the process's user and system CPU time so far.
func cpuNow() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkDecodeAndMarshal is the bridge's CPU cost per notification that
// does not depend on the brokers: event.Decode and Event.Marshal of the
// realistic bodies.
func BenchmarkDecodeAndMarshal(b *testing.B) {
	bodies := realisticBodies(b, 1000)
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuNow()
	for i := 0; i < b.N; i++ {
		ev, err := event.Decode(bodies[i%len(bodies)])
		if err != nil {
			b.Fatal(err)
		}
		if _, err := ev.Marshal(); err != nil {
			b.Fatal(err)
		}
	}
	// CPU time varies less than wall time on a shared machine.
	b.ReportMetric(float64((cpuNow()-cpu0).Nanoseconds())/float64(b.N), "cpu_ns/op")
}

// BenchmarkJetStreamPublish is the JetStream side alone, as the bridge
// publishes: the jetstream package's PublishMsgAsync of encoded events with
// Nats-Msg-Id to the embedded server, at most DefaultPublishWindow awaiting
// their PubAck, each future awaited in order.
func BenchmarkJetStreamPublish(b *testing.B) {
	env, msgs := jetStreamBench(b)
	js, err := jetstream.New(env.nc, jetstream.WithPublishAsyncMaxPending(DefaultPublishWindow),
		jetstream.WithPublishAsyncTimeout(DefaultPubAckTimeout))
	if err != nil {
		b.Fatal(err)
	}
	pending := make(chan jetstream.PubAckFuture, DefaultPrefetch)
	done := make(chan struct{})
	b.ResetTimer()
	start, cpu0 := time.Now(), cpuNow()
	go func() {
		defer close(done)
		for p := range pending {
			select {
			case <-p.Ok():
			case err := <-p.Err():
				b.Error(err)
			}
		}
	}()
	for _, m := range msgs {
		p, err := js.PublishMsgAsync(m)
		for errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
			p, err = js.PublishMsgAsync(m)
		}
		if err != nil {
			b.Fatal(err)
		}
		pending <- p
	}
	close(pending)
	<-done
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
	// The NATS client and the embedded server, both in this process.
	b.ReportMetric(float64((cpuNow()-cpu0).Microseconds())/float64(b.N), "cpu_us/msg")
}

// jetStreamBench starts a NATS server with a stream and encodes b.N events
// for it.
func jetStreamBench(b *testing.B) (*natsEnv, []*nats.Msg) {
	env := startNATS(b)
	sc := stream.Config{Name: "BENCH_" + testutil.NameSuffix(), SubjectPrefix: "bench"}
	js, err := jetstream.New(env.nc)
	if err != nil {
		b.Fatal(err)
	}
	if err := stream.Ensure(context.Background(), js, sc); err != nil {
		b.Fatal(err)
	}
	bodies := realisticBodies(b, b.N)
	msgs := make([]*nats.Msg, b.N)
	for i, body := range bodies {
		ev, err := event.Decode(body)
		if err != nil {
			b.Fatal(err)
		}
		data, _ := ev.Marshal()
		msgs[i] = &nats.Msg{Subject: stream.Subject(sc.SubjectPrefix, &ev), Data: data,
			Header: nats.Header{jetstream.MsgIDHeader: []string{ev.ID}, jetstream.ExpectedStreamHeader: []string{sc.Name}}}
	}
	return env, msgs
}
