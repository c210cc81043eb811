// Package regionagent is the consuming side of keystone-fanout: one Agent runs
// in each region, reads every event from its region's durable JetStream
// consumer, has the region's token cache (a *tokencache.Invalidator) remove
// the affected keystonemiddleware cache entries from every memcached server of
// the region, and acknowledges an event only after that finished, twice (see
// Options.SecondPassDelay).
//
// Guarantees:
//   - at least once: an event is acknowledged only after both its passes
//     returned nil from Invalidate; a failed pass is retried in process
//     with capped back-off, forever, and an event the agent stopped working on
//     (crash, lost connection) is redelivered by JetStream;
//   - no silent loss: events the region missed and the stream no longer holds
//     are detected (see gaps.go) and answered with one sweep of every token
//     entry; events the consumer skipped that are still in the stream (a
//     delivery lost with its connection) are fetched and invalidated at once,
//     and are no gap (see skipped.go);
//   - a restart does not wait for redeliveries: the events a previous agent
//     held unacknowledged are redelivered as soon as the agent binds (see
//     handBackOrphans);
//   - the consumer is supervised: it is created when missing (replaying the
//     last TokenCacheTime+ReplayMargin), re-created when deleted, and the agent
//     waits for NATS as long as it is away.
package regionagent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/backoff"
	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
)

// TokenCache is the region's token cache as the agent uses it:
// *tokencache.Invalidator, whose Run the caller runs beside the agent (it
// keeps the live index of every memcached server).
type TokenCache interface {
	// Invalidate handles one batch (one pass of its events). A nil error
	// means the invalidation finished on every server; otherwise the agent
	// retries the whole batch later. It must be safe to repeat.
	Invalidate(ctx context.Context, events []event.Event) (tokencache.Result, error)
}

// Pinger is implemented by a TokenCache that can tell whether every
// memcached server is reachable; Ready uses it when present.
type Pinger interface {
	Ping(ctx context.Context) error
}

// UndecodableEventType is the Type of the unbounded event an agent handles a
// stream message with when the message is not an event.
const UndecodableEventType = "keystone-fanout.undecodable"

// WidenedEventType is the Type of the unbounded event an agent replaces a
// batch with when Invalidate panicked on it.
const WidenedEventType = "keystone-fanout.widened"

// Agent consumes one region's events. Create it with New, run it with Run.
type Agent struct {
	o  Options
	nc *nats.Conn
	// js reaches the stream the agent consumes (the central one, or the
	// regional mirror) and the checkpoint bucket; central reaches the central
	// stream's domain: the poller's lease and the mirror's source.
	js, central jetstream.JetStream
	inv         TokenCache
	log         *slog.Logger
	m           *metrics

	tr   tracker
	in   chan *item
	held heldSet

	consumer string // the region's durable consumer (stream.ConsumerName)

	running atomic.Bool
	bound   atomic.Bool
	skew    atomic.Int64 // NATS server clock minus ours, nanoseconds

	// streamSeen is set once the stream was found: before that a missing
	// stream is the expected first start before the bridge's (logged at
	// Info), after it a stream that disappeared (Warn).
	streamSeen atomic.Bool

	// life ends when Run's context does; background checks of skipped
	// sequences (see skipped.go) run under it, one at a time (checkMu), and
	// Run waits for them (checks).
	life    context.Context
	checks  sync.WaitGroup
	checkMu sync.Mutex

	// poller is the revocation poller's lease as last seen (nil: none).
	poller atomic.Pointer[pollerState]

	mu             sync.Mutex
	cancelBinding  context.CancelFunc
	lastBindErr    error
	kv             jetstream.KeyValue
	cpReadFailures int
	lastCheckpoint *Checkpoint
}

// item is one event the agent holds, or a gap to sweep for (msg nil).
type item struct {
	msg      jetstream.Msg
	gen, seq uint64
	ev       event.Event
	// stored is when the stream stored the event: just after the bridge
	// received it, on the NATS server's clock.
	stored time.Time
	gap    bool
	// first is true for the first delivery of an event.
	first bool
	// due is when the second pass may run; secondFails counts its failures.
	due         time.Time
	secondFails int
}

// New checks o (see Options.Validate), registers the agent's metrics with reg
// and returns an Agent that uses nc (which the caller owns, connected with
// unlimited reconnects: see internal/natsconn) and inv, the region's token
// cache. Nothing is contacted before Run.
func New(o Options, nc *nats.Conn, inv TokenCache, reg prometheus.Registerer, log *slog.Logger) (*Agent, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if nc == nil {
		return nil, errors.New("regionagent: no NATS connection")
	}
	if inv == nil {
		return nil, errors.New("regionagent: no token cache")
	}
	if reg == nil {
		return nil, errors.New("regionagent: no prometheus.Registerer")
	}
	if log == nil {
		log = slog.Default()
	}
	js, err := newJetStream(nc, o.JetStreamDomain)
	if err != nil {
		return nil, fmt.Errorf("regionagent: JetStream: %w", err)
	}
	central := js
	if o.MirrorFrom != "" {
		if central, err = newJetStream(nc, o.MirrorFrom); err != nil {
			return nil, fmt.Errorf("regionagent: JetStream: %w", err)
		}
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("regionagent: registering metrics: %w", err)
	}
	a := &Agent{
		o:       o,
		nc:      nc,
		js:      js,
		central: central,
		inv:     inv,
		log:     log.With("component", "agent", "region", o.Region),
		m:       m,
		in:      make(chan *item, 2*o.MaxAckPending+64),
	}
	a.held.items = map[*item]struct{}{}
	live := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: metricPrefix + "revocation_poller_live",
		Help: "1 while a healthy revocation poller holds its lease (CADF group membership notifications then wait for its revocation events instead of removing every token entry), else 0.",
	}, func() float64 {
		if a.pollerLive() {
			return 1
		}
		return 0
	})
	if err := reg.Register(live); err != nil {
		return nil, fmt.Errorf("regionagent: registering metrics: %w", err)
	}
	a.consumer = stream.ConsumerName(o.Region)
	return a, nil
}

// newJetStream is JetStream in domain, or the server's own when domain is "".
func newJetStream(nc *nats.Conn, domain string) (jetstream.JetStream, error) {
	if domain != "" {
		return jetstream.NewWithDomain(nc, domain)
	}
	return jetstream.New(nc)
}

// Run consumes until ctx ends, then stops within Options.ShutdownTimeout: an
// invalidation in progress may finish and its events be acknowledged; every
// other event the agent holds is handed back to JetStream (nak) for
// redelivery. It returns nil after ctx ended, or an error when the NATS
// connection was closed. Lost connections, a missing stream and a deleted
// consumer are waited out and repaired, never returned. Run may be called once.
func (a *Agent) Run(ctx context.Context) error {
	if !a.running.CompareAndSwap(false, true) {
		return errors.New("regionagent: Run called twice")
	}
	// hard bounds the work that may continue after ctx ended.
	hard, cancelHard := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelHard()
	runCtx, cancelRun := context.WithCancel(ctx)
	defer cancelRun()
	a.life = runCtx

	var wg sync.WaitGroup
	schedulerDone := make(chan struct{})
	go func() {
		defer close(schedulerDone)
		a.work(runCtx, hard)
	}()
	wg.Add(3)
	go func() {
		defer wg.Done()
		a.keepalive(runCtx)
	}()
	go func() {
		defer wg.Done()
		a.watchPoller(runCtx)
	}()
	go func() {
		defer wg.Done()
		a.auditLoop(runCtx)
	}()

	a.log.Info("region agent starting", "stream", a.o.Stream, "consumer", a.consumer,
		"token_cache_time", a.o.TokenCacheTime, "second_pass_delay", a.o.SecondPassDelay,
		"batch_size", a.o.BatchSize, "max_ack_pending", a.o.MaxAckPending)
	err := a.consume(runCtx)
	cancelRun()
	stopTimer := time.AfterFunc(a.o.ShutdownTimeout, cancelHard)
	defer stopTimer.Stop()
	<-schedulerDone
	wg.Wait()
	a.checks.Wait()
	n := a.handBack()
	a.setBound(false)
	// Record how far the region got, for the next start.
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	a.auditOnce(cctx, true)
	cancel()
	a.log.Info("region agent stopped", "handed_back", n)
	return err
}

// Ready reports whether the agent can do its work now: NATS connected, the
// consumer bound, and (when the token cache is a Pinger) every memcached
// server reachable within Options.ReadyTimeout. The error says what is wrong.
func (a *Agent) Ready() error {
	var errs []error
	if !a.nc.IsConnected() {
		errs = append(errs, fmt.Errorf("NATS is not connected (%s)", a.nc.Status()))
	}
	if !a.bound.Load() {
		a.mu.Lock()
		last := a.lastBindErr
		a.mu.Unlock()
		if last != nil {
			errs = append(errs, fmt.Errorf("not consuming from consumer %s of stream %s: %w", a.consumer, a.o.Stream, last))
		} else {
			errs = append(errs, fmt.Errorf("not consuming from consumer %s of stream %s yet", a.consumer, a.o.Stream))
		}
	}
	if p, ok := a.inv.(Pinger); ok {
		ctx, cancel := context.WithTimeout(context.Background(), a.o.ReadyTimeout)
		defer cancel()
		if err := p.Ping(ctx); err != nil {
			errs = append(errs, fmt.Errorf("memcached: %w", err))
		}
	}
	return errors.Join(errs...)
}

func (a *Agent) setBound(b bool) {
	a.bound.Store(b)
	if b {
		a.m.bound.Set(1)
	} else {
		a.m.bound.Set(0)
	}
}

// windowStart is the stream time before which an event cannot have a live
// stale entry.
func (a *Agent) windowStart() time.Time {
	return time.Now().Add(time.Duration(a.skew.Load())).Add(-a.o.replayWindow())
}

func (a *Agent) noteServerTime(ts time.Time) {
	if !ts.IsZero() {
		a.skew.Store(int64(time.Until(ts)))
	}
}

// requestRebind makes the fetcher drop its binding and bind again.
func (a *Agent) requestRebind(reason string) {
	a.mu.Lock()
	cancel := a.cancelBinding
	a.mu.Unlock()
	if cancel != nil {
		a.log.Warn("re-binding the consumer", "reason", reason)
		cancel()
	}
}

// consume binds to the consumer and pumps its messages to the scheduler, binding
// again after every failure, until ctx ends.
func (a *Agent) consume(ctx context.Context) error {
	retry := backoff.New(a.o.RetryMin, a.o.RetryMax)
	for {
		if ctx.Err() != nil {
			return nil
		}
		if a.nc.IsClosed() {
			return errors.New("regionagent: the NATS connection was closed")
		}
		bctx, cancel := context.WithCancel(ctx)
		a.mu.Lock()
		a.cancelBinding = cancel
		a.mu.Unlock()
		cons, err := a.bind(bctx)
		if err != nil {
			a.m.consumerErrors.WithLabelValues(consumerErrBind).Inc()
		} else {
			retry.Reset()
			a.mu.Lock()
			a.lastBindErr = nil
			a.mu.Unlock()
			err = a.pump(bctx, cons)
		}
		cancel()
		a.setBound(false)
		if ctx.Err() != nil {
			return nil
		}
		delay := retry.Next()
		if err != nil {
			// A request the server refused for lack of permission just
			// times out; the connection keeps the server's reason.
			if last := a.nc.LastError(); errors.Is(last, nats.ErrPermissionViolation) {
				err = fmt.Errorf("%w (NATS: %v)", err, last)
			} else if errors.Is(err, nats.ErrNoResponders) && (a.o.JetStreamDomain != "" || a.o.MirrorFrom != "") {
				// Through a leaf node a refused request finds no responders.
				err = fmt.Errorf("%w (through a leaf node this means: the JetStream domain (--js-domain %q) is wrong or "+
					"unreachable, or the region's user on the central side lacks the permission for the request)", err, a.o.JetStreamDomain)
			}
			a.mu.Lock()
			a.lastBindErr = err
			a.mu.Unlock()
			level := slog.LevelWarn
			if errors.Is(err, errNoStream) && !a.streamSeen.Load() {
				level = slog.LevelInfo // a first start before the bridge's: expected
			}
			a.log.Log(ctx, level, "consumer unavailable, retrying", "err", err, "retry_in", delay)
		}
		if !backoff.Sleep(ctx, delay) {
			return nil
		}
	}
}

func (a *Agent) consumerConfig(start time.Time) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       a.consumer,
		Description:   "keystone-fanout region agent of " + a.o.Region,
		DeliverPolicy: jetstream.DeliverByStartTimePolicy,
		OptStartTime:  &start,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       a.o.ackWait(),
		BackOff:       append([]time.Duration(nil), a.o.RedeliveryBackoff...),
		MaxDeliver:    -1,
		MaxAckPending: a.o.MaxAckPending,
		ReplayPolicy:  jetstream.ReplayInstantPolicy,
	}
}

// errNoStream is bind's error while the stream does not exist.
var errNoStream = errors.New("the bridge creates it (check --stream and that a bridge ran)")

// bind finds or creates the consumer, brings its settings in line with the
// options and checks for a gap.
func (a *Agent) bind(ctx context.Context) (jetstream.Consumer, error) {
	if a.o.MirrorFrom != "" {
		if err := a.ensureMirror(ctx); err != nil {
			return nil, err
		}
	}
	s, err := a.js.Stream(ctx, a.o.Stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("stream %s does not exist: %w", a.o.Stream, errNoStream)
	}
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", a.o.Stream, err)
	}
	a.streamSeen.Store(true)
	a.noteServerTime(s.CachedInfo().TimeStamp)
	cons, err := s.Consumer(ctx, a.consumer)
	created := false
	switch {
	case errors.Is(err, jetstream.ErrConsumerNotFound):
		start := a.windowStart()
		cons, err = s.CreateConsumer(ctx, a.consumerConfig(start))
		if errors.Is(err, jetstream.ErrConsumerExists) {
			// Another agent of the region created it meanwhile.
			cons, err = s.Consumer(ctx, a.consumer)
			if err == nil {
				cons, err = a.adopt(ctx, s, cons)
			}
		} else if err == nil {
			created = true
			a.m.recreations.Inc()
			a.log.Info("created the region's consumer", "stream", a.o.Stream, "consumer", a.consumer,
				"deliver_from", start.UTC().Format(time.RFC3339Nano))
		}
	case err == nil:
		cons, err = a.adopt(ctx, s, cons)
	}
	if err != nil {
		return nil, fmt.Errorf("consumer %s of stream %s: %w", a.consumer, a.o.Stream, err)
	}
	ci := cons.CachedInfo()
	if !created {
		ci = a.handBackOrphans(ctx, s, ci)
	}
	// Read the stream after the consumer: see gaps.go.
	si, err := s.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", a.o.Stream, err)
	}
	a.noteServerTime(si.TimeStamp)
	if err := a.startCheck(ctx, si, ci, created); err != nil {
		return nil, err
	}
	return cons, nil
}

// mirrorTimeout bounds ensureMirror.
const mirrorTimeout = 5 * time.Second

// ensureMirror creates the regional mirror and its source consumer when
// missing (stream.EnsureMirror). A failure is logged and counted: while the
// central domain is unreachable the agent consumes the mirror as it is, and
// without a mirror bind reports the missing stream. It returns an error only
// when the region's stream of that name is not the mirror (ErrNotMirror): the
// agent then does not consume it.
func (a *Agent) ensureMirror(ctx context.Context) error {
	mctx, cancel := context.WithTimeout(ctx, mirrorTimeout)
	defer cancel()
	err := stream.EnsureMirror(mctx, a.central, a.js, a.o.Stream, a.o.Region, a.o.MirrorFrom)
	if err == nil {
		return nil
	}
	if errors.Is(err, stream.ErrNotMirror) {
		a.m.consumerErrors.WithLabelValues(consumerErrMirror).Inc()
		return err
	}
	if last := a.nc.LastError(); errors.Is(last, nats.ErrPermissionViolation) {
		err = fmt.Errorf("%w (NATS: %v)", err, last)
	}
	a.m.consumerErrors.WithLabelValues(consumerErrMirror).Inc()
	a.log.Warn("cannot check the regional mirror and its source on the central stream; consuming the mirror as it is",
		"stream", a.o.Stream, "mirror_from", a.o.MirrorFrom, "err", err)
	return nil
}

// resetTimeout bounds the consumer reset of handBackOrphans.
const resetTimeout = 5 * time.Second

// handBackOrphans has JetStream redeliver now, rather than after the first
// Options.RedeliveryBackoff duration, the events that a previous agent of the
// region was given and never acknowledged (it was killed, or lost NATS and
// stopped): on the first bind of this process, when the consumer has
// acknowledgements pending, it resets the consumer to its ack floor. That
// needs NATS server 2.14 or later; an older server refuses, the agent logs it
// and the events come back after the back-off, as without the reset.
//
// The reset redelivers everything after the ack floor: also events
// acknowledged out of order, and those another agent sharing the region's
// consumer holds at that moment. Handling them again is harmless. It returns
// the consumer's state to start from.
func (a *Agent) handBackOrphans(ctx context.Context, s jetstream.Stream, ci *jetstream.ConsumerInfo) *jetstream.ConsumerInfo {
	a.tr.mu.Lock()
	initialized := a.tr.initialized
	a.tr.mu.Unlock()
	if initialized || ci.NumAckPending == 0 {
		return ci
	}
	rctx, cancel := context.WithTimeout(ctx, resetTimeout)
	defer cancel()
	resp, err := s.ResetConsumer(rctx, a.consumer)
	if err != nil {
		a.m.consumerErrors.WithLabelValues(consumerErrReset).Inc()
		a.log.Warn("cannot reset the consumer to its ack floor (needs NATS server 2.14 or later): "+
			"the events a previous agent held unacknowledged come back after the first --redelivery-backoff duration",
			"ack_pending", ci.NumAckPending, "ack_floor", ci.AckFloor.Stream, "delivered", ci.Delivered.Stream, "err", err)
		return ci
	}
	a.tr.mu.Lock()
	a.tr.replayedUpTo = ci.Delivered.Stream
	a.tr.mu.Unlock()
	a.m.resets.Inc()
	a.log.Info("reset the consumer to its ack floor: the events a previous agent held unacknowledged are redelivered now",
		"ack_pending", ci.NumAckPending, "ack_floor", ci.AckFloor.Stream, "delivered", ci.Delivered.Stream, "redeliver_from", resp.ResetSeq)
	return resp.ConsumerInfo
}

// adopt checks an existing consumer and updates the settings the agent owns.
func (a *Agent) adopt(ctx context.Context, s jetstream.Stream, cons jetstream.Consumer) (jetstream.Consumer, error) {
	have := cons.CachedInfo().Config
	if have.AckPolicy != jetstream.AckExplicitPolicy || have.DeliverSubject != "" || have.HeadersOnly {
		return nil, fmt.Errorf("it exists but is not a pull consumer with explicit acks and bodies (not created by keystone-fanout?): "+
			"delete it (nats consumer rm %s %s) and the agent creates it", a.o.Stream, a.consumer)
	}
	want := have
	want.Description = "keystone-fanout region agent of " + a.o.Region
	want.AckWait = a.o.ackWait()
	want.BackOff = append([]time.Duration(nil), a.o.RedeliveryBackoff...)
	want.MaxDeliver = -1
	want.MaxAckPending = a.o.MaxAckPending
	want.FilterSubject = ""
	want.FilterSubjects = nil
	want.InactiveThreshold = 0
	if reflect.DeepEqual(have, want) {
		return cons, nil
	}
	updated, err := s.UpdateConsumer(ctx, want)
	if err != nil {
		return nil, fmt.Errorf("updating its settings: %w", err)
	}
	a.log.Info("updated the consumer's settings", "consumer", a.consumer, "max_ack_pending", want.MaxAckPending,
		"backoff", want.BackOff)
	return updated, nil
}

// startCheck sets the tracker up for a (new) binding and queues a gap sweep
// when events the region had not handled are gone (see gaps.go).
func (a *Agent) startCheck(ctx context.Context, si *jetstream.StreamInfo, ci *jetstream.ConsumerInfo, created bool) error {
	a.tr.mu.Lock()
	initialized := a.tr.initialized
	a.tr.mu.Unlock()
	var cp *Checkpoint
	if !initialized && !a.o.NoCheckpoint {
		var err error
		cp, err = a.loadCheckpoint(ctx)
		if err != nil {
			a.m.checkpointErrors.Inc()
			a.mu.Lock()
			a.cpReadFailures++
			n := a.cpReadFailures
			a.mu.Unlock()
			if n < 3 {
				return fmt.Errorf("reading the checkpoint: %w", err)
			}
			a.log.Error("cannot read the checkpoint, going on without it: events purged while the agent was away may go unnoticed",
				"bucket", a.o.CheckpointBucket, "err", err)
		}
	}

	w := a.windowStart()
	t := &a.tr
	t.mu.Lock()
	reason := ""
	var floor uint64
	// The consumer existed before when this process bound to it already, or
	// the region's checkpoint records a position: created now, it was deleted.
	existedBefore := t.initialized || cp != nil
	switch {
	case !t.initialized:
		switch {
		case cp != nil && (cp.Stream != si.Config.Name || !cp.StreamCreated.Equal(si.Created)):
			reason = GapStreamRecreated
		case cp != nil:
			floor = cp.Seq
		case !created:
			floor = ci.AckFloor.Stream
		}
		t.maxSeen = ci.Delivered.Stream
	case !t.streamCreated.Equal(si.Created):
		reason = GapStreamRecreated
		t.gen++
		t.outstanding = nil
		t.gaps = 0
		t.suspect = 0
		t.replayedUpTo = 0
		t.maxSeen = ci.Delivered.Stream
	default:
		floor = t.floorLocked()
		t.maxSeen = max(t.maxSeen, ci.Delivered.Stream)
	}
	t.initialized = true
	t.stream = si.Config.Name
	t.streamCreated = si.Created
	t.ackFloor = ci.AckFloor.Stream
	first := si.State.FirstSeq
	if reason == "" && first > floor+1 && vanishedMayMatter(si.State, w) {
		reason = GapStreamTruncated
	}
	if reason == "" && created && existedBefore {
		reason = GapConsumerRecreated
	}
	var gapSeq, gen uint64
	if reason != "" {
		if first > 0 {
			gapSeq = first - 1
		}
		gen = t.gen
		t.gaps++
		t.hold(gen, gapSeq)
	}
	t.mu.Unlock()

	if reason != "" {
		a.m.gaps.WithLabelValues(reason).Inc()
		a.log.Warn("gap: events the region had not handled are gone from the stream; removing every token entry",
			"reason", reason, "handled_up_to", floor, "stream_first_seq", first, "stream_first_time", si.State.FirstTime,
			"window_start", w, "checkpoint", cp != nil)
		a.enqueue(ctx, &item{gen: gen, seq: gapSeq, gap: true, ev: gapEvent(reason, time.Now(), gapSeq)})
	}
	return nil
}

// pump moves messages from the consumer to the scheduler until the binding ends.
func (a *Agent) pump(ctx context.Context, cons jetstream.Consumer) error {
	pull := func() (jetstream.MessagesContext, error) {
		return cons.Messages(
			jetstream.PullMaxMessages(a.o.BatchSize),
			jetstream.PullHeartbeat(a.o.Heartbeat),
			jetstream.PullExpiry(4*a.o.Heartbeat),
			jetstream.WithMessagesErrOnMissingHeartbeat(true),
		)
	}
	it, err := pull()
	if err != nil {
		return fmt.Errorf("consuming from %s: %w", a.consumer, err)
	}
	defer func() {
		if it != nil {
			stopIterator(it)
		}
	}()
	a.setBound(true)
	a.log.Info("consuming", "stream", a.o.Stream, "consumer", a.consumer)
	for {
		msg, err := it.Next(jetstream.NextContext(ctx))
		if err == nil {
			a.receive(ctx, msg)
			continue
		}
		if ctx.Err() != nil {
			return nil
		}
		switch {
		case errors.Is(err, jetstream.ErrNoHeartbeat):
			a.m.consumerErrors.WithLabelValues(consumerErrHeartbeat).Inc()
			ierr, err := a.askConsumer(ctx, cons)
			if err != nil {
				return err
			}
			if ierr == nil {
				// NATS answers: the iterator has pulled again.
				a.log.Debug("missed consumer heartbeats")
				continue
			}
			// NATS, or behind a leaf node the link to the central side, is
			// away. The iterator pulls again only after two more heartbeats
			// (up to 2 x --consumer-heartbeat after the way is back, a pull
			// made meanwhile being lost): wait for the consumer to answer,
			// then pull at once with a new iterator.
			a.log.Info("missed consumer heartbeats and the consumer does not answer; asking again every 500ms", "err", ierr)
			if err := a.awaitConsumer(ctx, cons); err != nil {
				return err
			}
			if ctx.Err() != nil {
				return nil
			}
			stopIterator(it)
			it = nil
			next, err := pull()
			if err != nil {
				return fmt.Errorf("consuming from %s: %w", a.consumer, err)
			}
			it = next
			a.log.Info("the consumer answers again: pulling at once", "stream", a.o.Stream, "consumer", a.consumer)
		case errors.Is(err, jetstream.ErrConsumerDeleted):
			a.m.consumerErrors.WithLabelValues(consumerErrDeleted).Inc()
			return fmt.Errorf("consumer %s was deleted", a.consumer)
		default:
			a.m.consumerErrors.WithLabelValues(consumerErrIterator).Inc()
			return fmt.Errorf("consuming from %s: %w", a.consumer, err)
		}
	}
}

// awaitConsumer asks for the consumer's info every half second (or every
// timed-out request) until it answers; nil when it did or ctx ended, the
// error of askConsumer when the binding ends.
func (a *Agent) awaitConsumer(ctx context.Context, cons jetstream.Consumer) error {
	for {
		if !backoff.Sleep(ctx, consumerProbeInterval) {
			return nil
		}
		ierr, err := a.askConsumer(ctx, cons)
		if err != nil || ierr == nil {
			return err
		}
	}
}

// askConsumer asks for the consumer's info once. unanswered is why it got no
// answer (nil when it did); err ends the binding: the consumer or the stream
// is gone, or the NATS connection was closed for good.
func (a *Agent) askConsumer(ctx context.Context, cons jetstream.Consumer) (unanswered, err error) {
	rctx, cancel := context.WithTimeout(ctx, max(a.o.Heartbeat, 2*time.Second))
	defer cancel()
	_, ierr := cons.Info(rctx)
	switch {
	case ierr == nil:
		return nil, nil
	case errors.Is(ierr, jetstream.ErrConsumerNotFound):
		a.m.consumerErrors.WithLabelValues(consumerErrDeleted).Inc()
		return ierr, fmt.Errorf("consumer %s was deleted", a.consumer)
	case errors.Is(ierr, jetstream.ErrStreamNotFound):
		return ierr, fmt.Errorf("stream %s does not exist: %w", a.o.Stream, ierr)
	case a.nc.IsClosed() || errors.Is(ierr, nats.ErrConnectionClosed):
		return ierr, fmt.Errorf("waiting for consumer %s: %w", a.consumer, ierr)
	}
	return ierr, nil
}

// consumerProbeInterval is how often awaitConsumer asks. Behind a leaf node
// whose link is down the leaf answers at once (no responders): a cheap local
// request.
const consumerProbeInterval = 500 * time.Millisecond

// stopIterator stops it with Drain: JetStream may still deliver to its
// subscription until the server has seen the unsubscribe, and a message
// delivered to a stopped iterator would be lost until its redelivery. The
// messages that arrive meanwhile, for up to a second, are handed back (nak)
// for redelivery at once.
func stopIterator(it jetstream.MessagesContext) {
	it.Drain()
	deadline := time.Now().Add(time.Second)
	for wait := time.Until(deadline); wait > 0; wait = time.Until(deadline) {
		msg, err := it.Next(jetstream.NextMaxWait(wait))
		if err != nil {
			return // jetstream.ErrMsgIteratorClosed once drained
		}
		_ = msg.Nak()
	}
}

// receive turns a delivered message into an item for the scheduler.
func (a *Agent) receive(ctx context.Context, msg jetstream.Msg) {
	md, err := msg.Metadata()
	if err != nil {
		// Not a JetStream delivery: it cannot be acknowledged either.
		a.log.Error("ignoring a message without JetStream metadata", "subject", msg.Subject(), "err", err)
		return
	}
	ev, derr := event.Unmarshal(msg.Data())
	if derr != nil {
		ev = undecodableEvent(msg.Headers().Get(jetstream.MsgIDHeader), md.Timestamp)
		a.m.undecodable.Inc()
		a.log.Warn("stream message is not an event: removing every token entry for it",
			"stream_seq", md.Sequence.Stream, "subject", msg.Subject(), "err", derr)
	}
	a.m.pending.Set(float64(md.NumPending))
	seq := md.Sequence.Stream
	if md.NumDelivered > 1 && a.held.holds(a.tr.currentGen(), seq) {
		// A redelivery of an event the agent still works on (its progress
		// reports were lost while NATS was away). Acknowledgements are by
		// stream sequence, so the held one's ack covers this delivery too.
		a.m.redeliveries.Inc()
		a.log.Debug("dropping a duplicate delivery of an event in progress", "stream_seq", seq)
		return
	}
	gen, skipped, redelivery := a.tr.delivery(seq, md.NumDelivered, md.Timestamp, a.windowStart())
	if redelivery {
		a.m.redeliveries.Inc()
	}
	if !skipped.empty() {
		a.log.Debug("the consumer skipped sequences; looking them up in the stream",
			"skipped_from", skipped.lo, "skipped_to", skipped.hi, "next_seq", seq)
		a.checkSkipped(gen, skipped, md.Timestamp)
	}
	a.enqueue(ctx, &item{msg: msg, gen: gen, seq: seq, ev: ev, stored: md.Timestamp, first: !redelivery})
}

// enqueue hands an item to the scheduler. Items not taken when ctx ends stay in
// the held set and are handed back on shutdown; gaps are redetected.
func (a *Agent) enqueue(ctx context.Context, it *item) {
	a.held.add(it)
	a.m.held.Set(float64(a.held.len()))
	select {
	case a.in <- it:
	case <-ctx.Done():
	}
}

// heldSet is every item the agent holds and has not finished.
type heldSet struct {
	mu    sync.Mutex
	items map[*item]struct{}
	// bySeq counts the held deliveries by stream incarnation and sequence.
	bySeq map[[2]uint64]int
}

func (h *heldSet) add(it *item) {
	h.mu.Lock()
	h.items[it] = struct{}{}
	if it.msg != nil {
		if h.bySeq == nil {
			h.bySeq = map[[2]uint64]int{}
		}
		h.bySeq[[2]uint64{it.gen, it.seq}]++
	}
	h.mu.Unlock()
}

func (h *heldSet) remove(it *item) {
	h.mu.Lock()
	if _, ok := h.items[it]; ok && it.msg != nil {
		k := [2]uint64{it.gen, it.seq}
		if h.bySeq[k] <= 1 {
			delete(h.bySeq, k)
		} else {
			h.bySeq[k]--
		}
	}
	delete(h.items, it)
	h.mu.Unlock()
}

// holds reports whether a delivery of seq of stream incarnation gen is held.
func (h *heldSet) holds(gen, seq uint64) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.bySeq[[2]uint64{gen, seq}] > 0
}

func (h *heldSet) len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.items)
}

func (h *heldSet) snapshot() []*item {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]*item, 0, len(h.items))
	for it := range h.items {
		out = append(out, it)
	}
	return out
}

// keepalive tells JetStream, every third of the ack wait, that the agent is
// still working on the events it holds, so that they are not redelivered
// while a batch waits for its second pass or a retry.
func (a *Agent) keepalive(ctx context.Context) {
	t := time.NewTicker(a.o.ackWait() / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, it := range a.held.snapshot() {
			if it.msg != nil {
				_ = it.msg.InProgress() // fails only while NATS is away; redelivery is harmless
			}
		}
	}
}

// handBack naks every event still held so that JetStream redelivers it
// without waiting for the ack wait.
func (a *Agent) handBack() int {
	n := 0
	for _, it := range a.held.snapshot() {
		if it.msg != nil {
			_ = it.msg.Nak()
			n++
		}
		a.held.remove(it)
	}
	a.m.held.Set(0)
	return n
}
