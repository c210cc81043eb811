package doctor

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// find returns the findings of check (and target, when not empty).
func find(r *Report, check, target string) []Finding {
	var out []Finding
	for _, f := range r.Findings {
		if f.Check == check && (target == "" || strings.Contains(f.Target, target)) {
			out = append(out, f)
		}
	}
	return out
}

// want is one finding a case expects: its check, level and words of its
// text (summary, detail and fix together).
type want struct {
	check string
	level Level
	text  string
}

func (w want) in(t *testing.T, r *Report) {
	t.Helper()
	fs := find(r, w.check, "")
	for _, f := range fs {
		all := f.Summary + " " + f.Detail + " " + f.Fix
		if f.Level == w.level && strings.Contains(all, w.text) {
			return
		}
	}
	var b strings.Builder
	_ = r.WriteText(&b)
	t.Errorf("no %s finding at %s with %q; report:\n%s", w.check, w.level, w.text, b.String())
}

// rabbit declares what Keystone and a bridge would have declared on the
// test RabbitMQ, under names of the test's own, and removes them at the end.
type rabbit struct {
	exchange, queue, topic string
}

func newRabbit(t *testing.T) *rabbit {
	s := testutil.NameSuffix()
	r := &rabbit{exchange: "doctor-x-" + s, queue: "doctor-q-" + s, topic: "doctor-n-" + s}
	t.Cleanup(func() {
		r.do(t, func(ch *amqp.Channel) error {
			_, _ = ch.QueueDelete(r.queue, false, false, false)
			_, _ = ch.QueueDelete(r.topic+".info", false, false, false)
			return ch.ExchangeDelete(r.exchange, false, false)
		})
	})
	return r
}

func (r *rabbit) do(t *testing.T, fn func(*amqp.Channel) error) {
	t.Helper()
	conn, err := amqp.Dial(testutil.AMQPURL())
	if err != nil {
		t.Fatalf("RabbitMQ at %s: %v", testutil.AMQPURL(), err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := fn(ch); err != nil {
		t.Fatal(err)
	}
}

// keystoneSent declares Keystone's exchange and the notifier's own queue as
// oslo.messaging does, and publishes n notifications.
func (r *rabbit) keystoneSent(t *testing.T, n int) {
	r.do(t, func(ch *amqp.Channel) error {
		if err := ch.ExchangeDeclare(r.exchange, amqp.ExchangeTopic, false, false, false, false, nil); err != nil {
			return err
		}
		if _, err := ch.QueueDeclare(r.topic+".info", false, false, false, false, nil); err != nil {
			return err
		}
		if err := ch.QueueBind(r.topic+".info", r.topic+".info", r.exchange, false, nil); err != nil {
			return err
		}
		for range n {
			if err := ch.PublishWithContext(context.Background(), r.exchange, r.topic+".info", false, false,
				amqp.Publishing{ContentType: "application/json", Body: []byte(`{"oslo.version":"2.0","oslo.message":"{}"}`)}); err != nil {
				return err
			}
		}
		return nil
	})
}

// bridgeQueue declares the bridge's queue as the bridge does, bound with the
// notifier's routing key.
func (r *rabbit) bridgeQueue(t *testing.T) {
	r.do(t, func(ch *amqp.Channel) error {
		if err := ch.ExchangeDeclare(r.exchange, amqp.ExchangeTopic, false, false, false, false, nil); err != nil {
			return err
		}
		if _, err := ch.QueueDeclare(r.queue, true, false, false, false, amqp.Table{"x-message-ttl": int64(360000)}); err != nil {
			return err
		}
		return ch.QueueBind(r.queue, r.topic+".info", r.exchange, false, nil)
	})
}

// closingListener is an address that accepts connections and closes them at
// once, as a TLS-only broker does to a plain AMQP handshake.
func closingListener(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln.Addr().String()
}

// startNATS runs a NATS server with JetStream and users: "admin" may do
// anything; "ro" may only read stream and consumer information; "bridge" and
// "agent" have the permissions those components need.
func startNATS(t *testing.T) string {
	t.Helper()
	allow := func(pub ...string) *server.Permissions {
		return &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: pub},
			Subscribe: &server.SubjectPermission{Allow: []string{"_INBOX.>"}},
		}
	}
	o := &server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true,
		Users: []*server.User{
			{Username: "admin", Password: "admin-pw"},
			{Username: "ro", Password: "ro-pw", Permissions: allow("$JS.API.INFO", "$JS.API.STREAM.INFO.>", "$JS.API.CONSUMER.INFO.>")},
			{Username: "bridge", Password: "bridge-pw", Permissions: allow("$JS.API.INFO", "$JS.API.STREAM.INFO.KEYSTONE",
				"$JS.API.STREAM.CREATE.KEYSTONE", "$JS.API.STREAM.UPDATE.KEYSTONE", "keystone.>")},
			{Username: "agent", Password: "agent-pw", Permissions: allow("$JS.API.INFO", "$JS.API.STREAM.INFO.>",
				"$JS.API.CONSUMER.INFO.KEYSTONE.*", "$JS.API.CONSUMER.CREATE.KEYSTONE.*", "$JS.API.CONSUMER.MSG.NEXT.KEYSTONE.*",
				"$JS.ACK.KEYSTONE.>", "$JS.API.STREAM.CREATE.KV_keystone-fanout-agents", "$JS.API.DIRECT.GET.KV_keystone-fanout-agents.>",
				"$JS.API.STREAM.MSG.GET.KV_keystone-fanout-agents", "$KV.keystone-fanout-agents.>")},
		}}
	s, err := server.NewServer(o)
	if err != nil {
		t.Fatal(err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("NATS server did not start")
	}
	t.Cleanup(s.Shutdown)
	return s.ClientURL()
}

// createStream creates the events' stream (and, with bucket, the agents'
// checkpoint bucket) as the admin.
func createStream(t *testing.T, url string, bucket bool) {
	t.Helper()
	nc, err := nats.Connect(url, nats.UserInfo("admin", "admin-pw"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "KEYSTONE", Subjects: []string{"keystone.>"}, Storage: jetstream.FileStorage, MaxAge: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "keystone.identity.user.updated", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	_ = s
	if bucket {
		if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "keystone-fanout-agents"}); err != nil {
			t.Fatal(err)
		}
	}
}

// streamState is the stream's message count and consumers, to prove the
// checks changed nothing.
func streamState(t *testing.T, url string) (msgs uint64, consumers []string, kv uint64) {
	t.Helper()
	nc, err := nats.Connect(url, nats.UserInfo("admin", "admin-pw"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, "KEYSTONE")
	if err != nil {
		return 0, nil, 0
	}
	msgs = s.CachedInfo().State.Msgs
	for name := range s.ListConsumers(ctx).Info() {
		consumers = append(consumers, name.Name)
	}
	if k, err := js.Stream(ctx, "KV_keystone-fanout-agents"); err == nil {
		kv = k.CachedInfo().State.Msgs
	}
	return msgs, consumers, kv
}
