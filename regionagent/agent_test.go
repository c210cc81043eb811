package regionagent

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

func TestConsumerNamedAfterRegionAndAckAfterInvalidation(t *testing.T) {
	env := newEnv(t)
	var failing atomic.Bool
	failing.Store(true)
	inv := &fakeInvalidator{fail: func(int, []event.Event) error {
		if failing.Load() {
			return errFake
		}
		return nil
	}}
	o := testOptions()
	o.MaxAckPending = 300
	ra := startAgent(t, env.nc, o, inv)
	ra.waitBound(t)

	ci, err := env.consumerInfo()
	if err != nil {
		t.Fatalf("consumer %s: %v", testRegion, err)
	}
	c := ci.Config
	if c.Durable != testRegion || c.AckPolicy != jetstream.AckExplicitPolicy || c.MaxAckPending != 300 ||
		c.MaxDeliver != -1 || !slices.Equal(c.BackOff, o.RedeliveryBackoff) || c.InactiveThreshold != 0 ||
		c.DeliverPolicy != jetstream.DeliverByStartTimePolicy || c.DeliverSubject != "" {
		t.Fatalf("consumer config: want durable %s, explicit acks, max ack pending 300, unlimited deliveries, backoff %v, no inactive threshold, pull, by start time; got %+v",
			testRegion, o.RedeliveryBackoff, c)
	}

	ev := testEvent(1)
	env.publish(ev)
	testutil.Eventually(t, 10*time.Second, "at least 3 failed invalidations", func() (bool, string) {
		n := counter(ra.m.failures.WithLabelValues(passFirst))
		return n >= 3, fmt.Sprintf("%v failures", n)
	})
	ci, err = env.consumerInfo()
	if err != nil {
		t.Fatal(err)
	}
	if ci.AckFloor.Stream != 0 || ci.NumAckPending != 1 {
		t.Fatalf("while invalidation fails the event must stay unacknowledged: ack floor %d, ack pending %d", ci.AckFloor.Stream, ci.NumAckPending)
	}
	if got := counter(ra.m.events.WithLabelValues(ev.Type)); got != 0 {
		t.Fatalf("events_total counted %v events before they were handled", got)
	}
	failing.Store(false)
	env.waitAcked(1, 10*time.Second)
	if got := counter(ra.m.events.WithLabelValues(ev.Type)); got != 1 {
		t.Fatalf("events_total{type=%s} = %v, want 1", ev.Type, got)
	}
	if got := inv.succeeded()[ev.ID]; got != 1 {
		t.Fatalf("successful invalidations of %s: %d, want 1 (second pass disabled)", ev.ID, got)
	}
	if ra.totalGaps() != 0 {
		t.Fatalf("gaps counted on a complete stream: %v", ra.totalGaps())
	}
	if err := ra.Ready(); err != nil {
		t.Fatalf("Ready: %v", err)
	}
}

func TestBatching(t *testing.T) {
	env := newEnv(t)
	inv := &fakeInvalidator{}
	o := testOptions()
	o.BatchSize = 100
	ra := startAgent(t, env.nc, o, inv)
	ra.waitBound(t)

	// A burst published while the agent runs.
	burst := events(0, 300)
	seqs := env.publish(burst...)
	env.waitAcked(seqs[len(seqs)-1], 20*time.Second)
	waitProcessed(t, inv, ids(burst), 1, time.Second)
	calls := inv.snapshot()
	for _, c := range calls {
		if len(c.events) > o.BatchSize {
			t.Fatalf("a call had %d events, more than the batch size %d", len(c.events), o.BatchSize)
		}
	}
	// 300 events one by one would be 300 calls; together they need at least 3.
	if len(calls) > 30 {
		t.Fatalf("300 events published at once took %d invalidation calls, want few (<= 30)", len(calls))
	}
	t.Logf("300 events in %d calls", len(calls))
}

func TestBatchingBacklog(t *testing.T) {
	env := newEnv(t)
	backlog := events(0, 200)
	seqs := env.publish(backlog...)
	inv := &fakeInvalidator{}
	o := testOptions()
	o.BatchSize = 64
	startAgent(t, env.nc, o, inv)
	env.waitAcked(seqs[len(seqs)-1], 20*time.Second)
	calls := inv.snapshot()
	if len(calls) > 12 {
		t.Fatalf("a backlog of 200 events took %d invalidation calls with batch size 64, want at most 12", len(calls))
	}
	t.Logf("backlog of 200 events in %d calls", len(calls))
}

func TestSecondPass(t *testing.T) {
	env := newEnv(t)
	release := make(chan struct{})
	var once sync.Once
	var inSecond atomic.Bool
	inv := &fakeInvalidator{}
	inv.gate = func(ctx context.Context, n int, evs []event.Event) error {
		if n == 1 { // the second call: event A's second pass
			inSecond.Store(true)
			select {
			case <-release:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}
	o := testOptions()
	o.SecondPassDelay = 300 * time.Millisecond
	ra := startAgent(t, env.nc, o, inv)
	ra.waitBound(t)

	a := testEvent(1)
	env.publish(a)
	testutil.Eventually(t, 10*time.Second, "event A's second pass started", func() (bool, string) {
		return inSecond.Load(), fmt.Sprintf("%d calls done", len(inv.snapshot()))
	})
	ci, err := env.consumerInfo()
	if err != nil {
		t.Fatal(err)
	}
	if ci.AckFloor.Stream != 0 || ci.NumAckPending != 1 {
		t.Fatalf("during the second pass the event must not be acknowledged yet: ack floor %d, ack pending %d", ci.AckFloor.Stream, ci.NumAckPending)
	}
	once.Do(func() { close(release) })
	env.waitAcked(1, 10*time.Second)
	calls := inv.snapshot()
	if len(calls) != 2 {
		t.Fatalf("want 2 calls (first and second pass), got %d", len(calls))
	}
	for i, c := range calls {
		if !slices.Equal(c.ids(), []string{a.ID}) {
			t.Fatalf("call %d: events %v, want [%s]", i, c.ids(), a.ID)
		}
	}
	if gap := calls[1].start.Sub(calls[0].end); gap < o.SecondPassDelay {
		t.Fatalf("second pass started %s after the first ended, want at least %s", gap, o.SecondPassDelay)
	}
}

func TestSecondPassKeepsConsumingAndRetries(t *testing.T) {
	env := newEnv(t)
	inv := &fakeInvalidator{}
	var failSecond atomic.Int32
	failSecond.Store(2) // A's second pass fails twice
	aEv, bEv := testEvent(1), testEvent(2)
	inv.fail = func(n int, evs []event.Event) error {
		if n > 0 && evs[0].ID == aEv.ID && failSecond.Add(-1) >= 0 {
			return errFake
		}
		return nil
	}
	o := testOptions()
	o.SecondPassDelay = time.Second
	ra := startAgent(t, env.nc, o, inv)
	ra.waitBound(t)

	env.publish(aEv)
	waitProcessed(t, inv, []string{aEv.ID}, 1, 10*time.Second)
	env.publish(bEv) // well within A's second-pass delay
	env.waitAcked(2, 20*time.Second)

	var order []string
	for _, c := range inv.snapshot() {
		order = append(order, fmt.Sprintf("%s:%v", strings.Join(c.ids(), "+"), c.err == nil))
	}
	// A first; B first while A waits; A second (fails twice, then succeeds);
	// B second may come anywhere after B first.
	got := strings.Join(order, " ")
	if !strings.HasPrefix(got, "ev-0001:true ev-0002:true") {
		t.Fatalf("calls %q: want B's first pass right after A's, before A's second pass", got)
	}
	if inv.succeeded()[aEv.ID] != 2 || inv.succeeded()[bEv.ID] != 2 {
		t.Fatalf("calls %q: want two successful passes of each event", got)
	}
	if n := counter(ra.m.failures.WithLabelValues(passSecond)); n != 2 {
		t.Fatalf("second-pass failures %v, want 2", n)
	}
}

// A new event that arrives while an earlier event's second pass is due is
// invalidated in one call together with that second pass.
func TestSecondPassMergedIntoFirstPass(t *testing.T) {
	for _, tc := range []struct {
		name string
		// failMerged is how many times the merged call fails.
		failMerged int32
	}{
		{"merged call succeeds", 0},
		{"merged call fails then succeeds", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newEnv(t)
			aEv, bEv, cEv := testEvent(1), testEvent(2), testEvent(3)
			release := make(chan struct{})
			var inB atomic.Bool
			var failMerged atomic.Int32
			failMerged.Store(tc.failMerged)
			inv := &fakeInvalidator{}
			inv.gate = func(ctx context.Context, n int, evs []event.Event) error {
				if n == 1 { // B's first pass: held until A's second pass is due and C arrived
					inB.Store(true)
					select {
					case <-release:
					case <-ctx.Done():
						return ctx.Err()
					}
				}
				return nil
			}
			inv.fail = func(n int, evs []event.Event) error {
				if len(evs) == 2 && evs[0].ID == cEv.ID && failMerged.Add(-1) >= 0 {
					return errFake
				}
				return nil
			}
			o := testOptions()
			o.BatchLinger = -1 // C's first pass is ready as soon as it arrives
			// Long enough for B to reach the agent before A's second pass
			// is due, on a loaded machine too.
			o.SecondPassDelay = 2 * time.Second
			ra := startAgent(t, env.nc, o, inv)
			ra.waitBound(t)

			env.publish(aEv)
			waitProcessed(t, inv, []string{aEv.ID}, 1, 10*time.Second)
			aFirstEnd := inv.snapshot()[0].end
			env.publish(bEv)
			testutil.Eventually(t, 10*time.Second, "B's first pass started", func() (bool, string) {
				return inB.Load(), fmt.Sprintf("calls %v", inv.succeeded())
			})
			testutil.Eventually(t, 10*time.Second, "A's second pass due", func() (bool, string) {
				since := time.Since(aFirstEnd)
				return since > o.SecondPassDelay, fmt.Sprintf("%s since A's first pass ended", since)
			})
			env.publish(cEv)
			testutil.Eventually(t, 10*time.Second, "the agent holds A, B and C", func() (bool, string) {
				n := ra.held.len()
				return n == 3, fmt.Sprintf("holds %d", n)
			})
			close(release)
			env.waitAcked(3, 20*time.Second)

			calls := inv.snapshot()
			var order []string
			for _, c := range calls {
				order = append(order, fmt.Sprintf("%s:%v", strings.Join(c.ids(), "+"), c.err == nil))
			}
			got := strings.Join(order, " ")
			// A first; B first (held); then C's first pass with A's second
			// pass in one call, repeated while it fails.
			want := "ev-0001:true ev-0002:true"
			for range tc.failMerged {
				want += " ev-0003+ev-0001:false"
			}
			want += " ev-0003+ev-0001:true"
			if !strings.HasPrefix(got, want+" ") {
				t.Fatalf("calls %q: want them to start with %q (C's first pass and A's due second pass in one call)", got, want)
			}
			for _, c := range calls {
				if slices.Equal(c.ids(), []string{aEv.ID}) && c.start.After(aFirstEnd) {
					t.Fatalf("calls %q: A's second pass ran alone as well", got)
				}
			}
			if s := inv.succeeded(); s[aEv.ID] != 2 || s[bEv.ID] != 2 || s[cEv.ID] != 2 {
				t.Fatalf("calls %q: want two successful passes of each event, got %v", got, s)
			}
			if n := counter(ra.m.invalidations.WithLabelValues(passMerged)); n != float64(tc.failMerged+1) {
				t.Fatalf("invalidations_total{pass=merged} %v, want %d", n, tc.failMerged+1)
			}
			if n := counter(ra.m.failures.WithLabelValues(passMerged)); n != float64(tc.failMerged) {
				t.Fatalf("invalidation_failures_total{pass=merged} %v, want %d", n, tc.failMerged)
			}
			if n := counter(ra.m.events.WithLabelValues(aEv.Type)); n != 3 {
				t.Fatalf("events_total %v, want 3", n)
			}
		})
	}
}

func TestConsumerDeletedWhileRunning(t *testing.T) {
	env := newEnv(t)
	inv := &fakeInvalidator{}
	ra := startAgent(t, env.nc, testOptions(), inv)
	ra.waitBound(t)
	e1 := testEvent(1)
	env.publish(e1)
	env.waitAcked(1, 10*time.Second)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := env.js.DeleteConsumer(ctx, testStream, testRegion); err != nil {
		t.Fatal(err)
	}
	// Published while the consumer may not exist: the re-created consumer
	// replays the last token-cache-time, so it is not lost.
	e2 := testEvent(2)
	env.publish(e2)
	testutil.Eventually(t, 10*time.Second, "the consumer re-created", func() (bool, string) {
		n := counter(ra.m.recreations)
		return n == 2, fmt.Sprintf("consumer_created_total %v", n)
	})
	env.waitAcked(2, 10*time.Second)
	waitProcessed(t, inv, []string{e1.ID, e2.ID}, 1, 5*time.Second)
	// The replay covers what the stream holds, but where the old consumer
	// stood is unknown: one sweep, counted as a consumer_recreated gap.
	testutil.Eventually(t, 10*time.Second, "one consumer_recreated gap swept", func() (bool, string) {
		return ra.gaps(GapConsumerRecreated) == 1 && inv.gapCalls() >= 1,
			fmt.Sprintf("gaps %v, gap calls %d", ra.gaps(GapConsumerRecreated), inv.gapCalls())
	})
	if g := ra.totalGaps(); g != 1 {
		t.Fatalf("gaps_total %v after one consumer deletion, want 1", g)
	}
	if n := counter(ra.m.consumerErrors.WithLabelValues(consumerErrDeleted)); n < 1 {
		t.Fatalf("consumer_errors_total{reason=consumer_deleted} = %v, want >= 1", n)
	}
}

func TestFirstStartReplaysOnlyTheWindow(t *testing.T) {
	env := newEnv(t)
	old := testEvent(1)
	env.publish(old)
	o := testOptions()
	// The agent must bind within this of the recent event's publish.
	o.TokenCacheTime = 3 * time.Second
	o.ReplayMargin = time.Nanosecond
	// Wait (not for synchronisation: the old event must age out of the window).
	testutil.Eventually(t, 10*time.Second, "the old event to be older than the replay window", func() (bool, string) {
		age := time.Since(env.streamInfo().State.FirstTime)
		return age > o.TokenCacheTime+200*time.Millisecond, fmt.Sprintf("age %s", age)
	})
	recent := testEvent(2)
	env.publish(recent)
	inv := &fakeInvalidator{}
	ra := startAgent(t, env.nc, o, inv)
	env.waitAcked(2, 10*time.Second)
	waitProcessed(t, inv, []string{recent.ID}, 1, 5*time.Second)
	if n := inv.succeeded()[old.ID]; n != 0 {
		t.Fatalf("event older than token-cache-time+margin was replayed %d times", n)
	}
	if g := ra.totalGaps(); g != 0 {
		t.Fatalf("gaps_total %v on first start with a complete stream, want 0", g)
	}
}

// stopAndPublishWhileAway runs an agent until it handled the first events and
// recorded its checkpoint, stops it, and lets away run (publish, purge...)
// before a new agent starts.
func stopAndRestart(t *testing.T, env *testEnv, o Options, before int, away func()) (*runningAgent, *fakeInvalidator) {
	t.Helper()
	inv1 := &fakeInvalidator{}
	ra1 := startAgent(t, env.nc, o, inv1)
	seqs := env.publish(events(0, before)...)
	env.waitAcked(seqs[len(seqs)-1], 10*time.Second)
	testutil.Eventually(t, 10*time.Second, "the checkpoint recorded", func() (bool, string) {
		ra1.mu.Lock()
		defer ra1.mu.Unlock()
		if ra1.lastCheckpoint == nil {
			return false, "none"
		}
		return ra1.lastCheckpoint.Seq == seqs[len(seqs)-1], fmt.Sprintf("seq %d", ra1.lastCheckpoint.Seq)
	})
	ra1.stop(t)
	away()
	inv2 := &fakeInvalidator{}
	return startAgent(t, env.nc, o, inv2), inv2
}

func TestGapStreamPurgedWhileAway(t *testing.T) {
	env := newEnv(t)
	ra, inv := stopAndRestart(t, env, testOptions(), 3, func() {
		env.publish(events(100, 3)...) // never seen by the region
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := env.js.Stream(ctx, testStream)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Purge(ctx); err != nil {
			t.Fatal(err)
		}
	})
	testutil.Eventually(t, 10*time.Second, "a gap sweep for the purged events", func() (bool, string) {
		return ra.gaps(GapStreamTruncated) == 1 && inv.gapCalls() >= 1,
			fmt.Sprintf("gaps %v, gap calls %d", ra.gaps(GapStreamTruncated), inv.gapCalls())
	})
	if g := ra.totalGaps(); g != 1 {
		t.Fatalf("gaps_total %v, want exactly 1", g)
	}
}

func TestGapConsumerDeletedAndStreamPurgedWhileAway(t *testing.T) {
	env := newEnv(t)
	ra, inv := stopAndRestart(t, env, testOptions(), 3, func() {
		env.publish(events(100, 3)...)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := env.js.DeleteConsumer(ctx, testStream, testRegion); err != nil {
			t.Fatal(err)
		}
		s, err := env.js.Stream(ctx, testStream)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Purge(ctx, jetstream.WithPurgeKeep(1)); err != nil {
			t.Fatal(err)
		}
	})
	testutil.Eventually(t, 10*time.Second, "a gap sweep for the purged events", func() (bool, string) {
		return ra.gaps(GapStreamTruncated) == 1 && inv.gapCalls() >= 1,
			fmt.Sprintf("gaps %v, gap calls %d", ra.gaps(GapStreamTruncated), inv.gapCalls())
	})
	// The one event kept is still handled.
	waitProcessed(t, inv, []string{testEvent(102).ID}, 1, 10*time.Second)
}

func TestGapMaxAgeWhileAway(t *testing.T) {
	env := newEnv(t, func(c *jetstream.StreamConfig) { c.MaxAge = time.Second; c.Duplicates = 500 * time.Millisecond })
	ra, inv := stopAndRestart(t, env, testOptions(), 2, func() {
		env.publish(events(100, 2)...)
		testutil.Eventually(t, 10*time.Second, "the stream's max age to remove every event", func() (bool, string) {
			st := env.streamInfo().State
			return st.Msgs == 0, fmt.Sprintf("%d messages", st.Msgs)
		})
	})
	testutil.Eventually(t, 10*time.Second, "a gap sweep for the expired events", func() (bool, string) {
		return ra.gaps(GapStreamTruncated) == 1 && inv.gapCalls() >= 1,
			fmt.Sprintf("gaps %v, gap calls %d", ra.gaps(GapStreamTruncated), inv.gapCalls())
	})
}

func TestNoGapWhenVanishedEventsWereHandled(t *testing.T) {
	env := newEnv(t)
	ra, inv := stopAndRestart(t, env, testOptions(), 3, func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := env.js.Stream(ctx, testStream)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Purge(ctx); err != nil { // removes only events already handled
			t.Fatal(err)
		}
	})
	ra.waitBound(t)
	e := testEvent(50)
	seqs := env.publish(e)
	env.waitAcked(seqs[0], 10*time.Second)
	if g := ra.totalGaps(); g != 0 || inv.gapCalls() != 0 {
		t.Fatalf("purging handled events caused a sweep: gaps %v, gap calls %d", g, inv.gapCalls())
	}
}

func TestGapSequenceJump(t *testing.T) {
	env := newEnv(t)
	var away []uint64
	ra, inv := stopAndRestart(t, env, testOptions(), 3, func() {
		away = env.publish(events(100, 3)...)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := env.js.Stream(ctx, testStream)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.DeleteMsg(ctx, away[1]); err != nil { // from the middle
			t.Fatal(err)
		}
	})
	env.waitAcked(away[2], 10*time.Second)
	testutil.Eventually(t, 5*time.Second, "a gap sweep for the deleted event", func() (bool, string) {
		return ra.gaps(GapSequenceJump) == 1 && inv.gapCalls() >= 1,
			fmt.Sprintf("gaps %v, gap calls %d", ra.gaps(GapSequenceJump), inv.gapCalls())
	})
	waitProcessed(t, inv, []string{testEvent(100).ID, testEvent(102).ID}, 1, 5*time.Second)
}

func TestGapPurgedBeforeDeliveryWhileRunning(t *testing.T) {
	env := newEnv(t)
	release := make(chan struct{})
	inv := &fakeInvalidator{gate: func(ctx context.Context, n int, evs []event.Event) error {
		if evs[0].Type == GapEventType {
			return nil
		}
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}}
	o := testOptions()
	o.BatchSize = 2
	o.MaxAckPending = 2
	ra := startAgent(t, env.nc, o, inv)
	ra.waitBound(t)
	env.publish(events(0, 5)...)
	testutil.Eventually(t, 10*time.Second, "2 events held, 3 not delivered", func() (bool, string) {
		ci, err := env.consumerInfo()
		if err != nil {
			return false, err.Error()
		}
		return ci.NumAckPending == 2 && ci.NumPending == 3, fmt.Sprintf("ack pending %d, pending %d", ci.NumAckPending, ci.NumPending)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := env.js.Stream(ctx, testStream)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Purge(ctx); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "the audit detecting the purge of undelivered events", func() (bool, string) {
		return ra.gaps(GapPurgedBeforeDelivery) == 1, fmt.Sprintf("gaps %v", ra.gaps(GapPurgedBeforeDelivery))
	})
	close(release)
	testutil.Eventually(t, 10*time.Second, "the gap sweep and the held events handled", func() (bool, string) {
		got := inv.succeeded()
		return inv.gapCalls() >= 1 && got["ev-0000"] >= 1 && got["ev-0001"] >= 1,
			fmt.Sprintf("gap calls %d, succeeded %v", inv.gapCalls(), got)
	})
	if g := ra.totalGaps(); g != 1 {
		t.Fatalf("gaps_total %v, want 1", g)
	}
}

func TestNATSServerRestart(t *testing.T) {
	env := newEnv(t)
	inv := &fakeInvalidator{}
	ra := startAgent(t, env.nc, testOptions(), inv)
	ra.waitBound(t)
	env.publish(testEvent(1))
	env.waitAcked(1, 10*time.Second)

	if err := env.srv.Restart(); err != nil {
		t.Fatalf("restarting NATS: %v", err)
	}
	testutil.Eventually(t, 20*time.Second, "the test's connection back", func() (bool, string) {
		return env.nc.IsConnected(), env.nc.Status().String()
	})
	e2 := testEvent(2)
	env.publish(e2)
	waitProcessed(t, inv, []string{e2.ID}, 1, 30*time.Second)
	env.waitAcked(2, 10*time.Second)
	testutil.Eventually(t, 10*time.Second, "the agent ready again", func() (bool, string) {
		err := ra.Ready()
		return err == nil, fmt.Sprint(err)
	})
	if g := ra.totalGaps(); g != 0 {
		t.Fatalf("gaps_total %v after a server restart with the stream kept, want 0", g)
	}
}

func TestNATSAwayForLong(t *testing.T) {
	env := newEnv(t)
	inv := &fakeInvalidator{}
	ra := startAgent(t, env.nc, testOptions(), inv)
	ra.waitBound(t)
	env.publish(testEvent(1))
	env.waitAcked(1, 10*time.Second)

	so := env.srv.Options()
	so.Listen = env.srv.Addr()
	env.srv.Shutdown()
	down := time.Now()
	// Away for several heartbeat intervals and reconnect attempts: the time
	// passing is what is tested here.
	testutil.Eventually(t, 10*time.Second, "the agent not ready for 4 heartbeat intervals", func() (bool, string) {
		err := ra.Ready()
		return err != nil && time.Since(down) > 4*testOptions().Heartbeat, fmt.Sprintf("Ready: %v after %s", err, time.Since(down))
	})
	srv, err := natsserver.Start(so)
	if err != nil {
		t.Fatalf("starting NATS again: %v", err)
	}
	t.Cleanup(srv.Shutdown)
	testutil.Eventually(t, 20*time.Second, "the test's connection back", func() (bool, string) {
		return env.nc.IsConnected(), env.nc.Status().String()
	})
	e2 := testEvent(2)
	env.publish(e2)
	waitProcessed(t, inv, []string{e2.ID}, 1, 30*time.Second)
	env.waitAcked(2, 10*time.Second)
	if g := ra.totalGaps(); g != 0 {
		t.Fatalf("gaps_total %v, want 0", g)
	}
}

func TestGracefulRestartMidBurst(t *testing.T) {
	env := newEnv(t)
	inv := &fakeInvalidator{gate: func(ctx context.Context, n int, evs []event.Event) error {
		select { // slow memcached: a few ms per call
		case <-time.After(5 * time.Millisecond):
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}}
	o := testOptions()
	o.BatchSize = 10
	o.SecondPassDelay = 100 * time.Millisecond
	ra1 := startAgent(t, env.nc, o, inv)
	ra1.waitBound(t)
	burst := events(0, 500)
	go env.publish(burst...)
	testutil.Eventually(t, 20*time.Second, "part of the burst handled", func() (bool, string) {
		n := len(inv.succeeded())
		return n >= 50, fmt.Sprintf("%d events", n)
	})
	ra1.stop(t)
	if err := ra1.Ready(); err == nil {
		t.Fatalf("Ready after stop: want an error")
	}
	ra2 := startAgent(t, env.nc, o, inv)
	ra2.waitBound(t)
	waitProcessed(t, inv, ids(burst), 2, 60*time.Second)
	if g := ra2.totalGaps(); g != 0 {
		t.Fatalf("gaps_total %v after a graceful restart, want 0", g)
	}
}

func TestShutdownBounded(t *testing.T) {
	env := newEnv(t)
	started := make(chan struct{}, 1)
	inv := &fakeInvalidator{gate: func(ctx context.Context, n int, evs []event.Event) error {
		select {
		case started <- struct{}{}:
		default:
		}
		<-ctx.Done() // a memcached that never answers
		return ctx.Err()
	}}
	o := testOptions()
	o.ShutdownTimeout = 300 * time.Millisecond
	o.InvalidateTimeout = time.Hour
	ra := startAgent(t, env.nc, o, inv)
	ra.waitBound(t)
	env.publish(testEvent(1))
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the invalidation never started")
	}
	ra.cancel()
	select {
	case err := <-ra.done:
		close(ra.done)
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return within 10s though the shutdown timeout is 300ms")
	}
	ci, err := env.consumerInfo()
	if err != nil {
		t.Fatal(err)
	}
	if ci.AckFloor.Stream != 0 {
		t.Fatalf("an event whose invalidation never finished was acknowledged (ack floor %d)", ci.AckFloor.Stream)
	}
	// Handed back: a new agent gets it at once.
	inv2 := &fakeInvalidator{}
	startAgent(t, env.nc, testOptions(), inv2)
	waitProcessed(t, inv2, []string{testEvent(1).ID}, 1, 10*time.Second)
}

func TestReady(t *testing.T) {
	env := newEnv(t)
	inv := &fakeInvalidator{ping: fmt.Errorf("127.0.0.1:1: connection refused")}
	reg := startAgent(t, env.nc, testOptions(), inv)
	reg.waitBound(t)
	err := reg.Ready()
	if err == nil || !strings.Contains(err.Error(), "memcached") {
		t.Fatalf("Ready with memcached down: %v, want an error naming memcached", err)
	}
	inv.mu.Lock()
	inv.ping = nil
	inv.mu.Unlock()
	if err := reg.Ready(); err != nil {
		t.Fatalf("Ready: %v", err)
	}
}

func TestUndecodableMessageSweeps(t *testing.T) {
	env := newEnv(t)
	inv := &fakeInvalidator{}
	ra := startAgent(t, env.nc, testOptions(), inv)
	ra.waitBound(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := env.js.Publish(ctx, testPrefix+".notification.garbage", []byte("{not json"), jetstream.WithMsgID("garbage-1")); err != nil {
		t.Fatal(err)
	}
	env.waitAcked(1, 10*time.Second)
	calls := inv.snapshot()
	if len(calls) != 1 || len(calls[0].events) != 1 || !calls[0].events[0].Unbounded() || calls[0].events[0].Type != UndecodableEventType {
		t.Fatalf("want one call with one unbounded %s event, got %+v", UndecodableEventType, calls)
	}
	if n := counter(ra.m.undecodable); n != 1 {
		t.Fatalf("undecodable_events_total %v, want 1", n)
	}
	if n := counter(ra.m.events.WithLabelValues(typeOther)); n != 1 {
		t.Fatalf("events_total{type=other} %v, want 1", n)
	}
}

func TestInvalidatorPanicWidens(t *testing.T) {
	env := newEnv(t)
	inv := &fakeInvalidator{gate: func(_ context.Context, _ int, evs []event.Event) error {
		if evs[0].Type != WidenedEventType {
			panic("tokencache: cannot match this event")
		}
		return nil
	}}
	ra := startAgent(t, env.nc, testOptions(), inv)
	ra.waitBound(t)
	env.publish(testEvent(1))
	env.waitAcked(1, 10*time.Second)
	calls := inv.snapshot()
	if len(calls) != 1 || calls[0].events[0].Type != WidenedEventType || !calls[0].events[0].Unbounded() {
		t.Fatalf("want the batch replaced by one unbounded %s event, got %+v", WidenedEventType, calls)
	}
	if n := counter(ra.m.panics); n != 1 {
		t.Fatalf("invalidator_panics_total %v, want 1", n)
	}
}

func TestStreamRecreatedWhileRunning(t *testing.T) {
	env := newEnv(t)
	inv := &fakeInvalidator{}
	ra := startAgent(t, env.nc, testOptions(), inv)
	ra.waitBound(t)
	env.publish(testEvent(1))
	env.waitAcked(1, 10*time.Second)

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cfg := env.streamInfo().Config
	if err := env.js.DeleteStream(ctx, testStream); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "the agent to notice the stream is gone", func() (bool, string) {
		err := ra.Ready()
		return err != nil && strings.Contains(err.Error(), "does not exist"), fmt.Sprint(err)
	})
	if _, err := env.js.CreateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	e2 := testEvent(2)
	env.publish(e2)
	waitProcessed(t, inv, []string{e2.ID}, 1, 20*time.Second)
	testutil.Eventually(t, 10*time.Second, "one gap sweep for the old stream's lost events", func() (bool, string) {
		return ra.gaps(GapStreamRecreated) == 1 && inv.gapCalls() >= 1,
			fmt.Sprintf("gaps %v, gap calls %d", ra.gaps(GapStreamRecreated), inv.gapCalls())
	})
}

func TestProgressPreventsRedelivery(t *testing.T) {
	env := newEnv(t)
	inv := &fakeInvalidator{}
	o := testOptions()
	// An ack wait long enough that a loaded machine's stall of the progress
	// reports is not taken for their absence.
	o.RedeliveryBackoff = []time.Duration{1500 * time.Millisecond}
	o.SecondPassDelay = 6 * time.Second // four ack waits
	ra := startAgent(t, env.nc, o, inv)
	ra.waitBound(t)
	env.publish(testEvent(1))
	env.waitAcked(1, 10*time.Second)
	ci, err := env.consumerInfo()
	if err != nil {
		t.Fatal(err)
	}
	if ci.NumRedelivered != 0 || counter(ra.m.redeliveries) != 0 {
		t.Fatalf("an event held for its second pass was redelivered (%d, %v): progress reports missing",
			ci.NumRedelivered, counter(ra.m.redeliveries))
	}
	if n := inv.succeeded()[testEvent(1).ID]; n != 2 {
		t.Fatalf("invalidated %d times, want 2", n)
	}
}

func TestReadCheckpoints(t *testing.T) {
	env := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	got, err := ReadCheckpoints(ctx, env.js, DefaultCheckpointBucket)
	if err != nil || len(got) != 0 {
		t.Fatalf("ReadCheckpoints before any agent ran: %v, %v; want an empty map", got, err)
	}
	ra := startAgent(t, env.nc, testOptions(), &fakeInvalidator{})
	ra.waitBound(t)
	seqs := env.publish(events(0, 2)...)
	env.waitAcked(seqs[1], 10*time.Second)
	testutil.Eventually(t, 10*time.Second, "the region's checkpoint at the last event", func() (bool, string) {
		got, err := ReadCheckpoints(ctx, env.js, DefaultCheckpointBucket)
		if err != nil {
			return false, err.Error()
		}
		cp, ok := got[testRegion]
		return ok && cp.Seq == seqs[1] && cp.Stream == testStream && !cp.StreamCreated.IsZero(), fmt.Sprintf("%+v", got)
	})
}

// lockedBuffer is a log destination that the agent's goroutines may share.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
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

// TestWidenedEventLogsItsReason: `keystone-fanout sweep --reason` promises that
// every agent logs the operator's reason when it removes every token entry.
func TestWidenedEventLogsItsReason(t *testing.T) {
	env := newEnv(t)
	var logs lockedBuffer
	a, err := New(testOptions(), env.nc, &fakeInvalidator{}, prometheus.NewRegistry(), slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	ev := event.Event{Version: event.SchemaVersion, Kind: event.KindNotification, ID: "sweep-1",
		Type: "keystone-fanout.sweep", Time: time.Now().UTC(), Widen: "operator: identity provider acme deleted"}
	seqs := env.publish(ev)
	env.waitAcked(seqs[0], 10*time.Second)
	testutil.Eventually(t, 5*time.Second, "the operator's reason in the agent's log", func() (bool, string) {
		s := logs.String()
		return strings.Contains(s, `reason="operator: identity provider acme deleted"`) && strings.Contains(s, "event_id=sweep-1"), s
	})
}
