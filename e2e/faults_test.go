package e2e

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
	"github.com/keystone-fanout/keystone-fanout/regionagent"
)

// The fault matrix. Every test publishes a burst of token-affecting
// notifications (mixed with harmless ones) and breaks something while the
// burst is on; then the standard checks (env.verify) prove that no region
// kept an entry the events concern, nothing was lost or duplicated in the
// stream, every region acknowledged everything, no unrelated entry was
// removed and no process died by itself. Each logs a RECOVERY line; the
// numbers are in docs/BENCHMARKS.md.

const (
	burstVictims = 240 // token-affecting notifications per burst
	burstRate    = 150 // notifications per second
	unrelatedN   = 40
)

// scenario is a prepared burst: entries cached in every region and the
// notifications that concern them.
type scenario struct {
	victims   []*victim
	unrelated []kmwtest.Entry
	msgs      []amqpMessage
	outs      []outcome
}

func (e *env) prepare(victims, unrelated int) *scenario {
	e.t.Helper()
	s := &scenario{victims: e.work.victims(victims, 1)}
	s.unrelated, _ = e.work.unrelated(unrelated)
	e.writeEntries(append(allEntries(s.victims), s.unrelated...))
	s.msgs, s.outs = e.work.mixed(s.victims)
	return s
}

func (s *scenario) expect() expect {
	return expect{gone: victimTokens(s.victims), kept: entryTokens(s.unrelated)}
}

// streamMsgs is the number of messages in the stream, -1 when unknown.
func (e *env) streamMsgs() int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s, err := e.js.Stream(ctx, streamName)
	if err != nil {
		return -1
	}
	return int(s.CachedInfo().State.Msgs)
}

// waitStreamAtLeast waits until the stream holds n messages: the burst is
// under way end to end.
func (e *env) waitStreamAtLeast(n int) {
	e.t.Helper()
	testutil.Eventually(e.t, 60*time.Second, fmt.Sprintf("the stream to hold at least %d messages", n), func() (bool, string) {
		m := e.streamMsgs()
		return m >= n, fmt.Sprintf("%d messages", m)
	})
}

// logRecovery records a fault's recovery: from the heal (restart, reconnect
// possible again) to the moment no region held a concerned entry and to the
// moment every region had acknowledged every event.
func logRecovery(t testing.TB, scenario string, fault, heal time.Time, v verified) {
	t.Helper()
	t.Logf("RECOVERY %s: fault lasted %s; after the heal every concerned entry was gone in %s and every event acknowledged in %s",
		scenario, heal.Sub(fault).Round(time.Millisecond), durSince(heal, v.gone), durSince(heal, v.acked))
}

func durSince(from, to time.Time) string {
	d := to.Sub(from)
	if d < 0 {
		return "0s (before the heal)"
	}
	return d.Round(time.Millisecond).String()
}

// TestBridgeKilledDuringBurst: the bridge dies (SIGKILL) with deliveries in
// flight; the notifications published meanwhile wait in its durable queue;
// the restarted bridge publishes them all, once (the stream drops the
// redelivered ones it already holds by Nats-Msg-Id).
func TestBridgeKilledDuringBurst(t *testing.T) {
	e := newEnv(t, envOptions{})
	s := e.prepare(burstVictims, unrelatedN)
	b := e.startBurst(s.msgs, s.outs, burstRate)
	e.waitStreamAtLeast(burstVictims / 4)
	bridge := e.bridges[0]
	fault := time.Now()
	bridge.kill()
	t.Logf("bridge killed with SIGKILL after %d of %d notifications were published to RabbitMQ", b.published(), len(s.msgs))
	b.wait(t)
	heal := time.Now()
	bridge.start(readyTimeout)
	v := e.verify(s.expect())
	logRecovery(t, "bridge SIGKILL during a burst (restarted after the burst)", fault, heal, v)
}

// TestAgentKilledDuringBurst: one region's agent dies (SIGKILL) while it
// holds events it has not acknowledged; restarted, it gets them again
// (JetStream redelivers after the ack wait) together with everything
// published while it was down.
func TestAgentKilledDuringBurst(t *testing.T) {
	e := newEnv(t, envOptions{})
	s := e.prepare(burstVictims, unrelatedN)
	r := e.regions[len(e.regions)-1]
	b := e.startBurst(s.msgs, s.outs, burstRate)
	testutil.Eventually(t, 60*time.Second, r.name+"'s consumer to have delivered a quarter of the burst", func() (bool, string) {
		d := e.consumerDelivered(r.name)
		return d >= burstVictims/4, fmt.Sprintf("delivered up to stream sequence %d", d)
	})
	fault := time.Now()
	r.agent.kill()
	t.Logf("%s's agent killed with SIGKILL after %d of %d notifications were published", r.name, b.published(), len(s.msgs))
	b.wait(t)
	heal := time.Now()
	r.agent.start(readyTimeout)
	v := e.verify(s.expect())
	logRecovery(t, "agent SIGKILL during a burst (restarted after the burst)", fault, heal, v)
}

func (e *env) consumerDelivered(name string) uint64 {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := e.js.Consumer(ctx, streamName, name)
	if err != nil {
		return 0
	}
	return c.CachedInfo().Delivered.Stream
}

// TestRabbitMQConnectionsClosed: the broker side drops the bridge's AMQP
// connection twice during a burst: once with AMQP connection.close from
// RabbitMQ itself (rabbitmqctl close_connection, for this test's bridge
// connection only: the one consuming from this test's queue), once at the TCP
// level (the test's proxy between the bridge and RabbitMQ closes it, as a
// broker node going away does). Deliveries not yet acknowledged are
// redelivered; the stream keeps each once.
func TestRabbitMQConnectionsClosed(t *testing.T) {
	e := newEnv(t, envOptions{})
	s := e.prepare(burstVictims, unrelatedN)
	// Found before the burst: rabbitmqctl takes about a second per call.
	var conns map[string]string
	testutil.Eventually(t, 60*time.Second, "the bridge's connection consuming from "+e.queue+" in rabbitmqctl's lists", func() (bool, string) {
		var err error
		conns, err = e.queueConnections()
		if err != nil {
			return false, err.Error()
		}
		return len(conns) == 1, fmt.Sprintf("%d connections: %v", len(conns), conns)
	})
	// A slower burst: rabbitmqctl itself takes about a second.
	b := e.startBurst(s.msgs, s.outs, burstRate/2)

	e.waitStreamAtLeast(burstVictims / 4)
	fault := time.Now()
	for pid, name := range conns {
		t.Logf("asking RabbitMQ to close connection %s after %d of %d notifications", name, b.published(), len(s.msgs))
		out, err := exec.Command("rabbitmqctl", "-q", "close_connection", pid, "e2e: RabbitMQ closes the bridge's connection").CombinedOutput()
		if err != nil {
			t.Fatalf("rabbitmqctl close_connection %s (%s): %v: %s", pid, name, err, out)
		}
		t.Logf("RabbitMQ closed it (connection.close); %d of %d notifications published by then", b.published(), len(s.msgs))
	}

	e.waitStreamAtLeast(burstVictims / 2)
	testutil.Eventually(t, 30*time.Second, "the bridge to reconnect through the proxy", func() (bool, string) {
		n := e.amqpProxy.Connections()
		return n > 0, fmt.Sprintf("%d connections", n)
	})
	n := e.amqpProxy.CloseConnections()
	t.Logf("closed %d AMQP connection(s) at the TCP level after %d of %d notifications", n, b.published(), len(s.msgs))
	heal := time.Now()
	b.wait(t)
	v := e.verify(s.expect())
	logRecovery(t, "RabbitMQ closed the bridge's connection twice during a burst (connection.close, then TCP)", fault, heal, v)
}

// queueConnections returns the pids and names of the connections consuming
// from the test's queue.
func (e *env) queueConnections() (map[string]string, error) {
	rows := func(args ...string) ([][]string, error) {
		out, err := exec.Command("rabbitmqctl", append([]string{"-q", "--no-table-headers"}, args...)...).CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("rabbitmqctl %s: %v: %s", strings.Join(args, " "), err, out)
		}
		var rs [][]string
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if line = strings.TrimSpace(line); line != "" {
				rs = append(rs, strings.Split(line, "\t"))
			}
		}
		return rs, nil
	}
	consumers, err := rows("list_consumers", "queue_name", "channel_pid")
	if err != nil {
		return nil, err
	}
	chans := map[string]bool{}
	for _, c := range consumers {
		if len(c) == 2 && c[0] == e.queue {
			chans[c[1]] = true
		}
	}
	if len(chans) == 0 {
		return nil, nil
	}
	channels, err := rows("list_channels", "pid", "connection")
	if err != nil {
		return nil, err
	}
	conns := map[string]bool{}
	for _, c := range channels {
		if len(c) == 2 && chans[c[0]] {
			conns[c[1]] = true
		}
	}
	connections, err := rows("list_connections", "pid", "name")
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, c := range connections {
		if len(c) == 2 && conns[c[0]] {
			out[c[0]] = c[1]
		}
	}
	return out, nil
}

// natsOutage is how long TestNATSServerRestarted keeps NATS down.
const natsOutage = 3 * time.Second

// TestNATSServerRestarted: the NATS server (file storage) goes down during
// a burst and comes back on the same address and data directory: the stream,
// the region consumers and their positions survive; the bridge requeues what
// it could not publish, the agents reconnect.
func TestNATSServerRestarted(t *testing.T) {
	e := newEnv(t, envOptions{})
	s := e.prepare(burstVictims, unrelatedN)
	b := e.startBurst(s.msgs, s.outs, burstRate)
	e.waitStreamAtLeast(burstVictims / 4)
	fault := time.Now()
	e.nodes[0].shutdown()
	t.Logf("NATS server shut down after %d of %d notifications", b.published(), len(s.msgs))
	bridge := e.bridges[0]
	testutil.Eventually(t, 60*time.Second, "the bridge to report itself not ready while NATS is down", func() (bool, string) {
		code, body, err := httpGet("http://" + bridge.addr() + "/readyz")
		if err != nil {
			return false, err.Error()
		}
		return code != http.StatusOK, fmt.Sprintf("%d %s", code, strings.TrimSpace(body))
	})
	// A restart of a real server takes seconds: the outage is the scenario.
	time.Sleep(time.Until(fault.Add(natsOutage)))
	heal := time.Now()
	e.nodes[0].restart(t)
	t.Logf("NATS server restarted after %s down", heal.Sub(fault).Round(time.Millisecond))
	b.wait(t)
	v := e.verify(s.expect())
	logRecovery(t, "NATS server restarted during a burst (file storage)", fault, heal, v)
}

// TestNATSClusterNodeKilled: a 3-node NATS cluster with the stream at 3
// replicas; the node leading the stream is killed during a burst and stays
// down: the two others elect a new leader and nothing is lost.
func TestNATSClusterNodeKilled(t *testing.T) {
	e := newEnv(t, envOptions{cluster: true})
	s := e.prepare(burstVictims, unrelatedN)
	e.streamLeader() // the bridge created the stream with 3 replicas, and it has a leader
	b := e.startBurst(s.msgs, s.outs, burstRate)
	e.waitStreamAtLeast(burstVictims / 4)
	victimNode := e.streamLeader()
	fault := time.Now()
	victimNode.shutdown()
	t.Logf("stream leader %s shut down after %d of %d notifications", victimNode.opts.ServerName, b.published(), len(s.msgs))
	b.wait(t)
	v := e.verify(s.expect())
	logRecovery(t, "NATS cluster: the stream leader killed during a burst (R3, stays down)", fault, fault, v)

	// The regions' checkpoints outlive the node as the events do: their
	// bucket has the stream's replicas, and every region records the burst.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	kvs, err := e.js.Stream(ctx, "KV_"+stream.DefaultCheckpointBucket)
	if err != nil {
		t.Fatal(err)
	}
	if r := kvs.CachedInfo().Config.Replicas; r != 3 {
		t.Errorf("the checkpoint bucket has %d replicas, want 3 (the stream's)", r)
	}
	st, err := e.js.Stream(ctx, streamName)
	if err != nil {
		t.Fatal(err)
	}
	last := st.CachedInfo().State.LastSeq
	testutil.Eventually(t, 30*time.Second, "every region's checkpoint at the end of the stream", func() (bool, string) {
		cps, err := regionagent.ReadCheckpoints(ctx, e.js, stream.DefaultCheckpointBucket)
		if err != nil {
			return false, err.Error()
		}
		var behind []string
		for _, r := range e.regions {
			if cps[r.name].Seq < last {
				behind = append(behind, fmt.Sprintf("%s at %d", r.name, cps[r.name].Seq))
			}
		}
		return len(behind) == 0, fmt.Sprintf("last sequence %d; %s", last, strings.Join(behind, ", "))
	})
}

// regionCut is how long TestRegionCutOffFromNATS keeps a region away from
// NATS. nats.go gives up by default after 60 reconnect attempts 2s apart
// (about 2 minutes); keystone-fanout connects through internal/natsconn with
// unlimited reconnects (asserted below) and a 0.5-1s wait, so that 60
// attempts would take 30-45s. Cutting for more than two minutes on every CI
// run would cost too much; 35 s exceeds the budget of a client with that wait
// and default MaxReconnects, and the test asserts the configuration itself.
const regionCut = 35 * time.Second

// TestRegionCutOffFromNATS: one region loses NATS (connections dropped and
// new ones refused, through a proxy the test controls) for longer than a
// default client's reconnect budget while a burst is published; the other
// regions carry on and finish; the cut region's agent keeps running and, once
// the network heals, catches up with everything.
func TestRegionCutOffFromNATS(t *testing.T) {
	e := newEnv(t, envOptions{})
	// The agent connects through internal/natsconn, like this probe.
	probe, err := natsconn.Connect(context.Background(), natsconn.Options{URL: e.natsURL()}, "e2e-probe", quietLogger(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if probe.Opts.MaxReconnect != -1 {
		t.Fatalf("expected natsconn.Connect (which the agent uses) to reconnect without limit (MaxReconnect -1); it has %d", probe.Opts.MaxReconnect)
	}
	probe.Close()

	s := e.prepare(burstVictims, unrelatedN)
	cut := e.regions[0]
	others := e.regions[1:]
	fault := time.Now()
	for _, px := range cut.natsProxy {
		px.Refuse(true)
		px.CloseConnections()
	}
	t.Logf("%s cut off from NATS", cut.name)
	b := e.startBurst(s.msgs, s.outs, burstRate)
	b.wait(t)
	x := s.expect()
	x.regions = others
	v := e.verify(x)
	t.Logf("while %s was cut off, the other %d regions finished the burst: entries gone %s and acknowledged %s after the cut began",
		cut.name, len(others), durSince(fault, v.gone), durSince(fault, v.acked))
	if ok, seen := e.noneCached([]*region{cut}, tokenKeys(x.gone)); ok {
		t.Fatalf("expected %s, cut off from NATS, to still hold the entries (it cannot have heard of the events); saw none left: %s", cut.name, seen)
	}
	// The fault's duration is the scenario, not a synchronisation.
	time.Sleep(time.Until(fault.Add(regionCut)))
	if !cut.agent.running() {
		t.Fatalf("expected %s's agent to survive %s without NATS; it exited: %v", cut.name, regionCut, cut.agent.unexpectedExits())
	}
	heal := time.Now()
	for _, px := range cut.natsProxy {
		px.Refuse(false)
	}
	t.Logf("%s reconnected possible again after %s", cut.name, heal.Sub(fault).Round(time.Millisecond))
	v = e.verify(s.expect())
	logRecovery(t, fmt.Sprintf("a region cut off from NATS for %s during a burst", regionCut), fault, heal, v)
}

// TestMemcachedServerRestarted: one of a region's two memcached servers is
// down while entries are cached and a burst is published. keystonemiddleware
// (python-memcache) marks it dead and writes every entry to the other server;
// the agent must clean that server although the other is down, keep the
// events unacknowledged, and finish once the server is back (empty).
func TestMemcachedServerRestarted(t *testing.T) {
	e := newEnv(t, envOptions{})
	r := e.regions[0]
	down := r.servers[1]
	down.Stop()
	// Cached while the server is down: python-memcache marks it dead and
	// rehashes to the other one; for a few keys its rehash gives up and the
	// middleware caches nothing (no stale entry can come of those).
	s := &scenario{victims: e.work.victims(burstVictims, 1)}
	s.unrelated, _ = e.work.unrelated(unrelatedN)
	unstored := e.cacheEntriesReport(append(allEntries(s.victims), s.unrelated...))
	var kept []kmwtest.Entry
	for _, u := range s.unrelated {
		if unstored[u.TokenID] == "" {
			kept = append(kept, u)
		}
	}
	t.Logf("%s: %d of %d entries could not be stored by keystonemiddleware with %s down", r.name, len(unstored),
		len(s.victims)+len(s.unrelated), down.Addr)
	s.unrelated = kept
	s.msgs, s.outs = e.work.mixed(s.victims)
	fault := time.Now()
	b := e.startBurst(s.msgs, s.outs, burstRate)
	b.wait(t)
	others := e.regions[1:]
	x := s.expect()
	x.regions = others
	e.verify(x)
	testutil.Eventually(t, 120*time.Second, fmt.Sprintf("%s's reachable memcached %s to hold none of the concerned entries while %s is down", r.name, r.servers[0].Addr, down.Addr),
		func() (bool, string) {
			found, err := mcPresent(r.servers[0].Addr, tokenKeys(x.gone))
			if err != nil {
				return false, err.Error()
			}
			return len(found) == 0, fmt.Sprintf("%d of %d still cached", len(found), len(x.gone))
		})
	cleaned := time.Now()
	t.Logf("%s: the reachable server was clean %s after the burst began, with %s still down", r.name, cleaned.Sub(fault).Round(time.Millisecond), down.Addr)
	if ok, _ := e.allAcked([]*region{r}); ok {
		t.Fatalf("expected %s's agent not to acknowledge events while memcached %s is down; it acknowledged them all", r.name, down.Addr)
	}
	// A new event while the server is still down: measured, not asserted
	// (it joins the failing batch and waits for its retry back-off; see
	// docs/BENCHMARKS.md).
	late := e.work.victims(1, 1)
	for len(e.cacheEntriesReport(allEntries(late))) > 0 {
		late = e.work.victims(1, 1) // the rehash gave up on it: take another
	}
	m, o := late[0].notification(time.Now())
	sent := time.Now()
	e.publishNow([]amqpMessage{m}, []outcome{o})
	testutil.EventuallyEvery(t, 2*time.Millisecond, 60*time.Second, "the new event's entry to be gone from "+r.name+"'s reachable server", func() (bool, string) {
		found, err := mcPresent(r.servers[0].Addr, late[0].keys)
		if err != nil {
			return false, err.Error()
		}
		return len(found) == 0, fmt.Sprintf("%d cached", len(found))
	})
	t.Logf("%s: with %s down for %s, a new event's entry left the reachable server %s after the publish (other regions: milliseconds)",
		r.name, down.Addr, time.Since(fault).Round(time.Millisecond), time.Since(sent).Round(time.Millisecond))
	s.victims = append(s.victims, late...)
	heal := time.Now()
	e.restartMemcached(r, 1)
	v := e.verify(s.expect())
	logRecovery(t, "a memcached server down during a burst, then restarted", fault, heal, v)
}

// TestTwoBridges: two bridges consume the same queue; one is killed during
// the burst, its unacknowledged deliveries go to the other, which publishes
// some again: the stream keeps each notification once.
func TestTwoBridges(t *testing.T) {
	e := newEnv(t, envOptions{bridges: 2})
	s := e.prepare(burstVictims, unrelatedN)
	b := e.startBurst(s.msgs, s.outs, burstRate)
	testutil.Eventually(t, 60*time.Second, "both bridges to have received deliveries", func() (bool, string) {
		var got []string
		ok := true
		for _, br := range e.bridges {
			m, err := br.metrics()
			if err != nil {
				return false, err.Error()
			}
			n := m.sum("keystone_fanout_bridge_received_total")
			got = append(got, fmt.Sprintf("%s %v", br.name, n))
			ok = ok && n > 0
		}
		return ok, strings.Join(got, ", ")
	})
	e.waitStreamAtLeast(burstVictims / 4)
	fault := time.Now()
	e.bridges[0].kill()
	t.Logf("%s killed with SIGKILL after %d of %d notifications", e.bridges[0].name, b.published(), len(s.msgs))
	b.wait(t)
	v := e.verify(s.expect())
	logRecovery(t, "two bridges, one killed during a burst (stays down)", fault, fault, v)
	m, err := e.bridges[1].metrics()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: received %v, published %v, duplicates dropped by the stream %v", e.bridges[1].name,
		m.sum("keystone_fanout_bridge_received_total"), m.sum("keystone_fanout_bridge_published_total"),
		m.sum("keystone_fanout_bridge_duplicates_total"))
	// Both run again: the killed one rejoins.
	e.bridges[0].start(readyTimeout)
	s2 := e.prepare(burstVictims/4, 0)
	e.publishNow(s2.msgs, s2.outs)
	e.verify(expect{gone: append(victimTokens(s.victims), victimTokens(s2.victims)...), kept: entryTokens(s.unrelated)})
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
