package regionagent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/backoff"
	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

// Skipped sequences: the consumer moved past stream sequences this agent
// never received (see gaps.go). Each is in one of three states:
//
//   - still in the stream, unacknowledged: it was delivered into a connection
//     that dropped, and JetStream redelivers it after the ack wait (the first
//     RedeliveryBackoff duration), or another agent of the region holds it;
//   - still in the stream, acknowledged: another agent of the region (or a
//     previous one) handled it;
//   - gone: deleted, expired or purged before this agent saw it. Its age is
//     unknown, so it may have a live stale entry: a gap.
//
// The agent fetches each skipped sequence from the stream (a get by sequence,
// answered by the stream leader: a direct get from a replica that lags could
// take a stored message for a missing one). A fetched message is invalidated
// at once, which closes the window until its redelivery; handling it twice is
// harmless, and its redelivery is still handled and acknowledged. When a jump
// is longer than the fetch limit, or a fetch fails, the stream's state decides
// instead: sequences below its first one, and interior deletions (listed when
// there are not too many), are gone; what cannot be told is a gap, because
// removing too much is safe.

const (
	// defaultSkippedFetchLimit bounds the sequences one jump fetches: a lost
	// pull batch is at most BatchSize messages, far fewer in practice.
	defaultSkippedFetchLimit = 1024
	// skippedFetchParallel is how many gets are in flight at once.
	skippedFetchParallel = 16
	// skippedGetTimeout bounds one get, and the stream state request.
	skippedGetTimeout = 5 * time.Second
	// skippedResolveTimeout bounds the fetches of one jump.
	skippedResolveTimeout = 30 * time.Second
	// maxDeletedDetails is the most interior deletions the agent asks the
	// stream to list; beyond it, a jump whose sequences cannot all be fetched
	// is a gap.
	maxDeletedDetails = 100000
)

// skippedRetryDelays are the waits before looking again when a jump could
// not be told apart from a gap because the stream did not answer (NATS or
// its leaf link away, the stream leader starved): the skipped events are
// most likely still there, and a sweep would cost the region a
// re-validation of every token. A true gap is swept at most these (7 s)
// and their timeouts later; a sequence JetStream says is gone is swept at
// once.
var skippedRetryDelays = []time.Duration{time.Second, 2 * time.Second, 4 * time.Second}

// getMsg reads the message at seq from the stream. The stream as the bridge
// creates it has no direct gets, so the leader answers (jetstream's GetMsg
// asks any replica when an operator enabled them: one that lags may answer
// "not found" for a stored message, which is then taken for a gap and
// costs a sweep, never a stale entry).
func getMsg(ctx context.Context, s jetstream.Stream, seq uint64, timeout time.Duration) (*jetstream.RawStreamMsg, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return s.GetMsg(ctx, seq)
}

// fetchResult is what fetching a skipped range found.
type fetchResult struct {
	found  map[uint64]*jetstream.RawStreamMsg
	gone   []uint64
	failed int
	err    error // the first failure
}

// fetchSkipped gets every sequence of r from the stream, a few at a time. It
// stops at the first sequence gone (that is a gap already) and at the first
// failure (NATS away, a permission missing: the stream's state decides for
// the sequences not fetched).
func (a *Agent) fetchSkipped(ctx context.Context, r seqRange) fetchResult {
	res := fetchResult{found: map[uint64]*jetstream.RawStreamMsg{}}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sctx, scancel := context.WithTimeout(ctx, a.skippedTimeout())
	s, err := a.js.Stream(sctx, a.o.Stream)
	scancel()
	if err != nil {
		res.failed, res.err = int(r.len()), err
		return res
	}
	var mu sync.Mutex
	seqs := make(chan uint64)
	var wg sync.WaitGroup
	for range min(skippedFetchParallel, int(r.len())) {
		wg.Go(func() {
			for seq := range seqs {
				m, err := getMsg(ctx, s, seq, a.skippedTimeout())
				mu.Lock()
				switch {
				case err == nil:
					res.found[seq] = m
				case errors.Is(err, jetstream.ErrMsgNotFound):
					res.gone = append(res.gone, seq)
					cancel()
				case ctx.Err() != nil:
					// Stopped: another get failed or found a gap.
				default:
					res.failed++
					if res.err == nil {
						res.err = err
					}
					cancel()
				}
				mu.Unlock()
			}
		})
	}
send:
	for seq := r.lo; seq <= r.hi; seq++ {
		select {
		case seqs <- seq:
		case <-ctx.Done():
			break send
		}
	}
	close(seqs)
	wg.Wait()
	return res
}

// goneFromStream tells from the stream's state whether a sequence of r not in
// known may be gone. why says what decided it; unanswered is set when the
// stream did not answer (gone is then true: it cannot be told).
func (a *Agent) goneFromStream(ctx context.Context, r seqRange, known map[uint64]*jetstream.RawStreamMsg) (gone bool, why string, unanswered bool) {
	ctx, cancel := context.WithTimeout(ctx, a.skippedTimeout())
	defer cancel()
	s, err := a.js.Stream(ctx, a.o.Stream)
	if err != nil {
		return true, fmt.Sprintf("cannot read the stream's state: %v", err), !errors.Is(err, jetstream.ErrStreamNotFound)
	}
	st := s.CachedInfo().State
	unknown := func(seq uint64) bool { _, ok := known[seq]; return !ok }
	for seq := r.lo; seq <= r.hi && seq < st.FirstSeq; seq++ {
		if unknown(seq) {
			return true, fmt.Sprintf("the stream now starts at sequence %d", st.FirstSeq), false
		}
	}
	if st.NumDeleted == 0 {
		return false, "the stream has no deleted sequence", false
	}
	if st.NumDeleted > maxDeletedDetails {
		return true, fmt.Sprintf("the stream has %d deleted sequences, too many to list", st.NumDeleted), false
	}
	si, err := s.Info(ctx, jetstream.WithDeletedDetails(true))
	if err != nil {
		return true, fmt.Sprintf("cannot list the stream's deleted sequences: %v", err), true
	}
	for _, seq := range si.State.Deleted {
		if r.contains(seq) && unknown(seq) {
			return true, fmt.Sprintf("sequence %d was deleted", seq), false
		}
	}
	return false, "no deleted sequence among them", false
}

func (a *Agent) skippedTimeout() time.Duration {
	if a.o.skippedTimeout > 0 {
		return a.o.skippedTimeout
	}
	return skippedGetTimeout
}

// resolveSkipped finds out whether the sequences of r, which the consumer
// skipped before delivering one stored at next, are still in the stream;
// it invalidates those it fetched and queues a gap sweep when one is gone
// (see the top of this file). It runs in the background, one at a time.
func (a *Agent) resolveSkipped(ctx context.Context, gen uint64, r seqRange, next time.Time) {
	limit := a.o.skippedFetchLimit
	if limit == 0 {
		limit = defaultSkippedFetchLimit
	}
	retries := skippedRetryDelays
	if a.o.skippedRetry != nil {
		retries = a.o.skippedRetry
	}
	var res fetchResult
	var gap bool
	var why string
	for attempt := 0; ; attempt++ {
		var unanswered bool
		res, gap, why, unanswered = a.lookUpSkipped(ctx, r, limit)
		if ctx.Err() != nil {
			// Stopping: the sequences stay unhandled (the checkpoint stays
			// below them) and the next agent sees them again.
			return
		}
		if !gap || !unanswered || attempt >= len(retries) {
			break
		}
		a.log.Info("cannot tell whether skipped events are still in the stream; looking again before sweeping",
			"skipped_from", r.lo, "skipped_to", r.hi, "why", why, "retry_in", retries[attempt])
		if !backoff.Sleep(ctx, retries[attempt]) {
			return
		}
	}
	var items []*item
	var fetched []uint64
	if !gap {
		// A gap sweeps every token entry: the fetched events need no
		// invalidation of their own then.
		for seq := r.lo; seq <= r.hi; seq++ {
			if m, ok := res.found[seq]; ok {
				fetched = append(fetched, seq)
				items = append(items, &item{gen: gen, seq: seq, ev: a.storedEvent(m)})
			}
		}
	}
	if !a.tr.skippedResolved(gen, r, fetched, gap) {
		return // the stream was re-created meanwhile
	}
	if gap {
		a.m.gaps.WithLabelValues(GapSequenceJump).Inc()
		a.log.Warn("gap: events the consumer skipped vanished from the stream before delivery; removing every token entry",
			"reason", GapSequenceJump, "skipped_from", r.lo, "skipped_to", r.hi, "why", why, "next_time", next)
		a.enqueue(ctx, &item{gen: gen, seq: r.hi, gap: true, ev: gapEvent(GapSequenceJump, time.Now(), r.hi)})
		return
	}
	a.m.skippedFetched.Add(float64(len(items)))
	a.log.Info("the consumer skipped events this agent never received (lost in transit, or given to another agent of the region); they are still in the stream: no gap",
		"skipped_from", r.lo, "skipped_to", r.hi, "fetched_and_invalidated_now", len(items), "why", why)
	for _, it := range items {
		a.enqueue(ctx, it)
	}
}

// lookUpSkipped fetches the sequences of r (up to limit; -1: none) and,
// for those not fetched, asks the stream's state. unanswered is set when the
// gap verdict comes from the stream not answering rather than from a
// sequence known to be gone.
func (a *Agent) lookUpSkipped(ctx context.Context, r seqRange, limit int) (res fetchResult, gap bool, why string, unanswered bool) {
	if limit > 0 && r.len() <= uint64(limit) {
		fctx, cancel := context.WithTimeout(ctx, skippedResolveTimeout)
		res = a.fetchSkipped(fctx, r)
		cancel()
	} else {
		res.found = map[uint64]*jetstream.RawStreamMsg{}
	}
	if ctx.Err() != nil {
		return res, false, "", false
	}
	switch {
	case len(res.gone) > 0:
		return res, true, fmt.Sprintf("%d of them are no longer in the stream, for example sequence %d", len(res.gone), res.gone[0]), false
	case uint64(len(res.found)) < r.len():
		gap, why, unanswered = a.goneFromStream(ctx, r, res.found)
		if res.failed > 0 {
			why = fmt.Sprintf("fetching them failed (%v); %s", res.err, why)
		}
		return res, gap, why, unanswered
	}
	return res, false, "every one fetched", false
}

// checkSkipped resolves r in the background (see resolveSkipped); checks run
// one at a time, until the agent stops.
func (a *Agent) checkSkipped(gen uint64, r seqRange, next time.Time) {
	ctx := a.life
	a.checks.Go(func() {
		a.checkMu.Lock()
		defer a.checkMu.Unlock()
		if ctx.Err() != nil {
			return
		}
		a.resolveSkipped(ctx, gen, r, next)
	})
}

// storedEvent is the event of a message fetched from the stream. Such a
// message is also delivered, or was, so an undecodable one is counted and
// logged when it is.
func (a *Agent) storedEvent(m *jetstream.RawStreamMsg) event.Event {
	ev, err := event.Unmarshal(m.Data)
	if err != nil {
		return undecodableEvent(m.Header.Get(jetstream.MsgIDHeader), m.Time)
	}
	return ev
}

// undecodableEvent is the unbounded event a stream message that is not an
// event is handled with.
func undecodableEvent(msgID string, stored time.Time) event.Event {
	return event.Event{
		Version: event.SchemaVersion,
		Kind:    event.KindNotification,
		ID:      msgID,
		Type:    UndecodableEventType,
		Time:    stored.UTC(),
		Widen:   "undecodable stream message",
	}
}
