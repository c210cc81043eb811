// Package nats holds the shipped NATS server configurations (central.conf,
// leaf-region.conf) and the tests that prove them (leaf_test.go for regions
// behind leaf nodes): each keystone-fanout component works with exactly
// its permissions, and a region's credentials can neither read nor reset
// another region's consumer or checkpoint, nor publish an event.
package nats

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/app"
	"github.com/keystone-fanout/keystone-fanout/internal/confirm"
	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/revoke"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/regionagent"
)

var passwords = map[string]string{
	"bridge": "pw-bridge", "operator": "pw-operator", "regionTwo": "pw-two", "regionThree": "pw-three", "sys": "pw-sys",
}

// startCentral starts an embedded server from central.conf as shipped, on a
// free loopback port with its storage in a temporary directory.
func startCentral(t *testing.T) string {
	return startCentralServer(t).ClientURL()
}

// startCentralServer is startCentral returning the server.
func startCentralServer(t *testing.T) *server.Server {
	t.Helper()
	for user, pw := range passwords {
		t.Setenv("KSF_"+strings.ToUpper(user)+"_PASSWORD", pw)
	}
	return startConf(t, "central.conf", func(opts *server.Options) {
		opts.LeafNode.Host, opts.LeafNode.Port = "127.0.0.1", -1
	})
}

// startConf starts an embedded server from file, on a free loopback port with
// its storage in a temporary directory; adjust changes the options first.
func startConf(t *testing.T, file string, adjust func(*server.Options)) *server.Server {
	t.Helper()
	opts, err := server.ProcessConfigFile(file)
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	opts.Host, opts.Port = "127.0.0.1", -1
	opts.StoreDir = t.TempDir()
	opts.NoLog, opts.NoSigs = true, true
	if adjust != nil {
		adjust(opts)
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatalf("the server of %s did not start", file)
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	return srv
}

// natsOptions are a component's connection options as the user.
func natsOptions(url, user string) natsconn.Options {
	return natsconn.Options{URL: url, User: user, Password: passwords[user], InboxPrefix: "_INBOX_" + user, ConnectTimeout: 5 * time.Second}
}

func connect(t *testing.T, url, user string) (*natsgo.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := natsconn.Connect(context.Background(), natsOptions(url, user), "test-"+user, testLog(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

func testLog(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

// fakeKeystone answers the poller's two requests: a token, and no events.
func fakeKeystone(t *testing.T) string {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v3/auth/tokens", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Subject-Token", "tok")
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"token": {"expires_at": %q}}`, time.Now().Add(time.Hour).UTC().Format(time.RFC3339))
	})
	mux.HandleFunc("GET /v3/OS-REVOKE/events", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, `{"events": []}`)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv.URL + "/v3"
}

// countingInvalidator counts the events it is given.
type countingInvalidator struct {
	mu  sync.Mutex
	ids map[string]bool
}

func (c *countingInvalidator) Invalidate(_ context.Context, evs []event.Event) (tokencache.Result, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range evs {
		c.ids[e.ID] = true
	}
	return tokencache.Result{}, nil
}

func (c *countingInvalidator) seen(id string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ids[id]
}

// runAgent runs a region agent as user for region.
func runAgent(t *testing.T, url, user, region string) (*regionagent.Agent, *countingInvalidator, *prometheus.Registry) {
	t.Helper()
	nc, _ := connect(t, url, user)
	a, inv, reg, _ := startAgent(t, nc, regionagent.Options{Region: region, RetryMax: time.Second})
	return a, inv, reg
}

// startAgent runs a region agent with o on nc until the test ends or stop is
// called.
func startAgent(t *testing.T, nc *natsgo.Conn, o regionagent.Options) (a *regionagent.Agent, inv *countingInvalidator, reg *prometheus.Registry, stop func()) {
	t.Helper()
	inv = &countingInvalidator{ids: map[string]bool{}}
	reg = prometheus.NewRegistry()
	a, err := regionagent.New(o, nc, inv, reg, testLog(t).With("region", o.Region))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return a, inv, reg, stop
}

// TestLeastPrivilege starts the server from central.conf and runs every
// component with its own user, then checks what a region must not do.
func TestLeastPrivilege(t *testing.T) {
	url := startCentral(t)
	ctx := context.Background()

	// The bridge's user: the stream, events, the poller's lease and position.
	_, bjs := connect(t, url, "bridge")
	if err := stream.Ensure(ctx, bjs, stream.Default()); err != nil {
		t.Fatalf("the bridge ensuring the stream: %v", err)
	}
	if err := stream.EnsureReceipts(ctx, bjs, stream.Default()); err != nil {
		t.Fatalf("the bridge ensuring the receipts stream: %v", err)
	}
	pollerReg := prometheus.NewRegistry()
	p, err := revoke.New(revoke.Options{URL: fakeKeystone(t), Username: "svc", Password: "pw", Project: "service"},
		bjs, pollerReg, testLog(t).With("component", "poller"))
	if err != nil {
		t.Fatal(err)
	}
	pctx, pcancel := context.WithCancel(ctx)
	pdone := make(chan error, 1)
	go func() { pdone <- p.Run(pctx) }()
	t.Cleanup(func() { pcancel(); <-pdone })
	testutil.Eventually(t, 20*time.Second, "the bridge's poller holding its lease and polling", func() (bool, string) {
		return testutil.Metric(pollerReg, "keystone_fanout_revoke_lease_held") == 1 && p.Ready() == nil, fmt.Sprint(p.Ready())
	})
	// The bridge's confirmations: the regions' receipts, the regions from
	// the stream's consumers.
	confirmReg := prometheus.NewRegistry()
	col, err := confirm.New(confirm.Options{}, bjs, confirmReg, testLog(t).With("component", "confirmations"))
	if err != nil {
		t.Fatal(err)
	}
	cctx, ccancel := context.WithCancel(ctx)
	cdone := make(chan error, 1)
	go func() { cdone <- col.Run(cctx) }()
	t.Cleanup(func() { ccancel(); <-cdone })

	// Two regions, each with its own user.
	a2, inv2, reg2 := runAgent(t, url, "regionTwo", "regionTwo")
	a3, inv3, _ := runAgent(t, url, "regionThree", "regionThree")
	for _, a := range []*regionagent.Agent{a2, a3} {
		testutil.Eventually(t, 20*time.Second, "the agents consuming", func() (bool, string) {
			err := a.Ready()
			return err == nil, fmt.Sprint(err)
		})
	}
	testutil.Eventually(t, 10*time.Second, "regionTwo seeing the poller", func() (bool, string) {
		return testutil.Metric(reg2, "keystone_fanout_agent_revocation_poller_live") == 1, "not yet"
	})

	// An event published as the bridge publishes reaches both regions; the
	// poller follows it and publishes its proof.
	e := event.Event{Version: event.SchemaVersion, Kind: event.KindNotification, ID: "n-1", Type: "identity.user.updated",
		Time: time.Now().UTC(), UserID: "u1"}
	body, _ := e.Marshal()
	if _, err := bjs.Publish(ctx, stream.Subject("keystone", &e), body, jetstream.WithMsgID(e.ID)); err != nil {
		t.Fatalf("the bridge publishing an event: %v", err)
	}
	testutil.Eventually(t, 20*time.Second, "both regions handling the event, the poller proving its poll", func() (bool, string) {
		polled := testutil.Metric(pollerReg, "keystone_fanout_revoke_polled_published_total")
		return inv2.seen("n-1") && inv3.seen("n-1") && polled >= 1, fmt.Sprintf("regionTwo %v, regionThree %v, polled %v", inv2.seen("n-1"), inv3.seen("n-1"), polled)
	})

	// The operator: status and sweep.
	var out strings.Builder
	testutil.Eventually(t, 20*time.Second, "status as the operator", func() (bool, string) {
		out.Reset()
		err := app.RunStatus(ctx, app.StatusOptions{NATS: natsOptions(url, "operator"), JSON: true}, &out, testLog(t))
		return err == nil && strings.Contains(out.String(), "regionThree"), fmt.Sprintf("%v %s", err, out.String())
	})
	if err := app.RunSweep(ctx, app.SweepOptions{NATS: natsOptions(url, "operator"), Reason: "test"}, io.Discard, testLog(t)); err != nil {
		t.Fatalf("sweep as the operator: %v", err)
	}
	testutil.Eventually(t, 20*time.Second, "trace as the operator: both regions confirmed the event", func() (bool, string) {
		out.Reset()
		err := app.RunTrace(ctx, app.TraceOptions{NATS: natsOptions(url, "operator"), Query: "n-1"}, &out, testLog(t))
		return err == nil && strings.Contains(out.String(), "confirmed by 2 of 2 regions"), fmt.Sprintf("%v %s", err, out.String())
	})
	testutil.Eventually(t, 20*time.Second, "the bridge's confirmations: effective in both regions", func() (bool, string) {
		n := testutil.Metric(confirmReg, confirm.MetricsPrefix+"everywhere_seconds")
		e := testutil.Metric(confirmReg, confirm.MetricsPrefix+"expected_regions")
		return n >= 1 && e == 2, fmt.Sprintf("%v events effective everywhere, %v regions expected", n, e)
	})

	// What regionTwo's credentials must not do.
	nc2, js2 := connect(t, url, "regionTwo")
	short := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, 2*time.Second) }
	tests := append(forbiddenToRegionTwo(js2, short), []forbidden{
		{"publish regionThree's receipt", func() error {
			c, cancel := short()
			defer cancel()
			_, err := js2.Publish(c, stream.ReceiptSubject("regionThree"), []byte(`{"v":1,"region":"regionThree"}`))
			return err
		}},
		{"write the poller's lease", func() error {
			c, cancel := short()
			defer cancel()
			_, err := js2.Publish(c, "$KV.keystone-fanout-revoke.lease", []byte(`{}`))
			return err
		}},
	}...)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := nc2.LastError()
			err := tt.do()
			last := nc2.LastError()
			if err == nil && (last == before || !errors.Is(last, natsgo.ErrPermissionViolation)) {
				t.Fatalf("regionTwo could %s", tt.name)
			}
		})
	}

	// regionThree's consumer is untouched and still consuming.
	testutil.Eventually(t, 10*time.Second, "regionThree still consuming", func() (bool, string) {
		err := a3.Ready()
		return err == nil, fmt.Sprint(err)
	})
}

// TestMissingPermissionIsNamed: an agent started with another region's name
// (its credentials lack that consumer) is not ready, and says which permission
// it lacks.
func TestMissingPermissionIsNamed(t *testing.T) {
	url := startCentral(t)
	_, bjs := connect(t, url, "bridge")
	if err := stream.Ensure(context.Background(), bjs, stream.Default()); err != nil {
		t.Fatal(err)
	}
	a, _, _ := runAgent(t, url, "regionTwo", "regionThree")
	testutil.Eventually(t, 30*time.Second, "the agent to name the missing permission", func() (bool, string) {
		err := a.Ready()
		return err != nil && strings.Contains(strings.ToLower(err.Error()), "permissions violation") &&
			strings.Contains(err.Error(), "KEYSTONE.regionThree"), fmt.Sprint(err)
	})
}

// forbidden is something a region's credentials must not do.
type forbidden struct {
	name string
	do   func() error
}

// forbiddenToRegionTwo is what regionTwo's credentials (js) must not do to
// regionThree or to the stream, directly or through a leaf node; each
// request is bounded by short.
func forbiddenToRegionTwo(js jetstream.JetStream, short func() (context.Context, context.CancelFunc)) []forbidden {
	return []forbidden{
		{"read regionThree's consumer", func() error {
			c, cancel := short()
			defer cancel()
			_, err := js.Consumer(c, "KEYSTONE", "regionThree")
			return err
		}},
		{"delete regionThree's consumer", func() error {
			c, cancel := short()
			defer cancel()
			return js.DeleteConsumer(c, "KEYSTONE", "regionThree")
		}},
		{"reset regionThree's consumer", func() error {
			c, cancel := short()
			defer cancel()
			_, err := js.CreateOrUpdateConsumer(c, "KEYSTONE", jetstream.ConsumerConfig{Durable: "regionThree", AckPolicy: jetstream.AckExplicitPolicy})
			return err
		}},
		{"publish an event", func() error {
			c, cancel := short()
			defer cancel()
			_, err := js.Publish(c, "keystone.notification.identity.user.updated", []byte(`{"v":1}`))
			return err
		}},
		{"delete the stream", func() error {
			c, cancel := short()
			defer cancel()
			return js.DeleteStream(c, "KEYSTONE")
		}},
		{"read regionThree's checkpoint", func() error {
			c, cancel := short()
			defer cancel()
			kv, err := js.KeyValue(c, regionagent.DefaultCheckpointBucket)
			if err != nil {
				return err
			}
			_, err = kv.Get(c, "regionThree")
			return err
		}},
	}
}
