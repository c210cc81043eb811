package tokencache

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-multierror"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/backoff"
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
	DefaultFetchBatch          = 100
	DefaultDeleteBatch         = 100
	DefaultIndexLimit          = 1 << 22
	DefaultRefreshInterval     = 60 * time.Second
	DefaultLateWriteBackWindow = 15 * time.Second
	DefaultTokenLifetime       = time.Hour
	DefaultHeartbeatInterval   = 20 * time.Millisecond
	DefaultMarkerTimeout       = time.Second
	DefaultMaxConfirmLag       = 500 * time.Millisecond
	DefaultMaxPending          = 1 << 18
)

// Options configure an Invalidator. Zero fields take their defaults.
type Options struct {
	// Strategy, default Targeted.
	Strategy Strategy
	// FetchBatch is how many values one "gets" command fetches. Default 100.
	FetchBatch int
	// DeleteBatch is how many entries a crawl collects before deleting them.
	// Default 100.
	DeleteBatch int
	// IndexLimit bounds how many token entries are remembered per server
	// (about 104 bytes each). A server with more entries than that cannot
	// have a complete index: every batch crawls it and reads the values the
	// index could not remember. Default 1<<22 (4,194,304); -1 remembers
	// nothing (every batch reads every value: slow, and no live index).
	IndexLimit int
	// RefreshInterval is how often Run crawls a server whose live index is
	// complete, to forget the entries others deleted (memcached 1.6.18 does
	// not report deletions) and to check the index. A server whose index is
	// not complete is crawled at once, and again with back-off while it
	// cannot be completed. Default 60s.
	RefreshInterval time.Duration
	// LateWriteBackWindow is how long a notification stays in the recent
	// window: a token store reported during it that the notification
	// concerns is removed at once (a validation that raced with the change
	// and was written back late). Default 15s: keystonemiddleware may wait
	// up to memcache_pool_conn_get_timeout (10s) for a memcached connection
	// and memcache_pool_socket_timeout (3s) for the write, after Keystone's
	// answer reached it; see docs/INVALIDATION.md, "Late write-backs".
	LateWriteBackWindow time.Duration
	// TokenLifetime is Keystone's [token] expiration: a revocation event
	// stays in the recent window until issued_before + TokenLifetime, after
	// which no token it concerns is valid. Default 1h (Keystone's default).
	TokenLifetime time.Duration
	// HeartbeatInterval (--watch-heartbeat) is how often Run stores its
	// marker key on each server to prove the watcher current (see
	// heartbeatLoop). Three markers confirm the index, so it must be at most
	// a quarter of MaxConfirmLag. Default 20ms: a marker also wakes
	// memcached's logger thread, so a longer interval delays the report of
	// a late write-back by up to the interval.
	HeartbeatInterval time.Duration
	// MarkerTimeout is how long the watcher may take to report a marker
	// before its connection counts as stalled and is reopened. Default 1s.
	MarkerTimeout time.Duration
	// MaxConfirmLag is how old the heartbeat's confirmation may be for a
	// batch to be answered from the index. The agent's second pass must
	// come later than this after the first (regionagent
	// Options.SecondPassDelay), so that it runs only once the first pass's
	// answer is confirmed. Default 500ms.
	MaxConfirmLag time.Duration
	// MaxPending bounds the reported stores waiting to be read per server;
	// beyond it the index counts as incomplete. Default 262,144.
	MaxPending int
	// NoLiveIndex turns the live index off: Run only crawls every
	// RefreshInterval and every batch crawls every server (the behaviour
	// before the live index; for comparisons and as an escape hatch).
	NoLiveIndex bool
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
	for _, d := range []struct {
		name string
		v    time.Duration
		def  time.Duration
	}{
		{"RefreshInterval", o.RefreshInterval, DefaultRefreshInterval},
		{"LateWriteBackWindow (--late-write-back-window)", o.LateWriteBackWindow, DefaultLateWriteBackWindow},
		{"TokenLifetime (--token-lifetime)", o.TokenLifetime, DefaultTokenLifetime},
		{"HeartbeatInterval", o.HeartbeatInterval, DefaultHeartbeatInterval},
		{"MarkerTimeout", o.MarkerTimeout, DefaultMarkerTimeout},
		{"MaxConfirmLag", o.MaxConfirmLag, DefaultMaxConfirmLag},
	} {
		if d.v < 0 {
			errs = append(errs, fmt.Errorf("invalidator %s %v must not be negative (0 means %v)", d.name, d.v, d.def))
		}
	}
	if hb, lag := cmp.Or(o.HeartbeatInterval, DefaultHeartbeatInterval), cmp.Or(o.MaxConfirmLag, DefaultMaxConfirmLag); hb > 0 && lag > 0 && 4*hb > lag {
		errs = append(errs, fmt.Errorf("--watch-heartbeat %v: at most %v (a quarter of the confirmation bound %v: three markers confirm the index)", hb, lag/4, lag))
	}
	if o.MaxPending < 0 {
		errs = append(errs, fmt.Errorf("invalidator MaxPending %d must not be negative (0 means %d)", o.MaxPending, DefaultMaxPending))
	}
	return errors.Join(errs...)
}

func (o *Options) setDefaults() {
	if o.Strategy == "" {
		o.Strategy = Targeted
	}
	def := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
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
	if o.MaxPending == 0 {
		o.MaxPending = DefaultMaxPending
	}
	def(&o.RefreshInterval, DefaultRefreshInterval)
	def(&o.LateWriteBackWindow, DefaultLateWriteBackWindow)
	def(&o.TokenLifetime, DefaultTokenLifetime)
	def(&o.HeartbeatInterval, DefaultHeartbeatInterval)
	def(&o.MarkerTimeout, DefaultMarkerTimeout)
	def(&o.MaxConfirmLag, DefaultMaxConfirmLag)
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
	// EventID is the matching event's ID.
	EventID string
	// Late is set when the entry was stored after its event had been
	// handled (a validation written back late), found when the watcher
	// reported the store or a crawl read it.
	Late bool
}

// Counts are what one call did on one or all servers.
type Counts struct {
	// Scanned is the number of token entries looked at.
	Scanned int
	// Removed is the number of token entries deleted, unreadable ones
	// included.
	Removed int
	// UnreadableRemoved is the part of Removed whose values could not be read.
	UnreadableRemoved int
	// LateRemoved is the part of Removed stored after an earlier batch's
	// event that concerns them (late write-backs).
	LateRemoved int
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
	c.LateRemoved += o.LateRemoved
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
	// Live is set when the batch was answered from the server's live
	// index, without a crawl.
	Live bool
	// Crawl describes the server's metadump (zero for the live path and
	// Flush).
	Crawl memcache.CrawlStats
	// Flushed is set when flush_all succeeded (strategy Flush, or a server
	// whose dumps are disabled).
	Flushed bool
	// Duration is the server's whole part.
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
	// Swept is set when the call removed every token entry of every server
	// (an event that removes every token, or strategy Sweep) and succeeded.
	Swept bool
	// Flushed is set when at least one server was flushed (flush_all).
	Flushed bool
	// Servers holds one entry per configured server, in order.
	Servers  []ServerResult
	Duration time.Duration
}

// Invalidator removes the keystonemiddleware cache entries that batches of
// events concern from every memcached server of a region. See the package
// documentation. Its methods are safe for concurrent use; crawls of one
// server are serialised.
type Invalidator struct {
	cluster *memcache.Cluster
	opts    Options
	log     *slog.Logger
	m       *metrics
	servers []*serverState
	recent  *recent
	// markerKey is this Invalidator's heartbeat marker: not a token key.
	markerKey string

	encryptedMu     sync.Mutex
	encryptedLogged map[string]bool

	// watchDelay (tests only) slows the handling of every watch line.
	watchDelay atomic.Int64
}

// NewInvalidator validates opts and returns an Invalidator for cluster. It
// does not connect.
func NewInvalidator(cluster *memcache.Cluster, opts Options, reg prometheus.Registerer, log *slog.Logger) (*Invalidator, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	opts.setDefaults()
	if log == nil {
		log = slog.Default()
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("invalidator metrics: %w", err)
	}
	var id [8]byte
	_, _ = rand.Read(id[:])
	inv := &Invalidator{cluster: cluster, opts: opts, log: log, m: m,
		recent:          newRecent(opts.LateWriteBackWindow, opts.TokenLifetime, opts.Strategy == Sweep),
		markerKey:       "keystone-fanout/watch/" + hex.EncodeToString(id[:]),
		encryptedLogged: map[string]bool{}}
	for _, s := range cluster.Servers() {
		st := newServerState(inv, s)
		st.live.wake = make(chan struct{}, 1)
		st.live.crawlNow = make(chan struct{}, 1)
		st.live.marker = make(chan struct{}, 1)
		st.live.changed = make(chan struct{}, 1)
		inv.servers = append(inv.servers, st)
		m.indexEntries.WithLabelValues(s.String()).Set(0)
		m.encrypted.WithLabelValues(s.String()).Set(0)
		m.live.WithLabelValues(s.String()).Set(0)
		m.watching.WithLabelValues(s.String()).Set(0)
		for _, r := range lossReasons {
			m.losses.WithLabelValues(s.String(), r)
		}
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

// liveEnabled says whether Run keeps live indexes.
func (inv *Invalidator) liveEnabled() bool {
	return !inv.opts.NoLiveIndex && inv.opts.Strategy != Flush && inv.opts.IndexLimit >= 0
}

// Ping checks that every server answers (see memcache.Cluster.Ping).
func (inv *Invalidator) Ping(ctx context.Context) error { return inv.cluster.Ping(ctx) }

// Invalidate removes, from every server (in parallel), the token entries
// that events concern. A server whose live index is complete answers from
// it: the entries are found in memory and deleted at once, after the stores
// the watcher reported were read; any other server is crawled (one crawl
// for the whole batch). It returns when every server is done. A nil error
// means every server finished: the batch may be acknowledged once its
// second pass (the same call again, Options.MaxConfirmLag or more later)
// also succeeded. An error (a *multierror.Error of *memcache.ServerError,
// each naming its server) means at least one server did not; the Result
// still counts what was done, and calling Invalidate again with the same
// events is safe: it is idempotent.
//
// The events also enter the recent window (see recent.go): stores reported
// after this call that they concern are removed as soon as they are read.
//
// An empty batch, or one of the poller's proofs of progress only, does
// nothing.
func (inv *Invalidator) Invalidate(ctx context.Context, events []event.Event) (Result, error) {
	res := Result{Strategy: inv.opts.Strategy, Events: len(events)}
	if len(events) == 0 {
		return res, nil
	}
	b := newMatcher(events, inv.opts.Strategy == Sweep)
	if b.none() && inv.opts.Strategy != Flush {
		return res, nil
	}
	inv.recent.add(events, time.Now())
	ids := make(map[string]bool, len(events))
	for i := range events {
		ids[events[i].ID] = true
	}
	res, err := inv.each(ctx, res, func(st *serverState, r *ServerResult) error { return st.invalidate(ctx, b, ids, r) })
	if err == nil && (inv.opts.Strategy == Sweep || b.all >= 0) {
		res.Swept = true
	}
	// Calls, failures and durations are the region agent's metrics
	// (keystone_fanout_agent_invalidations_total, ..._failures_total,
	// ..._duration_seconds): one counter per fact.
	lvl := slog.LevelInfo
	if err != nil {
		lvl = slog.LevelWarn
	}
	live := 0
	for _, r := range res.Servers {
		if r.Live {
			live++
		}
	}
	inv.log.Log(ctx, lvl, "invalidation batch", "strategy", string(inv.opts.Strategy), "events", res.Events,
		"removed", res.Removed, "unreadable_removed", res.UnreadableRemoved, "kept", res.Kept, "hidden", res.Hidden,
		"fetched", res.Fetched, "live_servers", live, "servers", len(res.Servers), "duration_ms", res.Duration.Milliseconds(), "error", err)
	return res, err
}

// Refresh crawls every server and learns new entries, removing only what
// the recent window concerns (late write-backs), so that later batches find
// a warm index. Run calls it per server.
func (inv *Invalidator) Refresh(ctx context.Context) (Result, error) {
	return inv.each(ctx, Result{Strategy: inv.opts.Strategy}, func(st *serverState, r *ServerResult) error {
		return st.refresh(ctx, r)
	})
}

// Warm reports whether every server was crawled successfully at least once
// (by Refresh, Run or Invalidate), so that batches only read new values.
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

// Live reports, per server in configured order, whether its live index is
// complete and confirmed now (a batch would be answered from it).
func (inv *Invalidator) Live() []bool {
	out := make([]bool, len(inv.servers))
	now := time.Now()
	for i, st := range inv.servers {
		st.mu.Lock()
		out[i] = inv.liveEnabled() && st.usable(now)
		st.mu.Unlock()
	}
	return out
}

// each runs fn for every server in parallel and sums the results.
func (inv *Invalidator) each(ctx context.Context, res Result, fn func(st *serverState, r *ServerResult) error) (Result, error) {
	start := time.Now()
	results := make([]ServerResult, len(inv.servers))
	var wg sync.WaitGroup
	for i, st := range inv.servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := &results[i]
			r.Server = st.name
			s0 := time.Now()
			defer func() {
				if p := recover(); p != nil {
					r.Err = fmt.Errorf("panic: %v", p)
				}
				r.Duration = time.Since(s0)
				inv.account(st, r)
			}()
			r.Err = fn(st, r)
		}()
	}
	wg.Wait()
	var merr *multierror.Error
	for _, r := range results {
		res.Counts.add(r.Counts)
		res.Flushed = res.Flushed || r.Flushed
		if r.Err != nil {
			merr = multierror.Append(merr, r.Err)
		}
	}
	res.Servers = results
	res.Duration = time.Since(start)
	if merr != nil {
		merr.ErrorFormat = memcache.OneLine
	}
	return res, merr.ErrorOrNil()
}

// account records a server's result in the metrics and names its error.
func (inv *Invalidator) account(st *serverState, r *ServerResult) {
	m := inv.m
	m.crawlDuration.WithLabelValues(st.name).Observe(r.Duration.Seconds())
	m.kept.WithLabelValues(st.name).Add(float64(r.Kept))
	m.nonToken.WithLabelValues(st.name).Add(float64(r.NonToken))
	m.fetched.WithLabelValues(st.name).Add(float64(r.Fetched))
	m.hidden.WithLabelValues(st.name).Add(float64(r.Hidden))
	m.gone.WithLabelValues(st.name).Add(float64(r.Gone))
	st.mu.Lock()
	m.indexEntries.WithLabelValues(st.name).Set(float64(st.ix.len()))
	st.mu.Unlock()
	if r.Err != nil {
		var se *memcache.ServerError
		op := "invalidate"
		if errors.As(r.Err, &se) {
			op = se.Op
		} else {
			r.Err = &memcache.ServerError{Server: st.name, Op: op, Err: r.Err}
		}
		m.serverErrors.WithLabelValues(st.name, opLabel(op)).Inc()
	}
}

// opLabel keeps the op metric label to a fixed set.
func opLabel(op string) string {
	switch op {
	case "get", "delete", "set", "metadump", "stats", "flush_all", "invalidate", "probe", "watch", "version":
		return op
	case "get (dial)", "delete (dial)", "set (dial)", "metadump (dial)", "stats (dial)", "flush_all (dial)", "watch (dial)", "version (dial)":
		return "dial"
	}
	return "other"
}

// invalidate handles batch b on the server.
func (st *serverState) invalidate(ctx context.Context, b *matcher, ids map[string]bool, r *ServerResult) error {
	inv := st.inv
	if inv.opts.Strategy == Flush {
		inv.m.serverBatches.WithLabelValues(st.name, pathFlush).Inc()
		return st.flush(ctx, r)
	}
	st.mu.Lock()
	unusable := st.unusable
	flushMode := st.probed && (!st.features.Dumps || !st.features.Crawler)
	st.mu.Unlock()
	if unusable != nil {
		return st.errUnusable(unusable)
	}
	if ok, err := st.fromIndex(ctx, b, r); ok {
		inv.m.serverBatches.WithLabelValues(st.name, pathLive).Inc()
		return err
	}
	if flushMode {
		inv.m.serverBatches.WithLabelValues(st.name, pathFlush).Inc()
		return st.flush(ctx, r)
	}
	inv.m.serverBatches.WithLabelValues(st.name, pathCrawl).Inc()
	return st.runCrawl(ctx, b, ids, r)
}

// flush runs flush_all on the server. With a watch connection open since
// before, the (empty) index is then complete: every later store is
// reported.
func (st *serverState) flush(ctx context.Context, r *ServerResult) error {
	st.mu.Lock()
	watchEpoch, lossEpoch, watching := st.live.epoch, st.live.lossEpoch, st.live.up
	st.mu.Unlock()
	if err := st.srv.FlushAll(ctx); err != nil {
		return err
	}
	r.Flushed = true
	st.inv.m.flushes.WithLabelValues(st.name).Inc()
	if st.inv.opts.Strategy == Flush {
		return nil
	}
	st.mu.Lock()
	st.ix = newServerIndex(st.inv.indexLimit())
	st.lastCrawl, st.warm = time.Now(), true
	if watching {
		st.markComplete(watchEpoch, lossEpoch)
	}
	st.mu.Unlock()
	return nil
}

// fromIndex answers batch b from the live index if it is usable, and
// reports whether it did. The stores the watcher reported are read first;
// then, with the read lock held (so that every read before is in the index
// and every read after matches b, which is in the recent window), the
// entries b's events concern are found through the index's columns,
// forgotten and deleted.
func (st *serverState) fromIndex(ctx context.Context, b *matcher, r *ServerResult) (bool, error) {
	inv := st.inv
	reason := ""
	st.mu.Lock()
	now := time.Now()
	switch {
	case !inv.liveEnabled():
		reason = fallbackDisabled
	case !st.live.up:
		reason = fallbackNotWatching
	case !st.live.complete || st.ix.full:
		reason = fallbackIncomplete
	case !st.usable(now):
		reason = fallbackUnconfirmed
	}
	st.mu.Unlock()
	if reason != "" {
		inv.m.fallbacks.WithLabelValues(st.name, reason).Inc()
		return false, nil
	}
	if err := st.drainPending(ctx, &r.Counts); err != nil {
		return true, err
	}
	st.readMu.Lock()
	st.mu.Lock()
	if !st.usable(time.Now()) {
		st.mu.Unlock()
		st.readMu.Unlock()
		inv.m.fallbacks.WithLabelValues(st.name, fallbackIncomplete).Inc()
		return false, nil
	}
	dels := st.chooseFromIndex(b)
	n := st.ix.len()
	st.mu.Unlock()
	st.readMu.Unlock()
	r.Live = true
	r.Scanned += n
	r.Kept += n - len(dels)
	return true, st.remove(ctx, dels, &r.Counts)
}

// chooseFromIndex returns the removals of b among the index's entries.
// Call with st.mu held.
func (st *serverState) chooseFromIndex(b *matcher) []pendingDelete {
	ix := st.ix
	var dels []pendingDelete
	var buf []uint64
	taken := st.scratch[0][:0]
	take := func(slot uint32) {
		if taken.has(slot) {
			return
		}
		e := ix.entry(slot)
		var pd pendingDelete
		var ok bool
		pd, ok, buf = decide(b, ix, ix.keys[slot], &e, buf, nil)
		if ok {
			taken.add(slot)
			dels = append(dels, pd)
		}
	}
	for slot := range ix.forEvery {
		take(slot)
	}
	set, all := b.candidates(ix, st.scratch[1])
	if all {
		ix.each(take)
	} else {
		set.each(take)
	}
	st.scratch = [2]slotSet{taken, set}
	return dels
}

// refresh crawls the server without a batch (or, on a server whose dumps
// are disabled, flushes it once a watch connection is open).
func (st *serverState) refresh(ctx context.Context, r *ServerResult) error {
	st.mu.Lock()
	unusable := st.unusable
	flushMode := st.probed && (!st.features.Dumps || !st.features.Crawler)
	watching := st.live.up
	st.mu.Unlock()
	switch {
	case unusable != nil:
		return st.errUnusable(unusable)
	case flushMode && watching:
		return st.flush(ctx, r)
	case flushMode:
		return nil // nothing to list; batches flush
	}
	return st.runCrawl(ctx, nil, nil, r)
}

// Run keeps every server's index: with the live index on (the default), a
// watcher, a reader of the stores it reports and a heartbeat per server,
// and a crawl at start, after every loss and every RefreshInterval; with
// NoLiveIndex, a crawl at start and whenever no batch crawled a server for
// RefreshInterval. Failures are logged, counted and retried. It returns nil
// when ctx ends. With strategy Flush it only waits for ctx.
func (inv *Invalidator) Run(ctx context.Context) error {
	if inv.opts.Strategy == Flush {
		<-ctx.Done()
		return nil
	}
	var wg sync.WaitGroup
	for _, st := range inv.servers {
		loops := []func(context.Context){st.crawlLoop}
		if inv.liveEnabled() {
			loops = append(loops, st.watchLoop, st.heartbeatLoop, st.pendingLoop)
		}
		for _, loop := range loops {
			wg.Add(1)
			go func() {
				defer wg.Done()
				loop(ctx)
			}()
		}
	}
	wg.Wait()
	return nil
}

// crawlLoop crawls the server when its index needs it, until ctx ends.
func (st *serverState) crawlLoop(ctx context.Context) {
	inv := st.inv
	retry := backoff.New(100*time.Millisecond, inv.opts.RefreshInterval)
	if inv.liveEnabled() {
		// Let the watch connect first, so that the first crawl completes
		// the index.
		t := time.NewTimer(inv.opts.MarkerTimeout)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-st.live.crawlNow:
		case <-t.C:
		}
		t.Stop()
	}
	tick := time.NewTicker(max(min(inv.opts.RefreshInterval/4, time.Second), 10*time.Millisecond))
	defer tick.Stop()
	var next time.Time // no crawl before (back-off after failures or losses)
	for {
		st.mu.Lock()
		due := !st.warm || time.Since(st.lastCrawl) >= inv.opts.RefreshInterval ||
			(inv.liveEnabled() && st.live.up && !st.live.complete)
		st.mu.Unlock()
		if due && !time.Now().Before(next) {
			var r ServerResult
			start := time.Now()
			err := st.refresh(ctx, &r)
			r.Duration = time.Since(start)
			if ctx.Err() != nil {
				return
			}
			inv.account(st, &r)
			st.mu.Lock()
			incomplete := inv.liveEnabled() && st.live.up && !st.live.complete
			st.mu.Unlock()
			switch {
			case err != nil:
				inv.m.refreshes.WithLabelValues("error").Inc()
				d := retry.Next()
				next = time.Now().Add(d)
				inv.log.Warn("crawl failed", "server", st.name, "error", err, "retry_in", d)
			case incomplete:
				// Another loss while it ran: try again, with back-off.
				inv.m.refreshes.WithLabelValues("ok").Inc()
				next = time.Now().Add(retry.Next())
			default:
				inv.m.refreshes.WithLabelValues("ok").Inc()
				retry.Reset()
				next = time.Time{}
				inv.log.Debug("crawled", "server", st.name, "scanned", r.Scanned, "fetched", r.Fetched,
					"hidden", r.Hidden, "late_removed", r.LateRemoved, "duration_ms", r.Duration.Milliseconds())
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-st.live.crawlNow:
		}
	}
}

// setMode records a server's mode in the server_mode gauge.
func (inv *Invalidator) setMode(st *serverState, mode string) {
	for _, m := range modes {
		v := 0.0
		if m == mode {
			v = 1
		}
		inv.m.mode.WithLabelValues(st.name, m).Set(v)
	}
}

// noteEncrypted records how many ENCRYPT entries a server holds and says,
// once per server, what that costs.
func (inv *Invalidator) noteEncrypted(st *serverState, encrypted, total int) {
	inv.m.encrypted.WithLabelValues(st.name).Set(float64(encrypted))
	if encrypted == 0 {
		return
	}
	inv.encryptedMu.Lock()
	logged := inv.encryptedLogged[st.name]
	inv.encryptedLogged[st.name] = true
	inv.encryptedMu.Unlock()
	if logged {
		return
	}
	inv.log.Error("token cache entries are encrypted (keystonemiddleware memcache_security_strategy = ENCRYPT): keystone-fanout cannot read them, "+
		"so every event removes every token entry of the region and every service re-validates every token after every change in Keystone; "+
		"use memcache_security_strategy = MAC (entries stay authenticated, and readable) to keep targeted invalidation",
		"server", st.name, "encrypted_entries", encrypted, "token_entries", total)
}
