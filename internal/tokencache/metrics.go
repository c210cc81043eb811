package tokencache

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
)

// metrics of an Invalidator: what happened on each memcached server. The
// calls themselves (how many, failed, how long) are counted by the region
// agent, which knows their pass. Label values are bounded: server is one of the
// configured servers, strategy one of three, reason an event type this
// version knows or one of a few fixed words (see matcher.reason), the
// others fixed lists.
type metrics struct {
	serverBatches  *prometheus.CounterVec   // server, path
	fallbacks      *prometheus.CounterVec   // server, reason
	removed        *prometheus.CounterVec   // server, reason
	lateRemoved    *prometheus.CounterVec   // server
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
	encrypted      *prometheus.GaugeVec     // server
	refreshes      *prometheus.CounterVec   // result
	serverRestarts *prometheus.CounterVec   // server
	live           *prometheus.GaugeVec     // server
	watching       *prometheus.GaugeVec     // server
	losses         *prometheus.CounterVec   // server, reason
	watchStores    *prometheus.CounterVec   // server
	watchSkipped   *prometheus.CounterVec   // server
	mode           *prometheus.GaugeVec     // server, mode
	features       *prometheus.GaugeVec     // server, feature
}

// Batch paths: the path label of server_batches_total.
const (
	pathLive  = "live"  // answered from the live index
	pathCrawl = "crawl" // a crawl of the whole server
	pathFlush = "flush" // flush_all
)

// Fallback reasons: why a batch crawled a server instead of answering from
// its index (the reason label of crawl_fallbacks_total).
const (
	fallbackNotWatching = "not_watching" // no watch connection (down, refused, Run not running)
	fallbackIncomplete  = "incomplete"   // watching, but no crawl has completed the index since the last loss
	fallbackUnconfirmed = "unconfirmed"  // the heartbeat has not confirmed the watcher recently
	fallbackDisabled    = "disabled"     // Options.NoLiveIndex
)

// Server modes: what a server allows (the mode label of server_mode).
const (
	modeLive     = "live"     // watch and dumps: the live index, crawls as the safety net
	modeCrawl    = "crawl"    // watch refused (-W): every batch crawls
	modeFlush    = "flush"    // dumps disabled (-X): flush_all instead of crawls
	modeUnusable = "unusable" // text protocol refused (SASL, -B binary, -Y): nothing can be done
)

var modes = []string{modeLive, modeCrawl, modeFlush, modeUnusable}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	const ns, sub = "keystone_fanout", "invalidator"
	durations := []float64{.0005, .001, .0025, .005, .01, .02, .05, .1, .15, .25, .5, 1, 2.5, 5, 10, 30}
	m := &metrics{
		serverBatches: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "server_batches_total",
			Help: "Batches handled on each server, by path: live (from the live index), crawl (a crawl of the whole server), flush (flush_all)."}, []string{"server", "path"}),
		fallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "crawl_fallbacks_total",
			Help: "Batches that crawled a server because its live index could not answer, by reason (not_watching, incomplete, unconfirmed, disabled)."}, []string{"server", "reason"}),
		removed: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "entries_removed_total",
			Help: "Token cache entries deleted, by server and reason (the event type that matched, revocation, unbounded, unreadable or sweep)."}, []string{"server", "reason"}),
		lateRemoved: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "late_writebacks_removed_total",
			Help: "Entries removed when they were stored after their event (a validation written back late), also counted in entries_removed_total."}, []string{"server"}),
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
			Help: "Duration of one server's part of a batch or refresh (crawl, value reads, deletes; or the live path).", Buckets: durations}, []string{"server"}),
		crawlBusy: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "crawl_busy_retries_total",
			Help: "Times memcached answered BUSY to a metadump (another crawl was running) before ours ran."}, []string{"server"}),
		flushes: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "flushes_total",
			Help: "flush_all commands sent (strategy flush, or a server whose dumps are disabled)."}, []string{"server"}),
		indexEntries: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "index_entries",
			Help: "Token entries remembered, per server."}, []string{"server"}),
		encrypted: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "encrypted_entries",
			Help: "Token entries of memcache_security_strategy ENCRYPT remembered, per server: unreadable, so every event removes every token entry; use MAC."}, []string{"server"}),
		refreshes: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "refreshes_total",
			Help: "Background crawls (Run), by result."}, []string{"result"}),
		serverRestarts: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "server_restarts_total",
			Help: "memcached restarts noticed (pid or start time changed); the server's index is dropped."}, []string{"server"}),
		live: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "live_index",
			Help: "1 while the server's live index is complete (batches are answered from it), else 0."}, []string{"server"}),
		watching: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "watching",
			Help: "1 while a watch connection to the server is open, else 0."}, []string{"server"}),
		losses: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "index_losses_total",
			Help: "Times the server's live index may have missed a store (and is crawled again), by reason."}, []string{"server", "reason"}),
		watchStores: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "watch_stores_total",
			Help: "Stores of token keys the watcher reported."}, []string{"server"}),
		watchSkipped: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "watch_skipped_lines_total",
			Help: "Watch lines memcached dropped for this watcher (skipped=N)."}, []string{"server"}),
		mode: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "server_mode",
			Help: "1 for the server's mode: live (watch and dumps), crawl (watch refused: every batch crawls), flush (dumps disabled: flush_all), unusable (text protocol refused)."}, []string{"server", "mode"}),
		features: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "memcached_features",
			Help: "What each server supports (1) or not (0): dumps, lru_crawler, mgdump, dump_ok_line."}, []string{"server", "feature"}),
	}
	for _, c := range []prometheus.Collector{m.serverBatches, m.fallbacks, m.removed, m.lateRemoved,
		m.kept, m.nonToken, m.fetched, m.hidden, m.gone, m.serverErrors, m.crawlDuration, m.crawlBusy, m.flushes, m.indexEntries,
		m.encrypted, m.refreshes, m.serverRestarts, m.live, m.watching, m.losses, m.watchStores, m.watchSkipped, m.mode, m.features} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// setFeatures records what Probe found.
func (m *metrics) setFeatures(server string, f memcache.Features) {
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	m.features.WithLabelValues(server, "dumps").Set(b(f.Dumps))
	m.features.WithLabelValues(server, "lru_crawler").Set(b(f.Crawler))
	m.features.WithLabelValues(server, "mgdump").Set(b(f.KeyDump))
	m.features.WithLabelValues(server, "dump_ok_line").Set(b(f.DumpOKLine))
}
