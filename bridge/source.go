package bridge

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strconv"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/keystone-fanout/keystone-fanout/internal/tlsconf"
)

// closeTimeout bounds the AMQP close handshake.
const closeTimeout = 2 * time.Second

// source is the bridge's queue on one RabbitMQ broker. Connect declares the
// exchange, the queue and its bindings and starts consuming; Deliveries are
// the queue's messages in delivery-tag order; Lost is closed when the
// connection, the channel or the consumer ends, and Err then says why; Close
// closes the connection, and RabbitMQ requeues what was not acked.
type source struct {
	o   *Options
	url string
	tls *tlsconf.Reloader
	log *slog.Logger

	conn       *amqp.Connection
	ch         *amqp.Channel // the consumer's
	tag        string        // the consumer tag
	deliveries <-chan amqp.Delivery
	lost       chan struct{}
	err        error // why lost was closed
}

// Connect connects and starts consuming, within ConnectTimeout.
func (s *source) Connect(ctx context.Context) error {
	props := amqp.NewConnectionProperties()
	props["connection_name"] = s.o.ConnectionName
	props["product"] = "keystone-fanout"
	cfg := amqp.Config{Heartbeat: s.o.Heartbeat, Dial: amqp.DefaultDial(s.o.ConnectTimeout), Properties: props}
	if s.tls != nil {
		// A new one per dial: the files on disk now. amqp091 sets its
		// ServerName to the URL's host when --amqp-tls-server-name is empty.
		cfg.TLSClientConfig = s.tls.Config("")
	}
	conn, err := amqp.DialConfig(s.url, cfg)
	if err != nil {
		if s.tls != nil {
			err = tlsconf.Explain(err, s.o.TLS.files(), amqpFlags)
		}
		return fmt.Errorf("connecting: %w", err)
	}
	s.conn = conn
	// Bound the whole set-up: closing the connection unblocks any call.
	cctx, cancel := context.WithTimeout(ctx, s.o.ConnectTimeout)
	defer cancel()
	abort := context.AfterFunc(cctx, func() { _ = conn.CloseDeadline(time.Now().Add(closeTimeout)) })
	err = s.setup()
	if !abort() {
		return fmt.Errorf("set-up did not finish within --amqp-connect-timeout %s (last error: %v)", s.o.ConnectTimeout, err)
	}
	if err != nil {
		_ = s.Close(ctx)
		return err
	}
	s.lost = make(chan struct{})
	go s.watch(conn.NotifyClose(make(chan *amqp.Error, 1)), s.ch.NotifyClose(make(chan *amqp.Error, 1)),
		s.ch.NotifyCancel(make(chan string, 1)))
	return nil
}

// Deliveries are the queue's messages, in order; the channel is closed with
// the AMQP channel.
func (s *source) Deliveries() <-chan amqp.Delivery { return s.deliveries }

// Lost is closed when the connection, the channel or the consumer ended.
func (s *source) Lost() <-chan struct{} { return s.lost }

// Err says why Lost was closed.
func (s *source) Err() error {
	select {
	case <-s.lost:
		return s.err
	default:
		return nil
	}
}

// Close closes the connection, within closeTimeout or ctx's deadline.
func (s *source) Close(ctx context.Context) error {
	deadline := time.Now().Add(closeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	return s.conn.CloseDeadline(deadline)
}

func isPreconditionFailed(err error) bool {
	var ae *amqp.Error
	return errors.As(err, &ae) && ae.Code == amqp.PreconditionFailed
}

// setup declares the exchange, the queue and its bindings, and starts
// consuming. A declaration that fails with PRECONDITION_FAILED (the object
// exists with other settings) closes the channel: the object is then checked
// passively on a new channel and used as it is.
func (s *source) setup() error {
	o := s.o
	ch, err := s.conn.Channel()
	if err != nil {
		return fmt.Errorf("opening a channel: %w", err)
	}
	// oslo.messaging's own declaration: topic, durable=false, auto_delete=false.
	err = ch.ExchangeDeclare(o.Exchange, amqp.ExchangeTopic, false, false, false, false, nil)
	if isPreconditionFailed(err) {
		s.log.Warn("exchange exists with other flags than oslo.messaging's; using it as it is", "exchange", o.Exchange, "err", err)
		if ch, err = s.conn.Channel(); err != nil {
			return fmt.Errorf("opening a channel: %w", err)
		}
		err = ch.ExchangeDeclarePassive(o.Exchange, amqp.ExchangeTopic, false, false, false, false, nil)
	}
	if err != nil {
		return fmt.Errorf("declaring exchange %q: %w", o.Exchange, err)
	}
	args := amqp.Table{"x-message-ttl": o.QueueMessageTTL.Milliseconds()}
	if o.QueueType == QueueQuorum {
		args["x-queue-type"] = QueueQuorum
	}
	if o.DeadLetterExchange != "" {
		args["x-dead-letter-exchange"] = o.DeadLetterExchange
	}
	_, err = ch.QueueDeclare(o.Queue, true, false, false, false, args)
	if isPreconditionFailed(err) {
		s.log.Error("queue exists with other settings than --queue-type/--queue-message-ttl/--dead-letter-exchange ask for; using it as it is. "+
			"To change it, stop every bridge, move or drain its messages and delete it (docs/OPERATIONS.md)",
			"queue", o.Queue, "queue_type", o.QueueType, "queue_message_ttl", o.QueueMessageTTL.String(),
			"dead_letter_exchange", o.DeadLetterExchange, "err", err)
		if ch, err = s.conn.Channel(); err != nil {
			return fmt.Errorf("opening a channel: %w", err)
		}
		_, err = ch.QueueDeclarePassive(o.Queue, true, false, false, false, nil)
	}
	if err != nil {
		return fmt.Errorf("declaring queue %q: %w", o.Queue, err)
	}
	for _, key := range o.RoutingKeys {
		if err := ch.QueueBind(o.Queue, key, o.Exchange, false, nil); err != nil {
			return fmt.Errorf("binding queue %q to exchange %q with key %q: %w", o.Queue, o.Exchange, key, err)
		}
	}
	if o.DeadLetterExchange != "" {
		s.checkDeadLetterExchange()
	}
	if err := ch.Qos(o.Prefetch, 0, false); err != nil {
		return fmt.Errorf("setting prefetch %d: %w", o.Prefetch, err)
	}
	host, _ := os.Hostname() // the tag names this process in rabbitmqctl list_consumers
	s.tag = o.ConnectionName + "-" + host + "-" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatUint(rand.Uint64()%1e9, 10)
	if s.deliveries, err = ch.Consume(o.Queue, s.tag, false, false, false, false, nil); err != nil {
		return fmt.Errorf("consuming from queue %q: %w", o.Queue, err)
	}
	s.ch = ch
	return nil
}

// checkDeadLetterExchange warns when the dead-letter exchange does not exist:
// RabbitMQ would drop the rejected messages.
func (s *source) checkDeadLetterExchange() {
	ch, err := s.conn.Channel()
	if err != nil {
		return
	}
	if err := ch.ExchangeDeclarePassive(s.o.DeadLetterExchange, amqp.ExchangeFanout, false, false, false, false, nil); err != nil {
		s.log.Warn("dead-letter exchange does not exist: RabbitMQ drops rejected messages until it is created",
			"dead_letter_exchange", s.o.DeadLetterExchange, "err", err)
		return
	}
	_ = ch.Close()
}

// watch closes s.lost when the connection or channel closes or the broker
// cancels the consumer, and keeps draining the notification channels until
// amqp091 closes them with the connection.
func (s *source) watch(connClosed, chClosed <-chan *amqp.Error, cancelled <-chan string) {
	reason := func(what string, e *amqp.Error, ok bool) error {
		if !ok || e == nil {
			return fmt.Errorf("%s closed", what)
		}
		return fmt.Errorf("%s closed: %w", what, e)
	}
	select {
	case e, ok := <-connClosed:
		s.err = reason("connection", e, ok)
	case e, ok := <-chClosed:
		s.err = reason("channel", e, ok)
	case tag, ok := <-cancelled:
		s.err = errors.New("channel closed")
		if ok {
			s.err = fmt.Errorf("RabbitMQ cancelled consumer %s (queue deleted or moved)", tag)
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
