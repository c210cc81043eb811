package bridge

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	amqp "github.com/rabbitmq/amqp091-go"
)

// closeTimeout bounds the AMQP close handshake.
const closeTimeout = 2 * time.Second

// session is one AMQP connection's consumption.
type session struct {
	ch      *amqp.Channel
	tag     string
	slots   chan struct{} // one per publish awaiting its PubAck
	pending chan inflight // deliveries to settle, for the acker
	// The stream replies to the publish of delivery tag T on inbox+"T";
	// the replies arrive on replies. natsDown reports the losses of the
	// NATS connection, with which replies are lost.
	inbox    string
	replies  chan *nats.Msg
	natsDown chan nats.Status
	lost     chan struct{} // closed when the connection, channel or consumer ends
	lostErr  error         // why, readable after lost is closed
}

// session connects to url, declares the topology and consumes until the
// connection, the channel or the consumer ends, or ctx ends. consumed
// reports whether consumption started; err says why the session ended (nil
// when ctx ended).
func (b *Bridge) session(ctx context.Context, url string) (consumed bool, err error) {
	// The stream replies to the session's publishes on the session's own
	// inbox, straight into a channel the acker reads. The NATS client drops
	// a reply when the channel is full: it holds more than the publish
	// window (and a dropped reply is a publish timeout, never a loss).
	inbox := b.nc.NewInbox() + "."
	replies := make(chan *nats.Msg, 2*b.o.PublishWindow+64)
	replySub, err := b.nc.ChanSubscribe(inbox+"*", replies)
	if err != nil {
		return false, fmt.Errorf("subscribing to JetStream replies on %s*: %w", inbox, err)
	}
	defer func() { _ = replySub.Unsubscribe() }()
	natsDown := b.nc.StatusChanged(nats.RECONNECTING, nats.CLOSED)
	defer b.nc.RemoveStatusListener(natsDown)

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
	s.inbox, s.replies, s.natsDown = inbox, replies, natsDown
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
	go b.acker(s, s.ch, ackerDone)

	// Decoding and publishing run in several workers, each taking the next
	// delivery. Order does not matter: events are order-free, and the acker
	// acks a delivery only once it and every delivery before it are settled.
	var workers sync.WaitGroup
	for range b.o.DecodeWorkers {
		workers.Add(1)
		go func() {
			defer workers.Done()
			b.work(ctx, s, deliveries)
		}()
	}
	workersDone := make(chan struct{})
	go func() { workers.Wait(); close(workersDone) }()

	var endErr error
	select {
	case <-ctx.Done():
	case <-s.lost:
		endErr = s.lostErr
	case <-workersDone:
		// The consumer's deliveries ended: the watcher knows why.
		select {
		case <-s.lost:
			endErr = s.lostErr
		case <-time.After(closeTimeout):
			endErr = errors.New("the consumer's deliveries ended")
		}
	}
	b.consuming.Store(false)
	// Workers finish quickly: with ctx or the session gone, they leave the
	// remaining deliveries unacknowledged for RabbitMQ to redeliver.
	<-workersDone

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

	args := amqp.Table{"x-message-ttl": b.o.QueueMessageTTL.Milliseconds()}
	if b.o.QueueType == QueueQuorum {
		args["x-queue-type"] = QueueQuorum
	}
	if b.o.DeadLetterExchange != "" {
		args["x-dead-letter-exchange"] = b.o.DeadLetterExchange
	}
	_, err = ch.QueueDeclare(b.o.Queue, true, false, false, false, args)
	if isPreconditionFailed(err) {
		b.log.Error("queue exists with other settings than --queue-type/--queue-message-ttl/--dead-letter-exchange ask for; using it as it is. "+
			"To change it, stop every bridge, move or drain its messages and delete it (docs/OPERATIONS.md)",
			"queue", b.o.Queue, "queue_type", b.o.QueueType, "queue_message_ttl", b.o.QueueMessageTTL.String(),
			"dead_letter_exchange", b.o.DeadLetterExchange, "err", err)
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

// work handles deliveries until they end, ctx ends or the session is lost.
func (b *Bridge) work(ctx context.Context, s *session, deliveries <-chan amqp.Delivery) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.lost:
			return
		case d, ok := <-deliveries:
			if !ok || !b.handle(ctx, s, &d) {
				return
			}
		}
	}
}

// handle processes one delivery and hands it to the acker. It returns false
// when ctx ended or the session was lost while waiting to publish (the
// delivery is then left unacknowledged, and RabbitMQ redelivers it).
func (b *Bridge) handle(ctx context.Context, s *session, d *amqp.Delivery) bool {
	if ctx.Err() != nil {
		return false
	}
	b.m.received.Inc()
	received := time.Now()
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
		b.m.filteredCounter(ev.Type).Inc()
		if b.log.Enabled(ctx, slog.LevelDebug) {
			b.log.Debug("filtered notification", "message_id", ev.ID, "event_type", ev.Type)
		}
		s.pending <- inflight{tag: d.DeliveryTag, how: settleAck, id: ev.ID}
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
			s.pending <- inflight{tag: d.DeliveryTag, how: settleRequeue, id: ev.ID}
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
	subject, ok := b.subjects[ev.Type]
	if !ok {
		subject = ev.Subject(b.o.Stream.SubjectPrefix)
	}
	msg := &nats.Msg{
		Subject: subject,
		Reply:   s.inbox + strconv.FormatUint(d.DeliveryTag, 10),
		Data:    data,
		Header: nats.Header{
			jetstream.MsgIDHeader:          []string{ev.ID},
			jetstream.ExpectedStreamHeader: b.streamHeader,
		},
	}
	// The acker learns of the publish before its reply can come.
	b.m.inFlight.Inc()
	s.pending <- inflight{tag: d.DeliveryTag, how: settlePublished, id: ev.ID, typ: ev.Type, since: ev.Time, recv: received}
	if err := b.nc.PublishMsg(msg); err != nil {
		b.m.publishErrors.Inc()
		b.publishFailed(err, ev.ID, ev.Type)
		s.pending <- inflight{tag: d.DeliveryTag, how: settlePublishFailed, id: ev.ID}
	}
	return true
}

// streamReachable records a PubAck as proof that the stream is reachable.
func (b *Bridge) streamReachable() {
	if b.streamDown.Load() {
		b.setStreamErr(nil)
	}
}

// reject counts and logs a body that is not a notification, and has the
// acker ack it, or nack it without requeue when a dead-letter exchange is
// configured.
func (b *Bridge) reject(s *session, d *amqp.Delivery, r *event.RejectError) {
	b.m.rejectedCounter(r.Reason).Inc()
	b.log.Warn("rejected AMQP message: not a Keystone notification",
		"reason", string(r.Reason), "message_id", r.MessageID, "amqp_message_id", d.MessageId,
		"redelivered", d.Redelivered, "body_bytes", len(d.Body), "err", r.Err)
	how := settleAck
	if b.o.DeadLetterExchange != "" {
		how = settleDeadLetter
	}
	s.pending <- inflight{tag: d.DeliveryTag, how: how, id: r.MessageID}
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
