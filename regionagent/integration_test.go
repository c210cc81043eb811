package regionagent

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

// writeBackInvalidator lets the test write a stale entry back right after the
// first pass that includes event id finished, as a validation that raced with
// the event would: the write happens while the pass returns.
type writeBackInvalidator struct {
	*tokencache.Invalidator
	id      string
	once    sync.Once
	after   chan struct{} // the first pass of id finished
	written chan struct{} // the test wrote the stale entry back
}

func (w *writeBackInvalidator) Invalidate(ctx context.Context, evs []event.Event) (tokencache.Result, error) {
	res, err := w.Invalidator.Invalidate(ctx, evs)
	if err != nil {
		return res, err
	}
	for _, e := range evs {
		if e.ID == w.id {
			w.once.Do(func() {
				w.after <- struct{}{}
				<-w.written
			})
		}
	}
	return res, err
}

// TestWithMemcachedAndMiddleware runs the agent against real memcached
// servers holding entries written by keystonemiddleware itself, with the real
// token cache Invalidator: the revoked user's entry goes from every server,
// the other stays, a stale entry written back after the first pass is removed
// (by the live index when its store is reported, or by the second pass), and
// an unbounded event sweeps every token entry.
func TestWithMemcachedAndMiddleware(t *testing.T) {
	mcs := memcachetest.Start(t, 2)
	addrs := memcachetest.Addrs(mcs)
	cluster, err := memcache.New(memcache.Options{Servers: memcachetest.List(mcs)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cluster.Close() })
	kmw := kmwtest.Start(t, addrs, kmwtest.None, "", 0)

	g := kmwtest.NewGen(7)
	domain, project := g.ID(), g.ID()
	role := []kmwtest.Role{{ID: g.ID(), Name: "member"}}
	spec := func(user string) kmwtest.Spec {
		return kmwtest.Spec{UserID: user, UserDomainID: domain, ProjectID: project, ProjectDomainID: domain, Roles: role}
	}
	victimUser, otherUser := g.ID(), g.ID()
	var victims, others []kmwtest.Entry
	for range 10 {
		victims = append(victims, g.Entry(spec(victimUser)))
		others = append(others, g.Entry(spec(otherUser)))
	}
	tokenIDs := func(es []kmwtest.Entry) []string {
		var out []string
		for _, e := range es {
			out = append(out, e.TokenID)
		}
		return out
	}
	for _, w := range kmw.Write(append(append([]kmwtest.Entry{}, victims...), others...)) {
		if !w.Stored {
			t.Fatalf("the middleware could not store %s", w.TokenID)
		}
	}

	reg := prometheus.NewRegistry()
	tc, err := tokencache.NewInvalidator(cluster, tokencache.Options{}, reg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = tc.Run(ctx)
	}()
	t.Cleanup(func() { cancel(); wg.Wait() })

	revoke := event.Event{Version: event.SchemaVersion, Kind: event.KindNotification, ID: "revoke-victim",
		Type: "identity.user.updated", Time: time.Now().UTC(), Format: "basic", UserID: victimUser}
	inv := &writeBackInvalidator{Invalidator: tc, id: revoke.ID,
		after: make(chan struct{}), written: make(chan struct{})}

	env := newEnv(t)
	o := testOptions()
	o.SecondPassDelay = 300 * time.Millisecond
	ra := startAgent(t, env.nc, o, inv)
	ra.waitBound(t)
	if err := ra.Ready(); err != nil {
		t.Fatalf("Ready with memcached up: %v", err)
	}

	env.publish(revoke)
	select {
	case <-inv.after:
	case <-time.After(30 * time.Second):
		t.Fatal("the first pass of the revocation did not finish within 30s")
	}
	if got := kmw.Read(tokenIDs(victims)); len(got) != 0 {
		t.Fatalf("after the first pass the middleware still finds %d of the revoked user's %d tokens", len(got), len(victims))
	}
	// A validation that raced with the revocation writes its result back.
	stale := victims[0]
	if w := kmw.Write([]kmwtest.Entry{stale}); !w[0].Stored {
		t.Fatal("could not write the stale entry back")
	}
	close(inv.written)

	env.waitAcked(1, 30*time.Second)
	if got := kmw.Read(tokenIDs(victims)); len(got) != 0 {
		t.Fatalf("after both passes the middleware finds %d of the revoked user's tokens (the stale write-back survived)", len(got))
	}
	if got := kmw.Read(tokenIDs(others)); len(got) != len(others) {
		t.Fatalf("the other user's tokens: the middleware finds %d of %d, want all", len(got), len(others))
	}
	// The stale write-back goes once: as soon as the watcher reports its
	// store when the live index runs (the usual case), else by the second
	// pass. The watcher's removal is counted after its delete, which can be
	// after the second pass found nothing and the event was acknowledged.
	testutil.Eventually(t, 10*time.Second, "the stale write-back counted once", func() (bool, string) {
		lateRemoved := gathered(t, reg, "keystone_fanout_invalidator_late_writebacks_removed_total")
		second := counter(ra.m.secondRemovals)
		return lateRemoved+second == 1, fmt.Sprintf("late_writebacks_removed_total %v + second_pass_removals_total %v", lateRemoved, second)
	})
	// Every removal counts there, the stale write-back's too (by whichever
	// path removed it).
	testutil.Eventually(t, 10*time.Second, fmt.Sprintf("entries_removed_total %d", len(victims)+1), func() (bool, string) {
		n := sumMetric(t, reg, "keystone_fanout_invalidator_entries_removed_total")
		return n == float64(len(victims)+1), fmt.Sprint(n)
	})

	// An event that cannot be bounded removes every token entry.
	unknown := event.Event{Version: event.SchemaVersion, Kind: event.KindNotification, ID: "unknown-1",
		Type: "identity.something.new", Time: time.Now().UTC(), Widen: event.WidenUnknownType}
	env.publish(unknown)
	env.waitAcked(2, 30*time.Second)
	if got := kmw.Read(tokenIDs(others)); len(got) != 0 {
		t.Fatalf("after an unbounded event the middleware still finds %d tokens", len(got))
	}
	if n := counter(ra.m.sweeps); n < 1 {
		t.Fatalf("sweeps_total %v, want >= 1", n)
	}

	// memcached down: not ready, and an event waits unacknowledged.
	mcs[1].Stop()
	testutil.Eventually(t, 10*time.Second, "Ready to report memcached", func() (bool, string) {
		err := ra.Ready()
		return err != nil, fmt.Sprint(err)
	})
	late := testEvent(3)
	env.publish(late)
	testutil.Eventually(t, 30*time.Second, "a failed invalidation while a server is down", func() (bool, string) {
		n := counter(ra.m.failures.WithLabelValues(passFirst))
		return n >= 1, fmt.Sprintf("%v failures", n)
	})
	if ci, err := env.consumerInfo(); err != nil || ci.AckFloor.Stream != 2 {
		t.Fatalf("with a server down the event must stay unacknowledged: %+v %v", ci, err)
	}
	mcs[1].Restart()
	env.waitAcked(3, 60*time.Second)
}

// gathered sums the samples of a counter or gauge family in reg.
func gathered(t testing.TB, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}
