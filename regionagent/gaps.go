package regionagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

// Gap detection.
//
// The region must see every event younger than TokenCacheTime+ReplayMargin (the
// window W): an older one cannot have a live stale entry. Events leave the
// stream by its limits (max age, max messages), by a purge, or with the stream
// itself; a region that had not handled them by then has a gap, and the only
// safe answer is to remove every token entry (a sweep), once.
//
// What the agent knows, and how it finds a gap:
//
//   - The checkpoint (a key-value entry per region): the stream (name and
//     creation time) and a sequence F such that every event at or below F was
//     handled. It is written by the audit, never beyond what JetStream
//     confirms acknowledged (the consumer's ack floor) nor beyond an event the
//     agent still holds, and not at all while a gap sweep is unfinished.
//   - On every (re)bind: the events in (F, FirstSeq-1] are gone. They matter
//     unless provably older than W: the stream's first message (or, when it is
//     empty, its last one) is older than W, and every vanished event is older
//     than that. A checkpoint of another stream means the region's unhandled
//     events may have gone with the old stream: a gap.
//   - While consuming, new events arrive in stream order, so a delivery
//     whose sequence is more than one past the highest delivered one means the
//     consumer moved past the events in between without this agent receiving
//     them (a redelivery counts too: after a reset, or when the first delivery
//     was lost, redeliveries come in stream order). That is not proof that
//     they vanished: JetStream also counts as delivered a message lost in
//     transit (the connection carrying it dropped), which it redelivers after
//     the ack wait while newer events keep coming, and a message delivered to
//     another agent of the same region. So the agent looks the skipped
//     sequences up in the stream (skipped.go): every one still there is
//     fetched and invalidated at once (its redelivery, if any, is handled and
//     acknowledged again: invalidation is idempotent); only one that is gone
//     (deleted, expired, purged) is a gap. Nothing matters when the new event
//     is older than W.
//   - The audit: when the stream's first sequence is beyond the highest
//     delivered one at two audits in a row, events vanished and nothing newer
//     came to reveal it by a jump (a purge also moves the consumer past them).
//
// Without a checkpoint (first start, or --no-checkpoint) F is the consumer's
// ack floor when it exists, else 0; on first start a stream whose first events
// were removed while its oldest remaining one is younger than W costs one
// sweep, which is safe.
//
// What is not detected: a single event deleted from the middle of the stream
// (nats stream rmm) after it was delivered to an agent that then stopped
// without acknowledging it, when no later event of that agent's comes again
// to reveal the jump. The next agent resets the consumer to its ack floor
// when it can (NATS server 2.14 or later, see Agent.handBackOrphans): the
// redelivery from the ack floor then skips the deleted event and reveals it
// unless it was the last one delivered.

// GapEventType is the Type of the unbounded event a gap is handled with.
const GapEventType = "keystone-fanout.gap"

// gapEvent is the unbounded event that sweeps every token entry for a gap.
func gapEvent(reason string, now time.Time, seq uint64) event.Event {
	return event.Event{
		Version: event.SchemaVersion,
		Kind:    event.KindNotification,
		ID:      fmt.Sprintf("gap-%s-%d-%d", reason, seq, now.UnixNano()),
		Type:    GapEventType,
		Time:    now.UTC(),
		Widen:   "gap: " + reason,
	}
}

// vanishedMayMatter reports whether events removed from before the stream's
// first sequence may be younger than the window start w.
func vanishedMayMatter(st jetstream.StreamState, w time.Time) bool {
	if st.Msgs > 0 {
		return !st.FirstTime.Before(w)
	}
	// Empty: every removed event is at most as young as the last one.
	return !st.LastTime.Before(w)
}

// tracker follows which stream sequences the agent has seen and handled. It
// is shared by the fetcher, the scheduler and the audit.
type tracker struct {
	mu sync.Mutex
	// initialized is false until the first bind of this process.
	initialized bool
	// stream and streamCreated identify the stream incarnation; gen counts
	// incarnations so that work held for an old one does not count.
	stream        string
	streamCreated time.Time
	gen           uint64
	// maxSeen is the highest stream sequence delivered (or found vanished).
	maxSeen uint64
	// outstanding counts, by sequence, the events the agent holds and the
	// unfinished gaps (at the last vanished sequence).
	outstanding map[uint64]int
	gaps        int
	// ackFloor is the consumer's ack floor as last read from JetStream.
	ackFloor uint64
	// suspect is the audit's "stream starts beyond maxSeen" from the previous
	// audit, 0 when none.
	suspect uint64
	// replayedUpTo is the highest sequence a previous agent had been given
	// when this one reset the consumer to its ack floor: deliveries up to it
	// are redeliveries although JetStream counts them as first ones.
	replayedUpTo uint64
}

// seqRange is the stream sequences from lo to hi, both included; lo 0 means
// none.
type seqRange struct{ lo, hi uint64 }

func (r seqRange) empty() bool { return r.lo == 0 || r.hi < r.lo }

func (r seqRange) len() uint64 {
	if r.empty() {
		return 0
	}
	return r.hi - r.lo + 1
}

func (r seqRange) contains(seq uint64) bool { return !r.empty() && seq >= r.lo && seq <= r.hi }

// floorLocked is the sequence at and below which every event is handled.
func (t *tracker) floorLocked() uint64 {
	f := t.maxSeen
	for seq := range t.outstanding {
		if seq == 0 {
			f = 0
			break
		}
		f = min(f, seq-1)
	}
	return min(f, t.ackFloor)
}

func (t *tracker) hold(gen, seq uint64) {
	if gen != t.gen {
		return
	}
	if t.outstanding == nil {
		t.outstanding = map[uint64]int{}
	}
	t.outstanding[seq]++
}

// done records that the agent no longer holds the event or gap at seq.
func (t *tracker) done(gen, seq uint64, gap bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if gen != t.gen {
		return
	}
	if gap {
		t.gaps--
	}
	t.releaseLocked(seq)
}

// delivery records a delivered message (stored at stored; w is the window
// start). When it is more than one past the highest sequence seen, and not
// older than w, it returns the sequences in between as skipped: the caller
// must find out whether they are still in the stream and then call
// skippedResolved. Until then the sequences at and above the first
// skipped one do not count as handled. redelivery reports whether the
// message was delivered before, to this agent or to a previous one.
func (t *tracker) delivery(seq, numDelivered uint64, stored, w time.Time) (gen uint64, skipped seqRange, redelivery bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	redelivery = numDelivered > 1 || seq <= t.replayedUpTo
	if seq > t.maxSeen+1 && !stored.Before(w) {
		skipped = seqRange{lo: t.maxSeen + 1, hi: seq - 1}
		t.hold(t.gen, skipped.lo)
	}
	t.maxSeen = max(t.maxSeen, seq)
	t.hold(t.gen, seq)
	return t.gen, skipped, redelivery
}

// skippedResolved ends the check of skipped (see delivery): the sequences
// fetched from the stream are held until their invalidation finishes, and a
// gap, when there is one, at skipped.hi. It reports false when the stream was
// re-created meanwhile: the results are then moot.
func (t *tracker) skippedResolved(gen uint64, skipped seqRange, fetched []uint64, gap bool) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if gen != t.gen {
		return false
	}
	for _, seq := range fetched {
		t.hold(gen, seq)
	}
	if gap {
		t.gaps++
		t.hold(gen, skipped.hi)
	}
	t.releaseLocked(skipped.lo)
	return true
}

func (t *tracker) releaseLocked(seq uint64) {
	if n := t.outstanding[seq]; n > 1 {
		t.outstanding[seq] = n - 1
	} else {
		delete(t.outstanding, seq)
	}
}

func (t *tracker) currentGen() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.gen
}

// Checkpoint is a region's record, in the checkpoint bucket under its region
// name, of how far it handled the stream.
type Checkpoint struct {
	// Stream and StreamCreated identify the stream incarnation.
	Stream        string    `json:"stream"`
	StreamCreated time.Time `json:"stream_created"`
	// Seq: every event at or below it was handled.
	Seq uint64 `json:"seq"`
	// Updated is when it was written.
	Updated time.Time `json:"updated"`
}

// ReadCheckpoints returns every region's checkpoint in bucket (for the status
// command). A missing bucket yields an empty map.
func ReadCheckpoints(ctx context.Context, js jetstream.JetStream, bucket string) (map[string]Checkpoint, error) {
	kv, err := js.KeyValue(ctx, bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return map[string]Checkpoint{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("checkpoint bucket %s: %w", bucket, err)
	}
	keys, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("checkpoint bucket %s: listing: %w", bucket, err)
	}
	out := map[string]Checkpoint{}
	for k := range keys.Keys() {
		e, err := kv.Get(ctx, k)
		if err != nil {
			if errors.Is(err, jetstream.ErrKeyNotFound) {
				continue
			}
			return nil, fmt.Errorf("checkpoint %s/%s: %w", bucket, k, err)
		}
		var cp Checkpoint
		if err := json.Unmarshal(e.Value(), &cp); err != nil {
			return nil, fmt.Errorf("checkpoint %s/%s: %w", bucket, k, err)
		}
		out[k] = cp
	}
	return out, nil
}
