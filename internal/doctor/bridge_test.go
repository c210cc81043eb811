package doctor

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// withPassword is the test broker's URL with another password.
func withPassword(pw string) string {
	u := testutil.AMQPURL()
	scheme, rest, _ := strings.Cut(u, "://")
	at := strings.LastIndex(rest, "@")
	user := "guest"
	if at >= 0 {
		user, _, _ = strings.Cut(rest[:at], ":")
	}
	return scheme + "://" + user + ":" + pw + "@" + rest[at+1:]
}

func TestBridge(t *testing.T) {
	natsURL := startNATS(t)
	createStream(t, natsURL, false)
	for _, tc := range []struct {
		name string
		// setup prepares RabbitMQ and returns the options to check.
		setup    func(t *testing.T, r *rabbit) BridgeOptions
		blocking bool
		want     []want
	}{
		{
			name: "healthy: notifications wait in the bridge's queue",
			setup: func(t *testing.T, r *rabbit) BridgeOptions {
				r.bridgeQueue(t)
				r.keystoneSent(t, 3)
				return r.options(natsURL, "bridge", "bridge-pw")
			},
			want: []want{
				{"rabbitmq.connect", LevelOK, `logged in as "guest"`},
				{"rabbitmq.exchange", LevelOK, "exists"},
				{"rabbitmq.queue", LevelOK, "3 notification(s) waiting, none consumed"},
				{"rabbitmq.notifier-queue", LevelWarn, "3 message(s) and no consumer"},
				{"nats.stream", LevelOK, "1 event(s)"},
				{"nats.permissions", LevelOK, "allowed: look up the stream, create the stream, update the stream, publish to keystone.>"},
				{"clock", LevelOK, "the NATS server's clock and this host's agree"},
			},
		},
		{
			name: "wrong RabbitMQ password",
			setup: func(t *testing.T, r *rabbit) BridgeOptions {
				o := r.options(natsURL, "bridge", "bridge-pw")
				o.AMQPURLs = []string{withPassword("not-the-password")}
				return o
			},
			blocking: true,
			want: []want{
				{"rabbitmq.connect", LevelFail, "RabbitMQ refused the login"},
				{"rabbitmq.connect", LevelFail, "rabbitmqctl authenticate_user"},
			},
		},
		{
			name: "no exchange: Keystone never sent a notification there",
			setup: func(t *testing.T, r *rabbit) BridgeOptions {
				return r.options(natsURL, "bridge", "bridge-pw")
			},
			blocking: true,
			want: []want{
				{"rabbitmq.exchange", LevelFail, "does not exist"},
				{"rabbitmq.exchange", LevelFail, "[DEFAULT] control_exchange"},
				{"rabbitmq.queue", LevelInfo, "does not exist yet"},
			},
		},
		{
			name: "bound but nothing arrived",
			setup: func(t *testing.T, r *rabbit) BridgeOptions {
				r.bridgeQueue(t)
				return r.options(natsURL, "bridge", "bridge-pw")
			},
			want: []want{{"rabbitmq.queue", LevelWarn, "empty and not consumed"}},
		},
		{
			name: "a broker that closes plain AMQP connections, next to one that works",
			setup: func(t *testing.T, r *rabbit) BridgeOptions {
				r.bridgeQueue(t)
				o := r.options(natsURL, "bridge", "bridge-pw")
				o.AMQPURLs = append(o.AMQPURLs, "amqp://guest:guest@"+closingListener(t)+"/")
				return o
			},
			want: []want{
				{"rabbitmq.connect", LevelWarn, "the broker closed the connection during the AMQP handshake"},
				{"rabbitmq.connect", LevelWarn, "use amqps://"},
			},
		},
		{
			name: "NATS user without the bridge's permissions",
			setup: func(t *testing.T, r *rabbit) BridgeOptions {
				r.bridgeQueue(t)
				r.keystoneSent(t, 1)
				return r.options(natsURL, "ro", "ro-pw")
			},
			blocking: true,
			want: []want{
				{"nats.permissions", LevelFail, "denied: create the stream, update the stream, publish to keystone.>"},
				{"nats.permissions", LevelFail, "allow publish to $JS.API.STREAM.CREATE.KEYSTONE, $JS.API.STREAM.UPDATE.KEYSTONE, keystone.>"},
			},
		},
		{
			name: "wrong NATS password",
			setup: func(t *testing.T, r *rabbit) BridgeOptions {
				r.bridgeQueue(t)
				r.keystoneSent(t, 1)
				return r.options(natsURL, "bridge", "wrong")
			},
			blocking: true,
			want:     []want{{"nats.connect", LevelFail, "check --nats-creds-file"}},
		},
		{
			name: "embedded NATS",
			setup: func(t *testing.T, r *rabbit) BridgeOptions {
				r.bridgeQueue(t)
				r.keystoneSent(t, 1)
				o := r.options("", "", "")
				o.DataDir = t.TempDir() + "/js"
				return o
			},
			want: []want{{"nats.embedded", LevelOK, "runs an embedded NATS server"}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRabbit(t)
			o := tc.setup(t, r)
			msgs, _, _ := streamState(t, natsURL)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			rep := Bridge(ctx, o)
			var text strings.Builder
			_ = rep.WriteText(&text)
			t.Log("\n" + text.String())
			for _, w := range tc.want {
				w.in(t, rep)
			}
			if (rep.Blocking > 0) != tc.blocking {
				var b strings.Builder
				_ = rep.WriteText(&b)
				t.Errorf("blocking %d, want blocking %v:\n%s", rep.Blocking, tc.blocking, b.String())
			}
			if after, consumers, _ := streamState(t, natsURL); after != msgs || len(consumers) != 0 {
				t.Errorf("the checks changed the stream: %d messages (was %d), consumers %v", after, msgs, consumers)
			}
		})
	}
}

// options are the bridge's options for this broker's names and a NATS user.
func (r *rabbit) options(natsURL, user, pw string) BridgeOptions {
	return BridgeOptions{
		AMQPURLs: []string{testutil.AMQPURL()}, Exchange: r.exchange, RoutingKeys: []string{r.topic + ".info"},
		Queue: r.queue, QueueMessageTTL: 6 * time.Minute,
		NATS:   natsconn.Options{URL: natsURL, User: user, Password: pw},
		Stream: "KEYSTONE", SubjectPrefix: "keystone", Timeout: 15 * time.Second,
	}
}
