package regionagent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/tcpproxy"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
)

const (
	testStream = stream.DefaultName
	testPrefix = stream.DefaultSubjectPrefix
	testRegion = "regionTwo"
)

func connect(t testing.TB, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond),
		nats.ReconnectBufSize(-1))
	if err != nil {
		t.Fatalf("connecting to %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// connectProxied connects to env's server through a proxy the test can
// pause, as a silent network would be.
func connectProxied(t testing.TB, env *testEnv) (*tcpproxy.Proxy, *nats.Conn) {
	t.Helper()
	px, err := tcpproxy.Start(env.srv.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { px.Close() })
	return px, connect(t, "nats://"+px.Addr())
}

// testEnv is an embedded NATS server with the bridge's stream.
type testEnv struct {
	t   testing.TB
	srv *natsserver.Server
	nc  *nats.Conn // the publisher's / inspector's connection
	js  jetstream.JetStream
}

func newEnv(t testing.TB, mutate ...func(*jetstream.StreamConfig)) *testEnv {
	t.Helper()
	srv := testutil.StartNATS(t)
	nc := connect(t, srv.ClientURL())
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	cfg := jetstream.StreamConfig{
		Name:       testStream,
		Subjects:   []string{testPrefix + ".>"},
		Storage:    jetstream.FileStorage,
		Duplicates: 2 * time.Minute,
	}
	for _, m := range mutate {
		m(&cfg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.CreateOrUpdateStream(ctx, cfg); err != nil {
		t.Fatalf("creating stream: %v", err)
	}
	return &testEnv{t: t, srv: srv, nc: nc, js: js}
}

func testEvent(i int) event.Event {
	return event.Event{
		Version: event.SchemaVersion,
		Kind:    event.KindNotification,
		ID:      fmt.Sprintf("ev-%04d", i),
		Type:    "identity.user.updated",
		Time:    time.Now().UTC(),
		Format:  "cadf",
		UserID:  fmt.Sprintf("user-%d", i),
	}
}

// publish publishes events as the bridge does and returns their stream sequences.
func (e *testEnv) publish(evs ...event.Event) []uint64 {
	e.t.Helper()
	var seqs []uint64
	futures := make([]jetstream.PubAckFuture, 0, len(evs))
	for i := range evs {
		b, err := evs[i].Marshal()
		if err != nil {
			e.t.Fatal(err)
		}
		f, err := e.js.PublishAsync(stream.Subject(testPrefix, &evs[i]), b, jetstream.WithMsgID(evs[i].ID))
		if err != nil {
			e.t.Fatalf("publishing %s: %v", evs[i].ID, err)
		}
		futures = append(futures, f)
	}
	for i, f := range futures {
		select {
		case ack := <-f.Ok():
			seqs = append(seqs, ack.Sequence)
		case err := <-f.Err():
			e.t.Fatalf("publishing %s: %v", evs[i].ID, err)
		case <-time.After(10 * time.Second):
			e.t.Fatalf("publishing %s: no PubAck within 10s", evs[i].ID)
		}
	}
	return seqs
}

func (e *testEnv) consumerInfo() (*jetstream.ConsumerInfo, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := e.js.Consumer(ctx, testStream, testRegion)
	if err != nil {
		return nil, err
	}
	return c.CachedInfo(), nil
}

func (e *testEnv) streamInfo() *jetstream.StreamInfo {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := e.js.Stream(ctx, testStream)
	if err != nil {
		e.t.Fatalf("stream info: %v", err)
	}
	return s.CachedInfo()
}

// waitAcked waits until the consumer's ack floor reaches seq with nothing pending.
func (e *testEnv) waitAcked(seq uint64, timeout time.Duration) {
	e.t.Helper()
	testutil.Eventually(e.t, timeout, fmt.Sprintf("consumer %s acked through stream seq %d with nothing pending", testRegion, seq), func() (bool, string) {
		ci, err := e.consumerInfo()
		if err != nil {
			return false, err.Error()
		}
		return ci.AckFloor.Stream >= seq && ci.NumAckPending == 0 && ci.NumPending == 0,
			fmt.Sprintf("ack floor %d, ack pending %d, pending %d", ci.AckFloor.Stream, ci.NumAckPending, ci.NumPending)
	})
}

// call is one Invalidate call seen by fakeInvalidator.
type call struct {
	start, end time.Time
	events     []event.Event
	err        error
}

func (c call) ids() []string {
	var ids []string
	for _, e := range c.events {
		ids = append(ids, e.ID)
	}
	return ids
}

// fakeInvalidator records calls. fail, when set, decides a call's error;
// gate, when set, is called before returning (it may block).
type fakeInvalidator struct {
	mu     sync.Mutex
	calls  []call
	fail   func(n int, evs []event.Event) error
	gate   func(ctx context.Context, n int, evs []event.Event) error
	result tokencache.Result
	ping   error
}

func (f *fakeInvalidator) Invalidate(ctx context.Context, evs []event.Event) (tokencache.Result, error) {
	start := time.Now()
	f.mu.Lock()
	n := len(f.calls)
	fail, gate, res := f.fail, f.gate, f.result
	f.mu.Unlock()
	var err error
	if gate != nil {
		err = gate(ctx, n, evs)
	}
	if err == nil && fail != nil {
		err = fail(n, evs)
	}
	for _, e := range evs {
		if e.Unbounded() {
			res.Swept = true
		}
	}
	f.mu.Lock()
	f.calls = append(f.calls, call{start: start, end: time.Now(), events: slices.Clone(evs), err: err})
	f.mu.Unlock()
	return res, err
}

func (f *fakeInvalidator) Ping(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ping
}

func (f *fakeInvalidator) snapshot() []call {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

// succeeded returns how many successful calls included each event ID.
func (f *fakeInvalidator) succeeded() map[string]int {
	out := map[string]int{}
	for _, c := range f.snapshot() {
		if c.err != nil {
			continue
		}
		for _, id := range c.ids() {
			out[id]++
		}
	}
	return out
}

func (f *fakeInvalidator) gapCalls() int {
	n := 0
	for _, c := range f.snapshot() {
		for _, e := range c.events {
			if e.Type == GapEventType {
				n++
				break
			}
		}
	}
	return n
}

// runningAgent is an Agent running in the background.
type runningAgent struct {
	*Agent
	reg    *prometheus.Registry
	cancel context.CancelFunc
	done   chan error
}

// testOptions are fast options for tests.
func testOptions() Options {
	return Options{
		Region:            testRegion,
		Stream:            testStream,
		BatchLinger:       20 * time.Millisecond,
		noSecondPass:      true,
		RetryMin:          20 * time.Millisecond,
		RetryMax:          200 * time.Millisecond,
		RedeliveryBackoff: []time.Duration{time.Second, 2 * time.Second},
		AuditInterval:     100 * time.Millisecond,
		Heartbeat:         500 * time.Millisecond,
		ShutdownTimeout:   2 * time.Second,
	}
}

func startAgent(t testing.TB, nc *nats.Conn, o Options, inv TokenCache) *runningAgent {
	t.Helper()
	return startAgentLogging(t, nc, o, inv, testutil.Logger(t))
}

// startAgentLogging is startAgent with the agent's log going to log.
func startAgentLogging(t testing.TB, nc *nats.Conn, o Options, inv TokenCache, log *slog.Logger) *runningAgent {
	t.Helper()
	reg := prometheus.NewRegistry()
	a, err := New(o, nc, inv, reg, log)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ra := &runningAgent{Agent: a, reg: reg, cancel: cancel, done: make(chan error, 1)}
	go func() { ra.done <- a.Run(ctx) }()
	t.Cleanup(func() { ra.stop(t) })
	return ra
}

// stop cancels the agent and waits for Run to return (once).
func (ra *runningAgent) stop(t testing.TB) {
	t.Helper()
	ra.cancel()
	select {
	case err, ok := <-ra.done:
		if ok && err != nil {
			t.Errorf("Run: %v", err)
		}
		if ok {
			close(ra.done)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("Run did not return within 30s of its context ending")
	}
}

func (ra *runningAgent) waitBound(t testing.TB) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, "the agent bound to its consumer", func() (bool, string) {
		return ra.bound.Load(), "not bound"
	})
}

func counter(c prometheus.Collector) float64 { return promtest.ToFloat64(c) }

// sumMetric is the sum of every series of the counter name in reg.
func sumMetric(t testing.TB, reg prometheus.Gatherer, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.Metric {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

func (ra *runningAgent) gaps(reason string) float64 {
	return counter(ra.m.gaps.WithLabelValues(reason))
}

func (ra *runningAgent) totalGaps() float64 {
	n := 0.0
	for _, r := range gapReasons {
		n += ra.gaps(r)
	}
	return n
}

// waitProcessed waits until every id was in a successful call at least times times.
func waitProcessed(t testing.TB, f *fakeInvalidator, ids []string, times int, timeout time.Duration) {
	t.Helper()
	testutil.Eventually(t, timeout, fmt.Sprintf("%d events each invalidated successfully %d times", len(ids), times), func() (bool, string) {
		got := f.succeeded()
		var missing []string
		for _, id := range ids {
			if got[id] < times {
				missing = append(missing, id)
			}
		}
		if len(missing) > 5 {
			missing = append(missing[:5], fmt.Sprintf("... (%d missing)", len(missing)))
		}
		return len(missing) == 0, "missing " + strings.Join(missing, ",")
	})
}

func ids(evs []event.Event) []string {
	var out []string
	for _, e := range evs {
		out = append(out, e.ID)
	}
	return out
}

func events(from, n int) []event.Event {
	var out []event.Event
	for i := from; i < from+n; i++ {
		out = append(out, testEvent(i))
	}
	return out
}

var errFake = errors.New("fake: memcached server 2 did not finish")
