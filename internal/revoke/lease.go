package revoke

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// The lease: one bridge replica at a time polls Keystone. The holder writes
// LeaseKey in the poller's bucket every LeaseTTL/4 with compare-and-set on the
// revision it last wrote; another replica that sees the revision unchanged for
// LeaseTTL (on its own clock: no clocks are compared) takes the lease over with
// the same compare-and-set, so exactly one wins. A holder that stops deletes
// the key, and a standby, which watches it, takes over at once. Region agents
// watch the key too: a live, healthy holder tells them that the revocation
// source is on (see LeaseState and docs/REVOCATION.md).

// LeaseKey is the key of the lease in the poller's bucket (Options.Bucket).
const LeaseKey = "lease"

// LeaseState is the lease's value, written by the holder at every renewal.
type LeaseState struct {
	// Holder names the replica holding the lease.
	Holder string `json:"holder"`
	// TTLMillis is the lease's time to live: a holder that has not renewed
	// within it is gone.
	TTLMillis int64 `json:"ttl_ms"`
	// Healthy is true while the holder's polls succeed: its last poll
	// succeeded, or it began polling less than three intervals ago.
	Healthy bool `json:"healthy"`
	// Stream and SubjectPrefix say which stream the holder's progress (the
	// event.KindPolled events) is published to.
	Stream        string `json:"stream"`
	SubjectPrefix string `json:"subject_prefix"`
}

// TTL is the lease's time to live.
func (s LeaseState) TTL() time.Duration { return time.Duration(s.TTLMillis) * time.Millisecond }

// ParseLeaseState decodes a lease value.
func ParseLeaseState(b []byte) (LeaseState, error) {
	var s LeaseState
	if err := json.Unmarshal(b, &s); err != nil {
		return LeaseState{}, fmt.Errorf("revoke: lease value: %w", err)
	}
	if s.TTLMillis <= 0 {
		return LeaseState{}, errors.New("revoke: lease value without a ttl")
	}
	return s, nil
}

// lease is one holding of the lease.
type lease struct {
	kv  jetstream.KeyValue
	rev uint64
}

// acquire blocks until this replica holds the lease, or ctx ends (nil, ctx's
// error). It watches the key: a deleted key (its holder stopped) is taken at
// once, a key whose revision stays unchanged for the TTL is taken over.
func (p *Poller) acquire(ctx context.Context) (*lease, error) {
	kv := p.store.kv
	value := p.leaseValue(true)
	for {
		w, err := kv.Watch(ctx, LeaseKey)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("watching the lease: %w", err)
		}
		l, err := p.contend(ctx, kv, w, value)
		_ = w.Stop()
		if l != nil || err != nil {
			return l, err
		}
		// The watch ended (NATS reconnect): watch again.
	}
}

// contend follows one watch of the lease key; it returns the lease once won,
// (nil, nil) when the watch ends, or ctx's error.
func (p *Poller) contend(ctx context.Context, kv jetstream.KeyValue, w jetstream.KeyWatcher, value []byte) (*lease, error) {
	var rev uint64 // the holder's last revision seen; 0: no holder
	var since time.Time
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	try := func() *lease {
		var r uint64
		var err error
		if rev == 0 {
			r, err = kv.Create(ctx, LeaseKey, value)
		} else {
			r, err = kv.Update(ctx, LeaseKey, value, rev)
		}
		if err != nil {
			return nil // another replica was faster, or NATS is away: the watch tells
		}
		return &lease{kv: kv, rev: r}
	}
	initial := true
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case e, ok := <-w.Updates():
			if !ok {
				return nil, nil
			}
			if e == nil { // the initial values are done
				if initial && rev == 0 {
					if l := try(); l != nil {
						return l, nil
					}
				}
				initial = false
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				rev = 0 // released: take it now
				if l := try(); l != nil {
					return l, nil
				}
				continue
			}
			rev, since = e.Revision(), time.Now()
			timer.Reset(p.o.LeaseTTL)
			p.setReady(nil) // another replica holds it and renews it
		case <-timer.C:
			if rev != 0 && time.Since(since) >= p.o.LeaseTTL {
				p.log.Warn("the revocation poller's lease was not renewed in time: taking it over",
					"ttl", p.o.LeaseTTL)
				if l := try(); l != nil {
					return l, nil
				}
			}
		}
	}
}

// leaseValue is this replica's lease value.
func (p *Poller) leaseValue(healthy bool) []byte {
	b, _ := json.Marshal(LeaseState{Holder: p.o.Holder, TTLMillis: p.o.LeaseTTL.Milliseconds(), Healthy: healthy,
		Stream: p.o.Stream, SubjectPrefix: p.o.SubjectPrefix})
	return b
}

// renew writes the lease again; an error means it is lost (another replica
// holds it) or could not be renewed.
func (l *lease) renew(ctx context.Context, value []byte) error {
	rev, err := l.kv.Update(ctx, LeaseKey, value, l.rev)
	if err != nil {
		return err
	}
	l.rev = rev
	return nil
}

// release deletes the lease if this holding still has it, so that a standby
// takes over at once.
func (l *lease) release(ctx context.Context) error {
	return l.kv.Delete(ctx, LeaseKey, jetstream.LastRevision(l.rev))
}
