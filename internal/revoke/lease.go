package revoke

import (
	"context"
	"crypto/rand"
	"encoding/hex"
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
	// Nonce identifies one holding: a renewal whose answer was lost is
	// recognised by it.
	Nonce string `json:"nonce"`
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
	kv    jetstream.KeyValue
	rev   uint64
	value []byte // last written
	nonce string // this holding's
}

// acquire blocks until this replica holds the lease, or ctx ends (nil, ctx's
// error). It watches the key: a deleted key (its holder stopped) is taken at
// once, a key whose revision stays unchanged for the TTL is taken over.
func (p *Poller) acquire(ctx context.Context) (*lease, error) {
	kv := p.store.kv
	nonce := newNonce()
	value := p.leaseValue(true, nonce)
	for {
		w, err := kv.Watch(ctx, LeaseKey)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			return nil, fmt.Errorf("watching the lease: %w", err)
		}
		l, err := p.contend(ctx, kv, w, value, nonce)
		_ = w.Stop()
		if l != nil || err != nil {
			return l, err
		}
		// The watch ended (NATS reconnect): watch again.
	}
}

// contend follows one watch of the lease key; it returns the lease once won,
// (nil, nil) when the watch ends, or ctx's error. A failed attempt (another
// replica was faster, or NATS is away) is repeated every LeaseTTL/4 for as
// long as no holder renews: a dead holder writes nothing that would wake it.
func (p *Poller) contend(ctx context.Context, kv jetstream.KeyValue, w jetstream.KeyWatcher, value []byte, nonce string) (*lease, error) {
	var rev uint64 // the holder's last revision seen; 0: no holder
	var since time.Time
	retry := p.o.LeaseTTL / 4
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
			timer.Reset(retry)
			return nil
		}
		return &lease{kv: kv, rev: r, value: value, nonce: nonce}
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
			if !initial {
				p.setReady(nil) // another replica holds it and renews it
			}
		case <-timer.C:
			if rev != 0 && time.Since(since) < p.o.LeaseTTL {
				timer.Reset(p.o.LeaseTTL - time.Since(since))
				continue
			}
			if rev != 0 {
				p.setReady(errors.New("revocation poller: the lease holder stopped renewing; taking it over"))
				p.log.Warn("the revocation poller's lease was not renewed in time: taking it over", "ttl", p.o.LeaseTTL)
			}
			if l := try(); l != nil {
				return l, nil
			}
		}
	}
}

// leaseValue is this replica's lease value for one holding (nonce).
func (p *Poller) leaseValue(healthy bool, nonce string) []byte {
	b, _ := json.Marshal(LeaseState{Holder: p.o.Holder, TTLMillis: p.o.LeaseTTL.Milliseconds(), Healthy: healthy,
		Nonce: nonce, Stream: p.o.Stream, SubjectPrefix: p.o.SubjectPrefix})
	return b
}

func newNonce() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// renew writes the lease again; an error means it is lost (another replica
// holds it) or could not be renewed. A renewal that was stored but whose
// answer was lost leaves a newer revision: when the key still holds this
// holding's last value (its nonce), that revision is adopted and written again.
func (l *lease) renew(ctx context.Context, value []byte) error {
	rev, err := l.kv.Update(ctx, LeaseKey, value, l.rev)
	if errors.Is(err, jetstream.ErrKeyExists) {
		if e, gerr := l.kv.Get(ctx, LeaseKey); gerr == nil && sameHolding(e.Value(), l.value) {
			rev, err = l.kv.Update(ctx, LeaseKey, value, e.Revision())
		}
	}
	if err != nil {
		return err
	}
	l.rev, l.value = rev, value
	return nil
}

// sameHolding reports whether two lease values were written by one holding.
func sameHolding(a, b []byte) bool {
	x, errA := ParseLeaseState(a)
	y, errB := ParseLeaseState(b)
	return errA == nil && errB == nil && x.Nonce != "" && x.Nonce == y.Nonce
}

// release deletes the lease if this holding still has it, so that a standby
// takes over at once.
func (l *lease) release(ctx context.Context) error {
	return l.kv.Delete(ctx, LeaseKey, jetstream.LastRevision(l.rev))
}
