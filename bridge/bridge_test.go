package bridge

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/fixtures"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// fixtureMessage is a captured notification with its recorded properties.
func fixtureMessage(f fixtures.Notification) message {
	p := f.Meta.Properties
	headers := amqp.Table{}
	for k, v := range p.Headers {
		headers[k] = v
	}
	return message{body: f.Body, routingKey: f.Meta.RoutingKey, props: amqp.Publishing{
		ContentType: p.ContentType, ContentEncoding: p.ContentEncoding, DeliveryMode: p.DeliveryMode,
		Priority: p.Priority, Headers: headers}}
}

// decodedFixture is what the test reads of a fixture's .decoded.json.
type decodedFixture struct {
	Message struct {
		MessageID string         `json:"message_id"`
		EventType string         `json:"event_type"`
		Publisher string         `json:"publisher_id"`
		Timestamp string         `json:"timestamp"`
		Payload   map[string]any `json:"payload"`
	} `json:"oslo.message"`
}

// tokenAffecting is the brief's rule, independent of the event package:
// authenticate and creations are harmless, except role assignments.
func tokenAffecting(eventType string) bool {
	if eventType == "identity.authenticate" {
		return false
	}
	return !strings.HasSuffix(eventType, ".created") || eventType == "identity.role_assignment.created"
}

func str(m map[string]any, k string) string { s, _ := m[k].(string); return s }

// expectedEvent builds the normalised event a fixture must become, from its
// decoded JSON.
func expectedEvent(t *testing.T, f fixtures.Notification) event.Event {
	t.Helper()
	raw, err := f.Decoded()
	if err != nil {
		t.Fatal(err)
	}
	var d decodedFixture
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("%s: %v", f.Name, err)
	}
	m := d.Message
	ts, err := time.Parse("2006-01-02 15:04:05.999999", m.Timestamp)
	if err != nil {
		t.Fatalf("%s timestamp: %v", f.Name, err)
	}
	e := event.Event{Version: event.SchemaVersion, Kind: event.KindNotification, ID: m.MessageID,
		Type: m.EventType, Time: ts.UTC(), Publisher: m.Publisher, Format: "basic"}
	p := m.Payload
	if str(p, "typeURI") == "http://schemas.dmtf.org/cloud/audit/1.0/event" {
		e.Format = "cadf"
	}
	id := str(p, "resource_info")
	if id == "" {
		if target, ok := p["target"].(map[string]any); ok && e.Format == "cadf" {
			id = str(target, "id")
		}
	}
	switch m.EventType {
	case "identity.role_assignment.created", "identity.role_assignment.deleted":
		e.UserID, e.GroupID, e.ProjectID, e.DomainID, e.RoleID = str(p, "user"), str(p, "group"), str(p, "project"), str(p, "domain"), str(p, "role")
		e.InheritedToProjects, _ = p["inherited_to_projects"].(bool)
	case "identity.user.updated", "identity.user.deleted":
		e.UserID = id
	case "identity.project.updated", "identity.project.deleted":
		e.ProjectID = id
	case "identity.domain.updated", "identity.domain.deleted":
		e.DomainID = id
	case "identity.group.updated", "identity.group.deleted":
		e.GroupID = id
		if a := str(p, "actor_id"); a != "" {
			e.Actor = &event.Actor{ID: a, Type: str(p, "actor_type"), Operation: str(p, "actor_operation")}
		}
	case "identity.role.deleted":
		e.RoleID = id
	case "identity.OS-TRUST:trust.deleted":
		e.TrustID = id
	case "identity.application_credential.deleted":
		e.AppCredID = id
	default:
		t.Fatalf("%s: no expectation for token-affecting type %s", f.Name, m.EventType)
	}
	return e
}

func eventJSON(e event.Event) string {
	b, _ := json.MarshalIndent(e, "", "  ")
	return string(b)
}

func TestEveryFixture(t *testing.T) {
	all, err := fixtures.All()
	if err != nil {
		t.Fatal(err)
	}
	r := newRig(t)
	n := startNATS(t)
	br := startBridge(t, r.options(), n.nc)

	want := map[string]event.Event{} // by message id
	wantFiltered := map[string]int{} // by event type
	var msgs []message
	for _, f := range all {
		msgs = append(msgs, fixtureMessage(f))
		if tokenAffecting(f.Meta.EventType) {
			e := expectedEvent(t, f)
			if _, dup := want[e.ID]; dup {
				t.Fatalf("fixture %s/%s repeats message id %s", f.Format, f.Name, e.ID)
			}
			want[e.ID] = e
		} else {
			wantFiltered[f.Meta.EventType]++
		}
	}
	if len(want) == 0 || len(wantFiltered) == 0 {
		t.Fatalf("fixtures: %d token-affecting, %d filtered types; want both", len(want), len(wantFiltered))
	}
	r.publish(msgs...)

	totalFiltered := 0
	for _, c := range wantFiltered {
		totalFiltered += c
	}
	// The bridge counts a publish when its PubAck comes back, which can be
	// after the stream has stored it.
	testutil.Eventually(t, 30*time.Second, fmt.Sprintf("%d events in the stream and published, %d filtered", len(want), totalFiltered), func() (bool, string) {
		got, filtered := n.streamCount(r.stream.Name), int(sum(br.b.m.filtered))
		published := int(promtest.ToFloat64(br.b.m.published))
		return got == len(want) && published == len(want) && filtered == totalFiltered,
			fmt.Sprintf("%d events stored, %d published, %d filtered", got, published, filtered)
	})
	stored := n.readStream(t, r.stream.Name)
	seen := map[string]bool{}
	for _, sm := range stored {
		w, ok := want[sm.ev.ID]
		if !ok {
			t.Errorf("stream holds an unexpected event %s", eventJSON(sm.ev))
			continue
		}
		if seen[sm.ev.ID] {
			t.Errorf("event %s stored twice", sm.ev.ID)
		}
		seen[sm.ev.ID] = true
		if sm.msgID != w.ID {
			t.Errorf("event %s: Nats-Msg-Id %q, want the oslo message_id", w.ID, sm.msgID)
		}
		if wantSubj := r.stream.SubjectPrefix + ".notification." + w.Type; sm.subject != wantSubj {
			t.Errorf("event %s: subject %q, want %q", w.ID, sm.subject, wantSubj)
		}
		if got, wantJ := eventJSON(sm.ev), eventJSON(w); got != wantJ {
			t.Errorf("event %s (%s):\n got %s\nwant %s", w.ID, w.Type, got, wantJ)
		}
	}
	for id, w := range want {
		if !seen[id] {
			t.Errorf("event %s (%s) missing from the stream", id, w.Type)
		}
	}
	for typ, c := range wantFiltered {
		if got := promtest.ToFloat64(br.b.m.filtered.WithLabelValues(typ)); got != float64(c) {
			t.Errorf("filtered_total{event_type=%q} = %v, want %d", typ, got, c)
		}
	}
	if got := promtest.ToFloat64(br.b.m.received); got != float64(len(all)) {
		t.Errorf("received_total = %v, want %d", got, len(all))
	}
	if got := promtest.ToFloat64(br.b.m.published); got != float64(len(want)) {
		t.Errorf("published_total = %v, want %d", got, len(want))
	}
	if got := sum(br.b.m.rejected); got != 0 {
		t.Errorf("rejected_total = %v, want 0", got)
	}
	if got := sum(br.b.m.widened); got != 0 {
		t.Errorf("widened_total = %v, want 0: every fixture can be bounded", got)
	}
	for _, from := range []string{latencyFromKeystone, latencyFromReceipt} {
		if got := sum(br.b.m.latency.WithLabelValues(from).(prometheus.Histogram)); got != float64(len(want)) {
			t.Errorf("latency_seconds{from=%q} samples = %v, want %d", from, got, len(want))
		}
	}
	testutil.Eventually(t, 10*time.Second, "the queue to be empty", func() (bool, string) {
		m, _ := r.queueDepth(r.queue)
		return m == 0, fmt.Sprintf("%d messages", m)
	})
}

func TestSameNotificationsTwiceStoredOnce(t *testing.T) {
	r := newRig(t)
	n := startNATS(t)
	o := r.options()
	o.QueueType = QueueClassic
	br := startBridge(t, o, n.nc)
	msgs, ids := notifications(200)
	r.publish(msgs...)
	r.publish(msgs...)
	testutil.Eventually(t, 30*time.Second, "every publish settled", func() (bool, string) {
		p, d := promtest.ToFloat64(br.b.m.published), promtest.ToFloat64(br.b.m.duplicates)
		return p+d == 400, fmt.Sprintf("published %v, duplicates %v", p, d)
	})
	checkStreamHoldsOnce(t, n, r.stream.Name, ids)
	if p, d := promtest.ToFloat64(br.b.m.published), promtest.ToFloat64(br.b.m.duplicates); p != 200 || d != 200 {
		t.Errorf("published_total %v, duplicates_total %v; want 200 and 200", p, d)
	}
	if got := promtest.ToFloat64(br.b.m.inFlight); got != 0 {
		t.Errorf("in_flight = %v after every publish settled, want 0", got)
	}
	// The queue is classic: declaring it as quorum must be refused.
	ch := r.channel()
	if _, err := ch.QueueDeclare(r.queue, true, false, false, false, amqp.Table{"x-queue-type": "quorum"}); !isPreconditionFailed(err) {
		t.Errorf("declaring the classic queue as quorum: %v, want PRECONDITION_FAILED", err)
	}
}

func TestTwoBridgesOneQueue(t *testing.T) {
	r := newRig(t)
	n := startNATS(t)
	o := r.options()
	o.Prefetch = 10 // spread the deliveries over both bridges
	a := startBridge(t, o, n.nc)
	b := startBridge(t, o, n.nc)
	msgs, ids := notifications(300)
	r.publish(msgs...)
	r.publish(msgs...)
	settled := func() float64 {
		var sum float64
		for _, br := range []*running{a, b} {
			sum += promtest.ToFloat64(br.b.m.published) + promtest.ToFloat64(br.b.m.duplicates)
		}
		return sum
	}
	testutil.Eventually(t, 30*time.Second, "600 publishes settled", func() (bool, string) {
		return settled() == 600, fmt.Sprint(settled())
	})
	checkStreamHoldsOnce(t, n, r.stream.Name, ids)
	pa, pb := promtest.ToFloat64(a.b.m.published), promtest.ToFloat64(b.b.m.published)
	if pa+pb != 300 {
		t.Errorf("published_total %v + %v, want 300", pa, pb)
	}
	if promtest.ToFloat64(a.b.m.received) == 0 || promtest.ToFloat64(b.b.m.received) == 0 {
		t.Errorf("received_total %v and %v: want both bridges to have consumed",
			promtest.ToFloat64(a.b.m.received), promtest.ToFloat64(b.b.m.received))
	}
	// The queue is quorum (the default): declaring it classic must be refused.
	ch := r.channel()
	if _, err := ch.QueueDeclare(r.queue, true, false, false, false, amqp.Table{"x-queue-type": "classic"}); !isPreconditionFailed(err) {
		t.Errorf("declaring the quorum queue as classic: %v, want PRECONDITION_FAILED", err)
	}
}

// checkStreamHoldsOnce checks that the stream holds exactly the events ids,
// each once.
func checkStreamHoldsOnce(t *testing.T, n *natsEnv, stream string, ids []string) {
	t.Helper()
	stored := n.readStream(t, stream)
	count := map[string]int{}
	for _, sm := range stored {
		count[sm.ev.ID]++
	}
	var missing, twice []string
	for _, id := range ids {
		switch count[id] {
		case 0:
			missing = append(missing, id)
		case 1:
		default:
			twice = append(twice, id)
		}
	}
	if len(missing) > 0 || len(twice) > 0 || len(stored) != len(ids) {
		sort.Strings(missing)
		t.Fatalf("stream %s: %d messages for %d notifications; %d missing (first %v), %d stored more than once (first %v)",
			stream, len(stored), len(ids), len(missing), first(missing), len(twice), first(twice))
	}
}

func first(s []string) []string { return s[:min(len(s), 3)] }

func TestBadInputInterleaved(t *testing.T) {
	for _, dlx := range []bool{false, true} {
		t.Run(fmt.Sprintf("dead-letter=%v", dlx), func(t *testing.T) { testBadInput(t, dlx) })
	}
}

func testBadInput(t *testing.T, deadLetter bool) {
	r := newRig(t)
	n := startNATS(t)
	o := r.options()
	dlq := r.queue + "-dead"
	if deadLetter {
		o.DeadLetterExchange = r.exchange + "-dlx"
		ch := r.channel()
		if err := ch.ExchangeDeclare(o.DeadLetterExchange, "fanout", true, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
		r.exchs = append(r.exchs, o.DeadLetterExchange)
		if _, err := ch.QueueDeclare(dlq, true, false, false, false, nil); err != nil {
			t.Fatal(err)
		}
		r.queues = append(r.queues, dlq)
		if err := ch.QueueBind(dlq, "", o.DeadLetterExchange, false, nil); err != nil {
			t.Fatal(err)
		}
	}
	br := startBridge(t, o, n.nc)

	good, ids := notifications(30)
	fixture := notification(newUUID(), "identity.user.deleted", "abc")
	envelope := func(inner string) []byte {
		b, _ := json.Marshal(map[string]string{"oslo.version": "2.0", "oslo.message": inner})
		return b
	}
	unknownID := newUUID()
	bad := []struct {
		reason string // "" for the unknown type, which is published widened
		body   []byte
	}{
		{string(event.ReasonNotJSON), []byte("this is not JSON")},
		{string(event.ReasonNotJSON), fixture[:len(fixture)/2]}, // truncated
		{string(event.ReasonUnsupportedVersion), []byte(`{"oslo.version": "1.0", "oslo.message": "{}"}`)},
		{string(event.ReasonBadEnvelope), []byte(`{"oslo.version": "2.0", "oslo.message": {"event_type": "identity.user.updated"}}`)},
		{string(event.ReasonMissingEventType), envelope(`{"message_id": "m1", "payload": {"resource_info": "u"}}`)},
		{string(event.ReasonInvalidUTF8), []byte("{\"oslo.version\": \"2.0\", \"x\": \"\xff\xfe\"}")},
		{string(event.ReasonTooLarge), []byte(`{"pad": "` + strings.Repeat("x", DefaultMaxBodySize) + `"}`)},
		{"", notification(unknownID, "identity.frobnicator.exploded", "zzz")},
	}
	var msgs []message
	wantReasons := map[string]int{}
	for i, g := range good {
		msgs = append(msgs, g)
		if i < len(bad) {
			msgs = append(msgs, keystoneMessage(bad[i].body))
			if bad[i].reason != "" {
				wantReasons[bad[i].reason]++
			}
		}
	}
	// The bad ones once more, at the end.
	for _, b := range bad[:len(bad)-1] {
		msgs = append(msgs, keystoneMessage(b.body))
		wantReasons[b.reason]++
	}
	rejected := 0
	for _, c := range wantReasons {
		rejected += c
	}
	r.publish(msgs...)

	wantIDs := append(slices.Clone(ids), unknownID)
	testutil.Eventually(t, 30*time.Second, fmt.Sprintf("%d events stored and %d rejected", len(wantIDs), rejected), func() (bool, string) {
		s, rj := n.streamCount(r.stream.Name), int(sum(br.b.m.rejected))
		return s == len(wantIDs) && rj == rejected, fmt.Sprintf("%d stored, %d rejected", s, rj)
	})
	checkStreamHoldsOnce(t, n, r.stream.Name, wantIDs)
	for _, reason := range event.Reasons {
		got := promtest.ToFloat64(br.b.m.rejected.WithLabelValues(string(reason)))
		if got != float64(wantReasons[string(reason)]) {
			t.Errorf("rejected_total{reason=%q} = %v, want %d", reason, got, wantReasons[string(reason)])
		}
	}
	if got := promtest.ToFloat64(br.b.m.widened.WithLabelValues(event.WidenUnknownType)); got != 1 {
		t.Errorf("widened_total{reason=unknown_event_type} = %v, want 1", got)
	}
	for _, sm := range n.readStream(t, r.stream.Name) {
		if sm.ev.ID == unknownID && (!sm.ev.Unbounded() || sm.ev.Widen != event.WidenUnknownType) {
			t.Errorf("unknown event type stored as %s, want it widened", eventJSON(sm.ev))
		}
	}
	if err := br.b.Ready(); err != nil {
		t.Errorf("Ready() after bad input = %v, want nil", err)
	}
	testutil.Eventually(t, 10*time.Second, "the queue to be empty", func() (bool, string) {
		m, _ := r.queueDepth(r.queue)
		return m == 0, fmt.Sprintf("%d messages", m)
	})
	if deadLetter {
		testutil.Eventually(t, 10*time.Second, fmt.Sprintf("%d rejected messages in the dead-letter queue", rejected), func() (bool, string) {
			m, _ := r.queueDepth(dlq)
			return m == rejected, fmt.Sprintf("%d messages", m)
		})
	}
}

func TestExchangeDeclaredDifferently(t *testing.T) {
	r := newRig(t)
	// Someone declared the exchange durable: the bridge's oslo-style declare
	// fails with PRECONDITION_FAILED and it must go on with the exchange as is.
	other := r.exchange + "-durable"
	ch := r.channel()
	if err := ch.ExchangeDeclare(other, "topic", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	r.exchs = append(r.exchs, other)
	n := startNATS(t)
	o := r.options()
	o.Exchange = other
	startBridge(t, o, n.nc)
	msgs, ids := notifications(5)
	for i := range msgs {
		p := msgs[i].props
		p.Body = msgs[i].body
		if err := ch.PublishWithContext(context.Background(), other, DefaultRoutingKey, false, false, p); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, 20*time.Second, "5 events stored", func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c == 5, fmt.Sprint(c)
	})
	checkStreamHoldsOnce(t, n, r.stream.Name, ids)
}

func TestExchangeDeclaredByBridgeFirst(t *testing.T) {
	// The bridge declares the exchange before Keystone: Keystone's own
	// declaration (topic, durable=false, auto_delete=false) must still succeed.
	r := newRig(t)
	fresh := r.exchange + "-fresh"
	r.exchs = append(r.exchs, fresh)
	n := startNATS(t)
	o := r.options()
	o.Exchange = fresh
	startBridge(t, o, n.nc)
	ch := r.channel()
	if err := ch.ExchangeDeclare(fresh, "topic", false, false, false, false, nil); err != nil {
		t.Fatalf("oslo.messaging's declaration after the bridge's: %v", err)
	}
}

func TestReadinessAndShutdown(t *testing.T) {
	r := newRig(t)
	n := startNATS(t)
	reg := prometheus.NewRegistry()
	o := r.options()
	o.ShutdownTimeout = 3 * time.Second
	b, err := New(o, n.nc, reg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Ready(); err == nil {
		t.Fatal("Ready() before Run = nil, want an error")
	}
	if _, err := New(o, n.nc, reg, testutil.Logger(t)); err == nil {
		t.Fatal("a second New on the same registry: want an error")
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	testutil.Eventually(t, 20*time.Second, "ready", func() (bool, string) { err := b.Ready(); return err == nil, fmt.Sprint(err) })
	if err := b.Run(ctx); err == nil {
		t.Fatal("second Run: want an error")
	}
	_, consumers := r.queueDepth(r.queue)
	if consumers != 1 {
		t.Fatalf("queue consumers = %d, want 1", consumers)
	}
	msgs, ids := notifications(100)
	r.publish(msgs...)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after cancel = %v, want nil", err)
		}
	case <-time.After(o.ShutdownTimeout + 10*time.Second):
		t.Fatal("Run did not return after cancel")
	}
	if err := b.Ready(); err == nil {
		t.Error("Ready() after shutdown = nil, want an error")
	}
	testutil.Eventually(t, 10*time.Second, "no consumer on the queue", func() (bool, string) {
		_, c := r.queueDepth(r.queue)
		return c == 0, fmt.Sprintf("%d consumers", c)
	})
	// Whatever was not published is still in the queue: a new bridge
	// finishes the job.
	br := startBridge(t, o, n.nc)
	testutil.Eventually(t, 20*time.Second, "100 events stored", func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c == 100, fmt.Sprint(c)
	})
	checkStreamHoldsOnce(t, n, r.stream.Name, ids)
	br.stop()
}

func TestReadyReportsNATSDown(t *testing.T) {
	r := newRig(t)
	n := startNATS(t)
	br := startBridge(t, r.options(), n.nc)
	n.srv.Shutdown()
	testutil.Eventually(t, 10*time.Second, "Ready() to report NATS down", func() (bool, string) {
		err := br.b.Ready()
		return err != nil && strings.Contains(err.Error(), "NATS"), fmt.Sprint(err)
	})
}

// TestQueueDropsNotificationsOlderThanItsTTL: while no bridge consumes (an
// outage, a trial's queue left behind), the queue keeps a notification only
// for QueueMessageTTL, after which it can no longer concern a cached entry.
func TestQueueDropsNotificationsOlderThanItsTTL(t *testing.T) {
	for _, tt := range []struct {
		name, queueType string
	}{
		{"quorum queue", QueueQuorum},
		{"classic queue", QueueClassic},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := newRig(t)
			n := startNATS(t)
			o := r.options()
			o.QueueType = tt.queueType
			// Long enough to count the messages before they expire, on a
			// loaded machine too.
			o.QueueMessageTTL = 3 * time.Second
			startBridge(t, o, n.nc).stop() // declares the queue, then goes away
			// RabbitMQ forgets the consumer when it has handled the closed
			// connection, which can be after stop returned.
			testutil.Eventually(t, 10*time.Second, "no consumer on the queue", func() (bool, string) {
				_, c := r.queueDepth(r.queue)
				return c == 0, fmt.Sprintf("%d consumers", c)
			})
			msgs, _ := notifications(3)
			r.publish(msgs...)
			if m, c := r.queueDepth(r.queue); m != 3 || c != 0 {
				t.Fatalf("queue after publishing with no bridge: %d messages, %d consumers; want 3 and 0", m, c)
			}
			testutil.Eventually(t, 15*time.Second, "the unconsumed notifications to expire", func() (bool, string) {
				m, _ := r.queueDepth(r.queue)
				return m == 0, fmt.Sprintf("%d messages", m)
			})
			// The TTL is the queue's own argument: a declaration with another is refused.
			args := amqp.Table{"x-message-ttl": int64(2000)} // not o.QueueMessageTTL
			if tt.queueType == QueueQuorum {
				args["x-queue-type"] = QueueQuorum
			}
			if _, err := r.channel().QueueDeclare(r.queue, true, false, false, false, args); !isPreconditionFailed(err) {
				t.Errorf("declaring the queue with another x-message-ttl: %v, want PRECONDITION_FAILED", err)
			}
		})
	}
}
