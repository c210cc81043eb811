package bridge

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

func newUUID() string {
	b := make([]byte, 16)
	rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// rig is one test's RabbitMQ objects (a uniquely named exchange declared as
// Keystone does, and queue names) and its JetStream stream.
type rig struct {
	t        testing.TB
	suffix   string
	exchange string
	queue    string
	conn     *amqp.Connection
	pub      *amqp.Channel // confirm mode
	pubMu    sync.Mutex
	stream   stream.Config
	queues   []string // deleted at cleanup
	exchs    []string // deleted at cleanup
}

func newRig(t testing.TB) *rig {
	t.Helper()
	r := &rig{t: t, suffix: testutil.NameSuffix()}
	r.exchange = "ksf-test-ex-" + r.suffix
	r.queue = "ksf-test-q-" + r.suffix
	r.stream = stream.Config{Name: "KSTEST_" + r.suffix, SubjectPrefix: "kstest" + r.suffix}
	conn, err := amqp.DialConfig(testutil.AMQPURL(), amqp.Config{Properties: amqp.Table{"connection_name": "bridge-test-" + r.suffix}})
	if err != nil {
		t.Fatalf("RabbitMQ at %s is required for this test: %v", testutil.AMQPURL(), err)
	}
	r.conn = conn
	r.pub, err = conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := r.pub.Confirm(false); err != nil {
		t.Fatal(err)
	}
	// Declared as oslo.messaging does.
	if err := r.pub.ExchangeDeclare(r.exchange, "topic", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	r.exchs = append(r.exchs, r.exchange)
	r.queues = append(r.queues, r.queue)
	t.Cleanup(r.cleanup)
	return r
}

func (r *rig) cleanup() {
	ch, err := r.conn.Channel()
	if err == nil {
		for _, q := range r.queues {
			if _, err := ch.QueueDelete(q, false, false, false); err != nil {
				ch, _ = r.conn.Channel()
			}
		}
		for _, e := range r.exchs {
			if err := ch.ExchangeDelete(e, false, false); err != nil {
				ch, _ = r.conn.Channel()
			}
		}
	}
	r.conn.Close()
}

// channel opens a plain channel for the test's own checks.
func (r *rig) channel() *amqp.Channel {
	r.t.Helper()
	ch, err := r.conn.Channel()
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(func() { ch.Close() })
	return ch
}

// options are bridge options for this rig's exchange, queue and stream,
// with quick reconnects.
func (r *rig) options() Options {
	return Options{
		AMQPURLs:          []string{testutil.AMQPURL()},
		Exchange:          r.exchange,
		Queue:             r.queue,
		Stream:            r.stream,
		ConnectTimeout:    5 * time.Second,
		ReconnectMin:      20 * time.Millisecond,
		ReconnectMax:      500 * time.Millisecond,
		StreamCheckPeriod: 500 * time.Millisecond,
		ConnectionName:    "bridge-test-" + r.suffix,
	}
}

// message is a body with the AMQP properties it is published with.
type message struct {
	body       []byte
	routingKey string
	props      amqp.Publishing
}

// keystoneMessage is body as oslo.messaging publishes it.
func keystoneMessage(body []byte) message {
	return message{body: body, routingKey: DefaultRoutingKey, props: amqp.Publishing{
		ContentType: "application/json", ContentEncoding: "utf-8", DeliveryMode: amqp.Persistent}}
}

// publish sends the messages to the rig's exchange and waits for the
// broker's confirms.
func (r *rig) publish(msgs ...message) {
	r.t.Helper()
	r.pubMu.Lock()
	defer r.pubMu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const batch = 500
	for start := 0; start < len(msgs); start += batch {
		var confirms []*amqp.DeferredConfirmation
		for _, m := range msgs[start:min(start+batch, len(msgs))] {
			p := m.props
			p.Body = m.body
			c, err := r.pub.PublishWithDeferredConfirmWithContext(ctx, r.exchange, m.routingKey, false, false, p)
			if err != nil {
				r.t.Errorf("publishing to RabbitMQ: %v", err)
				return
			}
			confirms = append(confirms, c)
		}
		for _, c := range confirms {
			ok, err := c.WaitContext(ctx)
			if err != nil || !ok {
				r.t.Errorf("RabbitMQ did not confirm a publish: ok=%v err=%v", ok, err)
				return
			}
		}
	}
}

// queueDepth is the number of ready messages in queue, and its consumers.
func (r *rig) queueDepth(queue string) (messages, consumers int) {
	r.t.Helper()
	ch, err := r.conn.Channel()
	if err != nil {
		r.t.Fatal(err)
	}
	defer ch.Close()
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	if err != nil {
		return -1, -1
	}
	return q.Messages, q.Consumers
}

// notification builds a messagingv2 body for a token-affecting event.
func notification(id, eventType, resourceID string) []byte {
	inner := map[string]any{
		"message_id":   id,
		"publisher_id": "identity.test",
		"event_type":   eventType,
		"priority":     "INFO",
		"payload":      map[string]any{"resource_info": resourceID},
		"timestamp":    time.Now().UTC().Format("2006-01-02 15:04:05.000000"),
		"_unique_id":   strings.ReplaceAll(newUUID(), "-", ""),
	}
	b, _ := json.Marshal(inner)
	out, _ := json.Marshal(map[string]string{"oslo.version": "2.0", "oslo.message": string(b)})
	return out
}

// notifications makes n user.updated notifications with fresh ids.
func notifications(n int) (msgs []message, ids []string) {
	for range n {
		id := newUUID()
		ids = append(ids, id)
		msgs = append(msgs, keystoneMessage(notification(id, "identity.user.updated", strings.ReplaceAll(newUUID(), "-", ""))))
	}
	return msgs, ids
}

// natsEnv is an embedded NATS server and two connections to it: one for the
// bridge, one for the test's checks.
type natsEnv struct {
	srv    *natsserver.Server
	nc     *nats.Conn // the bridge's
	check  *nats.Conn
	checkJ jetstream.JetStream
}

func startNATS(t testing.TB) *natsEnv {
	t.Helper()
	srv := testutil.StartNATS(t)
	return connectNATS(t, srv)
}

func connectNATS(t testing.TB, srv *natsserver.Server) *natsEnv {
	t.Helper()
	e := &natsEnv{srv: srv}
	var err error
	e.nc, err = natsconn.Connect(context.Background(), natsconn.Options{URL: srv.ClientURL()}, "bridge-test", testutil.Logger(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.nc.Close)
	e.check, err = nats.Connect(srv.ClientURL(), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.check.Close)
	e.checkJ, err = jetstream.New(e.check)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// streamCount is the number of messages in the stream, -1 when unknown.
func (e *natsEnv) streamCount(name string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s, err := e.checkJ.Stream(ctx, name)
	if err != nil {
		return -1
	}
	return int(s.CachedInfo().State.Msgs)
}

// streamMsg is one message of the stream.
type streamMsg struct {
	subject string
	msgID   string
	ev      event.Event
}

// readStream returns every message of the stream, in order.
func (e *natsEnv) readStream(t testing.TB, name string) []streamMsg {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s, err := e.checkJ.Stream(ctx, name)
	if err != nil {
		t.Fatalf("stream %s: %v", name, err)
	}
	total := int(s.CachedInfo().State.Msgs)
	if total == 0 {
		return nil
	}
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	var out []streamMsg
	for len(out) < total {
		batch, err := cons.Fetch(min(total-len(out), 1000), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for m := range batch.Messages() {
			n++
			ev, err := event.Unmarshal(m.Data())
			if err != nil {
				t.Fatalf("stream message %s: %v", m.Subject(), err)
			}
			out = append(out, streamMsg{subject: m.Subject(), msgID: m.Headers().Get(jetstream.MsgIDHeader), ev: ev})
		}
		if err := batch.Error(); err != nil && !errors.Is(err, jetstream.ErrNoMessages) {
			t.Fatalf("reading stream %s: %v", name, err)
		}
		if n == 0 {
			t.Fatalf("reading stream %s: got %d of %d messages, then nothing", name, len(out), total)
		}
	}
	return out
}

// running is a Bridge started by startBridge.
type running struct {
	b    *Bridge
	reg  *prometheus.Registry
	stop func() // cancels Run and checks that it returned nil in time
}

// startBridge runs a Bridge and waits until it is ready.
func startBridge(t testing.TB, o Options, nc *nats.Conn) *running {
	t.Helper()
	reg := prometheus.NewRegistry()
	b, err := New(o, nc, reg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			timeout := b.o.ShutdownTimeout + b.o.PubAckTimeout + 10*time.Second
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run returned %v, want nil after cancel", err)
				}
			case <-time.After(timeout):
				t.Errorf("Run did not return within %s of cancel", timeout)
			}
		})
	}
	t.Cleanup(stop)
	testutil.Eventually(t, 20*time.Second, "the bridge to be ready", func() (bool, string) {
		err := b.Ready()
		return err == nil, fmt.Sprint(err)
	})
	return &running{b: b, reg: reg, stop: stop}
}

// sum adds up every series of a metric (a vector's children); a histogram
// adds its sample count.
func sum(c prometheus.Collector) float64 {
	ch := make(chan prometheus.Metric, 64)
	go func() { c.Collect(ch); close(ch) }()
	var total float64
	for m := range ch {
		var pb dto.Metric
		if err := m.Write(&pb); err != nil {
			panic(err)
		}
		switch {
		case pb.Counter != nil:
			total += pb.Counter.GetValue()
		case pb.Gauge != nil:
			total += pb.Gauge.GetValue()
		case pb.Histogram != nil:
			total += float64(pb.Histogram.GetSampleCount())
		}
	}
	return total
}
