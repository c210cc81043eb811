package bridge

import (
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// settlement is how a delivery that was not published is settled.
type settlement uint8

const (
	ack        settlement = iota // filtered, or rejected without a dead-letter exchange
	requeue                      // the event could not be encoded
	deadLetter                   // rejected, with a dead-letter exchange: nack without requeue
)

// pending is one delivery awaiting its settlement.
type pending struct {
	tag    uint64
	future jetstream.PubAckFuture // the event's publish; nil when not published
	err    error                  // the publish could not be sent
	how    settlement             // when neither future nor err is set
	// For the logs and the latency of the publish: the event's id, type and
	// time, and when the delivery was received.
	id, typ     string
	since, recv time.Time
}

// ackChannel is what a settler uses of an AMQP channel.
type ackChannel interface {
	Ack(tag uint64, multiple bool) error
	Nack(tag uint64, multiple, requeue bool) error
}

// settler settles one channel's deliveries in the order they were added,
// which is delivery order. A published delivery waits for its publish's
// future: acked after the PubAck, nacked and requeued after an error or a
// time-out. A failure is nacked on its own, at once; acks are sent as one
// ack with multiple=true for the deliveries up to the last to ack, when the
// settler would otherwise wait, and at least once per quarter of the
// prefetch count. Since every delivery before the last to ack was settled
// before it, in order, such an ack never covers a delivery still in flight
// or one that failed. published is told each publish's outcome before its
// delivery is settled; ackFailed of acks or nacks the channel refused.
type settler struct {
	ch        ackChannel
	queue     chan *pending
	done      chan struct{}
	flushAt   int
	published func(p *pending, ack *jetstream.PubAck, err error)
	ackFailed func(n int, err error)
	last      uint64 // the highest delivery tag to ack
	toAck     int    // deliveries to ack up to last
}

// newSettler returns a settler of ch's deliveries, for run. RabbitMQ never
// has more than prefetch deliveries unacked: add never waits.
func newSettler(ch ackChannel, prefetch int, published func(*pending, *jetstream.PubAck, error), ackFailed func(int, error)) *settler {
	return &settler{ch: ch, queue: make(chan *pending, prefetch), done: make(chan struct{}),
		flushAt: max(1, prefetch/4), published: published, ackFailed: ackFailed}
}

// add hands the next delivery over.
func (s *settler) add(p *pending) { s.queue <- p }

// close says no delivery comes any more and waits up to wait until every
// delivery added is settled; it reports whether they are.
func (s *settler) close(wait time.Duration) bool {
	close(s.queue)
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-s.done:
		return true
	case <-t.C:
		return false
	}
}

// run settles the deliveries added until close.
func (s *settler) run() {
	defer close(s.done)
	for {
		var p *pending
		var open bool
		select {
		case p, open = <-s.queue:
		default:
			s.flush() // nothing more to settle now: send the acks
			p, open = <-s.queue
		}
		if !open {
			s.flush()
			return
		}
		ok := p.how == ack
		if p.future != nil || p.err != nil {
			pubAck, err := s.result(p)
			s.published(p, pubAck, err)
			ok = err == nil
		}
		if ok {
			s.last = p.tag
			if s.toAck++; s.toAck >= s.flushAt {
				s.flush()
			}
		} else if err := s.ch.Nack(p.tag, false, p.how != deadLetter); err != nil {
			s.ackFailed(1, err)
		}
	}
}

// result waits for p's publish to end, sending the acks due first when it
// has not.
func (s *settler) result(p *pending) (*jetstream.PubAck, error) {
	if p.future == nil {
		return nil, p.err
	}
	ok, failed := p.future.Ok(), p.future.Err()
	select {
	case a := <-ok:
		return a, nil
	case err := <-failed:
		return nil, err
	default:
		s.flush()
	}
	select {
	case a := <-ok:
		return a, nil
	case err := <-failed:
		return nil, err
	}
}

// flush acks the deliveries up to last.
func (s *settler) flush() {
	if s.toAck == 0 {
		return
	}
	if err := s.ch.Ack(s.last, s.toAck > 1); err != nil {
		s.ackFailed(s.toAck, err)
	}
	s.toAck = 0
}
