package bridge

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	amqp "github.com/rabbitmq/amqp091-go"
)

// closeTimeout bounds the AMQP close handshake.
const closeTimeout = 2 * time.Second

// inflight is one delivery whose event awaits its PubAck.
type inflight struct {
	tag   uint64
	paf   jetstream.PubAckFuture
	id    string
	typ   string
	since time.Time // the event's time, for the latency histogram
}

// session is one AMQP connection's consumption.
type session struct {
	ch      *amqp.Channel
	tag     string
	slots   chan struct{} // one per publish awaiting its PubAck
	pending chan inflight // publishes in order, for the acker
	lost    chan struct{} // closed when the connection, channel or consumer ends
	lostErr error         // why, readable after lost is closed
}

// session connects to url, declares the topology and consumes until the
// connection, the channel or the consumer ends, or ctx ends. consumed
// reports whether consumption started; err says why the session ended (nil
// when ctx ended).
func (b *Bridge) session(ctx context.Context, url string) (consumed bool, err error) {
	conn, err := b.dial(url)
	if err != nil {
		return false, fmt.Errorf("connecting: %w", err)
	}
	connClosed := conn.NotifyClose(make(chan *amqp.Error, 1))
	defer func() {
		// Also ends the notification channels and the watcher goroutine.
		_ = conn.CloseDeadline(time.Now().Add(closeTimeout))
	}()

	// Bound the whole set-up: closing the connection unblocks any call.
	guard := time.AfterFunc(b.o.ConnectTimeout, func() { _ = conn.CloseDeadline(time.Now().Add(closeTimeout)) })
	s, deliveries, err := b.setup(conn)
	if !guard.Stop() {
		return false, fmt.Errorf("set-up did not finish within --amqp-connect-timeout %s (last error: %v)", b.o.ConnectTimeout, err)
	}
	if err != nil {
		return false, err
	}
	chClosed := s.ch.NotifyClose(make(chan *amqp.Error, 1))
	cancelled := s.ch.NotifyCancel(make(chan string, 1))
	go s.watch(connClosed, chClosed, cancelled)

	if b.consumed {
		b.m.reconnects.WithLabelValues(sideAMQP).Inc()
	}
	b.consumed = true
	b.setAMQPErr(nil)
	b.consuming.Store(true)
	defer b.consuming.Store(false)
	b.log.Info("consuming from RabbitMQ", "url", redactedURLs([]string{url})[0], "queue", b.o.Queue, "consumer_tag", s.tag)

	ackerDone := make(chan struct{})
	go b.acker(s, ackerDone)

	// Decoding is the costly part: several workers decode and publish while
	// this loop hands them the deliveries. Order does not matter: acks are
	// per delivery and events are order-free.
	jobs := make(chan amqp.Delivery, b.o.DecodeWorkers)
	var workers sync.WaitGroup
	for range b.o.DecodeWorkers {
		workers.Add(1)
		go func() {
			defer workers.Done()
			for d := range jobs {
				b.handle(ctx, s, d)
			}
		}()
	}

	var endErr error
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-s.lost:
			endErr = s.lostErr
			break loop
		case d, ok := <-deliveries:
			if !ok {
				// The consumer ended: the watcher knows why.
				select {
				case <-s.lost:
					endErr = s.lostErr
				case <-time.After(closeTimeout):
					endErr = errors.New("the consumer's deliveries ended")
				}
				break loop
			}
			select {
			case jobs <- d:
			case <-ctx.Done():
				break loop
			case <-s.lost:
				endErr = s.lostErr
				break loop
			}
		}
	}
	b.consuming.Store(false)
	// Workers finish quickly: with ctx or the session gone, handle leaves the
	// remaining deliveries unacknowledged for RabbitMQ to redeliver.
	close(jobs)
	workers.Wait()

	wait := b.o.PubAckTimeout + closeTimeout
	if ctx.Err() != nil {
		// Shutting down, within ShutdownTimeout in all. Cancel the consumer
		// first; deliveries received but not handled are requeued by
		// RabbitMQ when the channel closes.
		deadline := time.Now().Add(b.o.ShutdownTimeout)
		cancelDone := make(chan error, 1)
		go func() { cancelDone <- s.ch.Cancel(s.tag, false) }()
		select {
		case <-cancelDone:
		case <-s.lost:
		case <-time.After(time.Until(deadline)):
		}
		wait = max(time.Until(deadline), 0)
		endErr = nil
	} else {
		b.log.Warn("RabbitMQ consumption ended; waiting for in-flight publishes, then reconnecting",
			"err", endErr, "in_flight", len(s.slots))
	}
	close(s.pending)
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-ackerDone:
	case <-t.C:
		b.log.Warn("in-flight publishes not settled in time; RabbitMQ will redeliver their notifications",
			"in_flight", len(s.slots), "waited", wait)
	}
	if ctx.Err() == nil && endErr == nil {
		endErr = errors.New("consumption ended")
	}
	return true, endErr
}

// dial opens one AMQP connection, bounded by ConnectTimeout.
func (b *Bridge) dial(url string) (*amqp.Connection, error) {
	props := amqp.NewConnectionProperties()
	props["connection_name"] = b.o.ConnectionName
	props["product"] = "keystone-fanout"
	cfg := amqp.Config{
		Heartbeat:  b.o.Heartbeat,
		Dial:       amqp.DefaultDial(b.o.ConnectTimeout),
		Properties: props,
	}
	if b.tls != nil {
		cfg.TLSClientConfig = b.tls.Clone() // amqp091 sets ServerName in it
	}
	return amqp.DialConfig(url, cfg)
}

func isPreconditionFailed(err error) bool {
	var ae *amqp.Error
	return errors.As(err, &ae) && ae.Code == amqp.PreconditionFailed
}

// setup declares the exchange, the queue and its bindings, and starts
// consuming. A declaration that fails with PRECONDITION_FAILED (the object
// exists with other settings) closes the channel: the object is then checked
// passively on a new channel and used as it is.
func (b *Bridge) setup(conn *amqp.Connection) (*session, <-chan amqp.Delivery, error) {
	ch, err := conn.Channel()
	if err != nil {
		return nil, nil, fmt.Errorf("opening a channel: %w", err)
	}
	// oslo.messaging's own declaration: topic, durable=false, auto_delete=false.
	err = ch.ExchangeDeclare(b.o.Exchange, amqp.ExchangeTopic, false, false, false, false, nil)
	if isPreconditionFailed(err) {
		b.log.Warn("exchange exists with other flags than oslo.messaging's; using it as it is",
			"exchange", b.o.Exchange, "err", err)
		if ch, err = conn.Channel(); err != nil {
			return nil, nil, fmt.Errorf("opening a channel: %w", err)
		}
		err = ch.ExchangeDeclarePassive(b.o.Exchange, amqp.ExchangeTopic, false, false, false, false, nil)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("declaring exchange %q: %w", b.o.Exchange, err)
	}

	args := amqp.Table{}
	if b.o.QueueType == QueueQuorum {
		args["x-queue-type"] = QueueQuorum
	}
	if b.o.DeadLetterExchange != "" {
		args["x-dead-letter-exchange"] = b.o.DeadLetterExchange
	}
	_, err = ch.QueueDeclare(b.o.Queue, true, false, false, false, args)
	if isPreconditionFailed(err) {
		b.log.Error("queue exists with other settings than --queue-type/--dead-letter-exchange ask for; using it as it is. "+
			"To change it, stop every bridge, move or drain its messages and delete it",
			"queue", b.o.Queue, "queue_type", b.o.QueueType, "dead_letter_exchange", b.o.DeadLetterExchange, "err", err)
		if ch, err = conn.Channel(); err != nil {
			return nil, nil, fmt.Errorf("opening a channel: %w", err)
		}
		_, err = ch.QueueDeclarePassive(b.o.Queue, true, false, false, false, nil)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("declaring queue %q: %w", b.o.Queue, err)
	}
	for _, key := range b.o.RoutingKeys {
		if err := ch.QueueBind(b.o.Queue, key, b.o.Exchange, false, nil); err != nil {
			return nil, nil, fmt.Errorf("binding queue %q to exchange %q with key %q: %w", b.o.Queue, b.o.Exchange, key, err)
		}
	}
	if b.o.DeadLetterExchange != "" {
		b.checkDeadLetterExchange(conn)
	}
	if err := ch.Qos(b.o.Prefetch, 0, false); err != nil {
		return nil, nil, fmt.Errorf("setting prefetch %d: %w", b.o.Prefetch, err)
	}
	s := &session{
		ch:      ch,
		tag:     consumerTag(b.o.ConnectionName),
		slots:   make(chan struct{}, b.o.PublishWindow),
		pending: make(chan inflight, b.o.PublishWindow),
		lost:    make(chan struct{}),
	}
	deliveries, err := ch.Consume(b.o.Queue, s.tag, false, false, false, false, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("consuming from queue %q: %w", b.o.Queue, err)
	}
	return s, deliveries, nil
}

// checkDeadLetterExchange warns when the dead-letter exchange does not exist:
// RabbitMQ would drop the rejected messages.
func (b *Bridge) checkDeadLetterExchange(conn *amqp.Connection) {
	ch, err := conn.Channel()
	if err != nil {
		return
	}
	if err := ch.ExchangeDeclarePassive(b.o.DeadLetterExchange, amqp.ExchangeFanout, false, false, false, false, nil); err != nil {
		b.log.Warn("dead-letter exchange does not exist: RabbitMQ drops rejected messages until it is created",
			"dead_letter_exchange", b.o.DeadLetterExchange, "err", err)
		return
	}
	_ = ch.Close()
}

// watch closes s.lost when the connection or channel closes or the broker
// cancels the consumer, and keeps draining the notification channels until
// amqp091 closes them with the connection.
func (s *session) watch(connClosed, chClosed <-chan *amqp.Error, cancelled <-chan string) {
	select {
	case e, ok := <-connClosed:
		s.lostErr = closeReason("connection", e, ok)
	case e, ok := <-chClosed:
		s.lostErr = closeReason("channel", e, ok)
	case tag, ok := <-cancelled:
		if ok {
			s.lostErr = fmt.Errorf("RabbitMQ cancelled consumer %s (queue deleted or moved)", tag)
		} else {
			s.lostErr = errors.New("channel closed")
		}
	}
	close(s.lost)
	go func() {
		for range connClosed {
		}
	}()
	go func() {
		for range chClosed {
		}
	}()
	for range cancelled {
	}
}

func closeReason(what string, e *amqp.Error, ok bool) error {
	if !ok || e == nil {
		return fmt.Errorf("%s closed", what)
	}
	return fmt.Errorf("%s closed: %w", what, e)
}

// handle processes one delivery. It returns false when ctx ended or the
// session was lost while waiting to publish (the delivery is then left
// unacknowledged, and RabbitMQ redelivers it).
func (b *Bridge) handle(ctx context.Context, s *session, d amqp.Delivery) bool {
	if ctx.Err() != nil {
		return false
	}
	received := time.Now().UTC()
	b.m.received.Inc()
	if len(d.Body) > b.o.MaxBodySize {
		b.reject(s, d, &event.RejectError{Reason: event.ReasonTooLarge,
			Err: fmt.Errorf("body of %d bytes exceeds --max-body-size %d", len(d.Body), b.o.MaxBodySize)})
		return true
	}
	ev, err := decode(d.Body)
	if err != nil {
		r, ok := event.IsReject(err)
		if !ok {
			r = &event.RejectError{Reason: event.ReasonNotJSON, Err: err}
		}
		b.reject(s, d, r)
		return true
	}
	if b.filter.Filtered(ev.Type) {
		b.m.filtered.WithLabelValues(filteredLabel(ev.Type)).Inc()
		b.log.Debug("filtered notification", "message_id", ev.ID, "event_type", ev.Type)
		b.ack(s, d.DeliveryTag, ev.ID)
		return true
	}
	if ev.Time.IsZero() {
		ev.Time = received
	}
	if ev.Widen != "" {
		b.m.widened.WithLabelValues(widenLabel(ev.Widen)).Inc()
		b.log.Warn("notification cannot be bounded: agents will remove every token entry",
			"message_id", ev.ID, "event_type", ev.Type, "reason", ev.Widen)
	}
	data, err := ev.Marshal()
	if err != nil {
		// Only a time outside years 0-9999 can fail; never drop the event.
		ev.Time = received
		if data, err = ev.Marshal(); err != nil {
			b.log.Error("cannot encode event; requeueing", "message_id", ev.ID, "event_type", ev.Type, "err", err)
			b.nack(s, d.DeliveryTag, ev.ID)
			return true
		}
	}

	if !b.gate.wait(ctx, s.lost) {
		return false
	}
	select {
	case s.slots <- struct{}{}:
	case <-ctx.Done():
		return false
	case <-s.lost:
		return false
	}
	msg := &nats.Msg{
		Subject: ev.Subject(b.o.Stream.SubjectPrefix),
		Data:    data,
		Header: nats.Header{
			jetstream.MsgIDHeader:          []string{ev.ID},
			jetstream.ExpectedStreamHeader: []string{b.o.Stream.Name},
		},
	}
	paf, err := b.js.PublishMsgAsync(msg)
	if err != nil {
		<-s.slots
		b.m.publishErrors.Inc()
		b.publishFailed(err, ev.ID, ev.Type)
		b.nack(s, d.DeliveryTag, ev.ID)
		return true
	}
	b.m.inFlight.Inc()
	s.pending <- inflight{tag: d.DeliveryTag, paf: paf, id: ev.ID, typ: ev.Type, since: ev.Time}
	return true
}

// acker settles each publish in turn: ack its delivery after its PubAck
// (a duplicate counts as stored), nack and requeue it after an error. Acks
// are per delivery (multiple=false), so a failed publish is never acked by a
// later one's ack. Every PubAckFuture resolves: with a PubAck, an error, or
// the PubAck timeout.
func (b *Bridge) acker(s *session, done chan<- struct{}) {
	defer close(done)
	for it := range s.pending {
		select {
		case ack := <-it.paf.Ok():
			if ack.Duplicate {
				b.m.duplicates.Inc()
			} else {
				b.m.published.Inc()
				b.m.latency.Observe(time.Since(it.since).Seconds())
			}
			b.gate.success()
			b.streamReachable()
			b.ack(s, it.tag, it.id)
		case err := <-it.paf.Err():
			b.m.publishErrors.Inc()
			b.publishFailed(err, it.id, it.typ)
			b.nack(s, it.tag, it.id)
		}
		b.m.inFlight.Dec()
		<-s.slots
	}
}

// streamReachable records a PubAck as proof that the stream is reachable.
func (b *Bridge) streamReachable() {
	if b.streamDown.Load() {
		b.setStreamErr(nil)
	}
}

func (b *Bridge) ack(s *session, tag uint64, id string) {
	if err := s.ch.Ack(tag, false); err != nil {
		b.m.ackErrors.Inc()
		b.log.Debug("ack failed; RabbitMQ will redeliver and the stream dedupe it", "message_id", id, "err", err)
	}
}

func (b *Bridge) nack(s *session, tag uint64, id string) {
	if err := s.ch.Nack(tag, false, true); err != nil {
		b.m.ackErrors.Inc()
		b.log.Debug("nack failed; RabbitMQ will redeliver anyway", "message_id", id, "err", err)
	}
}

// reject counts, logs and settles a body that is not a notification: acked,
// or nacked without requeue when a dead-letter exchange is configured.
func (b *Bridge) reject(s *session, d amqp.Delivery, r *event.RejectError) {
	b.m.rejected.WithLabelValues(string(r.Reason)).Inc()
	b.log.Warn("rejected AMQP message: not a Keystone notification",
		"reason", string(r.Reason), "message_id", r.MessageID, "amqp_message_id", d.MessageId,
		"redelivered", d.Redelivered, "body_bytes", len(d.Body), "err", r.Err)
	var err error
	if b.o.DeadLetterExchange != "" {
		err = s.ch.Nack(d.DeliveryTag, false, false)
	} else {
		err = s.ch.Ack(d.DeliveryTag, false)
	}
	if err != nil {
		b.m.ackErrors.Inc()
		b.log.Debug("settling a rejected message failed; RabbitMQ will redeliver it", "message_id", r.MessageID, "err", err)
	}
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
