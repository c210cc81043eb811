package regionagent

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

// worker is the state of the goroutine that runs invalidations. Only that
// goroutine touches it. Invalidations run one at a time: memcached crawls one
// request at a time per server, and batching makes one call do the work of
// many.
type worker struct {
	a    *Agent
	hard context.Context

	// first holds events waiting for their first pass: due at firstDue (the
	// batch linger, or the retry after firstFails failures in a row).
	first      []*item
	firstDue   time.Time
	firstFails int
	// second holds events whose first pass succeeded, each due at its own time.
	second []*item
	// lastFirst alternates the passes when both are due, so that a steady
	// flow of new events cannot starve the second passes (and the acks).
	lastFirst bool
}

// work runs until ctx ends. Invalidation calls use hard, which outlives ctx
// by Options.ShutdownTimeout so that a call in progress may finish.
func (a *Agent) work(ctx, hard context.Context) {
	w := &worker{a: a, hard: hard}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now := time.Now()
	drain:
		for {
			select {
			case it := <-a.in:
				w.add(it, now)
			default:
				break drain
			}
		}
		if ctx.Err() != nil {
			return
		}
		firstReady := len(w.first) > 0 && !now.Before(w.firstDue)
		secondDue, secondAny := w.earliestSecond()
		secondReady := secondAny && !now.Before(secondDue)
		switch {
		case firstReady && (!secondReady || !w.lastFirst):
			w.firstPass()
			w.lastFirst = true
			continue
		case secondReady:
			w.secondPass(now)
			w.lastFirst = false
			continue
		}
		wait := time.Hour
		if len(w.first) > 0 {
			wait = w.firstDue.Sub(now)
		}
		if secondAny {
			wait = min(wait, secondDue.Sub(now))
		}
		timer.Reset(wait)
		select {
		case it := <-a.in:
			w.add(it, time.Now())
		case <-timer.C:
		case <-ctx.Done():
			return
		}
		timer.Stop()
	}
}

func (w *worker) add(it *item, now time.Time) {
	if len(w.first) == 0 && w.firstFails == 0 {
		w.firstDue = now.Add(max(w.a.o.BatchLinger, 0))
	}
	w.first = append(w.first, it)
	if len(w.first) >= w.a.o.BatchSize && w.firstFails == 0 {
		w.firstDue = now
	}
}

func (w *worker) earliestSecond() (time.Time, bool) {
	var due time.Time
	for i, it := range w.second {
		if i == 0 || it.due.Before(due) {
			due = it.due
		}
	}
	return due, len(w.second) > 0
}

func (w *worker) firstPass() {
	a := w.a
	n := min(len(w.first), a.o.BatchSize)
	batch := w.first[:n]
	_, err := a.invalidate(w.hard, passFirst, batch)
	end := time.Now()
	if err != nil {
		w.firstFails++
		d := a.retryDelay(w.firstFails)
		w.firstDue = end.Add(d)
		a.log.Warn("invalidation failed: the events stay unacknowledged and are retried",
			"pass", passFirst, "events", n, "attempt", w.firstFails, "retry_in", d, "err", err)
		return
	}
	if w.firstFails > 0 {
		a.log.Info("invalidation succeeded after failures", "pass", passFirst, "events", n, "failures", w.firstFails)
	}
	w.firstFails = 0
	w.first = append([]*item(nil), w.first[n:]...)
	if len(w.first) > 0 {
		w.firstDue = end // a backlog: go on at once
	}
	for _, it := range batch {
		if it.first && !it.gap && !it.ev.Time.IsZero() {
			a.m.latency.Observe(end.Sub(it.ev.Time).Seconds())
		}
		if a.o.SecondPassDelay < 0 {
			a.finish(it)
			continue
		}
		it.due = end.Add(a.o.SecondPassDelay)
		w.second = append(w.second, it)
	}
}

func (w *worker) secondPass(now time.Time) {
	a := w.a
	var batch, rest []*item
	for _, it := range w.second {
		if !now.Before(it.due) && len(batch) < a.o.BatchSize {
			batch = append(batch, it)
		} else {
			rest = append(rest, it)
		}
	}
	res, err := a.invalidate(w.hard, passSecond, batch)
	end := time.Now()
	if err != nil {
		var d time.Duration
		for _, it := range batch {
			it.secondFails++
			d = a.retryDelay(it.secondFails)
			it.due = end.Add(d)
		}
		a.log.Warn("invalidation failed: the events stay unacknowledged and are retried",
			"pass", passSecond, "events", len(batch), "attempt", batch[0].secondFails, "retry_in", d, "err", err)
		return
	}
	a.m.secondRemovals.Add(float64(res.Removed))
	if res.Removed > 0 {
		a.log.Info("second pass removed entries written back after the first pass", "entries", res.Removed, "events", len(batch))
	}
	for _, it := range batch {
		a.finish(it)
	}
	w.second = rest
}

// invalidate runs one Invalidator call for items and counts what it did.
func (a *Agent) invalidate(ctx context.Context, pass string, items []*item) (Result, error) {
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
		a.log.Error("invalidator panicked; removing every token entry instead", "pass", pass, "events", len(evs), "err", err)
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
	if pass == passFirst {
		a.m.batchSize.Observe(float64(len(evs)))
	}
	// What was removed is removed, even when another server failed.
	a.m.removed.Add(float64(res.Removed))
	a.m.kept.Add(float64(res.Kept))
	if res.Swept {
		a.m.sweeps.Inc()
	}
	if res.Flushed {
		a.m.flushes.Inc()
	}
	if err != nil {
		a.m.failures.WithLabelValues(pass).Inc()
		return res, err
	}
	return res, nil
}

var errPanic = errors.New("invalidator panicked")

// safeInvalidate calls the Invalidator, turning a panic into an error.
func (a *Agent) safeInvalidate(ctx context.Context, evs []event.Event) (res Result, err error) {
	defer func() {
		if r := recover(); r != nil {
			a.m.panics.Inc()
			res, err = Result{}, fmt.Errorf("%w: %v\n%s", errPanic, r, debug.Stack())
		}
	}()
	return a.inv.Invalidate(ctx, evs)
}

// finish acknowledges a handled event (or closes a gap) and forgets it.
func (a *Agent) finish(it *item) {
	if it.msg != nil {
		if err := it.msg.Ack(); err != nil {
			a.m.ackFailures.Inc()
			a.log.Warn("acknowledgement not sent; the event will be redelivered and invalidated again",
				"stream_seq", it.seq, "err", err)
		}
		a.m.events.WithLabelValues(typeLabel(&it.ev)).Inc()
	} else if it.gap {
		a.log.Info("gap sweep finished", "reason", it.ev.Widen, "seq", it.seq)
	}
	a.held.remove(it)
	a.m.held.Set(float64(a.held.len()))
	a.tr.done(it.gen, it.seq, it.gap)
}

// retryDelay is the capped exponential back-off after n failures in a row.
func (a *Agent) retryDelay(n int) time.Duration {
	d := a.o.RetryMin
	for i := 1; i < n && d < a.o.RetryMax; i++ {
		d *= 2
	}
	return min(d, a.o.RetryMax)
}
