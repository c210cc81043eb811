package bridge

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	promtest "github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/tcpproxy"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// lockedBuffer collects a child's stderr.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// child is a bridge running in a separate process (this test binary).
type child struct {
	cmd    *exec.Cmd
	stderr *lockedBuffer
	done   chan error
}

// startChild runs a bridge process on the rig's queue and stream, publishing
// to natsURL, and waits until it consumes.
func startChild(t *testing.T, r *rig, natsURL string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(),
		childEnv+"=1",
		"KSF_CHILD_NATS_URL="+natsURL,
		"KSF_CHILD_AMQP_URL="+testutil.AMQPURL(),
		"KSF_CHILD_EXCHANGE="+r.exchange,
		"KSF_CHILD_QUEUE="+r.queue,
		"KSF_CHILD_STREAM="+r.stream.Name,
		"KSF_CHILD_PREFIX="+r.stream.SubjectPrefix,
		"KSF_CHILD_NAME=bridge-test-child-"+r.suffix,
	)
	c := &child{cmd: cmd, stderr: &lockedBuffer{}, done: make(chan error, 1)}
	cmd.Stderr = c.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { c.done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-c.done
		if t.Failed() {
			t.Logf("bridge process %d stderr:\n%s", cmd.Process.Pid, c.stderr.String())
		}
	})
	testutil.Eventually(t, 20*time.Second, "the bridge process to consume", func() (bool, string) {
		select {
		case err := <-c.done:
			c.done <- err
			t.Fatalf("bridge process exited early: %v\n%s", err, c.stderr.String())
		default:
		}
		_, consumers := r.queueDepth(r.queue)
		return consumers == 1, fmt.Sprintf("%d consumers", consumers)
	})
	return c
}

func TestSIGKILLMidBurstThenRestart(t *testing.T) {
	const total = 10000
	r := newRig(t)
	n := startNATS(t)
	first := startChild(t, r, n.srv.ClientURL())

	msgs, ids := notifications(total)
	published := make(chan struct{})
	go func() {
		defer close(published)
		r.publish(msgs...)
	}()

	testutil.Eventually(t, 60*time.Second, "the bridge to have stored 1000 events", func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c >= 1000, fmt.Sprint(c)
	})
	if err := first.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	err := <-first.done
	first.done <- err
	atKill := n.streamCount(r.stream.Name)
	t.Logf("SIGKILL with %d of %d events stored (%v)", atKill, total, err)
	if atKill >= total {
		t.Fatalf("the bridge stored all %d events before the kill: the test did not kill it mid-burst", total)
	}
	<-published
	if t.Failed() {
		return
	}

	second := startChild(t, r, n.srv.ClientURL())
	testutil.Eventually(t, 90*time.Second, fmt.Sprintf("%d events in the stream", total), func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c >= total, fmt.Sprint(c)
	})
	testutil.Eventually(t, 20*time.Second, "the queue to be empty", func() (bool, string) {
		m, _ := r.queueDepth(r.queue)
		return m == 0, fmt.Sprintf("%d messages", m)
	})
	// A graceful stop ends with status 0.
	if err := second.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-second.done:
		second.done <- err
		if err != nil {
			t.Errorf("bridge process after SIGTERM: %v, want exit status 0", err)
		}
	case <-time.After(30 * time.Second):
		t.Error("bridge process did not exit within 30s of SIGTERM")
	}
	checkStreamHoldsOnce(t, n, r.stream.Name, ids)
}

// proxiedAMQPURL is the test broker's URL with its host replaced by addr.
func proxiedAMQPURL(t *testing.T, addr string) string {
	t.Helper()
	u, err := url.Parse(testutil.AMQPURL())
	if err != nil {
		t.Fatal(err)
	}
	u.Host = addr
	return u.String()
}

func brokerAddr(t *testing.T) string {
	t.Helper()
	u, err := url.Parse(testutil.AMQPURL())
	if err != nil {
		t.Fatal(err)
	}
	if u.Port() == "" {
		return u.Hostname() + ":5672"
	}
	return u.Host
}

func startProxy(t *testing.T) *tcpproxy.Proxy {
	t.Helper()
	p, err := tcpproxy.Start(brokerAddr(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func TestBrokerDropsConnectionAndNATSRestarts(t *testing.T) {
	const batch = 3000
	r := newRig(t)
	srv, err := natsserver.Start(natsserver.Options{Listen: "127.0.0.1:-1", DataDir: t.TempDir(), ServerName: "restart"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Shutdown() })
	n := connectNATS(t, srv)
	proxy := startProxy(t)
	o := r.options()
	o.AMQPURLs = []string{proxiedAMQPURL(t, proxy.Addr())}
	o.PubAckTimeout = 2 * time.Second
	br := startBridge(t, o, n.nc)

	var allIDs []string
	publishAsync := func() chan struct{} {
		msgs, ids := notifications(batch)
		allIDs = append(allIDs, ids...)
		done := make(chan struct{})
		go func() { defer close(done); r.publish(msgs...) }()
		return done
	}

	// Burst 1: the broker drops the bridge's connection mid-way.
	done1 := publishAsync()
	testutil.Eventually(t, 30*time.Second, "200 events stored", func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c >= 200, fmt.Sprint(c)
	})
	if closed := proxy.CloseConnections(); closed == 0 {
		t.Fatal("the bridge had no connection through the proxy")
	}
	t.Logf("AMQP connection dropped with %d events stored", n.streamCount(r.stream.Name))

	// Burst 2: NATS restarts (same port, same store) mid-way.
	<-done1
	before := n.streamCount(r.stream.Name)
	done2 := publishAsync()
	testutil.Eventually(t, 30*time.Second, "more events stored", func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c >= before+200, fmt.Sprint(c)
	})
	t.Logf("restarting NATS with %d events stored", n.streamCount(r.stream.Name))
	if err := srv.Restart(); err != nil {
		t.Fatalf("restarting NATS: %v", err)
	}
	<-done2

	testutil.Eventually(t, 60*time.Second, fmt.Sprintf("%d events in the stream", len(allIDs)), func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c >= len(allIDs), fmt.Sprint(c)
	})
	checkStreamHoldsOnce(t, n, r.stream.Name, allIDs)
	testutil.Eventually(t, 20*time.Second, "ready again", func() (bool, string) {
		err := br.b.Ready()
		return err == nil, fmt.Sprint(err)
	})
	if got := promtest.ToFloat64(br.b.m.reconnects.WithLabelValues(sideAMQP)); got < 1 {
		t.Errorf("reconnects_total{side=amqp} = %v, want at least 1", got)
	}
	// Counted by a status listener, asynchronously to the publishes.
	testutil.Eventually(t, 5*time.Second, "reconnects_total{side=nats} >= 1", func() (bool, string) {
		got := promtest.ToFloat64(br.b.m.reconnects.WithLabelValues(sideNATS))
		return got >= 1, fmt.Sprint(got)
	})
	t.Logf("publish errors %v, duplicates %v, ack errors %v",
		promtest.ToFloat64(br.b.m.publishErrors), promtest.ToFloat64(br.b.m.duplicates), promtest.ToFloat64(br.b.m.ackErrors))
}

func TestSilentNetworkDetectedByHeartbeat(t *testing.T) {
	r := newRig(t)
	n := startNATS(t)
	proxy := startProxy(t)
	o := r.options()
	o.AMQPURLs = []string{proxiedAMQPURL(t, proxy.Addr())}
	o.Heartbeat = time.Second
	o.ConnectTimeout = time.Second
	br := startBridge(t, o, n.nc)

	// The network goes silent: nothing is closed, bytes stop flowing.
	proxy.Pause()
	testutil.Eventually(t, 20*time.Second, "Ready() to report the dead AMQP connection", func() (bool, string) {
		err := br.b.Ready()
		return err != nil && strings.Contains(err.Error(), "RabbitMQ"), fmt.Sprint(err)
	})
	// Keystone goes on publishing meanwhile; reconnection attempts through
	// the silent proxy time out and are retried.
	msgs, ids := notifications(100)
	r.publish(msgs...)
	proxy.Resume()
	testutil.Eventually(t, 30*time.Second, "100 events stored", func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c >= 100, fmt.Sprint(c)
	})
	checkStreamHoldsOnce(t, n, r.stream.Name, ids)
	testutil.Eventually(t, 10*time.Second, "ready again", func() (bool, string) {
		err := br.b.Ready()
		return err == nil, fmt.Sprint(err)
	})
}

func TestSeveralBrokerURLsTriedInTurn(t *testing.T) {
	r := newRig(t)
	n := startNATS(t)
	down := startProxy(t)
	down.Refuse(true)
	up := startProxy(t)
	o := r.options()
	// The first broker refuses connections: the bridge must go on to the second.
	o.AMQPURLs = []string{proxiedAMQPURL(t, down.Addr()) + "," + proxiedAMQPURL(t, up.Addr())}
	br := startBridge(t, o, n.nc)
	if up.Connections() != 1 {
		t.Fatalf("connections through the working broker's proxy = %d, want 1", up.Connections())
	}
	// The second goes away and the first comes back.
	down.Refuse(false)
	up.Refuse(true)
	up.CloseConnections()
	testutil.Eventually(t, 20*time.Second, "a connection through the first broker's proxy", func() (bool, string) {
		return down.Connections() == 1 && br.b.Ready() == nil, fmt.Sprintf("%d connections, ready: %v", down.Connections(), br.b.Ready())
	})
	msgs, ids := notifications(10)
	r.publish(msgs...)
	testutil.Eventually(t, 20*time.Second, "10 events stored", func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c >= 10, fmt.Sprint(c)
	})
	checkStreamHoldsOnce(t, n, r.stream.Name, ids)
}

func TestStreamDeletedWhileRunning(t *testing.T) {
	r := newRig(t)
	n := startNATS(t)
	o := r.options()
	o.StreamCheckPeriod = time.Hour // only a failed publish can trigger the check
	br := startBridge(t, o, n.nc)
	ctx := context.Background()
	if err := n.checkJ.DeleteStream(ctx, r.stream.Name); err != nil {
		t.Fatal(err)
	}
	// Publishes now fail (no stream answers): the deliveries are nacked and
	// requeued, never acked, until the bridge has created the stream again.
	msgs, ids := notifications(50)
	r.publish(msgs...)
	testutil.Eventually(t, 30*time.Second, "50 events in the re-created stream", func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c >= 50, fmt.Sprint(c)
	})
	checkStreamHoldsOnce(t, n, r.stream.Name, ids)
	testutil.Eventually(t, 10*time.Second, "the queue to be empty", func() (bool, string) {
		m, _ := r.queueDepth(r.queue)
		return m == 0, fmt.Sprintf("%d messages", m)
	})
	if got := promtest.ToFloat64(br.b.m.publishErrors); got < 1 {
		t.Errorf("publish_errors_total = %v, want at least 1 while the stream was missing", got)
	}
}

func TestClusterWithThreeReplicas(t *testing.T) {
	servers := testutil.StartNATSCluster(t, 3, "bridge-test")
	n := connectNATS(t, servers[0])
	r := newRig(t)
	r.stream.Replicas = 3
	// The JetStream meta leader is elected some time after start.
	testutil.Eventually(t, 60*time.Second, "the 3-replica stream to be created", func() (bool, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := stream.Ensure(ctx, n.checkJ, r.stream)
		return err == nil, fmt.Sprint(err)
	})
	o := r.options()
	o.Stream.Replicas = 3
	startBridge(t, o, n.nc)
	msgs, ids := notifications(100)
	r.publish(msgs...)
	testutil.Eventually(t, 30*time.Second, "100 events stored", func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c >= 100, fmt.Sprint(c)
	})
	checkStreamHoldsOnce(t, n, r.stream.Name, ids)
	s, err := n.checkJ.Stream(context.Background(), r.stream.Name)
	if err != nil {
		t.Fatal(err)
	}
	info := s.CachedInfo()
	if info.Config.Replicas != 3 || info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
		t.Fatalf("stream replicas %d, cluster %+v; want 3 replicas (a leader and 2 followers)", info.Config.Replicas, info.Cluster)
	}
}

func TestQueueDeletedWhileRunning(t *testing.T) {
	r := newRig(t)
	n := startNATS(t)
	br := startBridge(t, r.options(), n.nc)
	ch := r.channel()
	if _, err := ch.QueueDelete(r.queue, false, false, false); err != nil {
		t.Fatal(err)
	}
	// RabbitMQ cancels the consumer; the bridge declares and binds the queue
	// again and consumes from it.
	testutil.Eventually(t, 20*time.Second, "the queue declared again with one consumer", func() (bool, string) {
		_, c := r.queueDepth(r.queue)
		return c == 1, fmt.Sprintf("%d consumers", c)
	})
	msgs, ids := notifications(10)
	r.publish(msgs...)
	testutil.Eventually(t, 20*time.Second, "10 events stored", func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c >= 10, fmt.Sprint(c)
	})
	checkStreamHoldsOnce(t, n, r.stream.Name, ids)
	if got := promtest.ToFloat64(br.b.m.reconnects.WithLabelValues(sideAMQP)); got < 1 {
		t.Errorf("reconnects_total{side=amqp} = %v, want at least 1", got)
	}
}
