package regionagent

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

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
			reg := prometheus.NewRegistry()
			a, err := New(o, nc, inv, reg, log)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- a.Run(ctx) }()
			t.Cleanup(func() {
				cancel()
				select {
				case <-done:
				case <-time.After(30 * time.Second):
					t.Error("Run did not return within 30s of its context ending")
				}
			})
			testutil.Eventually(t, 10*time.Second, "the agent bound to its consumer", func() (bool, string) {
				return a.bound.Load(), "not bound"
			})
			e1 := testEvent(1)
			env.publish(e1)
			waitProcessed(t, inv, []string{e1.ID}, 1, 10*time.Second)

			px.Pause()
			select {
			case <-silent: // two heartbeats missed, and a look at the consumer timed out
			case <-time.After(30 * time.Second):
				t.Fatalf("the agent did not find its consumer silent (%v missed-heartbeat errors)", counter(a.m.consumerErrors.WithLabelValues(consumerErrHeartbeat)))
			}
			if tc.closed {
				nc.Close()
				select {
				case err := <-done:
					if err == nil {
						t.Fatal("Run returned nil after the NATS connection was closed, want an error")
					}
					done <- err // for the cleanup
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
			if g := sumMetric(t, reg, "keystone_fanout_agent_gaps_total"); g != 0 {
				t.Errorf("gaps_total %v after the silence, want 0", g)
			}
		})
	}
}
