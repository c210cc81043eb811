package bridge

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// fakeBroker is an AMQP channel that settles deliveries as RabbitMQ does
// (an ack with multiple=true settles every unsettled delivery up to its tag;
// settling an unknown tag closes the channel) and fails the test when a
// delivery is acked before it is known to be safe.
type fakeBroker struct {
	t           *testing.T
	mu          sync.Mutex
	outstanding map[uint64]bool
	safe        map[uint64]bool // may be acked: PubAck received, filtered or rejected
	acked       map[uint64]int
	nacked      map[uint64]int
	requeued    map[uint64]bool
	ackFrames   int
}

func newFakeBroker(t *testing.T, n int) *fakeBroker {
	f := &fakeBroker{t: t, outstanding: map[uint64]bool{}, safe: map[uint64]bool{},
		acked: map[uint64]int{}, nacked: map[uint64]int{}, requeued: map[uint64]bool{}}
	for tag := uint64(1); tag <= uint64(n); tag++ {
		f.outstanding[tag] = true
	}
	return f
}

func (f *fakeBroker) markSafe(tag uint64) {
	f.mu.Lock()
	f.safe[tag] = true
	f.mu.Unlock()
}

func (f *fakeBroker) Ack(tag uint64, multiple bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ackFrames++
	if !f.outstanding[tag] {
		f.t.Errorf("ack of unknown delivery tag %d (multiple=%v): RabbitMQ would close the channel", tag, multiple)
		return errors.New("PRECONDITION_FAILED - unknown delivery tag")
	}
	tags := []uint64{tag}
	if multiple {
		tags = tags[:0]
		for t := range f.outstanding {
			if t <= tag {
				tags = append(tags, t)
			}
		}
	}
	for _, t := range tags {
		if !f.safe[t] {
			f.t.Errorf("delivery %d acked (ack %d, multiple=%v) before its PubAck, or after a failure", t, tag, multiple)
		}
		delete(f.outstanding, t)
		f.acked[t]++
	}
	return nil
}

func (f *fakeBroker) Nack(tag uint64, multiple, requeue bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if multiple {
		f.t.Errorf("nack %d with multiple=true", tag)
	}
	if !f.outstanding[tag] {
		f.t.Errorf("nack of unknown delivery tag %d: RabbitMQ would close the channel", tag)
		return errors.New("PRECONDITION_FAILED - unknown delivery tag")
	}
	delete(f.outstanding, tag)
	f.nacked[tag]++
	f.requeued[tag] = requeue
	return nil
}

func (f *fakeBroker) settled() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.acked) + len(f.nacked)
}

// outcome is what happens to one delivery in a settler test.
type outcome int

const (
	stored          outcome = iota
	storedDuplicate         // the stream already held it
	streamError             // the stream replied with an error
	noResponders            // no stream listens on the subject
	timedOut                // no reply within PubAckTimeout
	disconnected            // the NATS connection was lost before the reply
	notSent                 // the NATS client could not send the publish
	filtered
	rejectedAcked
	rejectedDeadLettered
	requeued // the event could not be encoded
)

func (o outcome) acked() bool {
	return o == stored || o == storedDuplicate || o == filtered || o == rejectedAcked
}

func (o outcome) publishFailed() bool {
	return o == streamError || o == noResponders || o == timedOut || o == disconnected || o == notSent
}

// fakeFuture is a publish's future that the test resolves.
type fakeFuture struct {
	ok  chan *jetstream.PubAck
	err chan error
}

func newFakeFuture() *fakeFuture {
	return &fakeFuture{ok: make(chan *jetstream.PubAck, 1), err: make(chan error, 1)}
}

func (f *fakeFuture) Ok() <-chan *jetstream.PubAck { return f.ok }
func (f *fakeFuture) Err() <-chan error            { return f.err }
func (f *fakeFuture) Msg() *nats.Msg               { return nil }

// resolve ends the publish of delivery tag as outcome o has it.
func (f *fakeFuture) resolve(tag uint64, o outcome) {
	switch o {
	case stored:
		f.ok <- &jetstream.PubAck{Stream: "S", Sequence: tag}
	case storedDuplicate:
		f.ok <- &jetstream.PubAck{Stream: "S", Sequence: tag, Duplicate: true}
	case streamError:
		f.err <- &jetstream.APIError{Code: 400, ErrorCode: 10060, Description: "expected stream does not match"}
	case noResponders:
		f.err <- jetstream.ErrNoStreamResponse
	case timedOut:
		f.err <- jetstream.ErrAsyncPublishTimeout
	case disconnected:
		f.err <- nats.ErrDisconnected
	}
}

// pendingFor is the delivery tag as the bridge hands it to the settler when
// its outcome is o, and its future when it was published.
func pendingFor(tag uint64, o outcome) (*pending, *fakeFuture) {
	p := &pending{tag: tag, id: fmt.Sprint(tag), typ: "identity.user.updated", since: time.Now(), recv: time.Now()}
	switch o {
	case filtered, rejectedAcked:
	case rejectedDeadLettered:
		p.how = deadLetter
	case requeued:
		p.how = requeue
	case notSent:
		p.err = nats.ErrConnectionClosed
	default:
		f := newFakeFuture()
		p.future = f
		return p, f
	}
	return p, nil
}

// settlerBridge is a Bridge with what the settler's callbacks use.
func settlerBridge(t *testing.T) *Bridge {
	m, err := newMetrics(prometheus.NewRegistry(), func() float64 { return 0 })
	if err != nil {
		t.Fatal(err)
	}
	return &Bridge{m: m, log: slog.New(slog.DiscardHandler), gate: publishGate{lo: time.Millisecond, hi: time.Millisecond}}
}

// runSettler hands the deliveries to a settler in delivery order, as the
// bridge does, and has the stream end each publish from another goroutine,
// in an order of its own, with at most window publishes outstanding; then it
// checks that every delivery was settled once, as its outcome requires.
func runSettler(t *testing.T, rng *rand.Rand, outcomes []outcome, prefetch, window int) *fakeBroker {
	t.Helper()
	b := settlerBridge(t)
	broker := newFakeBroker(t, len(outcomes))
	s := newSettler(broker, prefetch, b.published, b.ackFailed)
	go s.run()

	replies := make(chan func(), window)
	replierDone := make(chan struct{})
	replierRng := rand.New(rand.NewPCG(rng.Uint64(), 7))
	slots := make(chan struct{}, window) // the library's bound on outstanding publishes
	go func() {
		defer close(replierDone)
		var waiting []func()
		sendOne := func() {
			i := replierRng.IntN(len(waiting))
			waiting[i]()
			waiting = append(waiting[:i], waiting[i+1:]...)
			<-slots
		}
		for {
			select {
			case r, ok := <-replies:
				if !ok {
					for len(waiting) > 0 {
						sendOne()
					}
					return
				}
				waiting = append(waiting, r)
				if replierRng.IntN(4) == 0 {
					sendOne()
				}
			default:
				if len(waiting) == 0 {
					r, ok := <-replies
					if !ok {
						return
					}
					waiting = append(waiting, r)
					continue
				}
				sendOne()
				runtime.Gosched()
			}
		}
	}()

	for i, o := range outcomes {
		tag := uint64(i + 1)
		p, f := pendingFor(tag, o)
		if o == filtered || o == rejectedAcked {
			broker.markSafe(tag)
		}
		if f != nil {
			slots <- struct{}{}
			replies <- func() {
				if o == stored || o == storedDuplicate {
					broker.markSafe(tag) // the PubAck is in: the delivery may be acked
				}
				f.resolve(tag, o)
			}
		}
		s.add(p)
	}
	close(replies)
	<-replierDone
	if !s.close(30 * time.Second) {
		t.Fatal("the settler did not finish within 30s of the last delivery")
	}

	want := map[outcome]int{}
	failed := 0
	for i, o := range outcomes {
		want[o]++
		if o.publishFailed() {
			failed++
		}
		tag := uint64(i + 1)
		acked, nacked := broker.acked[tag], broker.nacked[tag]
		switch {
		case o.acked() && (acked != 1 || nacked != 0):
			t.Errorf("delivery %d (outcome %d): acked %d times, nacked %d times; want acked once", tag, o, acked, nacked)
		case !o.acked() && (acked != 0 || nacked != 1):
			t.Errorf("delivery %d (outcome %d): acked %d times, nacked %d times; want nacked once", tag, o, acked, nacked)
		case !o.acked() && broker.requeued[tag] != (o != rejectedDeadLettered):
			t.Errorf("delivery %d (outcome %d): requeue=%v", tag, o, broker.requeued[tag])
		}
	}
	if len(broker.outstanding) != 0 {
		t.Errorf("%d deliveries left unsettled", len(broker.outstanding))
	}
	if got := promtest.ToFloat64(b.m.published); got != float64(want[stored]) {
		t.Errorf("published_total = %v, want %d", got, want[stored])
	}
	if got := promtest.ToFloat64(b.m.duplicates); got != float64(want[storedDuplicate]) {
		t.Errorf("duplicates_total = %v, want %d", got, want[storedDuplicate])
	}
	if got := promtest.ToFloat64(b.m.publishErrors); got != float64(failed) {
		t.Errorf("publish_errors_total = %v, want %d", got, failed)
	}
	return broker
}

func TestSettlerSettlesEveryDeliveryOnceAndNeverEarly(t *testing.T) {
	tests := []struct {
		name     string
		n        int
		prefetch int
		window   int
		mix      []outcome // drawn from uniformly
	}{
		{"all stored", 3000, 256, 256, []outcome{stored}},
		{"stored and duplicates", 3000, 256, 256, []outcome{stored, stored, storedDuplicate}},
		{"mixed outcomes", 3000, 256, 256,
			[]outcome{stored, stored, stored, stored, storedDuplicate, streamError, noResponders, notSent, filtered,
				rejectedAcked, rejectedDeadLettered, requeued, disconnected}},
		{"mostly failures", 1000, 256, 64, []outcome{streamError, noResponders, notSent, requeued, stored}},
		{"replies never come", 300, 256, 64, []outcome{timedOut}},
		{"time-outs and local outcomes", 300, 256, 64, []outcome{timedOut, notSent, filtered, rejectedDeadLettered, requeued}},
		{"prefetch 1, window 1", 500, 1, 1, []outcome{stored, filtered, streamError}},
		{"small prefetch and window", 2000, 8, 4, []outcome{stored, stored, filtered, noResponders}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for seed := range uint64(5) {
				rng := rand.New(rand.NewPCG(seed, 42))
				outcomes := make([]outcome, tt.n)
				for i := range outcomes {
					outcomes[i] = tt.mix[rng.IntN(len(tt.mix))]
				}
				runSettler(t, rng, outcomes, tt.prefetch, tt.window)
				if t.Failed() {
					t.Fatalf("seed %d", seed)
				}
			}
		})
	}
}

// Deliveries already resolved are acked with few frames: at most one per
// quarter of the prefetch count, plus the last.
func TestSettlerAcksManyDeliveriesPerFrame(t *testing.T) {
	const n, prefetch = 2048, 256
	b := settlerBridge(t)
	broker := newFakeBroker(t, n)
	s := newSettler(broker, prefetch, b.published, b.ackFailed)
	s.queue = make(chan *pending, n) // all handed over before the settler runs
	for tag := uint64(1); tag <= n; tag++ {
		broker.markSafe(tag)
		p, f := pendingFor(tag, stored)
		f.resolve(tag, stored)
		s.add(p)
	}
	go s.run()
	if !s.close(10 * time.Second) {
		t.Fatal("the settler did not finish")
	}
	if len(broker.outstanding) != 0 {
		t.Fatalf("%d deliveries left unacked", len(broker.outstanding))
	}
	if maxFrames := n / 8; broker.ackFrames > maxFrames {
		t.Fatalf("%d ack frames for %d deliveries, want at most %d", broker.ackFrames, n, maxFrames)
	}
}

// A lost NATS connection loses the PubAcks too: the jetstream package fails
// the publishes awaiting theirs, and their deliveries are nacked and
// requeued at once, not after PubAckTimeout.
func TestSettlerRequeuesPublishesWhenNATSIsLost(t *testing.T) {
	const n = 20
	env := startNATS(t)
	sc := stream.Config{Name: "LOST_" + testutil.NameSuffix(), SubjectPrefix: "lost"}
	if err := stream.Ensure(context.Background(), env.checkJ, sc); err != nil {
		t.Fatal(err)
	}
	// A subscriber that never answers holds the second half's PubAcks.
	if _, err := env.check.Subscribe("held.>", func(*nats.Msg) {}); err != nil {
		t.Fatal(err)
	}
	if err := env.check.Flush(); err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(env.nc, jetstream.WithPublishAsyncTimeout(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	b := settlerBridge(t)
	broker := newFakeBroker(t, n)
	s := newSettler(broker, 256, b.published, b.ackFailed)
	go s.run()
	for tag := uint64(1); tag <= n; tag++ {
		subject := "lost.notification.identity.user.updated"
		if tag > n/2 {
			subject = "held.x"
		} else {
			broker.markSafe(tag)
		}
		f, err := js.PublishMsgAsync(&nats.Msg{Subject: subject, Data: []byte("{}"),
			Header: nats.Header{jetstream.MsgIDHeader: []string{fmt.Sprint(tag)}}})
		if err != nil {
			t.Fatal(err)
		}
		s.add(&pending{tag: tag, future: f, since: time.Now(), recv: time.Now()})
	}
	testutil.Eventually(t, 10*time.Second, "the first half acked", func() (bool, string) {
		return broker.settled() == n/2, fmt.Sprintf("%d settled", broker.settled())
	})
	env.srv.Shutdown()
	testutil.Eventually(t, 10*time.Second, "the second half nacked", func() (bool, string) {
		return broker.settled() == n, fmt.Sprintf("%d settled", broker.settled())
	})
	s.close(time.Second)
	for tag := uint64(n/2 + 1); tag <= n; tag++ {
		if broker.nacked[tag] != 1 || !broker.requeued[tag] {
			t.Errorf("delivery %d: nacked %d times, requeue %v; want nacked once, requeued", tag, broker.nacked[tag], broker.requeued[tag])
		}
	}
	if got := promtest.ToFloat64(b.m.publishErrors); got != n/2 {
		t.Errorf("publish_errors_total = %v, want %d", got, n/2)
	}
}
