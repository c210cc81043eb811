package e2e

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

// expect is what every scenario ends with.
type expect struct {
	// gone are tokens whose entries must be absent from every region.
	gone []string
	// kept are tokens whose entries must still be cached in every region
	// (targeted strategy: no entry the events do not concern is removed).
	kept []string
	// regions restricts the checks to these regions (default all).
	regions []*region
	// noCanary skips the check that non-token keys survive (strategy flush,
	// or a memcached server restarted without it being set again).
	noCanary bool
	// timeout bounds each wait; default 120s.
	timeout time.Duration
}

// verified is when the final state was reached.
type verified struct {
	// gone is when no region held any entry of expect.gone any more.
	gone time.Time
	// acked is when every region's consumer had acknowledged every event.
	acked time.Time
}

func tokenKeys(tokens []string) []string {
	keys := make([]string, len(tokens))
	for i, tok := range tokens {
		keys[i] = kmwtest.NoneKey(tok)
	}
	return keys
}

func entryTokens(entries []kmwtest.Entry) []string {
	out := make([]string, len(entries))
	for i, e := range entries {
		out[i] = e.TokenID
	}
	return out
}

func victimTokens(victims []*victim) []string { return entryTokens(allEntries(victims)) }

// verify runs the checks every scenario ends with:
//
//  1. every published notification that is token-affecting is in the stream
//     exactly once (by Nats-Msg-Id), as the event it should be, and nothing
//     else is (filtered and rejected ones are not);
//  2. no region holds an entry of x.gone (memcached gets on every server);
//  3. every region's consumer has acknowledged everything (no ack pending,
//     nothing pending, ack floor at the stream's last sequence), and then
//     still no entry of x.gone is anywhere (acknowledged means done);
//  4. every entry of x.kept is still cached in every region, and the
//     non-token canary keys survived;
//  5. keystonemiddleware itself finds none of x.gone and all of x.kept;
//  6. no process exited by itself.
func (e *env) verify(x expect) verified {
	t := e.t
	t.Helper()
	if x.timeout == 0 {
		x.timeout = 120 * time.Second
	}
	regions := x.regions
	if regions == nil {
		regions = e.regions
	}
	var v verified

	e.checkStream(x.timeout)

	goneKeys := tokenKeys(x.gone)
	testutil.Eventually(t, x.timeout, fmt.Sprintf("no region to hold any of the %d entries the events concern", len(goneKeys)), func() (bool, string) {
		return e.noneCached(regions, goneKeys)
	})
	v.gone = time.Now()

	testutil.Eventually(t, x.timeout, "every region's consumer to have acknowledged every event", func() (bool, string) {
		return e.allAcked(regions)
	})
	v.acked = time.Now()

	if ok, seen := e.noneCached(regions, goneKeys); !ok {
		t.Fatalf("after every event was acknowledged: expected no entry the events concern; saw %s", seen)
	}
	keptKeys := tokenKeys(x.kept)
	for _, r := range regions {
		found, err := presentIn(serverAddrs(r), keptKeys)
		if err != nil {
			t.Fatalf("%s: %v", r.name, err)
		}
		if len(found) != len(keptKeys) {
			var missing []string
			for _, k := range keptKeys {
				if found[k] == "" {
					missing = append(missing, k)
				}
			}
			t.Fatalf("%s: expected all %d entries the events do not concern to be cached still; %d were removed, for example %s%s",
				r.name, len(keptKeys), len(missing), strings.Join(missing[:min(3, len(missing))], ", "), gapNote(r))
		}
		if !x.noCanary {
			for _, s := range r.servers {
				found, err := mcPresent(s.PlainAddr, []string{canaryKey})
				if err != nil {
					t.Fatalf("%s: memcached %s: %v", r.name, s.Addr, err)
				}
				if !found[canaryKey] {
					t.Fatalf("%s: memcached %s: expected the non-token key %s to survive; it is gone", r.name, s.Addr, canaryKey)
				}
			}
		}
	}

	// The middleware's own view.
	for _, r := range regions {
		if len(x.gone) > 0 {
			if got := r.cache.Read(x.gone); len(got) != 0 {
				t.Fatalf("%s: keystonemiddleware still finds %d of the %d tokens the events concern in its cache, want 0",
					r.name, len(got), len(x.gone))
			}
		}
		if len(x.kept) > 0 {
			if got := r.cache.Read(x.kept); len(got) != len(x.kept) {
				t.Fatalf("%s: keystonemiddleware finds %d of the %d tokens the events do not concern, want all",
					r.name, len(got), len(x.kept))
			}
		}
	}
	e.checkNoUnexpectedExits()
	return v
}

// serverAddrs are the addresses at which the test reads and writes a
// region's memcached servers (without TLS: see envOptions.tls).
func serverAddrs(r *region) []string {
	out := make([]string, len(r.servers))
	for i, s := range r.servers {
		out[i] = s.PlainAddr
	}
	return out
}

// noneCached reports whether no region holds any of keys.
func (e *env) noneCached(regions []*region, keys []string) (bool, string) {
	var bad []string
	for _, r := range regions {
		found, err := presentIn(serverAddrs(r), keys)
		if err != nil {
			bad = append(bad, fmt.Sprintf("%s: %v", r.name, err))
			continue
		}
		if len(found) > 0 {
			var one string
			for k, s := range found {
				one = fmt.Sprintf("%s on %s", k, s)
				break
			}
			bad = append(bad, fmt.Sprintf("%s holds %d (e.g. %s)", r.name, len(found), one))
		}
	}
	if len(bad) > 0 {
		return false, strings.Join(bad, "; ")
	}
	return true, ""
}

// allAcked reports whether every region's consumer acknowledged every event
// of the stream.
func (e *env) allAcked(regions []*region) (bool, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := e.js.Stream(ctx, streamName)
	if err != nil {
		return false, fmt.Sprintf("stream %s: %v", streamName, err)
	}
	last := s.CachedInfo().State.LastSeq
	var bad []string
	for _, r := range regions {
		c, err := s.Consumer(ctx, r.name)
		if err != nil {
			bad = append(bad, fmt.Sprintf("%s: %v", r.name, err))
			continue
		}
		ci := c.CachedInfo()
		if ci.NumAckPending != 0 || ci.NumPending != 0 || ci.AckFloor.Stream < last {
			bad = append(bad, fmt.Sprintf("%s: ack pending %d, pending %d, ack floor %d of %d, redelivered %d",
				r.name, ci.NumAckPending, ci.NumPending, ci.AckFloor.Stream, last, ci.NumRedelivered))
		}
	}
	if len(bad) > 0 {
		return false, strings.Join(bad, "; ")
	}
	return true, ""
}

// streamMsg is one message of the stream.
type streamMsg struct {
	seq   uint64
	msgID string
	ev    event.Event
	err   error
}

// readStream returns every message of the stream.
func (e *env) readStream() ([]streamMsg, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, err := e.js.Stream(ctx, streamName)
	if err != nil {
		return nil, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, err
	}
	total := int(info.State.Msgs)
	if total == 0 {
		return nil, nil
	}
	cons, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return nil, err
	}
	var out []streamMsg
	empty := 0 // consecutive fetches that got nothing (a saturated machine may answer late)
	for len(out) < total {
		batch, err := cons.Fetch(min(total-len(out), 1000), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			return nil, err
		}
		n := 0
		for m := range batch.Messages() {
			n++
			md, _ := m.Metadata()
			sm := streamMsg{msgID: m.Headers().Get(jetstream.MsgIDHeader)}
			if md != nil {
				sm.seq = md.Sequence.Stream
			}
			sm.ev, sm.err = event.Unmarshal(m.Data())
			out = append(out, sm)
		}
		if err := batch.Error(); err != nil && !errors.Is(err, jetstream.ErrNoMessages) {
			return nil, err
		}
		if n == 0 {
			if empty++; empty == 6 {
				return nil, fmt.Errorf("read %d of %d messages, then nothing in 6 fetches of 5 s", len(out), total)
			}
			continue
		}
		empty = 0
	}
	return out, nil
}

// expectedInStream returns, by Nats-Msg-Id, the published outcomes, and the
// ids that must not be in the stream.
func (e *env) expectedInStream() (want map[string]outcome, notWant map[string]outcome) {
	want, notWant = map[string]outcome{}, map[string]outcome{}
	for _, s := range e.sentSnapshot() {
		if s.published {
			want[s.msgID] = s.outcome
		} else if s.msgID != "" {
			notWant[s.msgID] = s.outcome
		}
	}
	return want, notWant
}

// checkStream waits until the stream holds as many messages as were
// published token-affecting notifications, then checks that each is there
// exactly once, as the event it should be, and nothing else.
func (e *env) checkStream(timeout time.Duration) {
	t := e.t
	t.Helper()
	want, notWant := e.expectedInStream()
	testutil.Eventually(t, timeout, fmt.Sprintf("the stream to hold the %d published token-affecting notifications", len(want)), func() (bool, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := e.js.Stream(ctx, streamName)
		if err != nil {
			return false, err.Error()
		}
		n := s.CachedInfo().State.Msgs
		return n >= uint64(len(want)), fmt.Sprintf("%d messages", n)
	})
	msgs, err := e.readStream()
	if err != nil {
		t.Fatalf("reading stream %s: %v", streamName, err)
	}
	count := map[string]int{}
	var problems []string
	for _, m := range msgs {
		count[m.msgID]++
		if m.err != nil {
			problems = append(problems, fmt.Sprintf("seq %d (%s) is not an event: %v", m.seq, m.msgID, m.err))
			continue
		}
		if m.ev.ID != m.msgID {
			problems = append(problems, fmt.Sprintf("seq %d: Nats-Msg-Id %q but event id %q", m.seq, m.msgID, m.ev.ID))
		}
		if o, ok := want[m.msgID]; ok && m.ev.Widen != o.widen {
			problems = append(problems, fmt.Sprintf("seq %d (%s, %s): widen %q, want %q", m.seq, m.msgID, m.ev.Type, m.ev.Widen, o.widen))
		}
		if o, ok := notWant[m.msgID]; ok {
			problems = append(problems, fmt.Sprintf("seq %d (%s, %s) should not be in the stream (%s)", m.seq, m.msgID, m.ev.Type, describe(o)))
		}
		if _, ok := want[m.msgID]; !ok {
			if _, ok := notWant[m.msgID]; !ok {
				problems = append(problems, fmt.Sprintf("seq %d (%s, %s) was never published", m.seq, m.msgID, m.ev.Type))
			}
		}
	}
	var missing, dups []string
	for id := range want {
		switch c := count[id]; {
		case c == 0:
			missing = append(missing, id)
		case c > 1:
			dups = append(dups, fmt.Sprintf("%s x%d", id, c))
		}
	}
	sort.Strings(missing)
	sort.Strings(dups)
	if len(missing) > 0 {
		problems = append(problems, fmt.Sprintf("%d published notifications are missing, e.g. %s", len(missing), strings.Join(missing[:min(5, len(missing))], ", ")))
	}
	if len(dups) > 0 {
		problems = append(problems, fmt.Sprintf("%d notifications are in the stream more than once: %s", len(dups), strings.Join(dups[:min(5, len(dups))], ", ")))
	}
	if len(problems) > 0 {
		t.Fatalf("expected each of the %d token-affecting notifications in the stream exactly once and nothing else (%d messages); saw:\n  %s",
			len(want), len(msgs), strings.Join(problems[:min(20, len(problems))], "\n  "))
	}
}

func describe(o outcome) string {
	switch {
	case o.filtered:
		return "filtered"
	case o.reject != "":
		return "rejected: " + string(o.reject)
	case o.widen != "":
		return "widened: " + o.widen
	}
	return "published"
}

// checkNoUnexpectedExits fails when a process exited without the test
// stopping or killing it.
func (e *env) checkNoUnexpectedExits() {
	e.t.Helper()
	var all []string
	for _, p := range e.allProcs() {
		all = append(all, p.unexpectedExits()...)
	}
	if len(all) > 0 {
		e.t.Fatalf("expected no process to exit by itself; saw: %s", strings.Join(all, "; "))
	}
}

// bridgeMetrics sums a metric over the running bridges.
func (e *env) bridgeMetrics(name string, labels ...string) (float64, error) {
	var total float64
	for _, b := range e.bridges {
		if !b.running() {
			continue
		}
		m, err := b.metrics()
		if err != nil {
			return 0, fmt.Errorf("%s: %w", b.name, err)
		}
		total += m.sum(name, labels...)
	}
	return total, nil
}

// gapNote says whether the region's agent swept every token entry for a gap,
// for failure messages.
func gapNote(r *region) string {
	if r.agent == nil || !r.agent.running() {
		return ""
	}
	m, err := r.agent.metrics()
	if err != nil {
		return ""
	}
	gaps := m.byLabel("keystone_fanout_agent_gaps_total", "reason")
	var parts []string
	for reason, n := range gaps {
		if n > 0 {
			parts = append(parts, fmt.Sprintf("%s=%v", reason, n))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	sort.Strings(parts)
	return fmt.Sprintf(" (the agent swept every token entry for gaps: %s; a lost delivery taken for a gap is the bug TestLostDeliveryIsNotAGap reproduces)",
		strings.Join(parts, ", "))
}
