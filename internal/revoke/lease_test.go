package revoke

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// replica is one bridge replica's poller with a NATS connection of its own.
type replica struct {
	p    *Poller
	reg  *prometheus.Registry
	nc   *nats.Conn
	stop func()
}

// jetStreamOf connects to url for the test's own checks.
func jetStreamOf(t *testing.T, url string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

func startReplica(t *testing.T, url string, o Options, name string) *replica {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	o.Holder = name
	reg := prometheus.NewRegistry()
	p, err := New(o, js, reg, testutil.Logger(t).With("replica", name))
	if err != nil {
		t.Fatal(err)
	}
	return &replica{p: p, reg: reg, nc: nc, stop: runPoller(t, p)}
}

func (r *replica) holds(t *testing.T) bool {
	return metricValue(t, r.reg, "keystone_fanout_revoke_lease_held") == 1
}

// holders lists which of rs hold the lease now.
func holders(t *testing.T, rs ...*replica) []int {
	var out []int
	for i, r := range rs {
		if r != nil && r.holds(t) {
			out = append(out, i)
		}
	}
	return out
}

// TestLeaseOneReplicaPolls: of several replicas one polls; a replica that
// stops hands over at once; one that dies (no renewal, no release) is taken
// over after the lease's ttl. Keystone's load does not grow with replicas.
func TestLeaseOneReplicaPolls(t *testing.T) {
	f := newFakeKeystone(false)
	defer f.Close()
	srv := testutil.StartNATS(t)
	o := fakeOptions(f)
	o.LeaseTTL = 3 * time.Second // a loaded machine's stall of the holder's renewals is not a death
	rs := []*replica{startReplica(t, srv.ClientURL(), o, "a"), startReplica(t, srv.ClientURL(), o, "b"), startReplica(t, srv.ClientURL(), o, "c")}
	var holder int
	testutil.Eventually(t, 10*time.Second, "exactly one holder", func() (bool, string) {
		h := holders(t, rs...)
		if len(h) == 1 {
			holder = h[0]
		}
		return len(h) == 1, fmt.Sprint(h)
	})
	_, lists := f.counts()
	testutil.Eventually(t, 10*time.Second, "five polls", func() (bool, string) {
		_, l := f.counts()
		return l >= lists+5, fmt.Sprint(l - lists)
	})
	for i, r := range rs {
		if polls := metricValue(t, r.reg, "keystone_fanout_revoke_polls_total"); (i == holder) != (polls > 0) {
			t.Errorf("replica %d (holder %d) polled %v times", i, holder, polls)
		}
		// A standby is ready once it has seen the holder renew (every ttl/4).
		testutil.Eventually(t, 2*o.LeaseTTL, fmt.Sprintf("replica %d ready as holder or standby", i), func() (bool, string) {
			err := r.p.Ready()
			return err == nil, fmt.Sprint(err)
		})
	}

	// A clean stop hands the lease over at once.
	start := time.Now()
	rs[holder].stop()
	rs[holder] = nil
	testutil.Eventually(t, 10*time.Second, "another replica holds the lease after a clean stop", func() (bool, string) {
		h := holders(t, rs...)
		if len(h) == 1 {
			holder = h[0]
		}
		return len(h) == 1, fmt.Sprint(h)
	})
	t.Logf("takeover after a clean stop: %s", time.Since(start).Round(time.Millisecond))

	// A holder that dies renews nothing and releases nothing.
	start = time.Now()
	dead := rs[holder]
	dead.nc.Close()
	rs[holder] = nil
	testutil.Eventually(t, 10*time.Second, "the last replica holds the lease after the holder died", func() (bool, string) {
		h := holders(t, rs...)
		return len(h) == 1, fmt.Sprint(h)
	})
	t.Logf("takeover after the holder died (ttl %s): %s", o.LeaseTTL, time.Since(start).Round(time.Millisecond))
}

// TestNotificationTriggersPoll: a notification stored in the stream makes the
// holder poll at once; the revocation event it finds is stored before the
// proof of progress for the notification's sequence.
func TestNotificationTriggersPoll(t *testing.T) {
	f := newFakeKeystone(false)
	defer f.Close()
	srv := testutil.StartNATS(t)
	o := fakeOptions(f)
	o.PollInterval = time.Hour // only notifications make it poll after the first
	r := startReplica(t, srv.ClientURL(), o, "a")
	js, err := jetstream.New(r.nc)
	if err != nil {
		t.Fatal(err)
	}
	createStream(t, js, time.Minute)
	testutil.Eventually(t, 10*time.Second, "the first poll", func() (bool, string) {
		_, l := f.counts()
		return r.holds(t) && l >= 1, fmt.Sprint(l)
	})
	time.Sleep(200 * time.Millisecond) // the ordered consumer follows new messages only

	// Keystone records the event, then announces the change.
	f.add(map[string]any{"user_id": "removed-member"}, time.Now())
	start := time.Now()
	n := event.Event{Version: event.SchemaVersion, Kind: event.KindNotification, ID: "n1", Type: "identity.group.updated",
		Time: time.Now().UTC(), Format: "cadf", GroupID: "g"}
	body, _ := n.Marshal()
	ack, err := js.Publish(context.Background(), stream.Subject("keystone", &n), body)
	if err != nil {
		t.Fatal(err)
	}
	var revSeq, polledSeq uint64
	testutil.Eventually(t, 10*time.Second, "the revocation event, then the proof of progress", func() (bool, string) {
		revSeq, polledSeq = 0, 0
		s, err := js.Stream(context.Background(), testStream)
		if err != nil {
			return false, err.Error()
		}
		info, _ := s.Info(context.Background())
		for seq := ack.Sequence + 1; seq <= info.State.LastSeq; seq++ {
			m, err := s.GetMsg(context.Background(), seq)
			if err != nil {
				continue
			}
			e, _ := event.Unmarshal(m.Data)
			switch {
			case e.Kind == event.KindRevocation && e.Revocation.UserID == "removed-member":
				revSeq = seq
			case e.Kind == event.KindPolled && e.Polled.Through >= ack.Sequence && polledSeq == 0:
				polledSeq = seq
			}
		}
		return revSeq > 0 && polledSeq > revSeq, fmt.Sprintf("revocation at %d, polled at %d", revSeq, polledSeq)
	})
	t.Logf("notification stored to its proof of progress stored: %s", time.Since(start).Round(time.Millisecond))
	// The follow-up polls happen, then it is quiet again.
	testutil.Eventually(t, 10*time.Second, "the follow-up polls", func() (bool, string) {
		_, l := f.counts()
		return l >= 5, fmt.Sprint(l)
	})
	if got := metricValue(t, r.reg, "keystone_fanout_revoke_polled_published_total"); got < 1 {
		t.Errorf("polled_published_total = %v, want at least 1", got)
	}
}

// TestFailingHolderHandsOver: a holder whose polls keep failing (only it
// cannot reach Keystone) gives the lease up, and a replica that can poll takes
// it.
func TestFailingHolderHandsOver(t *testing.T) {
	broken, good := newFakeKeystone(false), newFakeKeystone(false)
	defer broken.Close()
	defer good.Close()
	broken.mu.Lock()
	broken.listCode = http.StatusServiceUnavailable
	broken.mu.Unlock()
	srv := testutil.StartNATS(t)
	o := fakeOptions(broken)
	o.LeaseTTL = 500 * time.Millisecond
	a := startReplica(t, srv.ClientURL(), o, "a")
	testutil.Eventually(t, 10*time.Second, "the broken replica holding the lease", func() (bool, string) {
		return a.holds(t), "not yet"
	})
	o = fakeOptions(good)
	o.LeaseTTL = 500 * time.Millisecond
	b := startReplica(t, srv.ClientURL(), o, "b")
	start := time.Now()
	testutil.Eventually(t, 30*time.Second, "the working replica holding the lease", func() (bool, string) {
		return b.holds(t) && !a.holds(t) && b.p.Ready() == nil, fmt.Sprint(b.p.Ready())
	})
	t.Logf("handed over after %s", time.Since(start).Round(time.Millisecond))
}
