package tokencache

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics of an Invalidator: what happened on each memcached server. The
// calls themselves (how many, failed, how long) are counted by the region
// agent, which knows their pass. Label values are bounded: server is one of the
// configured servers, strategy one of three, reason an event type this
// version knows or one of a few fixed words (see reasonOf).
type metrics struct {
	removed        *prometheus.CounterVec   // server, reason
	kept           *prometheus.CounterVec   // server
	nonToken       *prometheus.CounterVec   // server
	fetched        *prometheus.CounterVec   // server
	hidden         *prometheus.CounterVec   // server
	gone           *prometheus.CounterVec   // server
	serverErrors   *prometheus.CounterVec   // server, op
	crawlDuration  *prometheus.HistogramVec // server
	crawlBusy      *prometheus.CounterVec   // server
	flushes        *prometheus.CounterVec   // server
	indexEntries   *prometheus.GaugeVec     // server
	refreshes      *prometheus.CounterVec   // result
	serverRestarts *prometheus.CounterVec   // server
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	const ns, sub = "keystone_fanout", "invalidator"
	m := &metrics{
		removed: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "entries_removed_total",
			Help: "Token cache entries deleted, by server and reason (the event type that matched, revocation, unbounded, unreadable or sweep)."}, []string{"server", "reason"}),
		kept: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "entries_kept_total",
			Help: "Token cache entries examined and left in place (no event of the batch concerned them)."}, []string{"server"}),
		nonToken: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "non_token_keys_total",
			Help: "Keys listed by crawls that are not keystonemiddleware token keys (never touched)."}, []string{"server"}),
		fetched: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "values_fetched_total",
			Help: "Token cache values read (new or re-stored entries)."}, []string{"server"}),
		hidden: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "crawl_hidden_entries_total",
			Help: "Remembered token entries that a crawl did not list but a direct get still found (crawl hazard caught)."}, []string{"server"}),
		gone: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "entries_gone_total",
			Help: "Token entries that disappeared (expired, evicted, deleted by others) between listing and get or delete."}, []string{"server"}),
		serverErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "server_errors_total",
			Help: "Failed memcached operations, by server and operation."}, []string{"server", "op"}),
		crawlDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Subsystem: sub, Name: "crawl_duration_seconds",
			Help:    "Duration of one server's pass (metadump, value fetches, deletes).",
			Buckets: []float64{.001, .0025, .005, .01, .02, .05, .1, .15, .25, .5, 1, 2.5, 5, 10, 30}}, []string{"server"}),
		crawlBusy: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "crawl_busy_retries_total",
			Help: "Times memcached answered BUSY to a metadump (another crawl was running) before ours ran."}, []string{"server"}),
		flushes: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "flushes_total",
			Help: "flush_all commands sent (strategy flush)."}, []string{"server"}),
		indexEntries: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "index_entries",
			Help: "Token entries remembered from crawls, per server."}, []string{"server"}),
		refreshes: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "refreshes_total",
			Help: "Background index refreshes (Run), by result."}, []string{"result"}),
		serverRestarts: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "server_restarts_total",
			Help: "memcached restarts noticed (pid or start time changed); the server's index is dropped."}, []string{"server"}),
	}
	for _, c := range []prometheus.Collector{m.removed, m.kept, m.nonToken, m.fetched, m.hidden,
		m.gone, m.serverErrors, m.crawlDuration, m.crawlBusy, m.flushes, m.indexEntries, m.refreshes, m.serverRestarts} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
