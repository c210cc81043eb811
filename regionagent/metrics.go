package regionagent

import (
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

const metricPrefix = "keystone_fanout_agent_"

// Gap reasons: the gaps_total label values.
const (
	// GapStreamTruncated: on (re)binding, the stream no longer holds events
	// after the last one the region handled (purge, max age, max messages).
	GapStreamTruncated = "stream_truncated"
	// GapStreamRecreated: the stream is not the one the region's checkpoint
	// refers to (deleted and created again, or --stream changed).
	GapStreamRecreated = "stream_recreated"
	// GapSequenceJump: a newly delivered event's stream sequence is more than
	// one past the previous one, and one of the events between is no longer in
	// the stream: it vanished before delivery.
	GapSequenceJump = "sequence_jump"
	// GapPurgedBeforeDelivery: the audit found the stream's first sequence
	// beyond the last delivered one: events vanished and nothing newer came.
	GapPurgedBeforeDelivery = "purged_before_delivery"
	// GapConsumerRecreated: the region's consumer had existed (this process
	// consumed from it, or the region's checkpoint records a position) and had
	// to be created again. Its replay of the last token-cache-time covers what
	// the stream still holds, but where the old consumer stood, and whether it
	// had been handed events nobody handled, is unknown: sweep rather than trust it.
	GapConsumerRecreated = "consumer_recreated"
)

var gapReasons = []string{GapStreamTruncated, GapStreamRecreated, GapSequenceJump, GapPurgedBeforeDelivery, GapConsumerRecreated}

// Pass label values (the pass label of invalidations_total,
// invalidation_failures_total and invalidation_duration_seconds).
const (
	// passFirst: a call with first passes of new events only.
	passFirst = "first"
	// passSecond: a call with second passes only.
	passSecond = "second"
	// passMerged: a call with first passes of new events and the second
	// passes that were due (or nearly) at the same time, in one call.
	passMerged = "merged"
)

var passes = []string{passFirst, passSecond, passMerged}

type metrics struct {
	events           *prometheus.CounterVec
	undecodable      prometheus.Counter
	redeliveries     prometheus.Counter
	sweeps           prometheus.Counter
	gaps             *prometheus.CounterVec
	secondRemovals   prometheus.Counter
	latency          *prometheus.HistogramVec
	resolutions      *prometheus.CounterVec
	resolveWait      prometheus.Histogram
	invalidations    *prometheus.CounterVec
	failures         *prometheus.CounterVec
	callDuration     *prometheus.HistogramVec
	batchSize        prometheus.Histogram
	pending          prometheus.Gauge
	ackPending       prometheus.Gauge
	held             prometheus.Gauge
	bound            prometheus.Gauge
	consumerErrors   *prometheus.CounterVec
	recreations      prometheus.Counter
	ackFailures      prometheus.Counter
	receiptErrors    prometheus.Counter
	checkpointErrors prometheus.Counter
	checkpointSeq    prometheus.Gauge
	panics           prometheus.Counter
	skippedFetched   prometheus.Counter
	resets           prometheus.Counter
}

// Starting points of invalidation_latency_seconds: the "from" label values.
const (
	latencyFromKeystone = "keystone"
	latencyFromStream   = "stream"
)

// Consumer error reasons: the consumer_errors_total label values.
const (
	consumerErrBind      = "bind"
	consumerErrDeleted   = "consumer_deleted"
	consumerErrHeartbeat = "missed_heartbeat"
	consumerErrIterator  = "iterator"
	consumerErrAudit     = "audit"
	consumerErrReset     = "reset"
	consumerErrMirror    = "mirror"
)

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPrefix + "events_total",
			Help: "Events handled (invalidated on every memcached server, both passes, then acknowledged), by Keystone event type; types this version does not know are \"other\".",
		}, []string{"type"}),
		undecodable: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricPrefix + "undecodable_events_total",
			Help: "Stream messages that were not an event; each was handled as an unbounded event (every token entry removed).",
		}),
		redeliveries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricPrefix + "redeliveries_total",
			Help: "Events JetStream delivered more than once (a previous agent stopped before acknowledging them).",
		}),
		sweeps: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricPrefix + "sweeps_total",
			Help: "Invalidations that removed every token entry (an unbounded event or a gap).",
		}),
		gaps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPrefix + "gaps_total",
			Help: "Events the region may have missed because the stream no longer holds them; each gap costs one sweep of every token entry.",
		}, []string{"reason"}),
		secondRemovals: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricPrefix + "second_pass_removals_total",
			Help: "Token cache entries removed by calls of second passes alone: stale entries written back by validations in flight during the first pass. Second passes merged into a call with first passes (pass=\"merged\") are not counted, as their removals cannot be told apart from the first passes': a lower bound.",
		}),
		resolutions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPrefix + "resolutions_total",
			Help: "Notifications that do not bound their own effect (CADF group membership changes), by result: resolved (the revocation poller's events covered it; nothing removed for it), source_off (no live, healthy poller: every token entry removed), timeout (no proof within --resolve-wait: every token entry removed); stale_proof counts proofs ignored because they cover sequences after their own (made for an earlier copy of the stream).",
		}, []string{"result"}),
		resolveWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    metricPrefix + "resolve_wait_seconds",
			Help:    "From a resolved notification's storing in the stream to the poller's proof reaching the agent.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: metricPrefix + "invalidation_latency_seconds",
			Help: "To the end of an event's first invalidation pass (first deliveries), by starting point: from=\"keystone\" is Keystone's " +
				"timestamp of the change (clock skew between Keystone and this host and replays after a restart show here), " +
				"from=\"stream\" is when the stream stored the event, just after the bridge received it (the NATS server's clock).",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300},
		}, []string{"from"}),
		invalidations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPrefix + "invalidations_total",
			Help: "Invalidation calls (one Invalidate of the token cache: from the live index, or a crawl of a server without one), by pass: first (new events only), second (second passes only), merged (new events and due second passes in one call).",
		}, []string{"pass"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPrefix + "invalidation_failures_total",
			Help: "Invalidation calls that did not finish on every memcached server; each is retried with back-off, the events stay unacknowledged.",
		}, []string{"pass"}),
		callDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    metricPrefix + "invalidation_duration_seconds",
			Help:    "Duration of one invalidation call, by pass.",
			Buckets: []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"pass"}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    metricPrefix + "batch_events",
			Help:    "Events per invalidation call with first passes (pass first or merged), counting the second-pass events of a merged call too.",
			Buckets: []float64{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024},
		}),
		pending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricPrefix + "consumer_pending",
			Help: "Events in the stream not yet delivered to this region's consumer (its lag).",
		}),
		ackPending: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricPrefix + "consumer_ack_pending",
			Help: "Events delivered to this region's consumer and not yet acknowledged.",
		}),
		held: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricPrefix + "events_in_progress",
			Help: "Events this agent holds: waiting for their batch, their second pass, or a retry.",
		}),
		bound: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricPrefix + "consumer_bound",
			Help: "1 while the agent consumes from its durable consumer.",
		}),
		consumerErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricPrefix + "consumer_errors_total",
			Help: "Errors binding to or consuming from the region's consumer, by reason; the agent retries with back-off.",
		}, []string{"reason"}),
		recreations: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricPrefix + "consumer_created_total",
			Help: "Times the agent created its consumer (first start, or after it was deleted).",
		}),
		receiptErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricPrefix + "receipt_errors_total",
			Help: "Receipts (keystone-fanout trace's evidence) not stored: no receipts stream, no permission, or NATS away. The invalidation itself is unaffected.",
		}),
		ackFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricPrefix + "ack_failures_total",
			Help: "Acknowledgements that could not be sent (NATS away); JetStream redelivers those events and they are invalidated again.",
		}),
		checkpointErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricPrefix + "checkpoint_errors_total",
			Help: "Failed reads or writes of the region's checkpoint in the key-value bucket.",
		}),
		panics: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricPrefix + "invalidator_panics_total",
			Help: "Invalidation calls that panicked; the batch was then handled as one unbounded event (every token entry removed).",
		}),
		checkpointSeq: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: metricPrefix + "checkpoint_sequence",
			Help: "Stream sequence at and below which every event was handled, as last recorded.",
		}),
		skippedFetched: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricPrefix + "skipped_events_fetched_total",
			Help: "Events the consumer delivered that never reached this agent (lost with a dropped connection, or given to another agent of the region), fetched from the stream and invalidated at once; a redelivery of them is handled again.",
		}),
		resets: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricPrefix + "consumer_resets_total",
			Help: "Times the agent reset its consumer to its ack floor on start, so that the events a previous agent held unacknowledged were redelivered at once.",
		}),
	}
	for _, c := range []prometheus.Collector{m.events, m.undecodable, m.redeliveries,
		m.sweeps, m.gaps, m.secondRemovals, m.latency, m.resolutions, m.resolveWait, m.invalidations, m.failures,
		m.callDuration, m.batchSize, m.pending, m.ackPending, m.held, m.bound, m.consumerErrors,
		m.recreations, m.ackFailures, m.receiptErrors, m.checkpointErrors, m.checkpointSeq, m.panics, m.skippedFetched, m.resets} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	// Show zero counts for every bounded label value.
	for _, t := range append(event.KnownTypes(), typeOther) {
		m.events.WithLabelValues(t)
	}
	for _, r := range gapReasons {
		m.gaps.WithLabelValues(r)
	}
	for _, r := range resolveResults {
		m.resolutions.WithLabelValues(r)
	}
	for _, p := range passes {
		m.invalidations.WithLabelValues(p)
		m.failures.WithLabelValues(p)
	}
	for _, r := range []string{consumerErrBind, consumerErrDeleted, consumerErrHeartbeat, consumerErrIterator, consumerErrAudit, consumerErrReset, consumerErrMirror} {
		m.consumerErrors.WithLabelValues(r)
	}
	return m, nil
}

const typeOther = "other"

// typeLabel bounds the events_total label set.
func typeLabel(e *event.Event) string {
	if slices.Contains(knownTypes, e.Type) {
		return e.Type
	}
	return typeOther
}

var knownTypes = event.KnownTypes()
