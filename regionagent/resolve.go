package regionagent

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/backoff"
	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/revoke"
)

// Resolving notifications through the revocation poller.
//
// Some notifications do not bound their own effect: a CADF group membership
// change names neither the user nor whether it was an addition or a removal
// (event.ResolvedByRevocations). Keystone records a user_id revocation event
// for a removal, before it sends the notification, and none for an addition or
// a rename. The poller's lease holder polls Keystone as soon as a notification
// is in the stream, publishes what it finds, then a KindPolled event saying
// which notifications that poll covered. Stream order puts the revocation
// events before it. So such a notification waits (at most ResolveWait) for a
// KindPolled event covering its sequence, and is then done: the revocation
// events remove exactly what they name. Without a live, healthy poller it does
// not wait, and when the proof does not come in time it stops waiting: either
// way it removes every token entry, as it would without a poller.

// Results of a notification that could be resolved: the label values of
// resolutions_total.
const (
	resolvedByPoller = "resolved"   // covered by the poller's proof: nothing removed for it
	resolveSourceOff = "source_off" // no live, healthy poller: every token entry removed
	resolveTimeout   = "timeout"    // no proof within ResolveWait: every token entry removed
	// A proof covering sequences after its own (made for an earlier copy of
	// the stream): ignored.
	resolveStaleProof = "stale_proof"
)

var resolveResults = []string{resolvedByPoller, resolveSourceOff, resolveTimeout, resolveStaleProof}

// pollerState is what the agent last saw of the poller's lease.
type pollerState struct {
	healthy bool
	ttl     time.Duration
	seen    time.Time // on this host's clock
}

// pollerLive reports whether a healthy poller renewed its lease within its
// ttl, as seen by this agent.
func (a *Agent) pollerLive() bool {
	st := a.poller.Load()
	return st != nil && st.healthy && time.Since(st.seen) < st.ttl
}

// watchPoller follows the poller's lease until ctx ends.
func (a *Agent) watchPoller(ctx context.Context) {
	retry := backoff.New(a.o.RetryMin, max(a.o.RetryMax, 5*time.Second))
	for ctx.Err() == nil {
		err := a.followLease(ctx)
		a.poller.Store(nil)
		if ctx.Err() != nil {
			return
		}
		d := retry.Next()
		if n := retry.Failures(); n&(n-1) == 0 {
			a.log.Info("revocation poller's lease not readable; group membership notifications remove every token entry meanwhile",
				"bucket", a.o.PollerBucket, "err", err, "attempts", n, "retry_in", d)
		}
		if !backoff.Sleep(ctx, d) {
			return
		}
	}
}

// followLease watches the lease key; it returns when the watch ends.
func (a *Agent) followLease(ctx context.Context) error {
	kv, err := a.central.KeyValue(ctx, a.o.PollerBucket)
	if err != nil {
		return err
	}
	w, err := kv.Watch(ctx, revoke.LeaseKey)
	if err != nil {
		return err
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return errors.New("the lease watch ended")
			}
			if e == nil {
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				a.poller.Store(nil) // the holder stopped; another takes over
				continue
			}
			st, err := revoke.ParseLeaseState(e.Value())
			if err != nil {
				a.log.Warn("unreadable revocation poller lease; treating the poller as off", "err", err)
				a.poller.Store(nil)
				continue
			}
			was := a.pollerLive()
			a.poller.Store(&pollerState{healthy: st.Healthy, ttl: st.TTL(), seen: time.Now()})
			if !was && st.Healthy {
				a.log.Info("revocation poller is live: group membership notifications wait for its revocation events",
					"holder", st.Holder, "ttl", st.TTL())
			}
		}
	}
}

// waiting is a notification waiting for the poller's proof.
type waiting struct {
	it       *item
	deadline time.Time
}

// resolver is the scheduler's state for resolution. Only the scheduler goroutine
// touches it.
type resolver struct {
	waiting []waiting
	// polled is the highest sequence covered by a proof, by stream
	// incarnation (item.gen).
	polled map[uint64]uint64
}

// take handles it when it is a proof of progress or a notification that can
// wait for one, and reports whether it did; other items go the usual way.
func (s *scheduler) take(it *item, now time.Time) bool {
	a := s.a
	switch {
	case it.ev.Kind == event.KindPolled && it.ev.Polled != nil && it.ev.Polled.Through >= it.seq:
		// A proof can only cover what was stored before it: this one was
		// made for an earlier incarnation of the stream. It proves nothing.
		a.m.resolutions.WithLabelValues(resolveStaleProof).Inc()
		a.log.Warn("ignoring a revocation poller's proof made for an earlier copy of the stream",
			"stream_seq", it.seq, "through", it.ev.Polled.Through)
		a.finish(it)
		return true
	case it.ev.Kind == event.KindPolled && it.ev.Polled != nil:
		through := it.ev.Polled.Through
		if s.res.polled == nil {
			s.res.polled = map[uint64]uint64{}
		}
		s.res.polled[it.gen] = max(s.res.polled[it.gen], through)
		kept := s.res.waiting[:0]
		for _, wt := range s.res.waiting {
			if wt.it.gen == it.gen && wt.it.seq <= through {
				s.resolved(wt.it, now)
			} else {
				kept = append(kept, wt)
			}
		}
		clear(s.res.waiting[len(kept):])
		s.res.waiting = kept
		a.finish(it)
		return true
	case it.msg == nil || !it.ev.ResolvedByRevocations():
		return false
	case it.seq <= s.res.polled[it.gen]:
		s.resolved(it, now) // a redelivery after its proof
		return true
	case !a.pollerLive():
		a.m.resolutions.WithLabelValues(resolveSourceOff).Inc()
		return false
	}
	s.res.waiting = append(s.res.waiting, waiting{it: it, deadline: now.Add(a.o.ResolveWait)})
	return true
}

// resolved finishes a notification the poller's revocation events cover.
func (s *scheduler) resolved(it *item, now time.Time) {
	a := s.a
	a.m.resolutions.WithLabelValues(resolvedByPoller).Inc()
	if it.first && !it.stored.IsZero() {
		a.m.resolveWait.Observe(now.Sub(it.stored).Seconds())
	}
	a.log.Debug("notification resolved by the revocation poller: its revocation events remove what it changed",
		"event_id", it.ev.ID, "event_type", it.ev.Type, "stream_seq", it.seq)
	a.finish(it)
}

// expireWaiting hands the notifications whose wait is over to the usual
// path, which removes every token entry for them, and returns the earliest
// deadline still pending (zero: none).
func (s *scheduler) expireWaiting(now time.Time) time.Time {
	var next time.Time
	kept := s.res.waiting[:0]
	for _, wt := range s.res.waiting {
		if !now.Before(wt.deadline) {
			s.a.m.resolutions.WithLabelValues(resolveTimeout).Inc()
			s.a.log.Warn("no proof from the revocation poller in time: removing every token entry for this notification",
				"event_id", wt.it.ev.ID, "event_type", wt.it.ev.Type, "stream_seq", wt.it.seq, "waited", s.a.o.ResolveWait)
			s.enqueueFirst(wt.it, now)
			continue
		}
		if next.IsZero() || wt.deadline.Before(next) {
			next = wt.deadline
		}
		kept = append(kept, wt)
	}
	clear(s.res.waiting[len(kept):])
	s.res.waiting = kept
	return next
}
