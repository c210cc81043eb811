package regionagent

import (
	"log/slog"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// TestConsumerSilent: when the way to the consumer goes silent (as a leaf
// node's WAN link does) the agent misses its pull request's heartbeats and
// asks for its consumer until it answers. When it answers again, the agent
// pulls at once with a new request, rather than after two more heartbeats,
// and an event published then is handled without a gap. When the NATS
// connection is closed for good meanwhile, Run ends with an error (the
// process exits and its supervisor restarts it) instead of asking forever.
func TestConsumerSilent(t *testing.T) {
	for _, tc := range []struct {
		name   string
		closed bool // the connection is closed while the agent waits
	}{
		{name: "the consumer answers again"},
		{name: "the connection is closed", closed: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newEnv(t)
			px, nc := connectProxied(t, env)
			o := testOptions()
			o.Heartbeat = 500 * time.Millisecond
			silent, answers := make(chan struct{}, 100), make(chan struct{}, 100)
			log := slog.New(signalHandler{Handler: signalHandler{Handler: testutil.Logger(t).Handler(),
				msg: "missed consumer heartbeats and the consumer does not answer; asking again every 500ms", c: silent},
				msg: "the consumer answers again: pulling at once", c: answers})
			inv := &fakeInvalidator{}
			ra := startAgentLogging(t, nc, o, inv, log)
			ra.waitBound(t)
			e1 := testEvent(1)
			env.publish(e1)
			waitProcessed(t, inv, []string{e1.ID}, 1, 10*time.Second)

			px.Pause()
			select {
			case <-silent: // two heartbeats missed, and a look at the consumer timed out
			case <-time.After(30 * time.Second):
				t.Fatalf("the agent did not find its consumer silent (%v missed-heartbeat errors)", counter(ra.m.consumerErrors.WithLabelValues(consumerErrHeartbeat)))
			}
			if tc.closed {
				nc.Close()
				select {
				case err := <-ra.done:
					close(ra.done) // Run has returned: nothing for stop to wait for
					if err == nil {
						t.Fatal("Run returned nil after the NATS connection was closed, want an error")
					}
				case <-time.After(20 * time.Second):
					t.Fatal("Run did not return after the NATS connection was closed")
				}
				return
			}
			px.Resume()
			select {
			case <-answers:
			case <-time.After(20 * time.Second):
				t.Fatal("the agent did not pull again when the consumer answered")
			}
			e2 := testEvent(2)
			env.publish(e2)
			waitProcessed(t, inv, []string{e2.ID}, 1, 10*time.Second)
			env.waitAcked(2, 20*time.Second)
			if g := sumMetric(t, ra.reg, "keystone_fanout_agent_gaps_total"); g != 0 {
				t.Errorf("gaps_total %v after the silence, want 0", g)
			}
		})
	}
}
