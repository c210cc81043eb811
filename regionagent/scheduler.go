package regionagent

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/backoff"
	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
)

// scheduler is the state of the goroutine that decides when each event's
// passes run and runs them (Invalidate calls). Only that goroutine touches
// it. Calls run one at a time: batching makes one call do the work of many,
// and a server without a complete live index is crawled one request at a
// time. A call for new events (first passes) also takes the events whose
// second pass is due or nearly due (a merged call, see
// Options.SecondPassDelay), so that a new event does not wait behind a
// separate call for an earlier event's second pass.
type scheduler struct {
	a    *Agent
	hard context.Context

	// first holds events waiting for their first pass: due at firstDue (the
	// batch linger, or the retry after firstFails failures in a row).
	first      []*item
	firstDue   time.Time
	firstFails int
	// second holds events whose first pass succeeded, each due at its own time.
	second []*item
	// secondOwed is set when a first-pass call had no room (BatchSize) for
	// second passes that were due: the next call then runs those alone even
	// when new events are ready too, so that a steady flow of new events
	// cannot starve the second passes (and the acks).
	secondOwed bool
	// res holds the notifications waiting for the revocation poller.
	res resolver
}

// work runs until ctx ends. Invalidation calls use hard, which outlives ctx
// by Options.ShutdownTimeout so that a call in progress may finish.
func (a *Agent) work(ctx, hard context.Context) {
	s := &scheduler{a: a, hard: hard}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now := time.Now()
	drain:
		for {
			select {
			case it := <-a.in:
				s.add(it, now)
			default:
				break drain
			}
		}
		if ctx.Err() != nil {
			return
		}
		resolveDue := s.expireWaiting(now)
		firstReady := len(s.first) > 0 && !now.Before(s.firstDue)
		secondDue, secondAny := s.earliestSecond()
		secondReady := secondAny && !now.Before(secondDue)
		switch {
		case firstReady && (!secondReady || !s.secondOwed):
			s.firstPass(now)
			continue
		case secondReady:
			s.secondPass(now)
			s.secondOwed = false
			continue
		}
		wait := time.Hour
		if len(s.first) > 0 {
			wait = s.firstDue.Sub(now)
		}
		if secondAny {
			wait = min(wait, secondDue.Sub(now))
		}
		if !resolveDue.IsZero() {
			wait = min(wait, resolveDue.Sub(now))
		}
		timer.Reset(wait)
		select {
		case it := <-a.in:
			s.add(it, time.Now())
		case <-timer.C:
		case <-ctx.Done():
			return
		}
		timer.Stop()
	}
}

// add takes a new item: a proof of the poller's progress or a notification
// waiting for one (see resolve.go), else an event for the next first pass.
func (s *scheduler) add(it *item, now time.Time) {
	if s.take(it, now) {
		return
	}
	s.enqueueFirst(it, now)
}

// enqueueFirst queues it for the next first pass.
func (s *scheduler) enqueueFirst(it *item, now time.Time) {
	if len(s.first) == 0 && s.firstFails == 0 {
		s.firstDue = now.Add(max(s.a.o.BatchLinger, 0))
	}
	s.first = append(s.first, it)
	if len(s.first) >= s.a.o.BatchSize && s.firstFails == 0 {
		s.firstDue = now
	}
}

func (s *scheduler) earliestSecond() (time.Time, bool) {
	var due time.Time
	for i, it := range s.second {
		if i == 0 || it.due.Before(due) {
			due = it.due
		}
	}
	return due, len(s.second) > 0
}

// firstPass runs one call for the new events waiting for their first pass
// and, room permitting, the events whose second pass is due by now plus
// Options.secondPassAdvance. On success the new events wait for their second
// pass and the others are finished; on failure each group is retried as if
// it had run alone.
func (s *scheduler) firstPass(now time.Time) {
	a := s.a
	n := min(len(s.first), a.o.BatchSize)
	batch := s.first[:n:n]
	var seconds, rest []*item
	room := a.o.BatchSize - n
	horizon := now.Add(a.o.secondPassAdvance())
	s.secondOwed = false
	for _, it := range s.second {
		switch {
		case horizon.Before(it.due):
			rest = append(rest, it)
		case len(seconds) < room:
			seconds = append(seconds, it)
		default:
			rest = append(rest, it)
			s.secondOwed = s.secondOwed || !now.Before(it.due)
		}
	}
	pass := passFirst
	if len(seconds) > 0 {
		pass = passMerged
	}
	res, err := a.invalidate(s.hard, pass, append(batch, seconds...))
	end := time.Now()
	if err != nil {
		s.firstFails++
		d := a.retryDelay(s.firstFails)
		s.firstDue = end.Add(d)
		s.secondFailed(seconds, end)
		a.log.Warn("invalidation failed: the events stay unacknowledged and are retried",
			"pass", pass, "events", n, "second_pass_events", len(seconds), "attempt", s.firstFails, "retry_in", d, "err", err)
		return
	}
	if s.firstFails > 0 {
		a.log.Info("invalidation succeeded after failures", "pass", pass, "events", n, "failures", s.firstFails)
	}
	s.firstFails = 0
	s.first = append([]*item(nil), s.first[n:]...)
	if len(s.first) > 0 {
		s.firstDue = end // a backlog: go on at once
	}
	if len(seconds) > 0 {
		s.second = rest
		for _, it := range seconds {
			a.finish(it)
		}
	}
	a.sendReceipt(batch, res, end)
	for _, it := range batch {
		if it.first && !it.gap {
			if !it.ev.Time.IsZero() {
				a.m.latency.WithLabelValues(latencyFromKeystone).Observe(end.Sub(it.ev.Time).Seconds())
			}
			if !it.stored.IsZero() {
				a.m.latency.WithLabelValues(latencyFromStream).Observe(end.Sub(it.stored).Seconds())
			}
		}
		if !it.gap && it.ev.Widen != "" {
			// An operator's sweep (`keystone-fanout sweep --reason`) or
			// another event that cannot be bounded: say why the region's
			// services now re-validate every token.
			a.log.Info("removed every token entry of the region", "reason", it.ev.Widen,
				"event_id", it.ev.ID, "event_type", it.ev.Type, "stream_seq", it.seq,
				"entries_removed_by_batch", res.Removed, "batch_events", n)
		}
		if a.o.noSecondPass {
			a.finish(it)
			continue
		}
		it.due = end.Add(a.o.SecondPassDelay)
		s.second = append(s.second, it)
	}
}

// secondFailed schedules the retry of second passes whose call failed at
// end. A second pass that ran early is not retried before it was due.
func (s *scheduler) secondFailed(items []*item, end time.Time) {
	for _, it := range items {
		it.secondFails++
		it.due = later(it.due, end.Add(s.a.retryDelay(it.secondFails)))
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func (s *scheduler) secondPass(now time.Time) {
	a := s.a
	var batch, rest []*item
	for _, it := range s.second {
		if !now.Before(it.due) && len(batch) < a.o.BatchSize {
			batch = append(batch, it)
		} else {
			rest = append(rest, it)
		}
	}
	res, err := a.invalidate(s.hard, passSecond, batch)
	end := time.Now()
	if err != nil {
		s.secondFailed(batch, end)
		a.log.Warn("invalidation failed: the events stay unacknowledged and are retried",
			"pass", passSecond, "events", len(batch), "attempt", batch[0].secondFails,
			"retry_in", a.retryDelay(batch[0].secondFails), "err", err)
		return
	}
	a.m.secondRemovals.Add(float64(res.Removed))
	if res.Removed > 0 {
		a.log.Info("second pass removed entries written back after the first pass", "entries", res.Removed, "events", len(batch))
	}
	for _, it := range batch {
		a.finish(it)
	}
	s.second = rest
}

// invalidate runs one Invalidate call (one pass) for items and counts what it
// did.
func (a *Agent) invalidate(ctx context.Context, pass string, items []*item) (tokencache.Result, error) {
	evs := make([]event.Event, 0, len(items))
	seen := make(map[string]bool, len(items))
	for _, it := range items {
		if id := it.ev.ID; id != "" {
			if seen[id] {
				continue // a redelivery of an event already in the batch
			}
			seen[id] = true
		}
		evs = append(evs, it.ev)
	}
	ctx, cancel := context.WithTimeout(ctx, a.o.InvalidateTimeout)
	defer cancel()
	start := time.Now()
	res, err := a.safeInvalidate(ctx, evs)
	if errors.Is(err, errPanic) {
		// The batch cannot be handled as it is: widen it to one unbounded
		// event, which covers every event of the batch.
		a.log.Error("Invalidate panicked; removing every token entry instead", "pass", pass, "events", len(evs), "err", err)
		res, err = a.safeInvalidate(ctx, []event.Event{{
			Version: event.SchemaVersion,
			Kind:    event.KindNotification,
			ID:      fmt.Sprintf("widened-%d", start.UnixNano()),
			Type:    WidenedEventType,
			Time:    start.UTC(),
			Widen:   "the invalidator failed on this batch",
		}})
	}
	a.m.callDuration.WithLabelValues(pass).Observe(time.Since(start).Seconds())
	a.m.invalidations.WithLabelValues(pass).Inc()
	if pass != passSecond {
		a.m.batchSize.Observe(float64(len(evs)))
	}
	// Entries removed and kept are counted by the invalidator, per server
	// (keystone_fanout_invalidator_entries_removed_total, ..._kept_total,
	// ..._flushes_total).
	if res.Swept {
		a.m.sweeps.Inc()
	}
	if err != nil {
		a.m.failures.WithLabelValues(pass).Inc()
		return res, err
	}
	return res, nil
}

var errPanic = errors.New("Invalidate panicked")

// safeInvalidate calls the token cache, turning a panic into an error.
func (a *Agent) safeInvalidate(ctx context.Context, evs []event.Event) (res tokencache.Result, err error) {
	defer func() {
		if r := recover(); r != nil {
			a.m.panics.Inc()
			res, err = tokencache.Result{}, fmt.Errorf("%w: %v\n%s", errPanic, r, debug.Stack())
		}
	}()
	return a.inv.Invalidate(ctx, evs)
}

// finish acknowledges a handled event (or closes a gap) and forgets it.
func (a *Agent) finish(it *item) {
	if it.msg != nil {
		// Counted first: whoever sees the acknowledgement sees the count.
		a.m.events.WithLabelValues(typeLabel(&it.ev)).Inc()
		if err := it.msg.Ack(); err != nil {
			a.m.ackFailures.Inc()
			a.log.Warn("acknowledgement not sent; the event will be redelivered and invalidated again",
				"stream_seq", it.seq, "err", err)
		}
	} else if it.gap {
		a.log.Info("gap sweep finished", "reason", it.ev.Widen, "seq", it.seq)
	}
	a.held.remove(it)
	a.m.held.Set(float64(a.held.len()))
	a.tr.done(it.gen, it.seq, it.gap)
}

// retryDelay is the capped exponential back-off after n failures in a row:
// RetryMin after the first, doubling up to RetryMax.
func (a *Agent) retryDelay(n int) time.Duration {
	return backoff.Capped(a.o.RetryMin, a.o.RetryMax, n-1)
}
