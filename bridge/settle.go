package bridge

import (
	"bytes"
	"encoding/json"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// settlement says how the acker settles a delivery.
type settlement uint8

const (
	// settlePublished: the event is being published (the worker hands the
	// delivery over just before it publishes): ack after its PubAck (a
	// duplicate counts as stored); nack and requeue after an error reply,
	// or when no reply came within PubAckTimeout.
	settlePublished settlement = iota
	// settlePublishFailed: the publish of a delivery handed over as
	// settlePublished could not be sent: nack and requeue.
	settlePublishFailed
	// settleAck: ack at once (filtered, or rejected without a dead-letter
	// exchange).
	settleAck
	// settleDeadLetter: nack without requeue (rejected, with a dead-letter
	// exchange).
	settleDeadLetter
	// settleRequeue: nack and requeue (the event could not be encoded).
	settleRequeue
)

// inflight is one delivery handed to the acker.
type inflight struct {
	tag   uint64
	how   settlement
	id    string    // message id, for logs
	typ   string    // event type, for logs
	since time.Time // the event's time, for the latency histogram
	recv  time.Time // when the bridge received the delivery, likewise
}

// flushEvery is the fraction of the prefetch count that the acker acks as
// soon as it can, even when it need not wait: RabbitMQ stops delivering when
// Prefetch deliveries are unacknowledged.
const flushEvery = 4

// ackDelay is how long the acker, when it has nothing else to do, may keep
// fewer than a sixteenth of the prefetch count of acks to send them in one
// frame.
const ackDelay = time.Millisecond

// heldAckDelay bounds how long the acker keeps a delivery's ack while an
// earlier delivery is still being handled, hoping to ack both with one
// frame; after it, held acks are sent one by one.
const heldAckDelay = 20 * time.Millisecond

// busyCheck is how many events the acker handles, when it never has to
// wait, between checks of the publish timeouts and of held acks.
const busyCheck = 64

// acker settles every delivery of a session. Workers hand each delivery over
// (s.pending) with how to settle it; for a published event, the acker waits
// for the stream's reply on the session's reply subject (s.replies), for
// PubAckTimeout, or for the NATS connection to be lost (s.natsDown). It is the only goroutine that acks or nacks on the
// session's channel, so that acks and nacks go out in the order it decides.
//
// Nacks are sent at once, one delivery each. Acks are sent in as few frames
// as possible, at most ackDelay late: one ack with multiple=true
// covers the run of deliveries from the lowest unsettled delivery tag up to
// the highest tag whose delivery and every delivery before it are settled
// or to be acked. RabbitMQ's multiple ack acknowledges every unacknowledged
// delivery up to the tag; since every tag below it is known to be either
// already settled or to be acked, it never acknowledges a delivery that is
// still being published or whose publish failed (that one was nacked before).
// An ack that cannot join such a run (an earlier delivery is still being
// handled) is held for at most heldAckDelay, then sent on its own. So that
// RabbitMQ never runs out of prefetch while the acker is busy, it also acks
// as soon as a quarter of the prefetch count is to ack.
//
// The acker returns when s.pending is closed and every publish has its reply
// or timed out, after acking everything left to ack.
func (b *Bridge) acker(s *session, ch ackChannel, done chan<- struct{}) {
	defer close(done)
	a := acks{b: b, s: s, ch: ch, pending: s.pending, natsDown: s.natsDown, next: 1,
		state:     make(map[uint64]bool, b.o.Prefetch),
		published: make(map[uint64]publication, b.o.PublishWindow),
		flushAt:   max(1, b.o.Prefetch/flushEvery),
		batch:     max(1, b.o.Prefetch/(4*flushEvery)),
		timer:     time.NewTimer(time.Hour)}
	a.timer.Stop()
	busy := 0
	for a.pending != nil || len(a.published) > 0 {
		// Take what is there without waiting.
		select {
		case it, ok := <-a.pending:
			a.take(it, ok)
		case m := <-s.replies:
			a.reply(m)
		case _, ok := <-a.natsDown:
			a.disconnected(ok)
		default:
			a.wait()
			busy = 0
			continue
		}
		if a.held >= a.flushAt {
			a.flush()
		}
		if busy++; busy >= busyCheck {
			busy = 0
			now := time.Now()
			a.expire(now)
			a.flushDue(now, false)
		}
	}
	a.flush()
	a.ackHeld()
}

// wait sends the acks that are due, then waits for a delivery, a reply, a
// publish timeout or the time the next acks are due.
func (a *acks) wait() {
	now := time.Now()
	a.expire(now)
	a.flushDue(now, true)
	if a.pending == nil && len(a.published) == 0 {
		return
	}
	var wake time.Time
	if a.held > 0 {
		if wake = a.heldSince.Add(ackDelay); !wake.After(now) {
			// What is left waits for an earlier delivery.
			wake = a.heldSince.Add(heldAckDelay)
		}
	}
	if deadline, ok := a.oldestDeadline(); ok && (wake.IsZero() || deadline.Before(wake)) {
		wake = deadline
	}
	var fired <-chan time.Time
	if !wake.IsZero() {
		a.timer.Reset(wake.Sub(now))
		fired = a.timer.C
		defer a.timer.Stop()
	}
	select {
	case it, ok := <-a.pending:
		a.take(it, ok)
	case m := <-a.s.replies:
		a.reply(m)
	case _, ok := <-a.natsDown:
		a.disconnected(ok)
	case now := <-fired:
		a.expire(now)
		a.flushDue(now, true)
	}
}

// flushDue sends the acks that are due: any once the oldest has waited
// ackDelay, and before the acker waits, a sixteenth of the prefetch count;
// one by one those that waited heldAckDelay for an earlier delivery.
func (a *acks) flushDue(now time.Time, waiting bool) {
	if a.held == 0 {
		return
	}
	age := now.Sub(a.heldSince)
	if (waiting && a.held >= a.batch) || age >= ackDelay {
		a.flush()
	}
	if a.held > 0 && age >= heldAckDelay {
		a.ackHeld()
	}
}

// ackChannel is what the acker uses of the session's *amqp.Channel.
type ackChannel interface {
	Ack(tag uint64, multiple bool) error
	Nack(tag uint64, multiple, requeue bool) error
}

// publication is a published event awaiting its reply.
type publication struct {
	id, typ     string
	since, recv time.Time
	deadline    time.Time
}

// acks is the acker's state. Delivery tags are per channel, consecutive from
// 1, and every one reaches the acker unless its session ends first.
type acks struct {
	b       *Bridge
	s       *session
	ch      ackChannel
	pending <-chan inflight // nil once closed
	// natsDown reports the NATS connection's losses (nil once closed).
	natsDown <-chan nats.Status
	// next is the lowest delivery tag not known to be settled: every tag
	// below it is acked or nacked.
	next uint64
	// state holds the tags from next up that the acker knows: true = to
	// ack, false = settled already (nacked, or acked on its own).
	state     map[uint64]bool
	held      int       // how many tags of state are to ack
	heldSince time.Time // when the oldest of them became so (about)
	flushAt   int       // held count at which to flush without waiting
	batch     int       // held count at which to flush before waiting
	// published holds the publications awaiting their reply, by tag;
	// order lists their tags in the order they were handed over (and so of
	// their deadlines), from order[head].
	published map[uint64]publication
	order     []uint64
	head      int
	timer     *time.Timer
}

// take handles a delivery handed over by a worker; ok is false when
// s.pending is closed.
func (a *acks) take(it inflight, ok bool) {
	if !ok {
		a.pending = nil
		return
	}
	switch it.how {
	case settlePublished:
		a.published[it.tag] = publication{id: it.id, typ: it.typ, since: it.since, recv: it.recv,
			deadline: time.Now().Add(a.b.o.PubAckTimeout)}
		a.order = append(a.order, it.tag)
	case settlePublishFailed:
		// The worker counted and logged the failure.
		if _, ok := a.published[it.tag]; ok {
			delete(a.published, it.tag)
			a.b.m.inFlight.Dec()
			<-a.s.slots
		}
		a.nack(it.tag, true, it.id)
	case settleAck:
		a.toAck(it.tag)
	case settleDeadLetter:
		a.nack(it.tag, false, it.id)
	case settleRequeue:
		a.nack(it.tag, true, it.id)
	}
}

// disconnected fails every publication awaiting its reply when the NATS
// connection was lost (ok false: the status channel was closed): their
// replies are lost with it. Their deliveries are requeued, and the stream
// drops the duplicates of those it stored.
func (a *acks) disconnected(ok bool) {
	if !ok {
		a.natsDown = nil
		return
	}
	for _, tag := range a.order[a.head:] {
		if p, ok := a.published[tag]; ok {
			a.settle(tag, p, false, nats.ErrDisconnected)
		}
	}
	a.order, a.head = a.order[:0], 0
}

// reply handles a message on the session's reply subject: the stream's
// PubAck, or an error, for one publication.
func (a *acks) reply(m *nats.Msg) {
	inbox := a.s.inbox
	if len(m.Subject) <= len(inbox) || m.Subject[:len(inbox)] != inbox {
		return
	}
	tag, err := strconv.ParseUint(m.Subject[len(inbox):], 10, 64)
	if err != nil {
		return
	}
	p, ok := a.published[tag]
	if !ok {
		// Workers hand a delivery over before they publish it: if it is
		// not known yet, it is in s.pending.
		for !ok && a.pending != nil && len(a.pending) > 0 {
			it, open := <-a.pending
			a.take(it, open)
			p, ok = a.published[tag]
		}
		if !ok {
			return // it timed out before
		}
	}
	duplicate, err := pubAckResult(m)
	a.settle(tag, p, duplicate, err)
}

// settle settles the delivery of a publication that got its reply (err nil
// for a PubAck) or timed out.
func (a *acks) settle(tag uint64, p publication, duplicate bool, err error) {
	delete(a.published, tag)
	m := a.b.m
	m.inFlight.Dec()
	<-a.s.slots
	if err != nil {
		m.publishErrors.Inc()
		a.b.publishFailed(err, p.id, p.typ)
		a.nack(tag, true, p.id)
		return
	}
	if duplicate {
		m.duplicates.Inc()
		a.b.log.Debug("notification already in the stream, dropped as a duplicate", "message_id", p.id, "event_type", p.typ)
	} else {
		m.published.Inc()
		m.latency.WithLabelValues(latencyFromKeystone).Observe(time.Since(p.since).Seconds())
		m.latency.WithLabelValues(latencyFromReceipt).Observe(time.Since(p.recv).Seconds())
	}
	a.b.gate.success()
	a.b.streamReachable()
	a.toAck(tag)
}

// expire settles, as failed, the publications whose reply did not come by
// their deadline.
func (a *acks) expire(now time.Time) {
	for a.head < len(a.order) {
		tag := a.order[a.head]
		p, ok := a.published[tag]
		if ok && p.deadline.After(now) {
			break
		}
		a.head++
		if ok {
			a.settle(tag, p, false, jetstream.ErrAsyncPublishTimeout)
		}
	}
	if a.head > 0 && a.head >= len(a.order)/2 {
		a.order = a.order[:copy(a.order, a.order[a.head:])]
		a.head = 0
	}
}

// oldestDeadline is the deadline of the oldest publication awaiting its
// reply.
func (a *acks) oldestDeadline() (time.Time, bool) {
	for _, tag := range a.order[a.head:] {
		if p, ok := a.published[tag]; ok {
			return p.deadline, true
		}
	}
	return time.Time{}, false
}

// pubAckResult reads the stream's reply to a publish: whether the stream
// already held the message, or why it was not stored.
func pubAckResult(m *nats.Msg) (duplicate bool, err error) {
	if len(m.Data) == 0 {
		if m.Header.Get("Status") == "503" {
			return false, nats.ErrNoResponders // no stream holds the subject
		}
		return false, jetstream.ErrInvalidJSAck
	}
	// The PubAck JSON as nats-server writes it, {"stream":"NAME","seq":N}
	// with optional "domain" and "duplicate": true: a stream or domain name
	// holds no '"', so the quoted keys "error" and "duplicate" can only be
	// members.
	if bytes.HasPrefix(m.Data, []byte(`{"stream":"`)) && !bytes.Contains(m.Data, []byte(`"error"`)) {
		return isTrue(m.Data, `"duplicate"`), nil
	}
	var r struct {
		Error     *jetstream.APIError `json:"error"`
		Stream    string              `json:"stream"`
		Duplicate bool                `json:"duplicate"`
	}
	if err := json.Unmarshal(m.Data, &r); err != nil {
		return false, jetstream.ErrInvalidJSAck
	}
	if r.Error != nil {
		return false, r.Error
	}
	if r.Stream == "" {
		return false, jetstream.ErrInvalidJSAck
	}
	return r.Duplicate, nil
}

// isTrue reports whether the quoted key in the JSON object data is followed
// by the value true.
func isTrue(data []byte, key string) bool {
	i := bytes.Index(data, []byte(key))
	if i < 0 {
		return false
	}
	rest := bytes.TrimLeft(data[i+len(key):], " \t\r\n")
	if len(rest) == 0 || rest[0] != ':' {
		return false
	}
	return bytes.HasPrefix(bytes.TrimLeft(rest[1:], " \t\r\n"), []byte("true"))
}

// toAck records that the delivery is to be acked.
func (a *acks) toAck(tag uint64) {
	if tag < a.next {
		// Cannot happen (tags reach the acker once); ack it on its own.
		a.ack(tag, false, 1)
		return
	}
	a.state[tag] = true
	if a.held++; a.held == 1 {
		a.heldSince = time.Now()
	}
}

// nack sends a nack for one delivery at once.
func (a *acks) nack(tag uint64, requeue bool, id string) {
	if err := a.ch.Nack(tag, false, requeue); err != nil {
		a.b.m.ackErrors.Inc()
		a.b.log.Debug("nack failed; RabbitMQ will redeliver anyway", "message_id", id, "requeue", requeue, "err", err)
	}
	if tag >= a.next {
		a.state[tag] = false
	}
}

// flush moves next past the settled tags and acks, in one frame, those to
// ack among them.
func (a *acks) flush() {
	var last uint64
	n := 0
	for {
		toAck, known := a.state[a.next]
		if !known {
			break
		}
		delete(a.state, a.next)
		if toAck {
			last = a.next
			n++
		}
		a.next++
	}
	if n > 0 {
		a.held -= n
		a.ack(last, n > 1, n)
		if a.held > 0 {
			a.heldSince = time.Now() // those left wait for an earlier delivery
		}
	}
}

// ackHeld acks, one by one, the deliveries to ack that an unsettled earlier
// delivery keeps out of flush.
func (a *acks) ackHeld() {
	if a.held == 0 {
		return
	}
	for tag, toAck := range a.state {
		if toAck {
			a.ack(tag, false, 1)
			a.state[tag] = false
		}
	}
	a.held = 0
}

// ack sends one ack frame covering n deliveries.
func (a *acks) ack(tag uint64, multiple bool, n int) {
	if err := a.ch.Ack(tag, multiple); err != nil {
		a.b.m.ackErrors.Add(float64(n))
		a.b.log.Debug("ack failed; RabbitMQ will redeliver and the stream dedupe it",
			"delivery_tag", tag, "multiple", multiple, "deliveries", n, "err", err)
	}
}
