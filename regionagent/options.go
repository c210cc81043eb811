package regionagent

import (
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

// Defaults of Options. A zero field means its default.
const (
	DefaultStream            = stream.DefaultName
	DefaultTokenCacheTime    = 300 * time.Second
	DefaultReplayMargin      = 60 * time.Second
	DefaultSecondPassDelay   = time.Second
	DefaultBatchSize         = 256
	DefaultBatchLinger       = time.Duration(0)
	DefaultMaxAckPending     = 4096
	DefaultRetryMin          = 100 * time.Millisecond
	DefaultRetryMax          = 10 * time.Second
	DefaultInvalidateTimeout = 60 * time.Second
	DefaultAuditInterval     = 5 * time.Second
	DefaultHeartbeat         = 5 * time.Second
	DefaultCheckpointBucket  = stream.DefaultCheckpointBucket
	DefaultShutdownTimeout   = 10 * time.Second
	DefaultReadyTimeout      = 2 * time.Second
	DefaultResolveWait       = 2 * time.Second
	// DefaultPollerBucket is the revocation poller's bucket
	// (revoke.DefaultBucket), where it holds its lease.
	DefaultPollerBucket = "keystone-fanout-revoke"
)

// DefaultRedeliveryBackoff is the consumer's BackOff when Options.RedeliveryBackoff
// is empty.
var DefaultRedeliveryBackoff = []time.Duration{3 * time.Second, 30 * time.Second, time.Minute, 2 * time.Minute}

// Options configures an Agent. Validate fills zero fields with their defaults
// and checks the rest; New calls it, so an invalid Options never touches NATS.
// The flags named here are those of `keystone-fanout agent`.
type Options struct {
	// Region (--region) names this region. Required. It is the name of the
	// region's durable JetStream consumer and of its checkpoint key, so it must
	// be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-' (for example
	// "regionTwo"). Two agents with the same region share one consumer: each
	// event is then handled by one of them only, which is right only when they
	// serve the same memcached servers.
	Region string

	// Stream (--stream, default "KEYSTONE") is the JetStream stream the bridge
	// publishes to. The agent never creates it: while it does not exist the
	// agent logs, is not ready, and retries (with back-off, forever).
	Stream string

	// JetStreamDomain (--js-domain, default none) is the JetStream domain of the
	// stream the agent consumes, when it reaches it through a leaf node: the
	// central domain ("central" in deploy/nats) for the central stream, or the
	// region's own domain (or none: the local server's) for a regional mirror
	// (MirrorFrom).
	JetStreamDomain string

	// MirrorFrom (--mirror-from, default none) is the JetStream domain of the
	// central stream when the region keeps a mirror of it in its own domain
	// (JetStreamDomain) and the agent consumes the mirror. The agent creates
	// the mirror and its durable source consumer on the central stream
	// (stream.EnsureMirror) when they are missing; while the central domain is
	// unreachable it consumes the mirror as it is. Needs NATS server 2.14 or
	// later; see docs/OPERATIONS.md, "Regions behind leaf nodes".
	MirrorFrom string

	// TokenCacheTime (--token-cache-time, default 300s) is keystonemiddleware's
	// [keystone_authtoken] token_cache_time: how long an entry lives in
	// memcached. An event older than TokenCacheTime+ReplayMargin cannot have a
	// stale entry left. It bounds the replay when the consumer is created (first
	// start, or after it was deleted) and decides whether events that vanished
	// from the stream unseen (purge, max age) need a sweep of every token entry.
	// Setting it lower than the middleware's value can leave stale entries.
	TokenCacheTime time.Duration

	// ReplayMargin (--replay-margin, default 60s) is added to TokenCacheTime to
	// cover the time between Keystone's change and the stream storing the event,
	// a validation in flight when the event happened, and clock differences
	// between the NATS server and Keystone's hosts.
	ReplayMargin time.Duration

	// SecondPassDelay (--second-pass-delay, default 1s) is how long after the
	// first invalidation of an event ends the same invalidation runs again;
	// 0 means the default. It must not be negative: the second pass cannot be
	// turned off.
	//
	// Why a second pass: keystonemiddleware (auth_token fetch_token) asks
	// Keystone first and writes the answer to memcached after, so a
	// validation Keystone answered just before the change can be written
	// back after the first pass. The token cache's live index removes such a
	// late write-back as soon as memcached reports its store, for as long as
	// the event is in its recent window (tokencache
	// Options.LateWriteBackWindow, 15s, and revocation events for a token's
	// lifetime). The second pass is the safety net behind that: it runs the
	// batch again from the live index when it is still complete, and crawls
	// the servers whose index broke since the first pass (a watch
	// connection lost, lines memcached dropped, a restart), which is how a
	// store missed while the watcher was blind is still found. It also
	// delays the acknowledgement until the heartbeat confirmed the first
	// pass's answer (tokencache Options.MaxConfirmLag, 500ms): the delay
	// must be longer than that, hence 1s. Before the live index the second
	// pass was the only defence (2s; a write-back after it stayed for
	// token_cache_time); on a server that refuses "watch" it still is, and a
	// longer delay (5s covers memcache_pool_socket_timeout) is advisable
	// there. A longer delay costs nothing on the revocation path: it only
	// holds events longer before acknowledging them.
	//
	// An event is acknowledged only after its second pass finished on every
	// memcached server: a crash between the passes redelivers it, and the
	// redelivery repeats both passes. While an event waits for its second pass
	// the agent keeps consuming and invalidating newer events; due second
	// passes are batched like first passes.
	//
	// Due second passes ride along with the next first pass: an invalidation
	// of new events also takes, room permitting (BatchSize), every event whose
	// second pass is due or due within min(SecondPassDelay/10, 200ms), so that
	// one call does both and a new event never waits behind a second pass. A
	// second pass may therefore run up to that much early: with the default
	// 1s it runs 0.9s to 1s after the first pass ended. Second passes due
	// while no first pass is ready run on their own, on time. When new events
	// fill whole batches, the second passes they leave out run on their own
	// before the next batch of new events, so that acks never starve.
	SecondPassDelay time.Duration

	// BatchSize (--batch-size, default 256) is the most events handled by one
	// invalidation (one Invalidate call of the token cache). Events that arrive
	// together, or while a previous invalidation runs, share one invalidation.
	BatchSize int

	// BatchLinger (--batch-linger, default 0: no wait) is how long the first
	// event of an idle agent waits for others to join its batch. It adds to
	// the revocation latency of every event that arrives alone; 0 and
	// negative values mean no wait.
	//
	// Why no wait: with the token cache's live index a batch costs well under
	// a millisecond (the entries are found in memory), so waiting costs more
	// than one more batch would; events that arrive while a batch runs join
	// the next one anyway. A server without a complete live index costs a
	// crawl per batch (tens to hundreds of milliseconds); there the events
	// that arrive during one crawl share the next, and a linger of a few
	// milliseconds (Keystone sends the notifications of one change, such as
	// a domain deletion's cascade, within about a millisecond) would save
	// at most one crawl per cascade.
	BatchLinger time.Duration

	// MaxAckPending (--max-ack-pending, default 4096) is the consumer's
	// MaxAckPending: the most events delivered and not yet acknowledged. While
	// memcached cannot be cleaned, the agent keeps up to this many events in
	// memory, retrying, and JetStream delivers no more until some are
	// acknowledged. Must be at least BatchSize.
	MaxAckPending int

	// RedeliveryBackoff (--redelivery-backoff, default 3s,30s,1m,2m) is the
	// consumer's BackOff: when an agent stops acknowledging and stops reporting
	// progress on an event (it crashed, or lost NATS), JetStream redelivers it
	// after the first duration, then after the next ones; the last repeats.
	// Delivery attempts are unlimited: an event is never dropped. While the
	// agent works on an event it tells JetStream so every third of the first
	// duration, so a slow memcached does not cause redeliveries.
	//
	// The first duration bounds how long an event stays unhandled when its
	// agent went silent and nothing else brings it back: a delivery lost with
	// a dropped connection and followed by no newer event (a newer one makes
	// the agent fetch the lost one at once, see skipped.go), or, on a NATS
	// server older than 2.14, the events a killed agent held (from 2.14 on the
	// restarted agent resets the consumer to its ack floor and gets them at
	// once). The trade-off: shorter means a shorter stale window in those
	// cases but more progress reports (one per held event every third of it)
	// and more redeliveries when an agent stalls or loses NATS for longer than
	// it; such redeliveries are cheap (a held event's duplicate is dropped, any
	// other is invalidated again). 3s keeps both small; raise it on a NATS
	// link that often stalls for seconds.
	RedeliveryBackoff []time.Duration

	// RetryMin and RetryMax (--retry-min, --retry-max, default 100ms and 10s)
	// bound the capped exponential back-off between attempts of an invalidation
	// that failed (not every memcached server finished). The agent retries in
	// process, forever, keeping the events unacknowledged.
	RetryMin, RetryMax time.Duration

	// InvalidateTimeout (--invalidate-timeout, default 60s) bounds one
	// invalidation call; running out counts as a failure and is retried.
	InvalidateTimeout time.Duration

	// AuditInterval (--audit-interval, default 5s) is how often the agent reads
	// its consumer's and the stream's state: the lag gauge, the detection of a
	// deleted consumer and of events purged before delivery, and the
	// checkpoint write.
	AuditInterval time.Duration

	// Heartbeat (--consumer-heartbeat, default 5s) is the idle heartbeat of
	// the agent's pull requests. Two missed heartbeats make the agent check that
	// its consumer still exists (and re-create it if not); when it does not
	// answer (NATS, or a leaf node's link, away) the agent asks every 500 ms
	// and pulls again as soon as it does.
	Heartbeat time.Duration

	// CheckpointBucket (--checkpoint-bucket, default "keystone-fanout-agents")
	// is the JetStream key-value bucket where the agent records, under its
	// region, the stream sequence below which every event was handled. On
	// start it reveals events the region missed that the stream no longer
	// holds (purged while the agent was away, or the stream re-created), which
	// then cost one sweep of every token entry. The agent creates the bucket
	// (file storage, the stream's replicas, history 1) when missing; when it cannot
	// read or write it, it logs, counts checkpoint_errors_total and goes on.
	CheckpointBucket string
	// ResolveWait (--resolve-wait, default 2 s) bounds how long a notification
	// that does not bound its own effect (a CADF group membership change, see
	// event.ResolvedByRevocations) waits for the revocation poller's proof that
	// it polled Keystone after it. The revocation events Keystone recorded for
	// it, if any, then remove exactly what they name, and the notification
	// removes nothing. Without a live, healthy poller (its lease in
	// PollerBucket), or when the proof does not come within ResolveWait, the
	// notification removes every token entry, as it would without a poller.
	ResolveWait time.Duration
	// PollerBucket (--poller-bucket, default "keystone-fanout-revoke") is the
	// revocation poller's key-value bucket, where its lease says whether it
	// runs.
	PollerBucket string

	// NoCheckpoint (--no-checkpoint) disables the checkpoint. Events purged
	// from the stream while the agent was stopped then go unnoticed, because a
	// purge also advances the consumer's own acknowledgement floor.
	NoCheckpoint bool

	// ShutdownTimeout (--shutdown-timeout, default 10s) bounds the graceful
	// stop: an invalidation in progress may finish (and its events be
	// acknowledged) within it; everything not acknowledged by then is handed
	// back to JetStream for redelivery.
	ShutdownTimeout time.Duration

	// ReadyTimeout (default 2s) bounds the memcached reachability check of one
	// Ready call.
	ReadyTimeout time.Duration

	// skippedFetchLimit (tests only) bounds the skipped sequences one jump
	// fetches (default defaultSkippedFetchLimit); negative fetches none.
	skippedFetchLimit int
	// skippedRetry (tests only) replaces skippedRetryDelays.
	skippedRetry []time.Duration
	// skippedTimeout (tests only) replaces skippedGetTimeout.
	skippedTimeout time.Duration
	// noSecondPass (tests only) acknowledges events after their first pass,
	// unless SecondPassDelay is set.
	noSecondPass bool
}

func (o *Options) setDefaults() {
	if o.Stream == "" {
		o.Stream = DefaultStream
	}
	if o.TokenCacheTime == 0 {
		o.TokenCacheTime = DefaultTokenCacheTime
	}
	if o.ReplayMargin == 0 {
		o.ReplayMargin = DefaultReplayMargin
	}
	if o.SecondPassDelay != 0 {
		o.noSecondPass = false
	} else if !o.noSecondPass {
		o.SecondPassDelay = DefaultSecondPassDelay
	}
	if o.BatchSize == 0 {
		o.BatchSize = DefaultBatchSize
	}
	if o.BatchLinger == 0 {
		o.BatchLinger = DefaultBatchLinger
	}
	if o.MaxAckPending == 0 {
		o.MaxAckPending = DefaultMaxAckPending
	}
	if len(o.RedeliveryBackoff) == 0 {
		o.RedeliveryBackoff = append([]time.Duration(nil), DefaultRedeliveryBackoff...)
	}
	if o.RetryMin == 0 {
		o.RetryMin = DefaultRetryMin
	}
	if o.RetryMax == 0 {
		o.RetryMax = DefaultRetryMax
	}
	if o.InvalidateTimeout == 0 {
		o.InvalidateTimeout = DefaultInvalidateTimeout
	}
	if o.AuditInterval == 0 {
		o.AuditInterval = DefaultAuditInterval
	}
	if o.Heartbeat == 0 {
		o.Heartbeat = DefaultHeartbeat
	}
	if o.CheckpointBucket == "" {
		o.CheckpointBucket = DefaultCheckpointBucket
	}
	if o.ShutdownTimeout == 0 {
		o.ShutdownTimeout = DefaultShutdownTimeout
	}
	if o.ReadyTimeout == 0 {
		o.ReadyTimeout = DefaultReadyTimeout
	}
	if o.ResolveWait == 0 {
		o.ResolveWait = DefaultResolveWait
	}
	if o.PollerBucket == "" {
		o.PollerBucket = DefaultPollerBucket
	}
}

var (
	domainPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,255}$`)
	bucketPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,200}$`)
)

// Validate fills zero fields with their defaults and checks the others. Each
// error names the flag and says how to fix it.
func (o *Options) Validate() error {
	o.setDefaults()
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	switch {
	case o.Region == "":
		add("--region is required: give this region's name as Keystone's catalog knows it, for example --region=regionTwo")
	case !stream.ValidRegionName(o.Region):
		add("--region %q: a region name must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-' (it names the JetStream consumer), for example regionTwo", o.Region)
	}
	if err := stream.CheckName(o.Stream); err != nil {
		errs = append(errs, fmt.Errorf("%w; use the bridge's --stream", err))
	}
	if o.JetStreamDomain != "" && !domainPattern.MatchString(o.JetStreamDomain) {
		add("--js-domain %q: a JetStream domain is made of A-Z, a-z, 0-9, '_' and '-'", o.JetStreamDomain)
	}
	switch {
	case o.MirrorFrom == "":
	case !domainPattern.MatchString(o.MirrorFrom):
		add("--mirror-from %q: a JetStream domain is made of A-Z, a-z, 0-9, '_' and '-'", o.MirrorFrom)
	case o.MirrorFrom == o.JetStreamDomain:
		add("--mirror-from %q is the domain the agent consumes from (--js-domain): give the central domain to --mirror-from and the region's own (or none) to --js-domain", o.MirrorFrom)
	}
	if o.TokenCacheTime < time.Second {
		add("--token-cache-time %s: must be at least 1s; give keystonemiddleware's token_cache_time (default 300s)", o.TokenCacheTime)
	}
	if o.ReplayMargin < 0 {
		add("--replay-margin %s: must not be negative (default %s)", o.ReplayMargin, DefaultReplayMargin)
	}
	if o.SecondPassDelay < 0 {
		add("--second-pass-delay %s: must not be negative; 0 means the default %s (the second pass cannot be turned off)", o.SecondPassDelay, DefaultSecondPassDelay)
	} else if o.SecondPassDelay > o.TokenCacheTime {
		add("--second-pass-delay %s is longer than --token-cache-time %s: use a few seconds (default %s)", o.SecondPassDelay, o.TokenCacheTime, DefaultSecondPassDelay)
	}
	if o.BatchSize < 1 || o.BatchSize > 100000 {
		add("--batch-size %d: must be from 1 to 100000 (default %d)", o.BatchSize, DefaultBatchSize)
	}
	if o.BatchLinger > time.Second {
		add("--batch-linger %s: must be at most 1s, it delays every revocation (default %s)", o.BatchLinger, DefaultBatchLinger)
	}
	if o.MaxAckPending < o.BatchSize {
		add("--max-ack-pending %d: must be at least --batch-size %d (default %d)", o.MaxAckPending, o.BatchSize, DefaultMaxAckPending)
	}
	for _, d := range o.RedeliveryBackoff {
		if d < 100*time.Millisecond {
			add("--redelivery-backoff %v: every duration must be at least 100ms (default %v)", o.RedeliveryBackoff, DefaultRedeliveryBackoff)
			break
		}
	}
	if o.RetryMin <= 0 || o.RetryMax < o.RetryMin {
		add("--retry-min %s / --retry-max %s: both positive and --retry-min <= --retry-max (default %s and %s)", o.RetryMin, o.RetryMax, DefaultRetryMin, DefaultRetryMax)
	}
	if o.InvalidateTimeout < 0 {
		add("--invalidate-timeout %s: must be positive (default %s)", o.InvalidateTimeout, DefaultInvalidateTimeout)
	}
	if o.AuditInterval < 0 {
		add("--audit-interval %s: must be positive (default %s)", o.AuditInterval, DefaultAuditInterval)
	}
	if o.Heartbeat < 500*time.Millisecond || o.Heartbeat > 30*time.Second {
		add("--consumer-heartbeat %s: must be from 500ms to 30s (default %s)", o.Heartbeat, DefaultHeartbeat)
	}
	if o.ResolveWait < 0 || o.ResolveWait > time.Minute {
		add("--resolve-wait %s: must be from 0 (the default, %s) to 1m", o.ResolveWait, DefaultResolveWait)
	}
	if !bucketPattern.MatchString(o.PollerBucket) {
		add("--poller-bucket %q: a key-value bucket name is made of A-Z, a-z, 0-9, '_' and '-' (default %s)", o.PollerBucket, DefaultPollerBucket)
	}
	if !o.NoCheckpoint && !bucketPattern.MatchString(o.CheckpointBucket) {
		add("--checkpoint-bucket %q: a key-value bucket name is made of A-Z, a-z, 0-9, '_' and '-' (default %s)", o.CheckpointBucket, DefaultCheckpointBucket)
	}
	if o.ShutdownTimeout < 0 {
		add("--shutdown-timeout %s: must be positive (default %s)", o.ShutdownTimeout, DefaultShutdownTimeout)
	}
	if o.ReadyTimeout < 0 {
		add("ReadyTimeout %s: must be positive (default %s)", o.ReadyTimeout, DefaultReadyTimeout)
	}
	return errors.Join(errs...)
}

// replayWindow is how far back an event can still have a live stale entry.
func (o *Options) replayWindow() time.Duration { return o.TokenCacheTime + o.ReplayMargin }

// ackWait is the consumer's first redelivery delay.
func (o *Options) ackWait() time.Duration { return o.RedeliveryBackoff[0] }

// maxSecondPassAdvance bounds how early a second pass may run when it rides
// along with a first pass (see Options.SecondPassDelay).
const maxSecondPassAdvance = 200 * time.Millisecond

// secondPassAdvance is how early a second pass may run when it rides along
// with a first pass: a tenth of the delay, at most maxSecondPassAdvance.
func (o *Options) secondPassAdvance() time.Duration {
	return max(min(o.SecondPassDelay/10, maxSecondPassAdvance), 0)
}
