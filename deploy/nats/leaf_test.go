package nats

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/app"
	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/revoke"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/regionagent"
)

// agentPassword is the local agent's password on the leaf node.
const agentPassword = "pw-agent"

// startLeaf starts regionTwo's leaf node from leaf-region.conf as shipped,
// connected to central's leaf-node port as the user regionTwo, and waits
// for the leaf connection. It returns the leaf's client URL.
func startLeaf(t *testing.T, central *server.Server) string {
	t.Helper()
	v, err := central.Varz(nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("KSF_AGENT_PASSWORD", agentPassword)
	t.Setenv("KSF_CENTRAL_LEAF_URL", fmt.Sprintf("nats-leaf://regionTwo:%s@127.0.0.1:%d", passwords["regionTwo"], v.LeafNode.Port))
	leaf := startConf(t, "leaf-region.conf", nil)
	testutil.Eventually(t, 20*time.Second, "the leaf node connecting to central", func() (bool, string) {
		return leaf.NumLeafNodes() == 1 && central.NumLeafNodes() == 1, fmt.Sprintf("leaf %d, central %d", leaf.NumLeafNodes(), central.NumLeafNodes())
	})
	return leaf.ClientURL()
}

// connectLeaf connects to the leaf node as the region's local agent.
func connectLeaf(t *testing.T, url string) *natsgo.Conn {
	t.Helper()
	nc, err := natsconn.Connect(context.Background(), natsconn.Options{URL: url, User: "agent", Password: agentPassword,
		InboxPrefix: "_INBOX_regionTwo", ConnectTimeout: 5 * time.Second}, "test-leaf-agent", testLog(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// publishEvent publishes a notification as the bridge does.
func publishEvent(t *testing.T, js jetstream.JetStream, id string) {
	t.Helper()
	e := event.Event{Version: event.SchemaVersion, Kind: event.KindNotification, ID: id, Type: "identity.user.updated",
		Time: time.Now().UTC(), UserID: "u-" + id}
	body, _ := e.Marshal()
	if _, err := js.Publish(context.Background(), stream.Subject("keystone", &e), body, jetstream.WithMsgID(e.ID)); err != nil {
		t.Fatalf("publishing %s: %v", id, err)
	}
}

// startPoller runs the bridge's revocation poller, so that agents can be
// seen following its lease.
func startPoller(t *testing.T, js jetstream.JetStream) {
	t.Helper()
	reg := prometheus.NewRegistry()
	p, err := revoke.New(revoke.Options{URL: fakeKeystone(t), Username: "svc", Password: "pw", Project: "service"},
		js, reg, testLog(t).With("component", "poller"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}

// TestLeafCentralConsumer: an agent connected to its region's leaf node
// consumes its consumer on the central stream (--js-domain central), with its
// checkpoint there and the poller's lease followed, all as the region's user
// on the central side; through the same leaf, the region can neither read nor
// reset another region's consumer or checkpoint, nor publish an event.
func TestLeafCentralConsumer(t *testing.T) {
	central := startCentralServer(t)
	url := central.ClientURL()
	ctx := context.Background()
	_, bjs := connect(t, url, "bridge")
	if err := stream.Ensure(ctx, bjs, stream.Default()); err != nil {
		t.Fatal(err)
	}
	if err := stream.EnsureReceipts(ctx, bjs, stream.Default()); err != nil {
		t.Fatal(err)
	}
	startPoller(t, bjs)
	leafURL := startLeaf(t, central)

	a2, inv2, reg2, _ := startAgent(t, connectLeaf(t, leafURL), regionagent.Options{Region: "regionTwo", JetStreamDomain: "central",
		RetryMax: time.Second, AuditInterval: 200 * time.Millisecond})
	a3, inv3, _ := runAgent(t, url, "regionThree", "regionThree")
	for _, a := range []*regionagent.Agent{a2, a3} {
		testutil.Eventually(t, 20*time.Second, "the agents consuming", func() (bool, string) {
			err := a.Ready()
			return err == nil, fmt.Sprint(err)
		})
	}
	publishEvent(t, bjs, "n-leaf-1")
	testutil.Eventually(t, 20*time.Second, "both regions handling the event", func() (bool, string) {
		return inv2.seen("n-leaf-1") && inv3.seen("n-leaf-1"), fmt.Sprintf("regionTwo %v, regionThree %v", inv2.seen("n-leaf-1"), inv3.seen("n-leaf-1"))
	})
	testutil.Eventually(t, 20*time.Second, "regionTwo, through its leaf, following the poller's lease", func() (bool, string) {
		return testutil.Metric(reg2, "keystone_fanout_agent_revocation_poller_live") == 1, "not yet"
	})
	// The checkpoint is written on the central side, as the operator sees it.
	_, ojs := connect(t, url, "operator")
	testutil.Eventually(t, 20*time.Second, "regionTwo's checkpoint on the central side", func() (bool, string) {
		kv, err := ojs.KeyValue(ctx, regionagent.DefaultCheckpointBucket)
		if err != nil {
			return false, err.Error()
		}
		e, err := kv.Get(ctx, "regionTwo")
		if err != nil {
			return false, fmt.Sprintf("%v (checkpoint_errors_total %v)", err, testutil.Metric(reg2, "keystone_fanout_agent_checkpoint_errors_total"))
		}
		return true, string(e.Value())
	})

	// Its receipts reach the central side through the leaf.
	testutil.Eventually(t, 20*time.Second, "trace showing regionTwo's receipt", func() (bool, string) {
		var out strings.Builder
		err := app.RunTrace(ctx, app.TraceOptions{NATS: natsOptions(url, "operator"), Query: "u-n-leaf-1"}, &out, testLog(t))
		return err == nil && strings.Contains(out.String(), "confirmed by 2 of 2 regions"), fmt.Sprintf("%v %s", err, out.String())
	})

	// What the region must not do through its leaf.
	nc := connectLeaf(t, leafURL)
	js, err := jetstream.NewWithDomain(nc, "central")
	if err != nil {
		t.Fatal(err)
	}
	short := func() (context.Context, context.CancelFunc) { return context.WithTimeout(ctx, 2*time.Second) }
	// The same client reaches its own consumer: the refusals below are the
	// permissions', not a broken path.
	{
		c, cancel := context.WithTimeout(ctx, 15*time.Second) // a success need not be quick
		if _, err := js.Consumer(c, "KEYSTONE", "regionTwo"); err != nil {
			t.Fatalf("regionTwo cannot read its own consumer through the leaf: %v", err)
		}
		cancel()
	}
	body := []byte(`{"v":1}`)
	tests := append(forbiddenToRegionTwo(js, short), []forbidden{
		{"hijack regionThree's mirror consumer", func() error {
			c, cancel := short()
			defer cancel()
			_, err := js.CreateOrUpdatePushConsumer(c, "KEYSTONE", jetstream.ConsumerConfig{Durable: stream.MirrorConsumerName("regionThree"),
				DeliverSubject: stream.MirrorDeliverSubject("regionTwo"), AckPolicy: jetstream.AckFlowControlPolicy, FlowControl: true, IdleHeartbeat: time.Second})
			return err
		}},
	}...)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.do()
			if err == nil {
				t.Fatalf("regionTwo could %s through its leaf node", tt.name)
			}
			t.Logf("refused: %v", err)
		})
	}
	// A core publish of an event through the leaf never reaches the stream.
	bs, err := bjs.Stream(ctx, "KEYSTONE")
	if err != nil {
		t.Fatal(err)
	}
	before := bs.CachedInfo().State.LastSeq
	if err := nc.Publish("keystone.notification.identity.user.updated", body); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if si, err := bs.Info(ctx); err != nil || si.State.LastSeq != before {
		t.Fatalf("an event published through regionTwo's leaf reached the stream (last seq %d, was %d, err %v)", si.State.LastSeq, before, err)
	}
	testutil.Eventually(t, 10*time.Second, "regionThree still consuming", func() (bool, string) {
		err := a3.Ready()
		return err == nil, fmt.Sprint(err)
	})
}

// TestLeafRegionalMirror: an agent connected to its region's leaf node with
// --mirror-from central creates the regional mirror of the stream in the
// region's domain and consumes it; events published while the agent is
// stopped are replayed from the mirror when it restarts, even with the
// central server gone.
func TestLeafRegionalMirror(t *testing.T) {
	central := startCentralServer(t)
	url := central.ClientURL()
	ctx := context.Background()
	_, bjs := connect(t, url, "bridge")
	if err := stream.Ensure(ctx, bjs, stream.Default()); err != nil {
		t.Fatal(err)
	}
	if err := stream.EnsureReceipts(ctx, bjs, stream.Default()); err != nil {
		t.Fatal(err)
	}
	leafURL := startLeaf(t, central)
	o := regionagent.Options{Region: "regionTwo", MirrorFrom: "central", RetryMax: time.Second, AuditInterval: 200 * time.Millisecond}

	a, inv, _, stop := startAgent(t, connectLeaf(t, leafURL), o)
	testutil.Eventually(t, 30*time.Second, "the agent consuming its regional mirror", func() (bool, string) {
		err := a.Ready()
		return err == nil, fmt.Sprint(err)
	})
	publishEvent(t, bjs, "n-mirror-1")
	testutil.Eventually(t, 20*time.Second, "the event through the mirror", func() (bool, string) {
		return inv.seen("n-mirror-1"), "not yet"
	})
	// The receipt reaches the central side; status there shows the
	// mirror's consumer.
	testutil.Eventually(t, 20*time.Second, "trace showing the region's receipt", func() (bool, string) {
		var out strings.Builder
		err := app.RunTrace(ctx, app.TraceOptions{NATS: natsOptions(url, "operator"), Query: "n-mirror-1"}, &out, testLog(t))
		return err == nil && strings.Contains(out.String(), "confirmed by 1 of 1 regions") &&
			strings.Contains(out.String(), "after the stream stored it"), fmt.Sprintf("%v %s", err, out.String())
	})
	testutil.Eventually(t, 20*time.Second, "status --check on the central side, OK with regionTwo through its mirror", func() (bool, string) {
		var status strings.Builder
		err := app.RunStatus(ctx, app.StatusOptions{NATS: natsOptions(url, "operator"), Check: &app.CheckOptions{Regions: []string{"regionTwo"}}}, &status, testLog(t))
		return err == nil && strings.Contains(status.String(), "KEYSTONE-FANOUT OK") && regexp.MustCompile(`(?m)^regionTwo +mirror `).MatchString(status.String()),
			fmt.Sprintf("%v\n%s", err, status.String())
	})
	stop()

	// The mirror lives in the region's domain, read through its source
	// consumer on the central side.
	ljs, err := jetstream.New(connectLeaf(t, leafURL))
	if err != nil {
		t.Fatal(err)
	}
	publishEvent(t, bjs, "n-mirror-2")
	testutil.Eventually(t, 20*time.Second, "the mirror holding the event published while the agent was stopped", func() (bool, string) {
		s, err := ljs.Stream(ctx, "KEYSTONE")
		if err != nil {
			return false, err.Error()
		}
		si := s.CachedInfo()
		if si.Config.Mirror == nil || si.Config.Mirror.Consumer == nil || si.Config.Mirror.Consumer.Name != "regionTwo_mirror" {
			return false, fmt.Sprintf("not the mirror: %+v", si.Config.Mirror)
		}
		return si.State.LastSeq == 2, fmt.Sprintf("mirror last seq %d", si.State.LastSeq)
	})

	// Ensuring the mirror again (every agent start does) changes nothing.
	cjs, err := jetstream.NewWithDomain(connectLeaf(t, leafURL), "central")
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.EnsureMirror(ctx, cjs, ljs, "KEYSTONE", "regionTwo", "central"); err != nil {
		t.Fatalf("ensuring the running mirror again: %v", err)
	}

	// The central server goes away; the region replays from its mirror.
	central.Shutdown()
	central.WaitForShutdown()
	a2, inv2, _, _ := startAgent(t, connectLeaf(t, leafURL), o)
	testutil.Eventually(t, 30*time.Second, "the restarted agent replaying from the mirror without central", func() (bool, string) {
		return inv2.seen("n-mirror-2"), fmt.Sprint(a2.Ready())
	})
	if strings.Contains(fmt.Sprint(a2.Ready()), "not consuming") {
		t.Fatalf("the restarted agent is not consuming: %v", a2.Ready())
	}
}

// TestStatusAndSweepInADomain: status and sweep reach the stream in the
// JetStream domain --js-domain names, and a wrong domain finds nothing.
func TestStatusAndSweepInADomain(t *testing.T) {
	srv, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, JetStreamDomain: "hub",
		StoreDir: t.TempDir(), NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("the server did not start")
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	nc, err := natsgo.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := stream.Ensure(ctx, js, stream.Default()); err != nil {
		t.Fatal(err)
	}
	no := natsconn.Options{URL: srv.ClientURL()}
	tests := []struct {
		name    string
		domain  string
		wantErr bool
	}{
		{"the server's own", "", false},
		{"its domain", "hub", false},
		{"another domain", "elsewhere", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out strings.Builder
			err := app.RunStatus(ctx, app.StatusOptions{NATS: no, JetStreamDomain: tt.domain, JSON: true}, &out, testLog(t))
			if (err != nil) != tt.wantErr {
				t.Fatalf("status: %v, want error %v\n%s", err, tt.wantErr, out.String())
			}
			if err := app.RunSweep(ctx, app.SweepOptions{NATS: no, JetStreamDomain: tt.domain, Reason: "test"}, io.Discard, testLog(t)); err != nil && !tt.wantErr {
				t.Fatalf("sweep: %v", err)
			}
		})
	}
}

// TestLeafMissingPermissionIsExplained: through a leaf node a request the
// central side refuses finds no responders; an agent started with another
// region's name says so, and what to check.
func TestLeafMissingPermissionIsExplained(t *testing.T) {
	central := startCentralServer(t)
	_, bjs := connect(t, central.ClientURL(), "bridge")
	if err := stream.Ensure(context.Background(), bjs, stream.Default()); err != nil {
		t.Fatal(err)
	}
	leafURL := startLeaf(t, central)
	a, _, _, _ := startAgent(t, connectLeaf(t, leafURL), regionagent.Options{Region: "regionThree", JetStreamDomain: "central", RetryMax: time.Second})
	testutil.Eventually(t, 30*time.Second, "the agent to explain the refusal", func() (bool, string) {
		err := a.Ready()
		return err != nil && strings.Contains(err.Error(), "lacks the permission") && strings.Contains(err.Error(), "regionThree"), fmt.Sprint(err)
	})
}

// TestLeafForeignStreamIsNotConsumed: with --mirror-from, a stream of the
// same name in the region's domain that is not the regional mirror is never
// consumed (it could miss events); the agent says why.
func TestLeafForeignStreamIsNotConsumed(t *testing.T) {
	central := startCentralServer(t)
	_, bjs := connect(t, central.ClientURL(), "bridge")
	ctx := context.Background()
	if err := stream.Ensure(ctx, bjs, stream.Default()); err != nil {
		t.Fatal(err)
	}
	leafURL := startLeaf(t, central)
	ljs, err := jetstream.New(connectLeaf(t, leafURL))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ljs.CreateStream(ctx, jetstream.StreamConfig{Name: "KEYSTONE", Subjects: []string{"elsewhere.>"}}); err != nil {
		t.Fatal(err)
	}
	a, _, _, _ := startAgent(t, connectLeaf(t, leafURL), regionagent.Options{Region: "regionTwo", MirrorFrom: "central", RetryMax: time.Second})
	testutil.Eventually(t, 20*time.Second, "the agent refusing the foreign stream", func() (bool, string) {
		err := a.Ready()
		return err != nil && errors.Is(err, stream.ErrNotMirror) && strings.Contains(err.Error(), "nats stream rm KEYSTONE"), fmt.Sprint(err)
	})
}

// uncommentTLS returns the configuration file with its commented tls block
// (the first one after the line holding after) uncommented as shipped, and
// /etc/nats/tls/ replaced by dir.
func uncommentTLS(t *testing.T, file, after, dir string) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	start := -1
	for i, l := range lines {
		if start < 0 && strings.Contains(l, after) {
			start = i
		}
		if start >= 0 && strings.TrimSpace(l) == "# tls {" {
			for j := i; j < len(lines); j++ {
				lines[j] = strings.Replace(lines[j], "# ", "", 1)
				if strings.TrimSpace(lines[j]) == "}" {
					out := filepath.Join(dir, filepath.Base(file))
					text := strings.ReplaceAll(strings.Join(lines, "\n"), "/etc/nats/tls/", dir+"/")
					if err := os.WriteFile(out, []byte(text), 0o600); err != nil {
						t.Fatal(err)
					}
					return out
				}
			}
		}
	}
	t.Fatalf("%s: no commented tls block after %q", file, after)
	return ""
}

// TestLeafMutualTLS: central.conf and leaf-region.conf with their commented
// leaf-node tls blocks uncommented as shipped, and certificates of a test CA
// at the paths they name: central's leaf-node port demands TLS and a client
// certificate, and the region's leaf node connects with its own; the
// region's agent then works through it as without TLS.
func TestLeafMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewCA(t, "leaf-node CA")
	ca.WriteCA(t, filepath.Join(dir, "ca.pem"))
	ca.Issue(t, filepath.Join(dir, "central-leaf.pem"), filepath.Join(dir, "central-leaf-key.pem"),
		testutil.Leaf{Name: "central", Hosts: []string{"127.0.0.1", "localhost"}})
	ca.Issue(t, filepath.Join(dir, "leaf-regionTwo.pem"), filepath.Join(dir, "leaf-regionTwo-key.pem"),
		testutil.Leaf{Name: "leaf-regionTwo", Client: true})

	for user, pw := range passwords {
		t.Setenv("KSF_"+strings.ToUpper(user)+"_PASSWORD", pw)
	}
	central := startConf(t, uncommentTLS(t, "central.conf", "leafnodes {", dir), func(opts *server.Options) {
		if opts.LeafNode.TLSConfig == nil || opts.LeafNode.TLSConfig.ClientAuth != tls.RequireAndVerifyClientCert {
			t.Fatalf("central.conf's leafnodes tls block did not configure mutual TLS: %+v", opts.LeafNode)
		}
		opts.LeafNode.Host, opts.LeafNode.Port = "127.0.0.1", -1
	})
	v, err := central.Varz(nil)
	if err != nil {
		t.Fatal(err)
	}
	// What the leaf-node port announces before anything else.
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", v.LeafNode.Port), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	info, err := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if err != nil || !strings.Contains(info, `"tls_required":true`) || !strings.Contains(info, `"tls_verify":true`) {
		t.Fatalf("central's leaf-node port announced %q (%v); want TLS required and client certificates verified", info, err)
	}

	t.Setenv("KSF_AGENT_PASSWORD", agentPassword)
	t.Setenv("KSF_CENTRAL_LEAF_URL", fmt.Sprintf("nats-leaf://regionTwo:%s@127.0.0.1:%d", passwords["regionTwo"], v.LeafNode.Port))
	leaf := startConf(t, uncommentTLS(t, "leaf-region.conf", "remotes", dir), func(opts *server.Options) {
		if len(opts.LeafNode.Remotes) != 1 || opts.LeafNode.Remotes[0].TLSConfig == nil ||
			len(opts.LeafNode.Remotes[0].TLSConfig.Certificates) != 1 {
			t.Fatalf("leaf-region.conf's remote tls block did not configure a client certificate: %+v", opts.LeafNode.Remotes)
		}
	})
	testutil.Eventually(t, 20*time.Second, "the leaf node connecting to central over mutual TLS", func() (bool, string) {
		return leaf.NumLeafNodes() == 1 && central.NumLeafNodes() == 1, fmt.Sprintf("leaf %d, central %d", leaf.NumLeafNodes(), central.NumLeafNodes())
	})

	// The region works through the TLS link: its agent consumes the
	// central stream through its leaf.
	ctx := context.Background()
	_, bjs := connect(t, central.ClientURL(), "bridge")
	if err := stream.Ensure(ctx, bjs, stream.Default()); err != nil {
		t.Fatal(err)
	}
	if err := stream.EnsureReceipts(ctx, bjs, stream.Default()); err != nil {
		t.Fatal(err)
	}
	a, inv, _, _ := startAgent(t, connectLeaf(t, leaf.ClientURL()), regionagent.Options{Region: "regionTwo", JetStreamDomain: "central",
		RetryMax: time.Second})
	testutil.Eventually(t, 20*time.Second, "the agent consuming through the TLS leaf link", func() (bool, string) {
		err := a.Ready()
		return err == nil, fmt.Sprint(err)
	})
	publishEvent(t, bjs, "n-leaf-tls-1")
	testutil.Eventually(t, 20*time.Second, "the event reaching regionTwo through the TLS leaf link", func() (bool, string) {
		return inv.seen("n-leaf-tls-1"), "not yet"
	})
}
