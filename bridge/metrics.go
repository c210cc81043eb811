package bridge

import (
	"errors"
	"fmt"
	"sync"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/prometheus/client_golang/prometheus"
)

// MetricsPrefix starts the name of every metric of the bridge.
const MetricsPrefix = "keystone_fanout_bridge_"

// Widen reasons are event.WidenUnknownType, event.WidenMissingIDs and
// widenDecodeError (the decoder failed unexpectedly on a body); any other
// value reaching the bridge is counted as widenOther.
const (
	widenDecodeError = "decode_error"
	widenOther       = "other"
)

// Starting points of latency_seconds: the "from" label values.
const (
	latencyFromKeystone = "keystone"
	latencyFromReceipt  = "receipt"
)

// otherType is the filtered_total label of event types outside filteredTypes.
const otherType = "other"

// filteredTypes are the event types Keystone is known to emit that can be
// filtered: they are filtered_total's label values, so that a stream of odd
// event types cannot grow the metric without bound.
var filteredTypes = func() map[string]bool {
	m := map[string]bool{"identity.authenticate": true}
	resources := []string{"user", "group", "project", "domain", "role", "role_assignment", "implied_role",
		"OS-TRUST:trust", "application_credential", "access_rule", "credential", "region", "endpoint",
		"endpoint_group", "service", "policy", "limit", "registered_limit", "OS-OAUTH1:consumer",
		"OS-OAUTH1:request_token", "OS-OAUTH1:access_token", "OS-FEDERATION:identity_provider",
		"OS-FEDERATION:protocol", "OS-FEDERATION:mapping", "OS-FEDERATION:service_provider",
		"OS-EP-FILTER:project_endpoint", "OS-EP-FILTER:endpoint_group", "OS-INHERIT:role_assignment"}
	for _, r := range resources {
		for _, op := range []string{"created", "updated", "deleted", "disabled"} {
			m["identity."+r+"."+op] = true
		}
	}
	return m
}()

type metrics struct {
	received      prometheus.Counter
	published     prometheus.Counter
	duplicates    prometheus.Counter
	filtered      *prometheus.CounterVec
	rejected      *prometheus.CounterVec
	widened       *prometheus.CounterVec
	publishErrors prometheus.Counter
	ackErrors     prometheus.Counter
	reconnects    *prometheus.CounterVec
	inFlight      prometheus.GaugeFunc
	latency       *prometheus.HistogramVec

	// The labelled counters of every label value, resolved once.
	filteredBy sync.Map // label value -> prometheus.Counter, filled on first use
	rejectedBy map[event.Reason]prometheus.Counter
	widenedBy  map[string]prometheus.Counter
}

// newMetrics registers the bridge's metrics; inFlight reads in_flight.
func newMetrics(reg prometheus.Registerer, inFlight func() float64) (*metrics, error) {
	m := &metrics{
		received: prometheus.NewCounter(prometheus.CounterOpts{
			Name: MetricsPrefix + "received_total",
			Help: "AMQP deliveries received from the bridge's queue, redeliveries included.",
		}),
		published: prometheus.NewCounter(prometheus.CounterOpts{
			Name: MetricsPrefix + "published_total",
			Help: "Events stored in the JetStream stream (PubAck, not a duplicate) and acked to RabbitMQ.",
		}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: MetricsPrefix + "duplicates_total",
			Help: "Publishes the stream already held (same Nats-Msg-Id): redeliveries or another replica's; acked to RabbitMQ.",
		}),
		filtered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: MetricsPrefix + "filtered_total",
			Help: "Notifications acked without publishing because their type cannot affect a token, by event type (\"other\" for types outside Keystone's known list).",
		}, []string{"event_type"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: MetricsPrefix + "rejected_total",
			Help: "AMQP bodies that are not Keystone notifications, by reason; acked (or dead-lettered) and logged.",
		}, []string{"reason"}),
		widened: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: MetricsPrefix + "widened_total",
			Help: "Notifications published as unbounded (agents flush every token entry), by reason.",
		}, []string{"reason"}),
		publishErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: MetricsPrefix + "publish_errors_total",
			Help: "JetStream publishes that failed or timed out; the delivery was nacked and requeued.",
		}),
		ackErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: MetricsPrefix + "ack_errors_total",
			Help: "AMQP acks or nacks that could not be sent (channel gone); RabbitMQ redelivers those messages and the stream dedupes them.",
		}),
		reconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: MetricsPrefix + "reconnects_total",
			Help: "Connections re-established after a loss, by side (amqp, nats).",
		}, []string{"side"}),
		inFlight: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: MetricsPrefix + "in_flight",
			Help: "JetStream publishes awaiting their PubAck.",
		}, inFlight),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: MetricsPrefix + "latency_seconds",
			Help: "Time to the PubAck of a published event, by starting point: from=\"keystone\" is Keystone's notification timestamp " +
				"(the change itself; clock skew between Keystone and the bridge and notifications waiting in the queue show here), " +
				"from=\"receipt\" is the bridge's receipt of the delivery (the bridge's own share, on its own clock).",
			Buckets: prometheus.ExponentialBuckets(0.001, 2.5, 14), // 1ms .. ~150s
		}, []string{"from"}),
	}
	for _, c := range []prometheus.Collector{m.received, m.published, m.duplicates, m.filtered, m.rejected,
		m.widened, m.publishErrors, m.ackErrors, m.reconnects, m.inFlight, m.latency} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				return nil, fmt.Errorf("bridge metrics: %w (one Bridge per registry)", err)
			}
			return nil, fmt.Errorf("bridge metrics: %w", err)
		}
	}
	// Show zero counts for every known label value.
	m.rejectedBy = make(map[event.Reason]prometheus.Counter)
	for _, r := range event.Reasons {
		m.rejectedBy[r] = m.rejected.WithLabelValues(string(r))
	}
	m.widenedBy = make(map[string]prometheus.Counter)
	for _, w := range []string{event.WidenUnknownType, event.WidenMissingIDs, widenDecodeError} {
		m.widenedBy[w] = m.widened.WithLabelValues(w)
	}
	for _, s := range []string{sideAMQP, sideNATS} {
		m.reconnects.WithLabelValues(s)
	}
	return m, nil
}

const (
	sideAMQP = "amqp"
	sideNATS = "nats"
)

// filteredCounter is filtered_total for eventType.
func (m *metrics) filteredCounter(eventType string) prometheus.Counter {
	label := filteredLabel(eventType)
	if c, ok := m.filteredBy.Load(label); ok {
		return c.(prometheus.Counter)
	}
	// Created on first use, so that only the types seen show.
	c := m.filtered.WithLabelValues(label)
	m.filteredBy.Store(label, c)
	return c
}

// rejectedCounter is rejected_total for r.
func (m *metrics) rejectedCounter(r event.Reason) prometheus.Counter {
	if c, ok := m.rejectedBy[r]; ok {
		return c
	}
	return m.rejected.WithLabelValues(string(r))
}

// widenedCounter is widened_total for the widen reason.
func (m *metrics) widenedCounter(reason string) prometheus.Counter {
	if c, ok := m.widenedBy[reason]; ok {
		return c
	}
	return m.widened.WithLabelValues(widenOther)
}

func filteredLabel(eventType string) string {
	if filteredTypes[eventType] {
		return eventType
	}
	return otherType
}
