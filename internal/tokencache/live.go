package tokencache

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/backoff"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
)

// The live index of a server (see the package documentation, "The live
// index"): while Run runs, a watcher per server reports every store, the
// stored token keys are read shortly after (pendingLoop), and a heartbeat
// proves the watcher is current. A server whose index is complete answers
// a batch from memory; any doubt makes it incomplete until a crawl has
// made it complete again.

// Reasons a complete index stops being complete: the losses_total label
// values.
const (
	lossWatchDown     = "watch_down"     // the watch connection ended
	lossWatchStalled  = "watch_stalled"  // a heartbeat marker was not reported in time
	lossSkipped       = "skipped"        // memcached dropped lines for this watcher (skipped=N)
	lossWorkerDropped = "worker_dropped" // memcached dropped log lines at its worker threads
	lossRestarted     = "restarted"      // memcached restarted (pid or start time changed)
	lossReadFailed    = "read_failed"    // a reported store could not be read
	lossDeleteFailed  = "delete_failed"  // a delete failed: the index forgot a key the server may hold
	lossPendingFull   = "pending_full"   // more reported stores waiting than Options.MaxPending
	lossIndexFull     = "index_full"     // the index could not remember an entry (Options.IndexLimit)
)

var lossReasons = []string{lossWatchDown, lossWatchStalled, lossSkipped, lossWorkerDropped, lossRestarted,
	lossReadFailed, lossDeleteFailed, lossPendingFull, lossIndexFull}

// liveState is the watcher's side of a serverState, guarded by its mu.
type liveState struct {
	// up is set while a watch connection is registered; since is when
	// memcached answered its OK, epoch counts the connections.
	up    bool
	since time.Time
	epoch uint64
	// lossEpoch counts losses; a crawl makes the index complete only if no
	// loss happened while it ran.
	lossEpoch uint64
	complete  bool
	// confirmed is the time up to which every store memcached logged is known
	// to have been reported (or a loss recorded): see heartbeatLoop.
	confirmed time.Time
	// dropped is memcached's log_worker_dropped when the watch started or
	// when last checked.
	dropped    uint64
	hasDropped bool
	// cancel ends the current watch connection.
	cancel context.CancelFunc
	// refused is set when the server refuses "watch" (-W).
	refused error
	// wake wakes pendingLoop; crawlNow asks the crawl loop for a crawl;
	// marker receives the heartbeat marker's reports; changed tells the
	// heartbeat that a watch connection opened or ended, or that memcached
	// dropped lines (possibly its marker's).
	wake, crawlNow, marker, changed chan struct{}
}

// lose records that the index may miss stores: it is not complete until a
// crawl that begins after now has finished without another loss. Call with
// st.mu held.
func (st *serverState) lose(reason string) {
	l := &st.live
	l.lossEpoch++
	if l.complete {
		l.complete = false
		st.inv.m.live.WithLabelValues(st.name).Set(0)
		st.inv.log.Warn("live index incomplete: batches crawl this server until a crawl completes it again",
			"server", st.name, "reason", reason)
	}
	st.inv.m.losses.WithLabelValues(st.name, reason).Inc()
	signal(l.crawlNow)
}

// usable reports whether a batch can be answered from the index at now:
// complete, the watcher connected, and the heartbeat has confirmed every
// store up to at most Options.MaxConfirmLag ago. Call with st.mu held.
func (st *serverState) usable(now time.Time) bool {
	l := &st.live
	return l.complete && l.up && !st.ix.full && now.Sub(l.confirmed) <= st.inv.opts.MaxConfirmLag
}

func signal(c chan struct{}) {
	if c == nil {
		return
	}
	select {
	case c <- struct{}{}:
	default:
	}
}

// markComplete makes the index complete after a crawl that began at epoch
// lossEpoch with the watch connection of watchEpoch, if nothing was lost
// since. Call with st.mu held.
func (st *serverState) markComplete(watchEpoch, lossEpoch uint64) {
	l := &st.live
	if !l.up || l.epoch != watchEpoch || l.lossEpoch != lossEpoch || st.ix.full || l.complete {
		return
	}
	l.complete = true
	st.inv.m.live.WithLabelValues(st.name).Set(1)
	st.inv.log.Info("live index complete: batches are answered from memory", "server", st.name,
		"entries", st.ix.len(), "watching_since", l.since.Format(time.RFC3339Nano))
}

// watchTopics are the watch topics in order of preference.
var watchTopics = [][]string{{"mutations", "evictions", "deletions"}, {"mutations", "evictions"}}

// watchLoop keeps a watch connection to the server until ctx ends.
func (st *serverState) watchLoop(ctx context.Context) {
	inv := st.inv
	retry := backoff.New(100*time.Millisecond, 5*time.Second)
	topics := 0
	for ctx.Err() == nil {
		if !st.probe(ctx) {
			if !backoff.Sleep(ctx, retry.Next()) {
				return
			}
			continue
		}
		st.mu.Lock()
		sinceUnusable := st.unusable
		st.mu.Unlock()
		if sinceUnusable != nil {
			if !backoff.Sleep(ctx, time.Minute) {
				return
			}
			continue
		}
		// The drop counter before the watch starts: a drop after it is a
		// loss.
		if stats, err := st.srv.Stats(ctx, ""); err == nil {
			st.mu.Lock()
			st.live.dropped, _ = strconv.ParseUint(stats["log_worker_dropped"], 10, 64)
			st.live.hasDropped = stats["log_worker_dropped"] != ""
			st.mu.Unlock()
		}
		wctx, cancel := context.WithCancel(ctx)
		st.mu.Lock()
		st.live.cancel = cancel
		st.mu.Unlock()
		err := st.srv.Watch(wctx, watchTopics[topics], func() {
			st.mu.Lock()
			l := &st.live
			l.up, l.since, l.refused = true, time.Now(), nil
			l.epoch++
			l.confirmed = time.Time{} // to be confirmed on this connection
			st.mu.Unlock()
			inv.m.watching.WithLabelValues(st.name).Set(1)
			inv.log.Info("watching memcached's stores", "server", st.name, "topics", watchTopics[topics])
			retry.Reset()
			signal(st.live.crawlNow)
			signal(st.live.changed)
		}, st.onWatchLine)
		cancel()
		st.mu.Lock()
		wasUp := st.live.up
		st.live.up = false
		if wasUp {
			st.lose(lossWatchDown)
		}
		st.mu.Unlock()
		signal(st.live.changed)
		inv.m.watching.WithLabelValues(st.name).Set(0)
		if ctx.Err() != nil {
			return
		}
		switch {
		case errors.Is(err, memcache.ErrWatchTopicUnsupported) && topics+1 < len(watchTopics):
			topics++
			continue
		case errors.Is(err, memcache.ErrWatchRefused):
			st.mu.Lock()
			first := st.live.refused == nil
			st.live.refused = err
			listable := !st.probed || (st.features.Dumps && st.features.Crawler)
			st.mu.Unlock()
			if listable {
				inv.setMode(st, modeCrawl)
			}
			if first {
				inv.log.Warn("memcached refuses watch (started with -W): every batch crawls this server (its whole cache, tens to hundreds of milliseconds) "+
					"and validations written back after an event are caught only by the agent's second pass; start memcached without -W",
					"server", st.name, "error", err)
			}
			if !backoff.Sleep(ctx, time.Minute) {
				return
			}
			continue
		}
		d := retry.Next()
		lvl := inv.log.Warn
		if !wasUp {
			lvl = inv.log.Debug
		}
		lvl("watch connection ended; reconnecting", "server", st.name, "error", err, "retry_in", d)
		if !backoff.Sleep(ctx, d) {
			return
		}
	}
}

// onWatchLine handles one line of the watch.
func (st *serverState) onWatchLine(wl *memcache.WatchLine) error {
	inv := st.inv
	if d := inv.watchDelay.Load(); d > 0 {
		time.Sleep(time.Duration(d))
	}
	switch wl.Kind {
	case memcache.WatchSkipped:
		inv.m.watchSkipped.WithLabelValues(st.name).Add(float64(wl.Skipped))
		st.mu.Lock()
		st.lose(lossSkipped)
		st.mu.Unlock()
		signal(st.live.changed) // the heartbeat's marker may be among them
		inv.log.Warn("memcached dropped watch lines (the agent read too slowly); the server is crawled again",
			"server", st.name, "skipped", wl.Skipped)
	case memcache.WatchStore:
		if !wl.Stored {
			return nil
		}
		if string(wl.Key) == inv.markerKey {
			signal(st.live.marker)
			return nil
		}
		k, ok := parseKey(wl.Key)
		if !ok {
			return nil
		}
		inv.m.watchStores.WithLabelValues(st.name).Inc()
		var exp uint32
		if wl.TTL > 0 {
			exp = uint32(wl.Time.Unix() + wl.TTL)
		}
		st.mu.Lock()
		if len(st.pending) >= inv.opts.MaxPending {
			clear(st.pending)
			st.lose(lossPendingFull)
		} else {
			st.pending[k] = exp
		}
		st.mu.Unlock()
		signal(st.live.wake)
	case memcache.WatchEviction, memcache.WatchDeletion:
		if k, ok := parseKey(wl.Key); ok {
			st.mu.Lock()
			st.ix.remove(k)
			st.mu.Unlock()
		}
	}
	return nil
}

// pendingLoop reads the stores the watcher reported, as soon as they are
// reported, and removes at once the values that an event of the recent
// window concerns (late write-backs), until ctx ends.
func (st *serverState) pendingLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-st.live.wake:
		}
		for ctx.Err() == nil {
			var c Counts
			n, err := st.readPending(ctx, &c)
			if err != nil {
				break // counted and logged by readPending
			}
			if c.LateRemoved > 0 {
				st.inv.log.Info("removed validations written back after their event", "server", st.name, "entries", c.LateRemoved)
			}
			if n == 0 {
				break
			}
		}
	}
}

// readPending reads up to Options.FetchBatch reported keys and removes those
// an event of the recent window concerns. It returns how many keys it took.
// A read that fails is a loss: the keys it took are no longer pending and
// were not read.
func (st *serverState) readPending(ctx context.Context, c *Counts) (int, error) {
	inv := st.inv
	var readErr error
	defer func() {
		if readErr != nil && ctx.Err() == nil {
			inv.m.serverErrors.WithLabelValues(st.name, "get").Inc()
			st.mu.Lock()
			clear(st.pending)
			st.lose(lossReadFailed)
			st.mu.Unlock()
			inv.log.Warn("reading reported stores failed", "server", st.name, "error", readErr)
		}
	}()
	take := func() ([]binKey, []uint32) {
		st.mu.Lock()
		defer st.mu.Unlock()
		keys := make([]binKey, 0, min(len(st.pending), inv.opts.FetchBatch))
		exps := make([]uint32, 0, cap(keys))
		for k, exp := range st.pending {
			if len(keys) == inv.opts.FetchBatch {
				break
			}
			keys = append(keys, k)
			exps = append(exps, exp)
			delete(st.pending, k)
		}
		return keys, exps
	}
	var dels []pendingDelete
	var buf []uint64
	if inv.opts.Strategy == Sweep {
		// Values are never read: remember the keys; any event of the window
		// removes them.
		st.readMu.Lock()
		keys, exps := take()
		m := inv.recent.matcher(time.Now())
		st.mu.Lock()
		for i, k := range keys {
			e := entry{exp: exps[i]}
			st.ix.put(k, e)
			if pd, ok, _ := decide(m, st.ix, k, &e, nil, nil); ok {
				pd.late = true
				dels = append(dels, pd)
			}
		}
		st.mu.Unlock()
		st.readMu.Unlock()
		return len(keys), st.remove(ctx, dels, c)
	}
	n, fetched, err := st.read(ctx, take, func(rv *readValue, m *matcher) error {
		if !rv.found {
			return nil
		}
		var pd pendingDelete
		var ok bool
		st.mu.Lock()
		pd, ok, buf = decide(m, st.ix, rv.k, &rv.e, buf, nil)
		st.mu.Unlock()
		if ok {
			pd.late = true
			dels = append(dels, pd)
		}
		return nil
	})
	c.Fetched += fetched
	inv.m.fetched.WithLabelValues(st.name).Add(float64(fetched))
	if err != nil {
		readErr = err
		return n, err
	}
	return n, st.remove(ctx, dels, c)
}

// drainPending reads every reported key not read yet (a batch does this
// before it answers from the index).
func (st *serverState) drainPending(ctx context.Context, c *Counts) error {
	for {
		n, err := st.readPending(ctx, c)
		if err != nil || n == 0 {
			return err
		}
	}
}

// heartbeatLoop proves that the watcher is current, until ctx ends. Every
// Options.HeartbeatInterval it stores the Invalidator's marker key (a key
// that is not a token key, with a short TTL) and waits for the watcher to
// report it; every fifth marker it also reads memcached's stats, for a
// restart and for log lines its worker threads dropped.
//
// Why three markers: memcached's logger thread collects each worker
// thread's lines in turn, so a store logged before marker A on another
// thread may be written after A. Marker B is stored after A was reported,
// so the logger reads it at least one round later, and by then it has
// collected every thread's lines logged before A; marker C, stored after B
// was reported, is written after all of them. So once C is reported, and a
// stats read after that shows no drop, every store logged before A was
// stored has been reported (or a skipped=N line said it was lost): the
// index is confirmed up to A's time. The markers also keep memcached's
// logger thread awake: idle, it sleeps up to a second between rounds, and
// a marker every 20 ms keeps the delay of a reported store to a few
// milliseconds.
func (st *serverState) heartbeatLoop(ctx context.Context) {
	inv := st.inv
	type mark struct{ wrote, seen time.Time }
	var chain []mark
	// epoch is the watch connection the chain belongs to; stalled, one the
	// heartbeat gave up on (no marker is written until it is replaced).
	var epoch, stalled uint64
	n := 0
	tick := time.NewTicker(inv.opts.HeartbeatInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		st.mu.Lock()
		up, ep := st.live.up, st.live.epoch
		st.mu.Unlock()
		if !up || ep == stalled {
			chain = chain[:0]
			continue
		}
		if ep != epoch {
			epoch, chain = ep, chain[:0]
		}
		select { // a report of an earlier marker that came late
		case <-st.live.marker:
		default:
		}
		wrote := time.Now()
		if err := st.srv.Set(ctx, []memcache.Item{{Key: inv.markerKey, Value: []byte(strconv.Itoa(n))}}, markerTTL); err != nil {
			inv.m.serverErrors.WithLabelValues(st.name, "set").Inc()
			continue // not confirmed: after MaxConfirmLag the server is not usable
		}
		timer := time.NewTimer(inv.opts.MarkerTimeout)
		seen := false
	wait:
		for {
			select {
			case <-ctx.Done():
				timer.Stop()
				return
			case <-st.live.changed:
				// The marker went to a connection that ended, or its line
				// may have been dropped: store a new one.
				break wait
			case <-timer.C:
				st.mu.Lock()
				if st.live.epoch == epoch && st.live.up {
					st.lose(lossWatchStalled)
					if st.live.cancel != nil {
						st.live.cancel() // reconnect
					}
				}
				st.mu.Unlock()
				stalled = epoch
				inv.log.Warn("the watcher did not report the heartbeat marker in time; reconnecting", "server", st.name,
					"timeout", inv.opts.MarkerTimeout)
				break wait
			case <-st.live.marker:
				seen = true
				break wait
			}
		}
		timer.Stop()
		if !seen {
			chain = chain[:0]
			continue
		}
		chain = append(chain, mark{wrote, time.Now()})
		if len(chain) > 3 {
			chain = chain[len(chain)-3:]
		}
		n++
		if n%5 != 0 || len(chain) < 3 {
			continue
		}
		stats, err := st.srv.Stats(ctx, "")
		if err != nil {
			inv.m.serverErrors.WithLabelValues(st.name, "stats").Inc()
			continue
		}
		dropped, _ := strconv.ParseUint(stats["log_worker_dropped"], 10, 64)
		now, _ := strconv.ParseInt(stats["time"], 10, 64)
		up2, _ := strconv.ParseInt(stats["uptime"], 10, 64)
		st.mu.Lock()
		switch {
		case st.live.epoch != epoch || !st.live.up:
		case st.pid != "" && (stats["pid"] != st.pid || absDiff(now-up2, st.started) > 2):
			st.lose(lossRestarted)
			if st.live.cancel != nil {
				st.live.cancel()
			}
		case st.live.hasDropped && dropped > st.live.dropped:
			st.live.dropped = dropped
			st.lose(lossWorkerDropped)
			inv.log.Warn("memcached dropped log lines at its worker threads (stats log_worker_dropped); the server is crawled again",
				"server", st.name, "log_worker_dropped", dropped)
		default:
			st.live.confirmed = chain[0].wrote
		}
		st.mu.Unlock()
	}
}

// markerTTL is the TTL of the heartbeat marker: it outlives its agent by
// seconds only.
const markerTTL = 10 * time.Second

func absDiff(a, b int64) int64 {
	if a > b {
		return a - b
	}
	return b - a
}

// probe asks the server what it supports, once per process start of the
// server, records it, logs what it means and reports whether the server
// answered.
func (st *serverState) probe(ctx context.Context) bool {
	inv := st.inv
	pctx, cancel := context.WithTimeout(ctx, 2*inv.opts.MarkerTimeout+5*time.Second)
	defer cancel()
	f, err := st.srv.Probe(pctx)
	if err != nil {
		if errors.Is(err, memcache.ErrBinaryOnly) || f.TextAuth {
			st.mu.Lock()
			first := st.unusable == nil
			st.unusable = err
			st.mu.Unlock()
			inv.setMode(st, modeUnusable)
			if first {
				inv.log.Error("memcached does not accept the text protocol keystone-fanout speaks: no event can be handled on this server "+
					"(every batch fails and is retried, nothing is acknowledged); run the region's memcached without -S/-B binary/-Y, "+
					"with TLS (-Z) for protection", "server", st.name, "error", err)
			}
			return true
		}
		inv.log.Debug("probing memcached failed", "server", st.name, "error", err)
		return false
	}
	st.mu.Lock()
	st.unusable = nil
	restarted := st.probed && (f.PID != st.features.PID || absDiff(f.Started.Unix(), st.features.Started.Unix()) > 2)
	first := !st.probed || restarted
	st.probed, st.features = true, f
	if st.pid != "" && (f.PID != st.pid || absDiff(f.Started.Unix(), st.started) > 2) {
		st.forgetLocked(f.PID)
	}
	st.pid, st.started = f.PID, f.Started.Unix()
	st.mu.Unlock()
	if !first {
		return true
	}
	inv.m.setFeatures(st.name, f)
	switch {
	case !f.Dumps || !f.Crawler:
		inv.setMode(st, modeFlush)
		inv.log.Error("memcached cannot list its entries (dumps disabled with -X, or -o no_lru_crawler): keystone-fanout falls back to flush_all on this server "+
			"(every key, token or not, once at start and after every watch interruption; on every batch while the watch is down); start memcached without -X",
			"server", st.name, "version", f.Version, "dumps", f.Dumps, "lru_crawler", f.Crawler)
	default:
		inv.setMode(st, modeLive)
		inv.log.Info("memcached", "server", st.name, "version", f.Version, "mgdump", f.KeyDump, "dump_ok_line", f.DumpOKLine)
	}
	return true
}

// forgetLocked drops what the index knows of a restarted server. Call with
// st.mu held.
func (st *serverState) forgetLocked(pid string) {
	st.inv.log.Info("memcached restarted, forgetting its index", "server", st.name, "pid", pid, "previous_pid", st.pid)
	st.inv.m.serverRestarts.WithLabelValues(st.name).Inc()
	st.ix = newServerIndex(st.inv.indexLimit())
	clear(st.pending)
	st.warm = false
	st.lose(lossRestarted)
}

// errUnusable wraps the reason a server cannot be used for a batch.
func (st *serverState) errUnusable(err error) error {
	return &memcache.ServerError{Server: st.name, Op: "probe", Err: fmt.Errorf("server unusable: %w", err)}
}
