package bridge

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"runtime"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// fakeBroker is an AMQP channel that settles deliveries as RabbitMQ does
// (an ack with multiple=true settles every unsettled delivery up to its tag;
// settling an unknown tag closes the channel) and fails the test when a
// delivery is acked before the acker may know it is safe.
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

// outcome is what happens to one delivery in an acker test.
type outcome int

const (
	stored          outcome = iota
	storedDuplicate         // the stream already held it
	streamError             // the stream replied with an error
	noResponders            // no stream listens on the subject
	timedOut                // no reply within PubAckTimeout
	notSent                 // the NATS client could not send the publish
	filtered
	rejectedAcked
	rejectedDeadLettered
	requeued // the event could not be encoded
)

func (o outcome) settlement() settlement {
	switch o {
	case filtered, rejectedAcked:
		return settleAck
	case rejectedDeadLettered:
		return settleDeadLetter
	case requeued:
		return settleRequeue
	}
	return settlePublished
}

func (o outcome) publishFailed() bool {
	return o == streamError || o == noResponders || o == timedOut || o == notSent
}

const testInbox = "_INBOX.acker-test."

// replyTo is the stream's reply to the publish of delivery tag as outcome
// o has it, nil for none.
func replyTo(tag uint64, o outcome) *nats.Msg {
	m := &nats.Msg{Subject: testInbox + fmt.Sprint(tag), Header: nats.Header{}}
	switch o {
	case stored:
		m.Data = fmt.Appendf(nil, `{"stream":"S","seq":%d}`, tag)
	case storedDuplicate:
		m.Data = fmt.Appendf(nil, `{"stream":"S","seq":%d,"duplicate":true}`, tag)
	case streamError:
		m.Data = []byte(`{"error":{"code":400,"err_code":10060,"description":"expected stream does not match"}}`)
	case noResponders:
		m.Header.Set("Status", "503")
	default:
		return nil
	}
	return m
}

func (o outcome) acked() bool {
	return o == stored || o == storedDuplicate || o == filtered || o == rejectedAcked
}

// ackerBridge is a Bridge with what the acker uses.
// Publishes time out after a minute unless the test says otherwise (a
// reply is never that late here).
func ackerBridge(t *testing.T, prefetch, window int) *Bridge {
	m, err := newMetrics(prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	return &Bridge{o: Options{Prefetch: prefetch, PublishWindow: window, PubAckTimeout: time.Minute},
		m: m, log: slog.New(slog.DiscardHandler)}
}

func ackerSession(window int) *session {
	return &session{slots: make(chan struct{}, window), pending: make(chan inflight, window),
		inbox: testInbox, replies: make(chan *nats.Msg, 2*window+64)}
}

// runAcker hands the deliveries to an acker in the order given, as workers
// do, and has the stream reply to each publish from another goroutine, in
// an order of its own; then it checks that every delivery was settled once,
// as its outcome requires.
func runAcker(t *testing.T, rng *rand.Rand, outcomes []outcome, order []int, prefetch, window int) *fakeBroker {
	t.Helper()
	b := ackerBridge(t, prefetch, window)
	for _, o := range outcomes {
		if o == timedOut {
			// Only timeouts then: a short one cannot expire another publish.
			b.o.PubAckTimeout = 20 * time.Millisecond
		}
	}
	broker := newFakeBroker(t, len(outcomes))
	s := ackerSession(window)
	done := make(chan struct{})
	go b.acker(s, broker, done)

	// The stream's replies come in an order of their own, with noise: a
	// reply for a publish the acker never heard of, and one on another
	// subject.
	s.replies <- &nats.Msg{Subject: testInbox + "999999999", Data: []byte(`{"stream":"S","seq":1}`)}
	s.replies <- &nats.Msg{Subject: "_INBOX.other.1", Data: []byte(`{"stream":"S","seq":1}`)}
	replies := make(chan func(), len(outcomes))
	replierDone := make(chan struct{})
	replierRng := rand.New(rand.NewPCG(rng.Uint64(), 7))
	go func() {
		defer close(replierDone)
		var waiting []func()
		sendOne := func() {
			i := replierRng.IntN(len(waiting))
			waiting[i]()
			waiting = append(waiting[:i], waiting[i+1:]...)
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

	for _, i := range order {
		tag, o := uint64(i+1), outcomes[i]
		it := inflight{tag: tag, how: o.settlement(), id: fmt.Sprint(tag), since: time.Now()}
		switch o {
		case filtered, rejectedAcked:
			broker.markSafe(tag)
		}
		if it.how != settlePublished {
			s.pending <- it
			continue
		}
		// As handle does: a slot, the hand-over, then the publish.
		s.slots <- struct{}{}
		b.m.inFlight.Inc()
		s.pending <- it
		if o == notSent {
			s.pending <- inflight{tag: tag, how: settlePublishFailed, id: it.id}
			continue
		}
		if m := replyTo(tag, o); m != nil {
			replies <- func() {
				if o == stored || o == storedDuplicate {
					broker.markSafe(tag) // the PubAck is in: the delivery may be acked
				}
				s.replies <- m
			}
		}
	}
	close(replies)
	<-replierDone
	close(s.pending)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the acker did not finish within 30s of the last delivery")
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
	// The worker counts the publishes it could not send.
	if got := promtest.ToFloat64(b.m.publishErrors); got != float64(failed-want[notSent]) {
		t.Errorf("publish_errors_total = %v, want %d", got, failed-want[notSent])
	}
	if len(s.slots) != 0 {
		t.Errorf("%d publish slots not released", len(s.slots))
	}
	if got := promtest.ToFloat64(b.m.inFlight); got != 0 {
		t.Errorf("in_flight = %v, want 0", got)
	}
	return broker
}

// workerOrder is the order in which a few workers hand deliveries 0..n-1
// over: mostly ascending, with neighbours swapped.
func workerOrder(rng *rand.Rand, n, workers int) []int {
	order := make([]int, n)
	for i := range order {
		order[i] = i
	}
	for i := 0; i+1 < n; i++ {
		if rng.IntN(workers+1) > 0 {
			j := min(n-1, i+rng.IntN(workers))
			order[i], order[j] = order[j], order[i]
		}
	}
	return order
}

func TestAckerSettlesEveryDeliveryOnceAndNeverEarly(t *testing.T) {
	tests := []struct {
		name     string
		n        int
		workers  int
		prefetch int
		window   int
		mix      []outcome // drawn from uniformly
	}{
		{"all stored, in order", 3000, 1, 256, 256, []outcome{stored}},
		{"all stored, 2 workers", 3000, 2, 256, 256, []outcome{stored, stored, storedDuplicate}},
		{"mixed outcomes, 4 workers", 3000, 4, 256, 256,
			[]outcome{stored, stored, stored, stored, storedDuplicate, streamError, noResponders, notSent, filtered,
				rejectedAcked, rejectedDeadLettered, requeued}},
		{"mostly failures", 1000, 2, 256, 64, []outcome{streamError, noResponders, notSent, requeued, stored}},
		{"replies never come", 300, 2, 256, 64, []outcome{timedOut}},
		{"time-outs and local outcomes", 300, 2, 256, 64, []outcome{timedOut, notSent, filtered, rejectedDeadLettered, requeued}},
		{"prefetch 1, window 1", 500, 1, 1, 1, []outcome{stored, filtered, streamError}},
		{"small prefetch, many workers", 2000, 16, 8, 4, []outcome{stored, stored, filtered, noResponders}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for seed := range uint64(5) {
				rng := rand.New(rand.NewPCG(seed, 42))
				outcomes := make([]outcome, tt.n)
				for i := range outcomes {
					outcomes[i] = tt.mix[rng.IntN(len(tt.mix))]
				}
				runAcker(t, rng, outcomes, workerOrder(rng, tt.n, tt.workers), tt.prefetch, tt.window)
				if t.Failed() {
					t.Fatalf("seed %d", seed)
				}
			}
		})
	}
}

// Deliveries settled in order and already resolved are acked with few
// frames: at most one per quarter of the prefetch count, plus the last.
func TestAckerAcksManyDeliveriesPerFrame(t *testing.T) {
	const n, prefetch = 2048, 256
	b := ackerBridge(t, prefetch, n)
	broker := newFakeBroker(t, n)
	s := ackerSession(n)
	for tag := uint64(1); tag <= n; tag++ {
		broker.markSafe(tag)
		s.slots <- struct{}{}
		s.pending <- inflight{tag: tag, how: settlePublished, since: time.Now()}
	}
	close(s.pending)
	for tag := uint64(1); tag <= n; tag++ {
		s.replies <- replyTo(tag, stored)
	}
	done := make(chan struct{})
	b.acker(s, broker, done)
	if len(broker.outstanding) != 0 {
		t.Fatalf("%d deliveries left unacked", len(broker.outstanding))
	}
	// The acker never had to wait: a frame per quarter of the prefetch
	// count, or per busyCheck events when it is slow.
	if maxFrames := n / 8; broker.ackFrames > maxFrames {
		t.Fatalf("%d ack frames for %d deliveries, want at most %d", broker.ackFrames, n, maxFrames)
	}
}

// A delivery that never reaches the acker (its session ended while a worker
// held it) does not keep the later ones from being acked, one by one.
func TestAckerAcksPastAMissingDelivery(t *testing.T) {
	const n = 50
	b := ackerBridge(t, 256, 256)
	broker := newFakeBroker(t, n)
	s := ackerSession(n)
	done := make(chan struct{})
	go b.acker(s, broker, done)
	for tag := uint64(2); tag <= n; tag++ { // tag 1 never comes
		broker.markSafe(tag)
		s.pending <- inflight{tag: tag, how: settleAck}
	}
	// Held acks go out after heldAckDelay, without the session ending.
	testutil.Eventually(t, 10*time.Second, "deliveries 2-50 acked while delivery 1 is missing", func() (bool, string) {
		broker.mu.Lock()
		defer broker.mu.Unlock()
		return len(broker.outstanding) == 1 && broker.outstanding[1], fmt.Sprintf("outstanding %v", keys(broker.outstanding))
	})
	close(s.pending)
	<-done
	if broker.ackFrames != n-1 {
		t.Errorf("%d ack frames, want %d (each on its own)", broker.ackFrames, n-1)
	}
}

func keys(m map[uint64]bool) []uint64 {
	var k []uint64
	for t := range m {
		k = append(k, t)
	}
	sort.Slice(k, func(i, j int) bool { return k[i] < k[j] })
	if len(k) > 10 {
		k = k[:10]
	}
	return k
}

func TestPubAckResult(t *testing.T) {
	noResponders := &nats.Msg{Header: nats.Header{"Status": []string{"503"}}}
	tests := []struct {
		name      string
		msg       *nats.Msg
		duplicate bool
		err       error
	}{
		{"stored", &nats.Msg{Data: []byte(`{"stream":"KEYSTONE","seq":12}`)}, false, nil},
		{"stored in a domain", &nats.Msg{Data: []byte(`{"stream":"KEYSTONE","domain":"hub","seq":12}`)}, false, nil},
		{"duplicate, as nats-server writes it", &nats.Msg{Data: []byte(`{"stream":"KEYSTONE","seq":12,"duplicate": true}`)}, true, nil},
		{"duplicate, compact", &nats.Msg{Data: []byte(`{"stream":"KEYSTONE","seq":12,"duplicate":true}`)}, true, nil},
		{"duplicate false", &nats.Msg{Data: []byte(`{"stream":"KEYSTONE","seq":12,"duplicate":false}`)}, false, nil},
		{"other key order", &nats.Msg{Data: []byte(`{"seq":12, "stream":"KEYSTONE", "duplicate":true}`)}, true, nil},
		{"error", &nats.Msg{Data: []byte(`{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}`)}, false,
			&jetstream.APIError{Code: 503, ErrorCode: 10077}},
		{"error with stream", &nats.Msg{Data: []byte(`{"stream":"KEYSTONE","error":{"code":400,"err_code":10060,"description":"expected stream does not match"}}`)}, false,
			&jetstream.APIError{Code: 400, ErrorCode: 10060}},
		{"no responders", noResponders, false, nats.ErrNoResponders},
		{"empty", &nats.Msg{}, false, jetstream.ErrInvalidJSAck},
		{"not JSON", &nats.Msg{Data: []byte(`+OK`)}, false, jetstream.ErrInvalidJSAck},
		{"no stream", &nats.Msg{Data: []byte(`{"seq":1}`)}, false, jetstream.ErrInvalidJSAck},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dup, err := pubAckResult(tt.msg)
			if dup != tt.duplicate || !errors.Is(err, tt.err) && (err == nil || tt.err == nil || err.Error() != tt.err.Error()) {
				t.Fatalf("pubAckResult = %v, %v; want %v, %v", dup, err, tt.duplicate, tt.err)
			}
		})
	}
}

// A lost NATS connection loses the replies too: the publications awaiting
// theirs are nacked and requeued at once, not after PubAckTimeout.
func TestAckerRequeuesPublishesWhenNATSIsLost(t *testing.T) {
	const n = 20
	b := ackerBridge(t, 256, 256)
	broker := newFakeBroker(t, n)
	s := ackerSession(256)
	s.natsDown = make(chan nats.Status, 1)
	done := make(chan struct{})
	go b.acker(s, broker, done)
	for tag := uint64(1); tag <= n; tag++ {
		s.slots <- struct{}{}
		b.m.inFlight.Inc()
		s.pending <- inflight{tag: tag, how: settlePublished, since: time.Now()}
	}
	for tag := uint64(1); tag <= n/2; tag++ {
		broker.markSafe(tag)
		s.replies <- replyTo(tag, stored)
	}
	testutil.Eventually(t, 10*time.Second, "the first half acked", func() (bool, string) {
		broker.mu.Lock()
		defer broker.mu.Unlock()
		return len(broker.acked) == n/2, fmt.Sprintf("%d acked", len(broker.acked))
	})
	s.natsDown <- nats.RECONNECTING
	testutil.Eventually(t, 10*time.Second, "the second half nacked", func() (bool, string) {
		broker.mu.Lock()
		defer broker.mu.Unlock()
		return len(broker.outstanding) == 0, fmt.Sprintf("outstanding %v", keys(broker.outstanding))
	})
	close(s.pending)
	<-done
	for tag := uint64(n/2 + 1); tag <= n; tag++ {
		if broker.nacked[tag] != 1 || !broker.requeued[tag] {
			t.Errorf("delivery %d: nacked %d times, requeue %v; want nacked once, requeued", tag, broker.nacked[tag], broker.requeued[tag])
		}
	}
	if got := promtest.ToFloat64(b.m.publishErrors); got != n/2 {
		t.Errorf("publish_errors_total = %v, want %d", got, n/2)
	}
	if len(s.slots) != 0 {
		t.Errorf("%d publish slots not released", len(s.slots))
	}
}
