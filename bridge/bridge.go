// Package bridge moves Keystone's notifications from RabbitMQ to JetStream.
//
// A Bridge consumes its own durable queue bound to Keystone's exchange,
// decodes and normalises each notification (internal/event), publishes the
// event to a JetStream stream with Nats-Msg-Id = the oslo message_id, and acks
// the AMQP delivery only after that publish's own PubAck. Harmless event types
// are acked and counted; bodies that are not notifications are counted by
// reason, logged and acked (or dead-lettered). A failed publish nacks and
// requeues its delivery. Acks are batched (one multiple ack covers a run of
// deliveries that are all stored or filtered, never one still in flight or
// one that failed; see acker). Connections are re-established forever, with a
// capped exponential back-off. Several bridges may share one queue: the
// stream drops the duplicates.
package bridge

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/backoff"
	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
)

// Bridge is one bridge replica. Create it with New and run it with Run.
type Bridge struct {
	o      Options
	nc     *nats.Conn
	js     jetstream.JetStream
	filter *event.Filter
	tls    *tls.Config
	m      *metrics
	log    *slog.Logger

	started    atomic.Bool
	consuming  atomic.Bool
	streamDown atomic.Bool // streamErr != nil
	consumed   bool        // a session consumed before: the next one is a reconnect
	gate       publishGate
	// recheck asks checkStreamPeriodically for a check now: a publish found
	// no stream.
	recheck chan struct{}
	// streamHeader is the Nats-Expected-Stream header value of every
	// publish, and subjects the subjects of the known event types
	// (read-only).
	streamHeader []string
	subjects     map[string]string

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
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("bridge: JetStream context: %w", err)
	}
	filter, err := event.NewFilter(o.Filter)
	if err != nil {
		return nil, fmt.Errorf("--filter: %w", err)
	}
	tlsConf, err := o.TLS.config()
	if err != nil {
		return nil, err
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	b := &Bridge{o: o, nc: nc, js: js, filter: filter, tls: tlsConf, m: m, log: log,
		amqpErr: errors.New("not connected to RabbitMQ yet"), recheck: make(chan struct{}, 1),
		streamHeader: []string{o.Stream.Name}, subjects: make(map[string]string)}
	for _, t := range event.KnownTypes() {
		e := event.Event{Kind: event.KindNotification, Type: t}
		b.subjects[t] = e.Subject(o.Stream.SubjectPrefix)
	}
	b.setStreamErr(errors.New("stream not checked yet"))
	b.gate.init(o.ReconnectMin, min(o.ReconnectMax, 5*time.Second), nc)
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

func (b *Bridge) setAMQPErr(err error) {
	b.mu.Lock()
	b.amqpErr = err
	b.mu.Unlock()
}

func (b *Bridge) setStreamErr(err error) {
	b.mu.Lock()
	b.streamErr = err
	b.streamDown.Store(err != nil)
	b.mu.Unlock()
}

// Run ensures the stream, then consumes and publishes until ctx ends,
// reconnecting to RabbitMQ as long as it takes. When ctx ends it stops
// consuming, waits up to ShutdownTimeout for in-flight publishes to be
// acknowledged, closes the AMQP connection and returns nil. Run may be called
// once.
func (b *Bridge) Run(ctx context.Context) error {
	if !b.started.CompareAndSwap(false, true) {
		return errors.New("bridge: Run called twice")
	}
	b.log.Info("bridge starting", "amqp_urls", redactedURLs(b.o.AMQPURLs), "exchange", b.o.Exchange,
		"routing_keys", b.o.RoutingKeys, "queue", b.o.Queue, "queue_type", b.o.QueueType,
		"stream", b.o.Stream.Name, "subject_prefix", b.o.Stream.SubjectPrefix)

	var wg sync.WaitGroup
	watchCtx, stopWatch := context.WithCancel(context.Background())
	defer func() { stopWatch(); wg.Wait() }()

	// Without the stream, publishes cannot succeed: ensure it before consuming.
	retry := backoff.New(b.o.ReconnectMin, b.o.ReconnectMax)
	for {
		err := b.ensureStream(ctx)
		if err == nil {
			break
		}
		d := retry.Next()
		b.setAMQPErr(fmt.Errorf("not started: waiting for JetStream stream %s: %w", b.o.Stream.Name, err))
		b.log.Error("JetStream stream not available, retrying", "stream", b.o.Stream.Name, "err", err, "retry_in", d)
		if !backoff.Sleep(ctx, d) {
			return nil
		}
	}

	statusCh := b.nc.StatusChanged(nats.CONNECTED)
	wg.Add(2)
	go func() { defer wg.Done(); b.watchNATS(watchCtx, statusCh) }()
	go func() { defer wg.Done(); b.checkStreamPeriodically(watchCtx) }()
	defer b.nc.RemoveStatusListener(statusCh)

	retry = backoff.New(b.o.ReconnectMin, b.o.ReconnectMax)
	next := 0 // index of the next URL to try
	for {
		// One round: every URL in turn, starting after the last one used.
		var lastErr error
		for i := 0; i < len(b.o.AMQPURLs) && ctx.Err() == nil; i++ {
			idx := (next + i) % len(b.o.AMQPURLs)
			url := b.o.AMQPURLs[idx]
			began := time.Now()
			consumed, err := b.session(ctx, url)
			if consumed {
				if time.Since(began) >= stableSession {
					retry.Reset() // a session that dies at once keeps backing off
				}
				next = idx + 1
				lastErr = err
				break // start a new round after a working session ended
			}
			lastErr = err
			if ctx.Err() == nil {
				b.log.Warn("RabbitMQ connection failed", "url", redactedURLs([]string{url})[0], "err", err)
			}
		}
		if ctx.Err() != nil {
			b.log.Info("bridge stopped")
			return nil
		}
		b.setAMQPErr(lastErr)
		d := retry.Next()
		b.log.Info("reconnecting to RabbitMQ", "retry_in", d, "err", lastErr)
		if !backoff.Sleep(ctx, d) {
			b.log.Info("bridge stopped")
			return nil
		}
	}
}

// stableSession is how long a session must have lasted for the reconnect
// back-off to start again from ReconnectMin.
const stableSession = 10 * time.Second

// ensureStream runs EnsureStream bounded by ConnectTimeout and records the
// outcome for Ready.
func (b *Bridge) ensureStream(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, b.o.ConnectTimeout)
	defer cancel()
	err := EnsureStream(ctx, b.js, b.o.Stream)
	b.setStreamErr(err)
	return err
}

// watchNATS counts NATS reconnects and re-checks the stream after each.
func (b *Bridge) watchNATS(ctx context.Context, ch <-chan nats.Status) {
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-ch:
			if !ok {
				return
			}
			b.m.reconnects.WithLabelValues(sideNATS).Inc()
			b.log.Info("NATS reconnected", "url", b.nc.ConnectedUrlRedacted())
			b.checkStream(ctx)
		}
	}
}

func (b *Bridge) checkStreamPeriodically(ctx context.Context) {
	t := time.NewTicker(b.o.StreamCheckPeriod)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			b.checkStream(ctx)
		case <-b.recheck:
			b.checkStream(ctx)
		}
	}
}

// publishFailed records a failed publish of the event id: it closes the
// publish gate for a back-off, asks for a stream check when no stream
// answered, and logs, at Warn for the first failure of a streak and at Debug
// for the others (publish_errors_total counts them all).
func (b *Bridge) publishFailed(err error, id, eventType string) {
	first := b.gate.fail()
	if errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) {
		select {
		case b.recheck <- struct{}{}:
		default:
		}
	}
	level := slog.LevelDebug
	if first {
		level = slog.LevelWarn
	}
	b.log.Log(context.Background(), level, "publish to JetStream failed; requeueing the notification (further failures until one succeeds are logged at debug level)",
		"message_id", id, "event_type", eventType, "err", err)
}

// checkStream looks the stream up and re-creates it when it vanished (a new
// NATS server without the old data, or an operator deleted it).
func (b *Bridge) checkStream(ctx context.Context) {
	cctx, cancel := context.WithTimeout(ctx, b.o.ConnectTimeout)
	defer cancel()
	_, err := b.js.Stream(cctx, b.o.Stream.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		b.log.Warn("JetStream stream vanished, creating it again", "stream", b.o.Stream.Name)
		err = EnsureStream(cctx, b.js, b.o.Stream)
	}
	if err != nil && ctx.Err() == nil {
		b.log.Warn("JetStream stream check failed", "stream", b.o.Stream.Name, "err", err)
	}
	if ctx.Err() == nil {
		b.setStreamErr(err)
	}
}

// consumerTag names this process's consumer, for rabbitmqctl list_consumers.
func consumerTag(name string) string {
	host, _ := os.Hostname()
	return name + "-" + host + "-" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatUint(rand.Uint64()%1e9, 10)
}

// publishGate slows publishing down after publish errors, so that a NATS
// outage does not turn into a hot loop of publish, nack, redeliver: after an
// error, the next publish waits for a back-off and for the NATS connection to
// be up. A success opens the gate again.
type publishGate struct {
	failing  atomic.Bool // failures > 0, read without the lock
	mu       sync.Mutex
	failures int
	notUntil time.Time
	lo, hi   time.Duration
	nc       *nats.Conn
}

func (g *publishGate) init(lo, hi time.Duration, nc *nats.Conn) {
	g.lo, g.hi, g.nc = lo, max(hi, lo), nc
}

// fail records a failure and reports whether it is the first of a streak.
func (g *publishGate) fail() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.failures++
	g.failing.Store(true)
	d := g.lo << min(g.failures-1, 16)
	if d > g.hi || d <= 0 {
		d = g.hi
	}
	if until := time.Now().Add(d); until.After(g.notUntil) {
		g.notUntil = until
	}
	return g.failures == 1
}

func (g *publishGate) success() {
	if !g.failing.Load() {
		return
	}
	g.mu.Lock()
	g.failures = 0
	g.failing.Store(false)
	g.mu.Unlock()
}

// wait returns once publishing may go on, or false when ctx or stop ends first.
func (g *publishGate) wait(ctx context.Context, stop <-chan struct{}) bool {
	if !g.failing.Load() {
		return true
	}
	for {
		g.mu.Lock()
		failures, until := g.failures, g.notUntil
		g.mu.Unlock()
		if failures == 0 {
			return true
		}
		d := time.Until(until)
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
		if d := time.Until(until); d <= 0 && g.nc.IsConnected() {
			return true
		}
	}
}
