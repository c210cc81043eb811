package regionagent

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/revoke"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// groupChange is a CADF group membership notification: it names the group
// only.
func groupChange(id string) event.Event {
	return event.Event{Version: event.SchemaVersion, Kind: event.KindNotification, ID: id,
		Type: "identity.group.updated", Time: time.Now().UTC(), Format: "cadf", GroupID: "g1"}
}

func polled(through uint64) event.Event {
	return event.Event{Version: event.SchemaVersion, Kind: event.KindPolled, Type: event.PolledType,
		ID: fmt.Sprintf("polled-%d", through), Time: time.Now().UTC(), Polled: &event.Polled{Through: through}}
}

// setLease writes the poller's lease as a holder would.
func (e *testEnv) setLease(healthy bool) {
	e.t.Helper()
	ctx := context.Background()
	kv, err := e.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: DefaultPollerBucket})
	if err != nil {
		e.t.Fatal(err)
	}
	b, _ := json.Marshal(revoke.LeaseState{Holder: "test", TTLMillis: time.Minute.Milliseconds(), Healthy: healthy})
	if _, err := kv.Put(ctx, revoke.LeaseKey, b); err != nil {
		e.t.Fatal(err)
	}
}

// TestResolveThroughThePoller: a CADF group membership notification removes
// nothing itself when the poller proves it polled past it, removes every
// token entry when no poller runs, and when the proof does not come in time.
func TestResolveThroughThePoller(t *testing.T) {
	if DefaultPollerBucket != revoke.DefaultBucket {
		t.Fatalf("DefaultPollerBucket %q is not the poller's bucket %q", DefaultPollerBucket, revoke.DefaultBucket)
	}
	tests := []struct {
		name       string
		lease      bool // a healthy poller holds its lease
		unhealthy  bool // ... but its polls fail
		proof      bool // it publishes its proof after the notification
		wantCalls  int  // invalidator calls with the notification
		wantResult string
	}{
		{name: "proof arrives: nothing removed for the notification", lease: true, proof: true, wantCalls: 0, wantResult: resolvedByPoller},
		{name: "no poller: every token entry at once", wantCalls: 1, wantResult: resolveSourceOff},
		{name: "unhealthy poller: every token entry at once", lease: true, unhealthy: true, wantCalls: 1, wantResult: resolveSourceOff},
		{name: "no proof in time: every token entry", lease: true, wantCalls: 1, wantResult: resolveTimeout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := newEnv(t)
			if tt.lease {
				env.setLease(!tt.unhealthy)
			}
			inv := &fakeInvalidator{}
			o := testOptions()
			o.ResolveWait = 300 * time.Millisecond
			if tt.proof {
				o.ResolveWait = 10 * time.Second // the proof comes in a later publish
			}
			ra := startAgent(t, env.nc, o, inv)
			ra.waitBound(t)
			if tt.lease {
				testutil.Eventually(t, 5*time.Second, "the agent to see the lease", func() (bool, string) {
					return ra.poller.Load() != nil, "not yet"
				})
			}
			seqs := env.publish(groupChange("g-change"))
			if tt.proof {
				env.publish(polled(seqs[0]))
			}
			env.waitAcked(seqs[0], 10*time.Second)
			if got := inv.succeeded()["g-change"]; got != tt.wantCalls {
				t.Errorf("invalidations with the notification: %d, want %d", got, tt.wantCalls)
			}
			if got := counter(ra.m.resolutions.WithLabelValues(tt.wantResult)); got != 1 {
				t.Errorf("resolutions_total{result=%q} = %v, want 1", tt.wantResult, got)
			}
		})
	}
}

// TestOneProofCoversSeveral: one proof resolves every waiting notification up
// to its sequence.
func TestOneProofCoversSeveral(t *testing.T) {
	env := newEnv(t)
	env.setLease(true)
	inv := &fakeInvalidator{}
	o := testOptions()
	o.ResolveWait = 30 * time.Second
	ra := startAgent(t, env.nc, o, inv)
	ra.waitBound(t)
	testutil.Eventually(t, 5*time.Second, "the agent to see the lease", func() (bool, string) {
		return ra.poller.Load() != nil, "not yet"
	})
	seqs := env.publish(groupChange("a"), groupChange("b"))
	env.publish(polled(seqs[1]))
	env.waitAcked(seqs[1], 10*time.Second)
	if n := len(inv.snapshot()); n != 0 {
		t.Fatalf("%d invalidator calls, want none", n)
	}
	if got := counter(ra.m.resolutions.WithLabelValues(resolvedByPoller)); got != 2 {
		t.Fatalf("resolutions_total{result=resolved} = %v, want 2", got)
	}
}

// TestProofOfAnEarlierStreamIgnored: a proof covering sequences after its own
// was made for an earlier copy of the stream and resolves nothing.
func TestProofOfAnEarlierStreamIgnored(t *testing.T) {
	env := newEnv(t)
	env.setLease(true)
	inv := &fakeInvalidator{}
	o := testOptions()
	o.ResolveWait = 300 * time.Millisecond
	ra := startAgent(t, env.nc, o, inv)
	ra.waitBound(t)
	testutil.Eventually(t, 5*time.Second, "the agent to see the lease", func() (bool, string) {
		return ra.poller.Load() != nil, "not yet"
	})
	env.publish(polled(1000)) // sequence 1, covering up to 1000
	seqs := env.publish(groupChange("after"))
	env.waitAcked(seqs[0], 10*time.Second)
	if got := inv.succeeded()["after"]; got != 1 {
		t.Fatalf("the notification after a stale proof was invalidated %d times, want 1 (every token entry)", got)
	}
	if got := counter(ra.m.resolutions.WithLabelValues(resolveStaleProof)); got != 1 {
		t.Fatalf("resolutions_total{result=stale_proof} = %v, want 1", got)
	}
}
