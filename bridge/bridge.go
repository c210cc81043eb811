// Package bridge moves Keystone's notifications from RabbitMQ to JetStream.
//
// A Bridge consumes its own durable queue bound to Keystone's exchange (a
// source, source.go), decodes and normalises each notification
// (internal/event) and publishes the event with the jetstream package's
// asynchronous publish, Nats-Msg-Id = the oslo message_id. A settler
// (settle.go) settles the deliveries in delivery order from their publishes'
// futures: ack after the PubAck, nack and requeue a failure on its own, so
// that no ack ever covers a failure. Harmless event types are acked and
// counted; bodies that are not notifications are counted by reason, logged
// and acked (or dead-lettered). Connections are re-established forever, with
// a capped exponential back-off. Several bridges may share one queue: the
// stream drops the duplicates.
package bridge

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/keystone-fanout/keystone-fanout/internal/backoff"
	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/tlsconf"
)

// Bridge is one bridge replica. Create it with New and run it with Run.
type Bridge struct {
	o      Options
	urls   []string // the brokers, normalised (Options.brokerURLs)
	nc     *nats.Conn
	js     jetstream.JetStream
	filter *event.Filter
	tls    *tlsconf.Reloader // nil: no TLS options
	m      *metrics
	log    *slog.Logger

	started   atomic.Bool
	consuming atomic.Bool
	sessions  int // sessions that consumed: all but the first are reconnects
	gate      publishGate
	recheck   chan struct{} // a publish found no stream, or NATS reconnected: check it now

	mu        sync.Mutex
	amqpErr   error // why the bridge is not consuming, when it is not
	streamErr error // nil while the stream is known to be reachable
}

// New checks o (see Options.Validate) and returns a Bridge that publishes
// through nc. nc should reconnect forever (internal/natsconn); the bridge
// never closes it. Metrics are registered on reg; a second Bridge needs its
// own registry.
func New(o Options, nc *nats.Conn, reg prometheus.Registerer, log *slog.Logger) (*Bridge, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if nc == nil {
		return nil, errors.New("bridge: no NATS connection")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	urls, _ := o.brokerURLs()              // checked by Validate
	filter, _ := event.NewFilter(o.Filter) // likewise
	tlsConf, err := o.TLS.reloader(log)
	if err != nil {
		return nil, err
	}
	// The library bounds the publishes awaiting their PubAck and fails those
	// whose PubAck does not come in time, or is lost with the connection.
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(o.PublishWindow),
		jetstream.WithPublishAsyncTimeout(o.PubAckTimeout))
	if err != nil {
		return nil, fmt.Errorf("bridge: JetStream context: %w", err)
	}
	m, err := newMetrics(reg, func() float64 { return float64(js.PublishAsyncPending()) })
	if err != nil {
		return nil, err
	}
	b := &Bridge{o: o, urls: urls, nc: nc, js: js, filter: filter, tls: tlsConf, m: m, log: log,
		recheck: make(chan struct{}, 1), amqpErr: errors.New("not connected to RabbitMQ yet"),
		streamErr: errors.New("stream not checked yet"),
		gate:      publishGate{nc: nc, lo: o.ReconnectMin, hi: max(o.ReconnectMin, min(o.ReconnectMax, 5*time.Second))}}
	return b, nil
}

// Options returns the validated options, defaults filled in.
func (b *Bridge) Options() Options { return b.o }

// Ready returns nil while the bridge consumes from RabbitMQ, its NATS
// connection is up and the stream is reachable, and otherwise says what is
// missing.
func (b *Bridge) Ready() error {
	b.mu.Lock()
	amqpErr, streamErr := b.amqpErr, b.streamErr
	b.mu.Unlock()
	if !b.consuming.Load() {
		return fmt.Errorf("not consuming from RabbitMQ: %v", amqpErr)
	}
	if !b.nc.IsConnected() {
		return fmt.Errorf("NATS is not connected (%s)", b.nc.Status())
	}
	if streamErr != nil {
		return fmt.Errorf("JetStream stream %s not reachable: %v", b.o.Stream.Name, streamErr)
	}
	return nil
}

// setErr records why the bridge does not consume (&b.amqpErr) or cannot
// reach the stream (&b.streamErr), for Ready.
func (b *Bridge) setErr(field *error, err error) {
	b.mu.Lock()
	*field = err
	b.mu.Unlock()
}

// stableSession is how long a session must have lasted for the reconnect
// back-off to start again from ReconnectMin.
const stableSession = 10 * time.Second

// Run ensures the stream, then consumes and publishes until ctx ends,
// reconnecting to RabbitMQ as long as it takes, trying the brokers in turn.
// When ctx ends it stops consuming, waits up to ShutdownTimeout for the
// publishes in flight to be settled, closes the AMQP connection and returns
// nil. Run may be called once.
func (b *Bridge) Run(ctx context.Context) error {
	if !b.started.CompareAndSwap(false, true) {
		return errors.New("bridge: Run called twice")
	}
	b.log.Info("bridge starting", "amqp_urls", redactedURLs(b.urls), "exchange", b.o.Exchange,
		"routing_keys", b.o.RoutingKeys, "queue", b.o.Queue, "queue_type", b.o.QueueType,
		"stream", b.o.Stream.Name, "subject_prefix", b.o.Stream.SubjectPrefix)
	retry := backoff.New(b.o.ReconnectMin, b.o.ReconnectMax)
	for {
		// Without the stream no publish can succeed: ensure it before consuming.
		err := b.checkStream(ctx, true)
		if err == nil {
			break
		}
		d := retry.Next()
		b.setErr(&b.amqpErr, fmt.Errorf("not started: waiting for JetStream stream %s: %w", b.o.Stream.Name, err))
		b.log.Error("JetStream stream not available, retrying", "stream", b.o.Stream.Name, "err", err, "retry_in", d)
		if !backoff.Sleep(ctx, d) {
			return nil
		}
	}
	watchCtx, stopWatch := context.WithCancel(context.Background())
	watched := make(chan struct{})
	go func() { defer close(watched); b.watchStream(watchCtx) }()
	defer func() { stopWatch(); <-watched }()

	retry.Reset()
	for next := 0; ; {
		var err error
		// One round: every broker in turn, from the one after the last used.
		for i := 0; i < len(b.urls) && ctx.Err() == nil; i++ {
			url := b.urls[(next+i)%len(b.urls)]
			src := &source{o: &b.o, url: url, tls: b.tls, log: b.log}
			if err = src.Connect(ctx); err != nil {
				if ctx.Err() == nil {
					b.log.Warn("RabbitMQ connection failed", "url", redactedURLs([]string{url})[0], "err", err)
				}
				continue
			}
			began := time.Now()
			err = b.consume(ctx, src)
			if time.Since(began) >= stableSession {
				retry.Reset() // a session that dies at once keeps backing off
			}
			next = (next + i + 1) % len(b.urls)
			break
		}
		if ctx.Err() != nil {
			b.log.Info("bridge stopped")
			return nil
		}
		b.setErr(&b.amqpErr, err)
		d := retry.Next()
		b.log.Info("reconnecting to RabbitMQ", "retry_in", d, "err", err)
		if !backoff.Sleep(ctx, d) {
			b.log.Info("bridge stopped")
			return nil
		}
	}
}

// consume publishes src's deliveries until src is lost or ctx ends. Then it
// drains: the publishes in flight are settled within ShutdownTimeout when ctx
// ended, within PubAckTimeout otherwise, and src is closed; RabbitMQ
// redelivers whatever was not acked. It returns why consumption ended (nil
// when ctx did).
func (b *Bridge) consume(ctx context.Context, src *source) (err error) {
	if b.sessions++; b.sessions > 1 {
		b.m.reconnects.WithLabelValues(sideAMQP).Inc()
	}
	b.setErr(&b.amqpErr, nil)
	b.consuming.Store(true)
	b.log.Info("consuming from RabbitMQ", "url", redactedURLs([]string{src.url})[0], "queue", b.o.Queue, "consumer_tag", src.tag)
	s := newSettler(src.ch, b.o.Prefetch, b.published, b.ackFailed)
	go s.run()
	for err == nil && ctx.Err() == nil {
		select {
		case <-ctx.Done():
		case <-src.Lost():
			err = src.Err()
		case d, ok := <-src.Deliveries():
			if !ok {
				err = errors.New("the consumer's deliveries ended")
				select { // the watcher knows why
				case <-src.Lost():
					err = src.Err()
				case <-time.After(closeTimeout):
				}
			} else if !b.handle(ctx, src, s, &d) && ctx.Err() == nil {
				err = src.Err()
			}
		}
	}
	b.consuming.Store(false)
	wait := b.o.PubAckTimeout + closeTimeout
	if ctx.Err() != nil {
		wait, err = b.o.ShutdownTimeout, nil
	} else {
		b.log.Warn("RabbitMQ consumption ended; waiting for in-flight publishes, then reconnecting",
			"err", err, "in_flight", b.js.PublishAsyncPending())
	}
	if !s.close(wait) {
		b.log.Warn("in-flight publishes not settled in time; RabbitMQ will redeliver their notifications",
			"in_flight", b.js.PublishAsyncPending(), "waited", wait)
	}
	_ = src.Close(context.Background())
	return err
}

// handle decodes one delivery and publishes its event, or has it settled at
// once (filtered, rejected). It returns false, leaving the delivery to
// RabbitMQ's redelivery, when ctx ended or src was lost before the publish.
func (b *Bridge) handle(ctx context.Context, src *source, s *settler, d *amqp.Delivery) bool {
	b.m.received.Inc()
	p := &pending{tag: d.DeliveryTag, recv: time.Now()}
	if len(d.Body) > b.o.MaxBodySize {
		b.reject(s, p, d, &event.RejectError{Reason: event.ReasonTooLarge,
			Err: fmt.Errorf("body of %d bytes exceeds --max-body-size %d", len(d.Body), b.o.MaxBodySize)})
		return true
	}
	ev, err := decode(d.Body)
	if err != nil {
		r, ok := event.IsReject(err)
		if !ok {
			r = &event.RejectError{Reason: event.ReasonNotJSON, Err: err}
		}
		b.reject(s, p, d, r)
		return true
	}
	p.id, p.typ = ev.ID, ev.Type
	if b.filter.Filtered(ev.Type) {
		b.m.filteredCounter(ev.Type).Inc()
		if b.log.Enabled(ctx, slog.LevelDebug) {
			b.log.Debug("filtered notification", "message_id", ev.ID, "event_type", ev.Type)
		}
		s.add(p)
		return true
	}
	if ev.Time.IsZero() {
		ev.Time = time.Now().UTC()
	}
	if ev.Widen != "" {
		b.m.widenedCounter(ev.Widen).Inc()
		b.log.Warn("notification cannot be bounded: agents will remove every token entry",
			"message_id", ev.ID, "event_type", ev.Type, "reason", ev.Widen)
	}
	data, err := ev.Marshal()
	if err != nil {
		// Only a time outside years 0-9999 can fail; never drop the event.
		ev.Time = time.Now().UTC()
		if data, err = ev.Marshal(); err != nil {
			b.log.Error("cannot encode event; requeueing", "message_id", ev.ID, "event_type", ev.Type, "err", err)
			p.how = requeue
			s.add(p)
			return true
		}
	}
	p.since = ev.Time
	if !b.gate.wait(ctx, src.Lost()) {
		return false
	}
	msg := &nats.Msg{Subject: stream.Subject(b.o.Stream.SubjectPrefix, &ev), Data: data, Header: nats.Header{
		jetstream.MsgIDHeader:          []string{ev.ID},
		jetstream.ExpectedStreamHeader: []string{b.o.Stream.Name},
	}}
	for {
		// While PublishWindow publishes await their PubAck, this waits up to
		// 200 ms for one to end, then fails with ErrTooManyStalledMsgs.
		p.future, p.err = b.js.PublishMsgAsync(msg)
		if !errors.Is(p.err, jetstream.ErrTooManyStalledMsgs) {
			break
		}
		select {
		case <-ctx.Done():
			return false
		case <-src.Lost():
			return false
		default:
		}
	}
	s.add(p)
	return true
}

// reject counts and logs a body that is not a notification, and has it acked,
// or nacked without requeue when a dead-letter exchange is configured.
func (b *Bridge) reject(s *settler, p *pending, d *amqp.Delivery, r *event.RejectError) {
	b.m.rejectedCounter(r.Reason).Inc()
	b.log.Warn("rejected AMQP message: not a Keystone notification",
		"reason", string(r.Reason), "message_id", r.MessageID, "amqp_message_id", d.MessageId,
		"redelivered", d.Redelivered, "body_bytes", len(d.Body), "err", r.Err)
	if b.o.DeadLetterExchange != "" {
		p.how = deadLetter
	}
	s.add(p)
}

// published counts and logs the outcome of p's publish (err nil for a
// PubAck); the settler calls it in delivery order, before it settles p.
func (b *Bridge) published(p *pending, ack *jetstream.PubAck, err error) {
	switch {
	case err != nil:
		b.m.publishErrors.Inc()
		level := slog.LevelDebug
		if b.gate.fail() {
			level = slog.LevelWarn
		}
		if errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) {
			b.checkStreamSoon()
		}
		b.log.Log(context.Background(), level, "publish to JetStream failed; requeueing the notification (further failures until one succeeds are logged at debug level)",
			"message_id", p.id, "event_type", p.typ, "err", err)
		return
	case ack.Duplicate:
		b.m.duplicates.Inc()
		b.log.Debug("notification already in the stream, dropped as a duplicate", "message_id", p.id, "event_type", p.typ)
	default:
		b.m.latency.WithLabelValues(latencyFromKeystone).Observe(time.Since(p.since).Seconds())
		b.m.latency.WithLabelValues(latencyFromReceipt).Observe(time.Since(p.recv).Seconds())
		b.m.published.Inc() // last: a reader that sees it sees the latencies
	}
	b.gate.success()
	b.setErr(&b.streamErr, nil) // a PubAck proves the stream reachable
}

// ackFailed counts acks or nacks that could not be sent (the channel is
// gone): RabbitMQ redelivers those messages and the stream dedupes them.
func (b *Bridge) ackFailed(n int, err error) {
	b.m.ackErrors.Add(float64(n))
	b.log.Debug("ack or nack failed; RabbitMQ will redeliver", "deliveries", n, "err", err)
}

// decode is event.Decode that turns a panic into an unbounded event: a body
// the decoder chokes on may still be a token-affecting notification, so it
// is widened, never skipped.
func decode(body []byte) (ev event.Event, err error) {
	defer func() {
		if p := recover(); p != nil {
			sum := sha256.Sum256(body)
			ev = event.Event{Version: event.SchemaVersion, Kind: event.KindNotification,
				ID: "sha256-" + hex.EncodeToString(sum[:16]), Type: "unknown", Widen: widenDecodeError}
			err = nil
		}
	}()
	return event.Decode(body)
}

// checkStream ensures the stream (stream.Ensure) or, when ensure is false,
// looks it up and creates it again only when it vanished (a new NATS server
// without the old data, or an operator deleted it). It is bounded by
// ConnectTimeout and records the outcome for Ready.
func (b *Bridge) checkStream(ctx context.Context, ensure bool) error {
	cctx, cancel := context.WithTimeout(ctx, b.o.ConnectTimeout)
	defer cancel()
	var err error
	if !ensure {
		_, err = b.js.Stream(cctx, b.o.Stream.Name)
		if ensure = errors.Is(err, jetstream.ErrStreamNotFound); ensure {
			b.log.Warn("JetStream stream vanished, creating it again", "stream", b.o.Stream.Name)
		}
	}
	if ensure {
		err = stream.Ensure(cctx, b.js, b.o.Stream)
		if err == nil {
			// The agents' receipts (keystone-fanout trace): evidence only, so
			// their stream missing makes the bridge no less ready.
			if rerr := stream.EnsureReceipts(cctx, b.js, b.o.Stream); rerr != nil {
				b.log.Warn("cannot ensure the receipts stream: keystone-fanout trace will show no receipts",
					"stream", stream.ReceiptsStream, "err", rerr)
			}
		}
	}
	if ctx.Err() == nil {
		b.setErr(&b.streamErr, err)
	}
	return err
}

// watchStream checks the stream every StreamCheckPeriod, after each NATS
// reconnect (which it counts) and when a publish found no stream.
func (b *Bridge) watchStream(ctx context.Context) {
	reconnected := b.nc.StatusChanged(nats.CONNECTED)
	defer b.nc.RemoveStatusListener(reconnected) // closes it, ending the counter
	// Reconnects are counted apart from the checks: a check under way (slow
	// while NATS is away) must not delay the count or the log line.
	go func() {
		for range reconnected {
			b.m.reconnects.WithLabelValues(sideNATS).Inc()
			b.log.Info("NATS reconnected", "url", b.nc.ConnectedUrlRedacted())
			b.checkStreamSoon()
		}
	}()
	tick := time.NewTicker(b.o.StreamCheckPeriod)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-b.recheck:
		}
		if err := b.checkStream(ctx, false); err != nil && ctx.Err() == nil {
			b.log.Warn("JetStream stream check failed", "stream", b.o.Stream.Name, "err", err)
		}
	}
}

// checkStreamSoon asks watchStream for a check without waiting for it.
func (b *Bridge) checkStreamSoon() {
	select {
	case b.recheck <- struct{}{}:
	default:
	}
}

// publishGate slows publishing down after failures, so that a NATS outage
// does not become a hot loop of publish, nack, redeliver: after a failure the
// next publish waits for a back-off (doubling per failure, from ReconnectMin
// up to 5 s) and for the NATS connection. A success opens the gate again.
type publishGate struct {
	nc       *nats.Conn
	lo, hi   time.Duration
	failing  atomic.Bool // failures > 0, read without the lock
	mu       sync.Mutex
	failures int
	until    time.Time
}

// fail records a failure and reports whether it is the first of a streak.
func (g *publishGate) fail() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.failures++
	g.failing.Store(true)
	if until := time.Now().Add(backoff.Capped(g.lo, g.hi, g.failures-1)); until.After(g.until) {
		g.until = until
	}
	return g.failures == 1
}

func (g *publishGate) success() {
	if g.failing.Load() {
		g.mu.Lock()
		g.failures = 0
		g.failing.Store(false)
		g.mu.Unlock()
	}
}

// wait returns true once publishing may go on, false when ctx ends or stop
// is closed first.
func (g *publishGate) wait(ctx context.Context, stop <-chan struct{}) bool {
	for g.failing.Load() {
		g.mu.Lock()
		d := time.Until(g.until)
		g.mu.Unlock()
		if d <= 0 {
			if g.nc.IsConnected() {
				return true
			}
			d = 50 * time.Millisecond
		}
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return false
		case <-stop:
			t.Stop()
			return false
		case <-t.C:
		}
	}
	return true
}
