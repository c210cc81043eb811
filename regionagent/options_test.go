package regionagent

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

func TestOptionsValidate(t *testing.T) {
	tests := []struct {
		name string
		mut  func(*Options)
		want string // substring of the error; "" means valid
	}{
		{"defaults", func(*Options) {}, ""},
		{"missing region", func(o *Options) { o.Region = "" }, "--region is required"},
		{"region with a dot", func(o *Options) { o.Region = "region.two" }, "--region \"region.two\""},
		{"region with a space", func(o *Options) { o.Region = "region two" }, "--region"},
		{"region too long", func(o *Options) { o.Region = strings.Repeat("r", 65) }, "--region"},
		{"stream wildcard", func(o *Options) { o.Stream = "KEY*" }, "--stream"},
		{"domain with a dot", func(o *Options) { o.JetStreamDomain = "a.b" }, "--js-domain"},
		{"mirror from a domain with a dot", func(o *Options) { o.MirrorFrom = "a.b" }, "--mirror-from"},
		{"mirror from the domain it consumes", func(o *Options) { o.MirrorFrom = "central"; o.JetStreamDomain = "central" }, "--mirror-from \"central\" is the domain"},
		{"mirror from central into the region", func(o *Options) { o.MirrorFrom = "central"; o.JetStreamDomain = "regionTwo" }, ""},
		{"token cache time too short", func(o *Options) { o.TokenCacheTime = time.Millisecond }, "--token-cache-time"},
		{"negative margin", func(o *Options) { o.ReplayMargin = -time.Second }, "--replay-margin"},
		{"second pass beyond cache time", func(o *Options) { o.TokenCacheTime = 10 * time.Second; o.SecondPassDelay = time.Minute }, "--second-pass-delay"},
		{"negative second pass delay", func(o *Options) { o.SecondPassDelay = -time.Second }, "--second-pass-delay"},
		{"zero second pass delay is the default", func(o *Options) { o.SecondPassDelay = 0 }, ""},
		{"batch too large", func(o *Options) { o.BatchSize = 1 << 20 }, "--batch-size"},
		{"linger too long", func(o *Options) { o.BatchLinger = 5 * time.Second }, "--batch-linger"},
		{"no linger", func(o *Options) { o.BatchLinger = -1 }, ""},
		{"max ack pending below batch", func(o *Options) { o.BatchSize = 100; o.MaxAckPending = 10 }, "--max-ack-pending"},
		{"backoff too short", func(o *Options) { o.RedeliveryBackoff = []time.Duration{time.Millisecond} }, "--redelivery-backoff"},
		{"retry min above max", func(o *Options) { o.RetryMin = time.Minute; o.RetryMax = time.Second }, "--retry-min"},
		{"negative invalidate timeout", func(o *Options) { o.InvalidateTimeout = -1 }, "--invalidate-timeout"},
		{"heartbeat too short", func(o *Options) { o.Heartbeat = 10 * time.Millisecond }, "--consumer-heartbeat"},
		{"bad bucket", func(o *Options) { o.CheckpointBucket = "a.b" }, "--checkpoint-bucket"},
		{"bad bucket ignored without checkpoint", func(o *Options) { o.CheckpointBucket = "a.b"; o.NoCheckpoint = true }, ""},
		{"negative shutdown timeout", func(o *Options) { o.ShutdownTimeout = -1 }, "--shutdown-timeout"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := Options{Region: "regionTwo"}
			tc.mut(&o)
			err := o.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("Validate: %v, want nil", err)
			case tc.want != "" && err == nil:
				t.Fatalf("Validate: nil, want an error containing %q", tc.want)
			case tc.want != "" && !strings.Contains(err.Error(), tc.want):
				t.Fatalf("Validate: %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestOptionsDefaults(t *testing.T) {
	o := Options{Region: "regionTwo"}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	if o.Stream != DefaultStream || o.TokenCacheTime != DefaultTokenCacheTime || o.SecondPassDelay != DefaultSecondPassDelay ||
		o.BatchSize != DefaultBatchSize || o.MaxAckPending != DefaultMaxAckPending || o.CheckpointBucket != DefaultCheckpointBucket ||
		o.ackWait() != DefaultRedeliveryBackoff[0] || o.replayWindow() != DefaultTokenCacheTime+DefaultReplayMargin {
		t.Fatalf("defaults not applied: %+v", o)
	}
}

func TestVanishedMayMatter(t *testing.T) {
	w := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name string
		st   jetstream.StreamState
		want bool
	}{
		{"first message older than the window", jetstream.StreamState{Msgs: 3, FirstTime: w.Add(-time.Second)}, false},
		{"first message inside the window", jetstream.StreamState{Msgs: 3, FirstTime: w.Add(time.Second)}, true},
		{"empty, last message older", jetstream.StreamState{LastTime: w.Add(-time.Minute)}, false},
		{"empty, last message inside", jetstream.StreamState{LastTime: w.Add(time.Minute)}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := vanishedMayMatter(tc.st, w); got != tc.want {
				t.Fatalf("vanishedMayMatter = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestTracker(t *testing.T) {
	w := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	in, old := w.Add(time.Minute), w.Add(-time.Minute)
	// After a reset of the consumer, JetStream delivers again what a previous
	// agent was given, counting it as a first delivery.
	replay := tracker{initialized: true, maxSeen: 3, replayedUpTo: 8}
	if _, skipped, redelivery := replay.delivery(4, 1, in, w); !skipped.empty() || !redelivery {
		t.Fatalf("delivery after a reset: skipped %+v, redelivery %v; want none, true", skipped, redelivery)
	}
	if _, _, redelivery := replay.delivery(9, 1, in, w); redelivery {
		t.Fatal("delivery beyond what a previous agent was given: redelivery true, want false")
	}

	tr := tracker{initialized: true, maxSeen: 10, ackFloor: 10}
	floor := func() uint64 {
		tr.mu.Lock()
		defer tr.mu.Unlock()
		return tr.floorLocked()
	}

	steps := []struct {
		name           string
		seq, nd        uint64
		stored         time.Time
		wantSkipped    seqRange
		wantRedelivery bool
		wantFloor      uint64
	}{
		{"next in order", 11, 1, in, seqRange{}, false, 10},
		{"redelivery of an old one", 5, 2, in, seqRange{}, true, 4},
		{"jump over young events", 14, 1, in, seqRange{12, 13}, false, 4},
		{"jump over old events", 20, 1, old, seqRange{}, false, 4},
		{"replay after re-creation", 12, 1, in, seqRange{}, false, 4},
		{"redelivery past the others", 22, 2, in, seqRange{21, 21}, true, 4},
	}
	for _, s := range steps {
		_, skipped, redelivery := tr.delivery(s.seq, s.nd, s.stored, w)
		tr.ackFloor = 100
		if skipped != s.wantSkipped || redelivery != s.wantRedelivery {
			t.Fatalf("%s: skipped %+v, redelivery %v; want %+v, %v", s.name, skipped, redelivery, s.wantSkipped, s.wantRedelivery)
		}
		if f := floor(); f != s.wantFloor {
			t.Fatalf("%s: floor %d, want %d", s.name, f, s.wantFloor)
		}
	}
	// Finish every delivery: the floor stops below the first skipped
	// sequence, whose check is not over.
	for _, seq := range []uint64{11, 5, 14, 20, 12, 22} {
		tr.done(0, seq, false)
	}
	if f := floor(); f != 11 {
		t.Fatalf("floor %d, want 11 (12 and 13 not looked up yet)", f)
	}
	// 12 and 13 are in the stream; only 12 could be fetched: it is held until
	// its invalidation finishes, 13 comes again by redelivery.
	if !tr.skippedResolved(0, seqRange{12, 13}, []uint64{12}, false) {
		t.Fatal("skippedResolved: false for the current stream")
	}
	if f := floor(); f != 11 || tr.gaps != 0 {
		t.Fatalf("floor %d with gaps %d, want 11 (12 fetched, not handled yet) and 0", f, tr.gaps)
	}
	tr.done(0, 12, false)
	if f := floor(); f != 20 {
		t.Fatalf("floor %d, want 20 (21 not looked up yet)", f)
	}
	// 21 is gone: a gap, held until its sweep finishes.
	tr.skippedResolved(0, seqRange{21, 21}, nil, true)
	if f := floor(); f != 20 || tr.gaps != 1 {
		t.Fatalf("floor %d with gaps %d, want 20 and 1 (the gap at 21 unfinished)", f, tr.gaps)
	}
	tr.done(0, 21, true)
	if f := floor(); f != 22 || tr.gaps != 0 {
		t.Fatalf("floor %d with gaps %d, want 22 and 0", f, tr.gaps)
	}
	// Work of an older stream incarnation does not count.
	_, skipped, _ := tr.delivery(30, 1, in, w)
	tr.gen++
	if tr.skippedResolved(0, skipped, nil, true) || tr.gaps != 0 {
		t.Fatalf("skippedResolved for an old stream incarnation: want false and no gap (gaps %d)", tr.gaps)
	}
	tr.done(0, 30, false)
	tr.ackFloor = 15
	if f := floor(); f != 15 {
		t.Fatalf("floor %d, want the ack floor 15", f)
	}
}

func TestRetryDelay(t *testing.T) {
	a := &Agent{o: Options{RetryMin: 100 * time.Millisecond, RetryMax: time.Second}}
	want := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond, time.Second, time.Second}
	for i, w := range want {
		if got := a.retryDelay(i + 1); got != w {
			t.Fatalf("retryDelay(%d) = %s, want %s", i+1, got, w)
		}
	}
}
