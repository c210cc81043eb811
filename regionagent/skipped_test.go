package regionagent

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// TestResolveSkipped looks up skipped sequences in a real stream holding six
// events (sequences 1 to 6) after the case's changes.
func TestResolveSkipped(t *testing.T) {
	tests := []struct {
		name    string
		limit   int    // Options.skippedFetchLimit
		stream  string // the stream the agent reads, when not the one holding the events
		change  func(t *testing.T, s jetstream.Stream)
		skipped seqRange
		wantGap bool
		// wantFetched are the events invalidated at once.
		wantFetched []string
	}{
		{name: "all still in the stream", skipped: seqRange{2, 4},
			wantFetched: []string{"ev-0002", "ev-0003", "ev-0004"}},
		{name: "one deleted from the middle", skipped: seqRange{2, 4}, change: deleteSeq(3), wantGap: true},
		{name: "a deletion elsewhere", skipped: seqRange{2, 4}, change: deleteSeq(5),
			wantFetched: []string{"ev-0002", "ev-0003", "ev-0004"}},
		{name: "purged", skipped: seqRange{1, 2}, change: purgeBelow(4), wantGap: true},
		{name: "not fetched, all in the stream", limit: -1, skipped: seqRange{2, 4}},
		{name: "not fetched, a deletion elsewhere", limit: -1, skipped: seqRange{2, 4}, change: deleteSeq(5)},
		{name: "not fetched, one deleted from the middle", limit: -1, skipped: seqRange{2, 4}, change: deleteSeq(3), wantGap: true},
		{name: "not fetched, purged", limit: -1, skipped: seqRange{1, 2}, change: purgeBelow(4), wantGap: true},
		{name: "longer than the fetch limit", limit: 2, skipped: seqRange{1, 4}},
		{name: "longer than the fetch limit, one deleted", limit: 2, skipped: seqRange{1, 4}, change: deleteSeq(2), wantGap: true},
		{name: "cannot be looked up", stream: "MISSING", skipped: seqRange{2, 4}, wantGap: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			env := newEnv(t)
			evs := events(1, 6)
			env.publish(evs...)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if tc.change != nil {
				s, err := env.js.Stream(ctx, testStream)
				if err != nil {
					t.Fatal(err)
				}
				tc.change(t, s)
			}
			o := testOptions()
			o.skippedFetchLimit = tc.limit
			if tc.stream != "" {
				o.Stream = tc.stream
			}
			a, err := New(o, env.nc, &fakeInvalidator{}, prometheus.NewRegistry(), testutil.Logger(t))
			if err != nil {
				t.Fatal(err)
			}
			a.tr.initialized = true
			a.resolveSkipped(ctx, 0, tc.skipped, time.Now())

			var fetched []string
			gaps := 0
			for len(a.in) > 0 {
				it := <-a.in
				switch {
				case it.gap:
					gaps++
				case it.msg == nil:
					fetched = append(fetched, it.ev.ID)
					if want := evs[it.seq-1]; it.ev.UserID != want.UserID || it.ev.Type != want.Type {
						t.Errorf("sequence %d fetched as %+v, want the event published there, %+v", it.seq, it.ev, want)
					}
				}
			}
			if (gaps == 1) != tc.wantGap || gaps > 1 {
				t.Fatalf("%d gap sweeps queued, want gap %v", gaps, tc.wantGap)
			}
			if got := counter(a.m.gaps.WithLabelValues(GapSequenceJump)); (got == 1) != tc.wantGap {
				t.Fatalf("gaps_total{reason=sequence_jump} = %v, want gap %v", got, tc.wantGap)
			}
			slices.Sort(fetched)
			if !slices.Equal(fetched, tc.wantFetched) {
				t.Fatalf("fetched and queued %v, want %v", fetched, tc.wantFetched)
			}
			if got := counter(a.m.skippedFetched); int(got) != len(tc.wantFetched) {
				t.Fatalf("skipped_events_fetched_total = %v, want %d", got, len(tc.wantFetched))
			}
		})
	}
}

func deleteSeq(seq uint64) func(*testing.T, jetstream.Stream) {
	return func(t *testing.T, s jetstream.Stream) {
		t.Helper()
		if err := s.DeleteMsg(context.Background(), seq); err != nil {
			t.Fatalf("deleting sequence %d: %v", seq, err)
		}
	}
}

func purgeBelow(seq uint64) func(*testing.T, jetstream.Stream) {
	return func(t *testing.T, s jetstream.Stream) {
		t.Helper()
		if err := s.Purge(context.Background(), jetstream.WithPurgeSequence(seq)); err != nil {
			t.Fatalf("purging below sequence %d: %v", seq, err)
		}
	}
}

// TestLostDeliveryIsNotAGap: JetStream delivers an event into a connection
// that then drops, so the agent never receives it; the consumer counts it as
// delivered and redelivers it only after the ack wait, while the next event
// arrives first-hand, two past the last one the agent saw. That is no gap:
// the agent fetches the lost event from the stream and invalidates it at
// once, sweeps nothing, and still handles and acknowledges the redelivery.
func TestLostDeliveryIsNotAGap(t *testing.T) {
	env := newEnv(t)
	px, agentNC := connectProxied(t, env)
	inv := &fakeInvalidator{}
	o := testOptions()
	// Long enough that the redelivery cannot come before the next event, as
	// in production (3s by default), even on a loaded machine where the
	// agent's new pull request takes seconds to be served: longer than the
	// 10s the test waits for the next event to be handled.
	o.RedeliveryBackoff = []time.Duration{15 * time.Second}
	// A pull request outlives the pause (it expires after 4 heartbeats).
	o.Heartbeat = 5 * time.Second
	ra := startAgent(t, agentNC, o, inv)
	ra.waitBound(t)
	e1, e2, e3 := testEvent(1), testEvent(2), testEvent(3)
	env.publish(e1)
	env.waitAcked(1, 10*time.Second)

	// e2 is delivered into the paused proxy, then lost with the connection.
	px.Pause()
	env.publish(e2)
	testutil.Eventually(t, 10*time.Second, "JetStream to deliver stream sequence 2 into the paused connection", func() (bool, string) {
		ci, err := env.consumerInfo()
		if err != nil {
			return false, err.Error()
		}
		return ci.Delivered.Stream >= 2, fmt.Sprintf("delivered up to %d", ci.Delivered.Stream)
	})
	px.CloseConnections()
	px.Resume()
	dropped := time.Now()
	// Until the agent reconnected, the next event could be lost the same way.
	testutil.Eventually(t, 10*time.Second, "the agent's connection back", func() (bool, string) {
		n := agentNC.Stats().Reconnects
		return n >= 1 && agentNC.IsConnected(), fmt.Sprintf("%s after %d reconnects", agentNC.Status(), n)
	})

	env.publish(e3)
	waitProcessed(t, inv, []string{e2.ID, e3.ID}, 1, 10*time.Second)
	handled := time.Now()
	if n := counter(ra.m.skippedFetched); n != 1 {
		t.Fatalf("skipped_events_fetched_total = %v, want 1 (the lost event fetched from the stream)", n)
	}
	if n := counter(ra.m.redeliveries); n != 0 {
		t.Fatalf("the lost event was redelivered (redeliveries_total %v) before the next event revealed it: the test's timing does not hold", n)
	}
	t.Logf("the lost event was invalidated %s after its connection dropped (the redelivery comes after %s)",
		handled.Sub(dropped).Round(time.Millisecond), o.RedeliveryBackoff[0])

	// The redelivery is handled again and acknowledged.
	env.waitAcked(3, 40*time.Second)
	waitProcessed(t, inv, []string{e2.ID}, 2, 5*time.Second)
	if n := counter(ra.m.redeliveries); n != 1 {
		t.Fatalf("redeliveries_total = %v, want 1 (the lost event)", n)
	}
	if g, calls := ra.totalGaps(), inv.gapCalls(); g != 0 || calls != 0 {
		t.Fatalf("a lost delivery was taken for a gap: gaps_total %v, sweeps %d", g, calls)
	}
}

// TestGapSequenceJumpWhileRunning: an event deleted from the stream before the
// running agent got it is a gap, found when the next event comes.
func TestGapSequenceJumpWhileRunning(t *testing.T) {
	env := newEnv(t)
	release := make(chan struct{})
	inv := &fakeInvalidator{gate: func(ctx context.Context, n int, evs []event.Event) error {
		if n > 0 {
			return nil
		}
		select { // the first call waits: nothing else is delivered meanwhile
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}}
	o := testOptions()
	o.BatchSize = 1
	o.MaxAckPending = 1
	ra := startAgent(t, env.nc, o, inv)
	ra.waitBound(t)
	seqs := env.publish(events(1, 4)...)
	testutil.Eventually(t, 10*time.Second, "1 event held, 3 not delivered", func() (bool, string) {
		ci, err := env.consumerInfo()
		if err != nil {
			return false, err.Error()
		}
		return ci.NumAckPending == 1 && ci.NumPending == 3, fmt.Sprintf("ack pending %d, pending %d", ci.NumAckPending, ci.NumPending)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := env.js.Stream(ctx, testStream)
	if err != nil {
		t.Fatal(err)
	}
	deleteSeq(seqs[2])(t, s)
	close(release)
	env.waitAcked(seqs[3], 10*time.Second)
	testutil.Eventually(t, 10*time.Second, "one gap sweep for the deleted event", func() (bool, string) {
		return ra.gaps(GapSequenceJump) == 1 && inv.gapCalls() == 1,
			fmt.Sprintf("gaps %v, sweeps %d", ra.gaps(GapSequenceJump), inv.gapCalls())
	})
	if g := ra.totalGaps(); g != 1 {
		t.Fatalf("gaps_total %v, want 1", g)
	}
	if n := counter(ra.m.skippedFetched); n != 0 {
		t.Fatalf("skipped_events_fetched_total = %v, want 0", n)
	}
}

// TestGapEventDeletedWhileAKilledAgentHeldIt: a previous agent was given
// events and died without acknowledging them; one of them was then deleted
// from the stream. The restarted agent resets the consumer to its ack floor;
// the redelivery skips the deleted event, which reveals the gap.
func TestGapEventDeletedWhileAKilledAgentHeldIt(t *testing.T) {
	env := newEnv(t)
	var away []uint64
	ra, inv := stopAndRestart(t, env, testOptions(), 3, func() {
		away = env.publish(events(100, 3)...)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		// The "killed agent": it takes the events and never answers.
		c, err := env.js.Consumer(ctx, testStream, testRegion)
		if err != nil {
			t.Fatal(err)
		}
		batch, err := c.Fetch(len(away), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for range batch.Messages() {
			n++
		}
		if n != len(away) {
			t.Fatalf("the killed agent got %d events, want %d (%v)", n, len(away), batch.Error())
		}
		s, err := env.js.Stream(ctx, testStream)
		if err != nil {
			t.Fatal(err)
		}
		deleteSeq(away[1])(t, s)
	})
	env.waitAcked(away[2], 10*time.Second)
	testutil.Eventually(t, 10*time.Second, "a gap sweep for the deleted event", func() (bool, string) {
		return ra.gaps(GapSequenceJump) == 1 && inv.gapCalls() == 1,
			fmt.Sprintf("gaps %v, sweeps %d", ra.gaps(GapSequenceJump), inv.gapCalls())
	})
	waitProcessed(t, inv, []string{testEvent(100).ID, testEvent(102).ID}, 1, 5*time.Second)
	if n := counter(ra.m.resets); n != 1 {
		t.Fatalf("consumer_resets_total = %v, want 1", n)
	}
}

// TestSkippedLookedUpAgain: when the stream does not answer (a black-holed
// link), a jump is looked up again before it is taken for a gap; once the
// stream answers, the skipped events are fetched and nothing is swept. A
// stream that never answers is still a gap.
func TestSkippedLookedUpAgain(t *testing.T) {
	for _, tc := range []struct {
		name    string
		resume  bool // the link comes back after the first lookup
		wantGap bool
	}{
		{name: "the stream answers the second time", resume: true},
		{name: "the stream never answers", wantGap: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newEnv(t)
			env.publish(events(1, 6)...)
			px, nc := connectProxied(t, env)
			o := testOptions()
			o.skippedTimeout = 300 * time.Millisecond
			if tc.resume {
				o.skippedTimeout = 2 * time.Second // the lookups after the resume must not time out
			}
			o.skippedRetry = []time.Duration{200 * time.Millisecond, 200 * time.Millisecond}
			retried := make(chan struct{}, 10)
			log := slog.New(signalHandler{Handler: testutil.Logger(t).Handler(), msg: "cannot tell whether skipped events are still in the stream; looking again before sweeping", c: retried})
			a, err := New(o, nc, &fakeInvalidator{}, prometheus.NewRegistry(), log)
			if err != nil {
				t.Fatal(err)
			}
			a.tr.initialized = true
			px.Pause()
			if tc.resume {
				go func() {
					<-retried
					px.Resume()
				}()
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			a.resolveSkipped(ctx, 0, seqRange{2, 4}, time.Now())
			gaps, fetched := 0, 0
			for len(a.in) > 0 {
				if it := <-a.in; it.gap {
					gaps++
				} else {
					fetched++
				}
			}
			if tc.wantGap && (gaps != 1 || len(retried) != len(o.skippedRetry)) {
				t.Fatalf("%d gap sweeps after %d lookups again, want 1 after %d", gaps, len(retried), len(o.skippedRetry))
			}
			if !tc.wantGap && (gaps != 0 || fetched != 3) {
				t.Fatalf("%d gap sweeps and %d events fetched, want none and 3", gaps, fetched)
			}
		})
	}
}

// signalHandler sends on c for every record whose message is msg.
type signalHandler struct {
	slog.Handler
	msg string
	c   chan struct{}
}

func (h signalHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == h.msg {
		h.c <- struct{}{}
	}
	return h.Handler.Handle(ctx, r)
}

func (h signalHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return signalHandler{Handler: h.Handler.WithAttrs(as), msg: h.msg, c: h.c}
}

func (h signalHandler) WithGroup(g string) slog.Handler {
	return signalHandler{Handler: h.Handler.WithGroup(g), msg: h.msg, c: h.c}
}
