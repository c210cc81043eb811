package tokencache

import (
	"fmt"
	"sync"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

// recent holds the events of the recent past, against which every value
// read after its event is matched: a store the watcher reports (a
// validation that raced with the event and was written back late) and every
// new or changed value a crawl reads. It is what removes a late write-back
// within milliseconds of its store instead of at the next pass.
//
// How long an event stays:
//
//   - A revocation event (Keystone's own rule: a token issued at or before
//     issued_before is revoked for good) stays until no token it can concern
//     is still valid: issued_before + Options.TokenLifetime. A match is never
//     a false alarm: Keystone will not validate that token again.
//   - A notification cannot tell a harmless update from a revoking one, and
//     a fresh validation made after the change looks like a stale one, so
//     while it stays every new validation of the tokens it concerns is
//     removed again as soon as it is stored: those tokens are validated at
//     Keystone on every use. It stays Options.LateWriteBackWindow (default
//     15 s), chosen from how long a validation can take to reach memcached
//     (docs/INVALIDATION.md, "Late write-backs").
//   - The poller's proof of progress (KindPolled) concerns no token and is
//     not kept.
type recent struct {
	notifyFor, revokeFor time.Duration
	wide                 bool // strategy Sweep

	mu      sync.Mutex
	byID    map[string]struct{}
	events  []recentEvent
	changed bool
	m       *matcher // of events, rebuilt after a change; nil when empty
}

type recentEvent struct {
	ev    event.Event
	id    string
	until time.Time
}

// identity tells events apart: the whole event, not only its ID (a
// publisher reusing an ID must not hide a different event).
func identity(e *event.Event) string {
	b, err := e.Marshal()
	if err != nil {
		return fmt.Sprintf("%s\x00%+v", e.ID, *e)
	}
	return string(b)
}

func newRecent(notifyFor, revokeFor time.Duration, wide bool) *recent {
	return &recent{notifyFor: notifyFor, revokeFor: revokeFor, wide: wide, byID: map[string]struct{}{}}
}

// add remembers events handled at now. An event already remembered (the
// same event again: its second pass, a redelivery) keeps its first time.
func (r *recent) add(events []event.Event, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := range events {
		e := &events[i]
		if e.Kind == event.KindPolled {
			continue
		}
		id := identity(e)
		if _, ok := r.byID[id]; ok {
			continue
		}
		r.byID[id] = struct{}{}
		until := now.Add(r.notifyFor)
		if e.Kind == event.KindRevocation && !e.Unbounded() && e.Revocation != nil && !r.wide {
			if ib := e.Revocation.IssuedBefore; !ib.IsZero() {
				until = later(until, ib.Add(r.revokeFor))
			} else {
				until = later(until, now.Add(r.revokeFor))
			}
		}
		r.events = append(r.events, recentEvent{ev: *e, id: id, until: until})
		r.changed = true
	}
}

// matcher returns the matcher of the events still in the window at now, or
// nil when there is none.
func (r *recent) matcher(now time.Time) *matcher {
	r.mu.Lock()
	defer r.mu.Unlock()
	kept := r.events[:0]
	for _, re := range r.events {
		if now.Before(re.until) {
			kept = append(kept, re)
			continue
		}
		delete(r.byID, re.id)
		r.changed = true
	}
	clear(r.events[len(kept):])
	r.events = kept
	if r.changed {
		r.changed = false
		r.m = nil
		if len(r.events) > 0 {
			evs := make([]event.Event, len(r.events))
			for i := range r.events {
				evs[i] = r.events[i].ev
			}
			r.m = newLateMatcher(evs, r.wide)
		}
	}
	return r.m
}

// len returns how many events the window holds.
func (r *recent) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.events)
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
