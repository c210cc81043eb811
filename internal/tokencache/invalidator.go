package tokencache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-multierror"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
)

// Strategy is how an Invalidator removes entries.
type Strategy string

const (
	// Targeted removes the token entries an event concerns (Affects), every
	// unreadable token entry, and nothing else. The default.
	Targeted Strategy = "targeted"
	// Sweep removes every token entry for every batch, without reading
	// values, and nothing else.
	Sweep Strategy = "sweep"
	// Flush runs flush_all on every server: every item of the servers goes,
	// token or not.
	Flush Strategy = "flush"
)

// ParseStrategy checks a strategy name (as given on a command line).
func ParseStrategy(s string) (Strategy, error) {
	switch Strategy(s) {
	case Targeted, Sweep, Flush:
		return Strategy(s), nil
	case "":
		return Targeted, nil
	}
	return "", fmt.Errorf("unknown invalidation strategy %q: use targeted, sweep or flush", s)
}

// Defaults of Options.
const (
	DefaultFetchBatch      = 100
	DefaultDeleteBatch     = 100
	DefaultIndexLimit      = 1 << 20
	DefaultRefreshInterval = 15 * time.Second
)

// Options configure an Invalidator.
type Options struct {
	// Strategy, default Targeted.
	Strategy Strategy
	// FetchBatch is how many values one "gets" command fetches. Default 100.
	FetchBatch int
	// DeleteBatch is how many deletes are pipelined at once. Default 100.
	DeleteBatch int
	// IndexLimit bounds how many token entries are remembered per server
	// (about 100 bytes each, plus the ids they share). Entries beyond it are
	// still handled, but their values are fetched by every batch. Default
	// 1<<20; -1 remembers nothing (every batch reads every value: slow and
	// without the crawl-hazard defence).
	IndexLimit int
	// RefreshInterval is how often Run crawls a server that no batch crawled
	// meanwhile, so that the index is warm when an event comes. Default 15s.
	RefreshInterval time.Duration
	// OnRemove, when set, is called for every entry removed, from the
	// goroutine working on that server (one per server, concurrently). It
	// must be quick and must not call the Invalidator.
	OnRemove func(Removal)
}

// Validate fills zero fields with their defaults and checks the others.
// Errors name the option and the fix.
func (o *Options) Validate() error {
	if o.Strategy == "" {
		o.Strategy = Targeted
	}
	if o.FetchBatch == 0 {
		o.FetchBatch = DefaultFetchBatch
	}
	if o.DeleteBatch == 0 {
		o.DeleteBatch = DefaultDeleteBatch
	}
	if o.IndexLimit == 0 {
		o.IndexLimit = DefaultIndexLimit
	}
	if o.RefreshInterval == 0 {
		o.RefreshInterval = DefaultRefreshInterval
	}
	var errs []error
	if _, err := ParseStrategy(string(o.Strategy)); err != nil {
		errs = append(errs, err)
	}
	if o.FetchBatch < 0 || o.FetchBatch > 10000 {
		errs = append(errs, fmt.Errorf("invalidator FetchBatch %d: use 1 to 10000 (0 means %d)", o.FetchBatch, DefaultFetchBatch))
	}
	if o.DeleteBatch < 0 || o.DeleteBatch > 10000 {
		errs = append(errs, fmt.Errorf("invalidator DeleteBatch %d: use 1 to 10000 (0 means %d)", o.DeleteBatch, DefaultDeleteBatch))
	}
	if o.IndexLimit < -1 {
		errs = append(errs, fmt.Errorf("invalidator IndexLimit %d: use -1 (remember nothing), 0 (default %d) or a positive limit", o.IndexLimit, DefaultIndexLimit))
	}
	if o.RefreshInterval < 0 {
		errs = append(errs, fmt.Errorf("invalidator RefreshInterval %v must not be negative (0 means %v)", o.RefreshInterval, DefaultRefreshInterval))
	}
	return errors.Join(errs...)
}

// Removal describes one removed entry, for logs and metrics.
type Removal struct {
	// Server is the server as configured.
	Server string
	// Key is the memcached key.
	Key string
	// Reason is the type of the event that matched
	// ("identity.user.updated"), or "revocation", "unbounded" (an event that
	// widens to every token), "unreadable" (a value that cannot be read:
	// removed for every event) or "sweep".
	Reason string
	// EventID is the matching event's ID (empty for sweep).
	EventID string
}

// Counts are what one pass over one or all servers did.
type Counts struct {
	// Scanned is the number of token entries looked at.
	Scanned int
	// Removed is the number of token entries deleted, unreadable ones
	// included.
	Removed int
	// UnreadableRemoved is the part of Removed whose values could not be read.
	UnreadableRemoved int
	// Kept is the number of token entries examined and left in place.
	Kept int
	// NonToken is the number of other keys listed (never touched).
	NonToken int
	// Hidden is the number of remembered entries the crawl did not list but
	// a direct get still found: the crawl hazard, caught.
	Hidden int
	// Fetched is the number of values read.
	Fetched int
	// Gone is the number of entries that disappeared between listing and
	// get or delete (expired, evicted, or deleted by someone else).
	Gone int
}

func (c *Counts) add(o Counts) {
	c.Scanned += o.Scanned
	c.Removed += o.Removed
	c.UnreadableRemoved += o.UnreadableRemoved
	c.Kept += o.Kept
	c.NonToken += o.NonToken
	c.Hidden += o.Hidden
	c.Fetched += o.Fetched
	c.Gone += o.Gone
}

// ServerResult is one server's part of a Result.
type ServerResult struct {
	Server string
	Counts
	// Crawl describes the server's metadump (zero for Flush).
	Crawl memcache.CrawlStats
	// Flushed is set when flush_all succeeded (strategy Flush).
	Flushed bool
	// Duration is the server's whole pass.
	Duration time.Duration
	// Err is why the server did not finish, nil if it did.
	Err error
}

// Result is what one Invalidate or Refresh call did. Counts are the sums
// over Servers.
type Result struct {
	Strategy Strategy
	// Events is the number of events of the batch.
	Events int
	Counts
	// Servers holds one entry per configured server, in order.
	Servers  []ServerResult
	Duration time.Duration
}

// Invalidator removes the keystonemiddleware cache entries that batches of
// events concern from every memcached server of a region. See the package
// documentation. Its methods are safe for concurrent use; work on one server
// is serialised.
type Invalidator struct {
	cluster *memcache.Cluster
	opts    Options
	log     *slog.Logger
	m       *metrics
	servers []*serverState
}

// serverState is the per-server state, guarded by mu.
type serverState struct {
	srv       *memcache.Server
	name      string
	mu        sync.Mutex
	ix        *serverIndex
	gen       uint32
	mode      memcache.CrawlMode
	pid       string
	started   int64
	lastCrawl time.Time
	warm      bool
	spare     [][]listed // crawl queue batches kept for the next pass
	order     []uint32   // slots in the last listing order, reused between passes
}

// NewInvalidator validates opts and returns an Invalidator for cluster. It
// does not connect.
func NewInvalidator(cluster *memcache.Cluster, opts Options, reg prometheus.Registerer, log *slog.Logger) (*Invalidator, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("invalidator metrics: %w", err)
	}
	inv := &Invalidator{cluster: cluster, opts: opts, log: log, m: m}
	for _, s := range cluster.Servers() {
		inv.servers = append(inv.servers, &serverState{srv: s, name: s.String(), ix: newServerIndex(inv.indexLimit()), mode: memcache.CrawlHash})
		m.indexEntries.WithLabelValues(s.String()).Set(0)
	}
	return inv, nil
}

// indexLimit is the per-server index size: Options.IndexLimit, with -1
// (remember nothing) as 0.
func (inv *Invalidator) indexLimit() int {
	if inv.opts.IndexLimit < 0 {
		return 0
	}
	return inv.opts.IndexLimit
}

// Strategy returns the strategy in use.
func (inv *Invalidator) Strategy() Strategy { return inv.opts.Strategy }

// Invalidate removes, from every server, the token entries that events
// concern, with one crawl per server for the whole batch (servers in
// parallel). It returns when every server is done. A nil error means every
// server finished: the batch may be acknowledged. An error (a
// *multierror.Error of *memcache.ServerError, each naming its server) means
// at least one server did not; the Result still counts what was done, and
// calling Invalidate again with the same events is safe: it is idempotent,
// and it is also how a second pass is made (catching entries that a service
// stored from a validation that raced with the event).
//
// An empty batch does nothing.
func (inv *Invalidator) Invalidate(ctx context.Context, events []event.Event) (Result, error) {
	res := Result{Strategy: inv.opts.Strategy, Events: len(events)}
	if len(events) == 0 {
		return res, nil
	}
	return inv.pass(ctx, newMatcher(events), res)
}

// Refresh crawls every server and learns new entries without removing
// anything, so that later batches find a warm index. Run calls it.
func (inv *Invalidator) Refresh(ctx context.Context) (Result, error) {
	return inv.pass(ctx, nil, Result{Strategy: inv.opts.Strategy})
}

// Warm reports whether every server was crawled successfully at least once
// (by Refresh or Invalidate), so that batches only read new values.
func (inv *Invalidator) Warm() bool {
	for _, st := range inv.servers {
		st.mu.Lock()
		w := st.warm
		st.mu.Unlock()
		if !w {
			return false
		}
	}
	return true
}

// Run keeps the index warm: it crawls each server at start and then whenever
// no batch crawled it for RefreshInterval, until ctx ends. Failures are
// logged and counted and retried at the next interval. It returns nil when
// ctx ends. With strategy Flush it only waits for ctx.
func (inv *Invalidator) Run(ctx context.Context) error {
	if inv.opts.Strategy == Flush {
		<-ctx.Done()
		return nil
	}
	tick := time.NewTicker(max(inv.opts.RefreshInterval/4, 100*time.Millisecond))
	defer tick.Stop()
	for {
		var due []*serverState
		for _, st := range inv.servers {
			st.mu.Lock()
			if time.Since(st.lastCrawl) >= inv.opts.RefreshInterval || !st.warm {
				due = append(due, st)
			}
			st.mu.Unlock()
		}
		if len(due) > 0 {
			res, err := inv.passServers(ctx, nil, Result{Strategy: inv.opts.Strategy}, due)
			if ctx.Err() != nil {
				return nil
			}
			if err != nil {
				inv.m.refreshes.WithLabelValues("error").Inc()
				inv.log.Warn("index refresh failed", "error", err, "fetched", res.Fetched, "duration_ms", res.Duration.Milliseconds())
			} else {
				inv.m.refreshes.WithLabelValues("ok").Inc()
				inv.log.Debug("index refreshed", "servers", len(due), "scanned", res.Scanned, "fetched", res.Fetched,
					"hidden", res.Hidden, "duration_ms", res.Duration.Milliseconds())
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func (inv *Invalidator) pass(ctx context.Context, b *matcher, res Result) (Result, error) {
	return inv.passServers(ctx, b, res, inv.servers)
}

func (inv *Invalidator) passServers(ctx context.Context, b *matcher, res Result, servers []*serverState) (Result, error) {
	start := time.Now()
	results := make([]ServerResult, len(servers))
	var wg sync.WaitGroup
	for i, st := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				if r := recover(); r != nil {
					results[i].Err = &memcache.ServerError{Server: st.name, Op: "invalidate", Err: fmt.Errorf("panic: %v", r)}
				}
			}()
			results[i] = inv.serverPass(ctx, st, b)
		}()
	}
	wg.Wait()
	var merr *multierror.Error
	for _, r := range results {
		res.Counts.add(r.Counts)
		if r.Err != nil {
			merr = multierror.Append(merr, r.Err)
		}
	}
	res.Servers = results
	res.Duration = time.Since(start)
	if merr != nil {
		merr.ErrorFormat = memcache.OneLine
	}
	err := merr.ErrorOrNil()
	if b != nil {
		// Calls, failures and durations are the region agent's metrics
		// (keystone_fanout_agent_invalidations_total, ..._failures_total,
		// ..._duration_seconds): one counter per fact.
		lvl := slog.LevelInfo
		if err != nil {
			lvl = slog.LevelWarn
		}
		inv.log.Log(ctx, lvl, "invalidation batch", "strategy", string(inv.opts.Strategy), "events", res.Events,
			"removed", res.Removed, "unreadable_removed", res.UnreadableRemoved, "kept", res.Kept, "hidden", res.Hidden,
			"fetched", res.Fetched, "duration_ms", res.Duration.Milliseconds(), "error", err)
	}
	return res, err
}

// serverPass runs one batch (or, with b nil, a refresh) on one server.
func (inv *Invalidator) serverPass(ctx context.Context, st *serverState, b *matcher) ServerResult {
	st.mu.Lock()
	defer st.mu.Unlock()
	start := time.Now()
	r := ServerResult{Server: st.name}
	var err error
	if inv.opts.Strategy == Flush {
		if b != nil {
			if err = st.srv.FlushAll(ctx); err == nil {
				r.Flushed = true
				inv.m.flushes.WithLabelValues(st.name).Inc()
			}
		}
	} else {
		err = inv.crawlPass(ctx, st, b, &r)
	}
	r.Duration = time.Since(start)
	m := inv.m
	m.crawlDuration.WithLabelValues(st.name).Observe(r.Duration.Seconds())
	m.kept.WithLabelValues(st.name).Add(float64(r.Kept))
	m.nonToken.WithLabelValues(st.name).Add(float64(r.NonToken))
	m.fetched.WithLabelValues(st.name).Add(float64(r.Fetched))
	m.hidden.WithLabelValues(st.name).Add(float64(r.Hidden))
	m.gone.WithLabelValues(st.name).Add(float64(r.Gone))
	inv.m.indexEntries.WithLabelValues(st.name).Set(float64(st.ix.len()))
	if err != nil {
		var se *memcache.ServerError
		op := "invalidate"
		if errors.As(err, &se) {
			op = se.Op
		} else {
			err = &memcache.ServerError{Server: st.name, Op: op, Err: err}
		}
		inv.m.serverErrors.WithLabelValues(st.name, opLabel(op)).Inc()
		r.Err = err
	}
	return r
}

// opLabel keeps the op metric label to a fixed set.
func opLabel(op string) string {
	switch op {
	case "get", "delete", "metadump", "stats", "flush_all", "invalidate":
		return op
	case "get (dial)", "delete (dial)", "metadump (dial)", "stats (dial)", "flush_all (dial)":
		return "dial"
	}
	return "other"
}

// checkIdentity notices a restarted server (new pid or start time) and drops
// its index: CAS values start again from 1 after a restart.
func (inv *Invalidator) checkIdentity(ctx context.Context, st *serverState) error {
	stats, err := st.srv.Stats(ctx, "")
	if err != nil {
		return err
	}
	now, _ := strconv.ParseInt(stats["time"], 10, 64)
	up, _ := strconv.ParseInt(stats["uptime"], 10, 64)
	pid, started := stats["pid"], now-up
	if st.pid != "" && (pid != st.pid || math.Abs(float64(started-st.started)) > 2) {
		inv.log.Info("memcached restarted, forgetting its index", "server", st.name, "pid", pid, "previous_pid", st.pid)
		inv.m.serverRestarts.WithLabelValues(st.name).Inc()
		st.ix = newServerIndex(inv.indexLimit())
		st.warm = false
	}
	st.pid, st.started = pid, started
	return nil
}

func (inv *Invalidator) crawlPass(ctx context.Context, st *serverState, b *matcher, r *ServerResult) error {
	if err := inv.checkIdentity(ctx, st); err != nil {
		return err
	}
	st.gen++
	w := &worker{inv: inv, st: st, m: b, gen: st.gen, r: r, ctx: ctx, order: st.order[:0]}
	defer func() { st.order = w.order }()
	// The crawl is drained by its own goroutine into an unbounded queue
	// while this one fetches and deletes: memcached's crawler must never wait
	// for us. (It holds its lock while it waits to write to a full socket,
	// and a hash-table expansion pauses the worker threads until it gets that
	// lock: a get or delete sent while the crawl is not read can stall until
	// timeouts.)
	crawlCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	q := newListQueue(st.spare)
	defer func() { st.spare = q.spare() }()
	go func() {
		for {
			stats, err := st.srv.Crawl(crawlCtx, st.mode, q.item)
			r.Crawl = stats
			if err != nil && errors.Is(err, memcache.ErrCrawlModeUnsupported) && st.mode == memcache.CrawlHash && stats.Items == 0 {
				inv.log.Warn("memcached does not support metadump hash; falling back to metadump all, which can miss entries in use (remembered entries are checked directly)",
					"server", st.name, "error", err)
				st.mode = memcache.CrawlLRU
				continue
			}
			q.finish(err)
			return
		}
	}()
	var werr error
	for {
		batch, ok := q.pop()
		if !ok {
			break
		}
		if werr != nil {
			continue // drain until the crawl stops
		}
		for i := range batch {
			if werr = w.item(batch[i].k, batch[i].cas); werr != nil {
				cancel()
				break
			}
		}
		q.recycle(batch)
	}
	r.NonToken += q.nonToken
	inv.m.crawlBusy.WithLabelValues(st.name).Add(float64(r.Crawl.BusyRetries))
	if werr != nil {
		return werr
	}
	if q.err != nil {
		return q.err
	}
	if err := w.flushFetch(false); err != nil {
		return err
	}
	if err := w.checkRemembered(); err != nil {
		return err
	}
	if err := w.flushDeletes(); err != nil {
		return err
	}
	st.lastCrawl = time.Now()
	st.warm = true
	if len(w.order) >= 1000 && w.misses > len(w.order)/2 {
		st.ix.relayout(w.order) // memcached's listing order changed
	}
	if r.Hidden > 0 {
		inv.log.Warn("crawl did not list remembered entries that still exist; they were read directly and matched",
			"server", st.name, "hidden", r.Hidden, "mode", string(st.mode))
	}
	return nil
}
