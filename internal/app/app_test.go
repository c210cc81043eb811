package app

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/keystone-fanout/keystone-fanout/bridge"
	"github.com/keystone-fanout/keystone-fanout/internal/confirm"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/tcpproxy"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
	"github.com/keystone-fanout/keystone-fanout/regionagent"
)

func httpGet(url string) (int, string) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestAllInOneRemovesARevokedUsersEntries runs the whole daemon in-process:
// embedded NATS on a random port, the bridge on a real RabbitMQ, an agent on
// real memcached servers holding entries written by keystonemiddleware's own
// code, HTTP on port 0 and a registry of its own. A user update published as
// Keystone publishes it removes that user's entries and nothing else, and the
// daemon stops cleanly when its context ends.
func TestAllInOneRemovesARevokedUsersEntries(t *testing.T) {
	servers := memcachetest.Start(t, 2)
	cache := kmwtest.Start(t, memcachetest.Addrs(servers), kmwtest.None, "", 0)
	gen := kmwtest.NewGen(1)
	revoked, other := gen.ID(), gen.ID()
	project := gen.ID()
	var revokedTokens, otherTokens []string
	var entries []kmwtest.Entry
	for i := 0; i < 5; i++ {
		for _, u := range []string{revoked, other} {
			e := gen.Entry(kmwtest.Spec{UserID: u, UserDomainID: "default", ProjectID: project, ProjectDomainID: "default",
				Roles: []kmwtest.Role{{ID: "r1", Name: "member"}}})
			entries = append(entries, e)
			if u == revoked {
				revokedTokens = append(revokedTokens, e.TokenID)
			} else {
				otherTokens = append(otherTokens, e.TokenID)
			}
		}
	}
	for _, w := range cache.Write(entries) {
		if !w.Stored {
			t.Fatalf("the middleware did not store %s", w.TokenID)
		}
	}

	s := testutil.NameSuffix()
	exchange, queue := "app-test-x-"+s, "app-test-q-"+s
	reg := prometheus.NewRegistry()
	addr, natsURL := make(chan string, 1), make(chan string, 1)
	o := AllInOneOptions{
		Bridge: BridgeOptions{
			Bridge:   bridge.Options{AMQPURLs: []string{testutil.AMQPURL()}, Exchange: exchange, Queue: queue, QueueType: bridge.QueueClassic},
			Embedded: natsserver.Options{Listen: "127.0.0.1:-1", DataDir: t.TempDir()},
			HTTPAddr: "127.0.0.1:0", Registry: reg, OnListen: func(a string) { addr <- a }, OnNATS: func(u string) { natsURL <- u },
			ShutdownTimeout: 20 * time.Second,
		},
		Agent: AgentOptions{
			Agent:        regionagent.Options{Region: "regionTwo", SecondPassDelay: 200 * time.Millisecond},
			Memcache:     memcache.Options{Servers: memcachetest.List(servers)},
			Invalidation: tokencache.Options{Strategy: tokencache.Targeted},
		},
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- RunAllInOne(ctx, o, testutil.Logger(t)) }()
	t.Cleanup(func() {
		cancel()
		deleteAMQP(t, exchange, queue)
	})
	var natsOptions natsconn.Options
	select {
	case u := <-natsURL:
		natsOptions.URL = u
	case err := <-done:
		t.Fatalf("daemon exited before starting NATS: %v", err)
	}
	var base string
	select {
	case a := <-addr:
		base = "http://" + a
	case err := <-done:
		t.Fatalf("daemon exited before listening: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("daemon did not listen within 20s")
	}
	testutil.Eventually(t, 30*time.Second, "/readyz to answer 200", func() (bool, string) {
		code, body := httpGet(base + "/readyz")
		return code == 200, fmt.Sprintf("%d %s", code, body)
	})

	publishKeystone(t, exchange, "identity.user.updated", revoked)

	testutil.Eventually(t, 30*time.Second, "every entry of the revoked user gone", func() (bool, string) {
		left := cache.Read(revokedTokens)
		return len(left) == 0, fmt.Sprintf("%d of %d still cached", len(left), len(revokedTokens))
	})
	if kept := cache.Read(otherTokens); len(kept) != len(otherTokens) {
		t.Fatalf("entries of another user: %d of %d kept, want all", len(kept), len(otherTokens))
	}
	// The region's receipt reaches the bridge's confirmations: the event is
	// effective in every region (regionTwo, found from its consumer).
	testutil.Eventually(t, 30*time.Second, "the event confirmed everywhere", func() (bool, string) {
		n := testutil.Metric(reg, confirm.MetricsPrefix+"everywhere_seconds")
		r := testutil.Metric(reg, confirm.MetricsPrefix+"region_seconds", "region", "regionTwo")
		e := testutil.Metric(reg, confirm.MetricsPrefix+"expected_regions")
		return n == 1 && r == 1 && e == 1, fmt.Sprintf("everywhere %v, regionTwo %v, expected regions %v", n, r, e)
	})
	// The receipt says what each memcached server lost.
	rc := lastReceipt(t, natsOptions.URL, "regionTwo")
	sum := 0
	for _, s := range rc.Servers {
		sum += s.Removed
	}
	if len(rc.Servers) != 2 || sum != rc.Removed || rc.Removed != len(revokedTokens) {
		t.Errorf("receipt: removed %d over servers %+v; want %d over both servers", rc.Removed, rc.Servers, len(revokedTokens))
	}
	_, metrics := httpGet(base + "/metrics")
	for _, want := range []string{"keystone_fanout_bridge_published_total 1", "go_goroutines", "process_resident_memory_bytes"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics has no %q", want)
		}
	}
	if code, _ := httpGet(base + "/healthz"); code != 200 {
		t.Errorf("/healthz = %d, want 200", code)
	}

	// An operator's sweep (a change Keystone announces nowhere) removes every
	// token entry, and only token entries.
	var out strings.Builder
	if err := RunSweep(ctx, SweepOptions{NATS: natsOptions, Reason: "identity provider deleted"}, &out, testutil.Logger(t)); err != nil {
		t.Fatalf("sweep: %v", err)
	}
	testutil.Eventually(t, 30*time.Second, "every entry gone after the sweep", func() (bool, string) {
		left := cache.Read(otherTokens)
		return len(left) == 0, fmt.Sprintf("%d of %d still cached (%s)", len(left), len(otherTokens), out.String())
	})

	// The status command sees the stream and the region, caught up.
	testutil.Eventually(t, 10*time.Second, "status to show regionTwo caught up", func() (bool, string) {
		var buf strings.Builder
		if err := RunStatus(ctx, StatusOptions{NATS: natsOptions, JSON: true}, &buf, testutil.Logger(t)); err != nil {
			return false, err.Error()
		}
		var st Status
		if err := json.Unmarshal([]byte(buf.String()), &st); err != nil {
			return false, err.Error()
		}
		ok := st.Stream == stream.DefaultName && len(st.Consumers) == 1 && st.Consumers[0].Name == "regionTwo" &&
			st.Consumers[0].Pending == 0 && st.Consumers[0].AckPending == 0 && !st.Consumers[0].Gap && st.Messages >= 2
		return ok, buf.String()
	})

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("stop returned %v, want nil", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("daemon did not stop within 30s of its context ending")
	}
}

// lastReceipt reads region's last receipt from the receipts stream.
func lastReceipt(t testing.TB, natsURL, region string) stream.Receipt {
	t.Helper()
	nc, err := nats.Connect(natsURL)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, stream.ReceiptsStream)
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetLastMsgForSubject(ctx, stream.ReceiptSubject(region))
	if err != nil {
		t.Fatalf("%s's last receipt: %v", region, err)
	}
	r, err := stream.UnmarshalReceipt(m.Data)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// publishKeystone publishes a basic-format notification as Keystone does,
// with the routing key notifications.info.
func publishKeystone(t testing.TB, exchange, eventType, id string) {
	t.Helper()
	publishKeystoneTo(t, exchange, "notifications.info", eventType, id)
}

// publishKeystoneTo publishes a basic-format notification as Keystone does
// and returns its message_id.
func publishKeystoneTo(t testing.TB, exchange, routingKey, eventType, id string) string {
	t.Helper()
	msgID := "m-" + testutil.NameSuffix()
	inner, _ := json.Marshal(map[string]any{
		"message_id": msgID, "publisher_id": "identity.test", "event_type": eventType,
		"priority": "INFO", "payload": map[string]any{"resource_info": id},
		"timestamp": time.Now().UTC().Format("2006-01-02 15:04:05.000000"),
	})
	body, _ := json.Marshal(map[string]string{"oslo.version": "2.0", "oslo.message": string(inner)})
	conn, err := amqp.Dial(testutil.AMQPURL())
	if err != nil {
		t.Fatalf("RabbitMQ at %s: %v", testutil.AMQPURL(), err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	err = ch.PublishWithContext(context.Background(), exchange, routingKey, false, false, amqp.Publishing{
		ContentType: "application/json", ContentEncoding: "utf-8", DeliveryMode: 2, Body: body,
	})
	if err != nil {
		t.Fatal(err)
	}
	return msgID
}

func deleteAMQP(t testing.TB, exchange, queue string) {
	conn, err := amqp.Dial(testutil.AMQPURL())
	if err != nil {
		t.Logf("cleaning up: %v", err)
		return
	}
	defer conn.Close()
	if ch, err := conn.Channel(); err == nil {
		_, _ = ch.QueueDelete(queue, false, false, false)
		_ = ch.ExchangeDelete(exchange, false, false)
	}
}

// TestEmbeddedNATSStoppedWhenAComponentFails: a component that cannot be
// built after the embedded NATS server started (here the bridge, whose
// metrics are already registered) stops the server: its port is closed and
// its data directory can serve a new server.
func TestEmbeddedNATSStoppedWhenAComponentFails(t *testing.T) {
	tests := []struct {
		name string
		run  func(BridgeOptions) error
	}{
		{"bridge", func(o BridgeOptions) error { return RunBridge(context.Background(), o, testutil.Logger(t)) }},
		{"all-in-one", func(o BridgeOptions) error {
			return RunAllInOne(context.Background(), AllInOneOptions{Bridge: o, Agent: AgentOptions{
				Agent: regionagent.Options{Region: "r"}, Memcache: memcache.Options{Servers: memcachetest.List(memcachetest.Start(t, 1))}}},
				testutil.Logger(t))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			reg.MustRegister(prometheus.NewCounter(prometheus.CounterOpts{Name: bridge.MetricsPrefix + "received_total"}))
			dir := t.TempDir()
			var url string
			err := tt.run(BridgeOptions{Bridge: bridge.Options{AMQPURLs: []string{testutil.AMQPURL()}},
				Embedded: natsserver.Options{Listen: "127.0.0.1:-1", DataDir: dir}, Registry: reg,
				OnNATS: func(u string) { url = u }})
			if err == nil || !strings.Contains(err.Error(), "metrics") {
				t.Fatalf("run = %v, want the bridge's metrics error", err)
			}
			if url == "" {
				t.Fatal("the embedded NATS server never started")
			}
			if nc, err := nats.Connect(url, nats.NoReconnect()); err == nil {
				nc.Close()
				t.Fatalf("the embedded NATS server at %s still answers", url)
			}
			srv, err := natsserver.Start(natsserver.Options{Listen: "127.0.0.1:-1", DataDir: dir})
			if err != nil {
				t.Fatalf("a new server on the same data directory: %v", err)
			}
			srv.Shutdown()
		})
	}
}

// TestValidationNamesTheFlagBeforeConnecting gives every component a live
// address (a listener that counts connections) next to one bad option: the
// error must name the flag, and nothing may have connected.
func TestValidationNamesTheFlagBeforeConnecting(t *testing.T) {
	live, accepted := testutil.CountingListener(t)
	natsURL := natsconn.Options{URL: "nats://" + live}
	tests := []struct {
		name string
		run  func() error
		want []string
	}{
		{"bridge without a data dir for the embedded server", func() error {
			return RunBridge(context.Background(), BridgeOptions{Bridge: bridge.Options{AMQPURLs: []string{"amqp://" + live + "/"}}}, testutil.Logger(t))
		}, []string{"--data-dir"}},
		{"bridge with a bad AMQP scheme", func() error {
			return RunBridge(context.Background(), BridgeOptions{Bridge: bridge.Options{AMQPURLs: []string{"http://" + live + "/"}},
				NATS: natsURL}, testutil.Logger(t))
		}, []string{"--amqp-url"}},
		{"agent without region or memcached", func() error {
			return RunAgent(context.Background(), AgentOptions{NATS: natsURL}, testutil.Logger(t))
		}, []string{"--region", "--memcached"}},
		{"agent with an unknown strategy", func() error {
			return RunAgent(context.Background(), AgentOptions{Agent: regionagent.Options{Region: "r"}, Memcache: memcache.Options{Servers: live},
				Invalidation: tokencache.Options{Strategy: "purge"}, NATS: natsURL}, testutil.Logger(t))
		}, []string{"--strategy"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.run()
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %s", err, w)
				}
			}
			if n := accepted.Load(); n != 0 {
				t.Errorf("%d connection(s) were made before the bad option was reported", n)
			}
		})
	}
}

// TestAgentOutlivesNATSOutageAtStart starts an agent while its NATS server
// refuses every connection (a proxy in front of a real server). The agent must
// not exit: /healthz answers, /readyz says NATS is why it is not ready, and once
// NATS answers the agent binds its consumer and becomes ready. A stop during
// the first connect is clean (nil).
func TestAgentOutlivesNATSOutageAtStart(t *testing.T) {
	srv := testutil.StartNATS(t)
	servers := memcachetest.Start(t, 1)
	// The stream the bridge would have made.
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Ensure(t.Context(), js, stream.Default()); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		comeBack bool // NATS starts answering while the agent runs
	}{
		{name: "NATS comes back", comeBack: true},
		{name: "stopped while connecting"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			proxy, err := tcpproxy.Start(strings.TrimPrefix(srv.ClientURL(), "nats://"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { proxy.Close() })
			proxy.Refuse(true)

			addr := make(chan string, 1)
			o := AgentOptions{
				Agent:           regionagent.Options{Region: "outage" + testutil.NameSuffix()},
				Memcache:        memcache.Options{Servers: memcachetest.List(servers)},
				Invalidation:    tokencache.Options{Strategy: tokencache.Targeted},
				NATS:            natsconn.Options{URL: "nats://" + proxy.Addr()},
				HTTPAddr:        "127.0.0.1:0",
				ShutdownTimeout: 20 * time.Second,
				Registry:        prometheus.NewRegistry(),
				OnListen:        func(a string) { addr <- a },
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- RunAgent(ctx, o, testutil.Logger(t)) }()
			var base string
			select {
			case a := <-addr:
				base = "http://" + a
			case err := <-done:
				t.Fatalf("agent exited while NATS was unreachable: %v", err)
			case <-time.After(20 * time.Second):
				t.Fatal("agent did not serve HTTP within 20s while NATS was unreachable")
			}
			// Longer than the old bounded first connect (10 s) would be slow;
			// what matters is that the agent is still there and says why.
			testutil.Eventually(t, 10*time.Second, "/readyz to blame NATS", func() (bool, string) {
				code, body := httpGet(base + "/readyz")
				return code == http.StatusServiceUnavailable && strings.Contains(body, "NATS at nats://"+proxy.Addr()), fmt.Sprintf("%d %s", code, body)
			})
			if code, body := httpGet(base + "/healthz"); code != 200 {
				t.Fatalf("/healthz = %d %s while NATS is unreachable, want 200", code, body)
			}
			select {
			case err := <-done:
				t.Fatalf("agent exited while NATS was unreachable: %v", err)
			default:
			}
			if tt.comeBack {
				proxy.Refuse(false)
				testutil.Eventually(t, 30*time.Second, "/readyz to answer 200 once NATS answers", func() (bool, string) {
					code, body := httpGet(base + "/readyz")
					return code == 200, fmt.Sprintf("%d %s", code, body)
				})
			}
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("stop returned %v, want nil", err)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("agent did not stop within 20s")
			}
		})
	}
}
