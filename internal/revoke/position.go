package revoke

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// position is what the pollers have published, stored as JSON in the
// key-value entry. Replicas of the bridge share it and merge their progress.
type position struct {
	// RevokedAt is the newest revoked_at of a published event; zero when none
	// was published yet (the next poll then lists every event Keystone has).
	RevokedAt time.Time `json:"revoked_at"`
	// Recent holds the ids of published events that a poll can list again
	// (revoked_at at or after RevokedAt - Overlap), with their revoked_at, so
	// that a restarted poller does not publish them a second time, however long
	// after JetStream's duplicate window.
	Recent map[string]time.Time `json:"recent,omitempty"`
}

// since is the "since" of the next poll: zero (list everything) before the
// first published event.
func (p *position) since(overlap time.Duration) time.Time {
	if p.RevokedAt.IsZero() {
		return time.Time{}
	}
	return p.RevokedAt.Add(-overlap)
}

func (p *position) seen(id string) bool {
	_, ok := p.Recent[id]
	return ok
}

// add records a published event; at is its revoked_at (zero when unknown: it
// is then kept as recent as the position itself).
func (p *position) add(id string, at time.Time) {
	if p.Recent == nil {
		p.Recent = make(map[string]time.Time)
	}
	if at.IsZero() {
		at = p.RevokedAt
	}
	p.Recent[id] = at
	if at.After(p.RevokedAt) {
		p.RevokedAt = at
	}
}

// merge adds what another poller published.
func (p *position) merge(o position) {
	for id, at := range o.Recent {
		if cur, ok := p.Recent[id]; !ok || at.After(cur) {
			if p.Recent == nil {
				p.Recent = make(map[string]time.Time)
			}
			p.Recent[id] = at
		}
	}
	if o.RevokedAt.After(p.RevokedAt) {
		p.RevokedAt = o.RevokedAt
	}
}

// prune forgets ids that no poll can list again.
func (p *position) prune(overlap time.Duration) {
	since := p.since(overlap)
	for id, at := range p.Recent {
		if at.Before(since) {
			delete(p.Recent, id)
		}
	}
}

func (p position) clone() position {
	c := position{RevokedAt: p.RevokedAt, Recent: make(map[string]time.Time, len(p.Recent))}
	for id, at := range p.Recent {
		c.Recent[id] = at
	}
	return c
}

// positionStore keeps the position in a JetStream key-value bucket.
type positionStore struct {
	kv      jetstream.KeyValue
	key     string
	overlap time.Duration
	log     *slog.Logger
}

// openPositionStore opens the bucket, creating it when it does not exist.
func openPositionStore(ctx context.Context, js jetstream.JetStream, o *Options, log *slog.Logger) (*positionStore, error) {
	kv, err := js.KeyValue(ctx, o.Bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      o.Bucket,
			Description: "keystone-fanout: position of the Keystone revocation event poller",
			History:     1,
			Storage:     jetstream.FileStorage,
			Replicas:    o.BucketReplicas,
		})
		if errors.Is(err, jetstream.ErrBucketExists) { // created by another replica meanwhile
			kv, err = js.KeyValue(ctx, o.Bucket)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("opening key-value bucket %q: %w", o.Bucket, err)
	}
	return &positionStore{kv: kv, key: o.Key, overlap: o.Overlap, log: log}, nil
}

// load reads the stored position; a missing entry is the zero position.
func (s *positionStore) load(ctx context.Context) (position, error) {
	p, _, err := s.get(ctx)
	return p, err
}

func (s *positionStore) get(ctx context.Context) (position, uint64, error) {
	e, err := s.kv.Get(ctx, s.key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return position{}, 0, nil
	}
	if err != nil {
		return position{}, 0, fmt.Errorf("reading position %q: %w", s.key, err)
	}
	var p position
	if err := json.Unmarshal(e.Value(), &p); err != nil {
		// Starting over republishes what Keystone lists: safe, only costly.
		s.log.Error("stored revocation position is not readable; starting from Keystone's full list",
			"bucket", s.kv.Bucket(), "key", s.key, "err", err)
		return position{}, e.Revision(), nil
	}
	return p, e.Revision(), nil
}

// save merges mine into the stored position (other replicas may have written
// it since) with a compare-and-set, and returns the merged position.
func (s *positionStore) save(ctx context.Context, mine position) (position, error) {
	var last error
	for range 5 {
		cur, rev, err := s.get(ctx)
		if err != nil {
			return mine, err
		}
		cur.merge(mine)
		cur.prune(s.overlap)
		data, err := json.Marshal(cur)
		if err != nil {
			return mine, err
		}
		if rev == 0 {
			_, err = s.kv.Create(ctx, s.key, data)
		} else {
			_, err = s.kv.Update(ctx, s.key, data, rev)
		}
		if err == nil {
			return cur, nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) && !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return mine, fmt.Errorf("writing position %q: %w", s.key, err)
		}
		last = err // another replica wrote meanwhile: merge again
	}
	return mine, fmt.Errorf("writing position %q: kept conflicting with other writers: %w", s.key, last)
}
