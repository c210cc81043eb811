package regionagent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

// auditLoop runs auditOnce every Options.AuditInterval until ctx ends.
func (a *Agent) auditLoop(ctx context.Context) {
	t := time.NewTicker(a.o.AuditInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		actx, cancel := context.WithTimeout(ctx, max(a.o.AuditInterval, 2*time.Second))
		a.auditOnce(actx, false)
		cancel()
	}
}

// auditOnce reads the stream's and the consumer's state: it updates the lag
// gauges, asks for a re-bind when the consumer or the stream was deleted,
// detects events that vanished before delivery (see gaps.go) and writes the
// checkpoint. final is the last audit of Run: it only writes the checkpoint.
func (a *Agent) auditOnce(ctx context.Context, final bool) {
	s, err := a.js.Stream(ctx, a.o.Stream)
	if err != nil {
		if errors.Is(err, jetstream.ErrStreamNotFound) && a.bound.Load() && !final {
			a.requestRebind("the stream was deleted")
		}
		a.log.Debug("audit: reading the stream", "err", err)
		return
	}
	si := s.CachedInfo()
	a.noteServerTime(si.TimeStamp)
	cons, err := s.Consumer(ctx, a.consumer)
	if err != nil {
		if errors.Is(err, jetstream.ErrConsumerNotFound) && a.bound.Load() && !final {
			a.m.consumerErrors.WithLabelValues(consumerErrDeleted).Inc()
			a.requestRebind("the consumer was deleted")
			return
		}
		a.m.consumerErrors.WithLabelValues(consumerErrAudit).Inc()
		a.log.Debug("audit: reading the consumer", "err", err)
		return
	}
	ci := cons.CachedInfo()
	a.m.pending.Set(float64(ci.NumPending))
	a.m.ackPending.Set(float64(ci.NumAckPending))

	w := a.windowStart()
	t := &a.tr
	t.mu.Lock()
	if !t.initialized {
		t.mu.Unlock()
		return
	}
	if !t.streamCreated.Equal(si.Created) {
		t.mu.Unlock()
		if !final {
			a.requestRebind("the stream was re-created")
		}
		return
	}
	t.ackFloor = ci.AckFloor.Stream
	var gap bool
	var gapSeq, gen, prev uint64
	first := si.State.FirstSeq
	switch {
	case final || first == 0 || first-1 <= t.maxSeen:
		t.suspect = 0
	case t.suspect != 0 && t.maxSeen < t.suspect:
		// Two audits in a row: not a delivery in flight, events vanished.
		prev = t.maxSeen
		if vanishedMayMatter(si.State, w) {
			gap = true
			gapSeq, gen = first-1, t.gen
			t.gaps++
			t.hold(gen, gapSeq)
		}
		t.maxSeen = first - 1
		t.suspect = 0
	default:
		t.suspect = first - 1
	}
	floor, gaps := t.floorLocked(), t.gaps
	t.mu.Unlock()

	if gap {
		a.m.gaps.WithLabelValues(GapPurgedBeforeDelivery).Inc()
		a.log.Warn("gap: events vanished from the stream before delivery; removing every token entry",
			"reason", GapPurgedBeforeDelivery, "delivered_up_to", prev, "stream_first_seq", first)
		a.enqueue(ctx, &item{gen: gen, seq: gapSeq, gap: true, ev: gapEvent(GapPurgedBeforeDelivery, time.Now(), gapSeq)})
	}
	if !a.o.NoCheckpoint && gaps == 0 {
		a.writeCheckpoint(ctx, Checkpoint{Stream: si.Config.Name, StreamCreated: si.Created, Seq: floor})
	}
}

// bucket returns the checkpoint bucket, creating it when missing.
func (a *Agent) bucket(ctx context.Context) (jetstream.KeyValue, error) {
	a.mu.Lock()
	kv := a.kv
	a.mu.Unlock()
	if kv != nil {
		return kv, nil
	}
	kv, err := a.js.KeyValue(ctx, a.o.CheckpointBucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		// As many replicas as the stream, so that checkpoints survive the
		// loss of a node as the events do.
		var s jetstream.Stream
		if s, err = a.js.Stream(ctx, a.o.Stream); err != nil {
			return nil, fmt.Errorf("checkpoint bucket %s: reading the stream's replicas: %w", a.o.CheckpointBucket, err)
		}
		kv, err = a.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      a.o.CheckpointBucket,
			Description: "keystone-fanout: how far each region handled the event stream",
			History:     1,
			Storage:     jetstream.FileStorage,
			Replicas:    max(s.CachedInfo().Config.Replicas, 1),
		})
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = a.js.KeyValue(ctx, a.o.CheckpointBucket)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("checkpoint bucket %s: %w", a.o.CheckpointBucket, err)
	}
	a.mu.Lock()
	a.kv = kv
	a.mu.Unlock()
	return kv, nil
}

// loadCheckpoint returns the region's checkpoint, nil when there is none.
func (a *Agent) loadCheckpoint(ctx context.Context) (*Checkpoint, error) {
	kv, err := a.bucket(ctx)
	if err != nil {
		return nil, err
	}
	e, err := kv.Get(ctx, stream.CheckpointKey(a.o.Region))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("checkpoint %s/%s: %w", a.o.CheckpointBucket, stream.CheckpointKey(a.o.Region), err)
	}
	var cp Checkpoint
	if err := json.Unmarshal(e.Value(), &cp); err != nil {
		// Unreadable: as if another stream, which costs one sweep.
		a.log.Warn("unreadable checkpoint, treating it as one of another stream", "err", err)
		return &Checkpoint{Stream: "?"}, nil
	}
	a.mu.Lock()
	a.lastCheckpoint = &cp
	a.mu.Unlock()
	return &cp, nil
}

// writeCheckpoint records cp when it differs from the last one written.
func (a *Agent) writeCheckpoint(ctx context.Context, cp Checkpoint) {
	a.mu.Lock()
	last := a.lastCheckpoint
	a.mu.Unlock()
	if last != nil && last.Stream == cp.Stream && last.StreamCreated.Equal(cp.StreamCreated) && last.Seq == cp.Seq {
		return
	}
	kv, err := a.bucket(ctx)
	if err == nil {
		cp.Updated = time.Now().UTC()
		b, _ := json.Marshal(cp)
		_, err = kv.Put(ctx, stream.CheckpointKey(a.o.Region), b)
	}
	if err != nil {
		a.m.checkpointErrors.Inc()
		a.log.Warn("cannot write the checkpoint", "bucket", a.o.CheckpointBucket, "seq", cp.Seq, "err", err)
		return
	}
	a.m.checkpointSeq.Set(float64(cp.Seq))
	a.mu.Lock()
	a.lastCheckpoint = &cp
	a.mu.Unlock()
}
