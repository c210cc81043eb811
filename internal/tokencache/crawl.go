package tokencache

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
)

// A crawl lists every item of a server and brings the index up to date: it
// reads the values of entries that are new or were stored again (their CAS
// changed) and, for a batch, removes the entries the batch's events concern.
// It is today's path for a batch on a server whose index is not complete,
// the way an index becomes complete, and the periodic reconciliation of a
// complete one (Options.RefreshInterval).

// crawl is one crawl of one server.
type crawl struct {
	st  *serverState
	ctx context.Context
	// b is the batch (nil for a refresh); wide says its removals need no
	// value (strategy Sweep or an event that removes every token).
	b    *matcher
	wide bool
	// batch holds the IDs of b's events, to tell late write-backs. The values
	// read are matched against b and the recent window (see
	// serverState.read).
	batch map[string]bool
	r     *ServerResult

	keyBuf []uint64
	fetch  []binKey
	exps   []uint32
	dels   []pendingDelete
}

// listed is a token entry a crawl listed.
type listed struct {
	k   binKey
	cas uint64 // 0: unknown (mgdump)
	exp uint32
}

// listQueue carries crawl lines from the goroutine reading the metadump to
// the crawl, without bound, so that the metadump is always read as fast as
// memcached writes it.
type listQueue struct {
	mu       sync.Mutex
	batches  [][]listed
	cur      []listed // filled by item, pushed when full
	done     bool
	err      error
	ready    chan struct{}
	nonToken int        // written by the crawl goroutine, read after pop reports the end
	free     [][]listed // consumed batches, for reuse
}

const (
	listBatch = 256
	// maxSpare bounds the batches kept for reuse between crawls.
	maxSpare = 64
)

func newListQueue(spare [][]listed) *listQueue {
	return &listQueue{ready: make(chan struct{}, 1), free: spare}
}

// recycle gives a consumed batch back for reuse.
func (q *listQueue) recycle(b []listed) {
	q.mu.Lock()
	if len(q.free) < maxSpare {
		q.free = append(q.free, b[:0])
	}
	q.mu.Unlock()
}

// spare returns the batches kept for reuse, once the queue is done.
func (q *listQueue) spare() [][]listed {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.free
}

// item is the Crawl callback.
func (q *listQueue) item(it *memcache.MetaItem) error {
	k, ok := parseKey(it.Key)
	if !ok {
		q.nonToken++
		return nil
	}
	if q.cur == nil {
		q.mu.Lock()
		if n := len(q.free); n > 0 {
			q.cur = q.free[n-1]
			q.free = q.free[:n-1]
		}
		q.mu.Unlock()
		if q.cur == nil {
			q.cur = make([]listed, 0, listBatch)
		}
	}
	var exp uint32
	if it.Exp > 0 && it.Exp < 1<<32 {
		exp = uint32(it.Exp)
	}
	q.cur = append(q.cur, listed{k, it.CAS, exp})
	if len(q.cur) == listBatch {
		q.push(q.cur)
		q.cur = nil
	}
	return nil
}

func (q *listQueue) push(b []listed) {
	q.mu.Lock()
	q.batches = append(q.batches, b)
	q.mu.Unlock()
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// finish ends the queue with the crawl's error.
func (q *listQueue) finish(err error) {
	if len(q.cur) > 0 {
		q.push(q.cur)
		q.cur = nil
	}
	q.mu.Lock()
	q.done, q.err = true, err
	q.mu.Unlock()
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// pop returns the next batch, blocking; false once the crawl ended and every
// batch was taken.
func (q *listQueue) pop() ([]listed, bool) {
	for {
		q.mu.Lock()
		if len(q.batches) > 0 {
			b := q.batches[0]
			q.batches[0] = nil
			q.batches = q.batches[1:]
			q.mu.Unlock()
			return b, true
		}
		done := q.done
		q.mu.Unlock()
		if done {
			return nil, false
		}
		<-q.ready
	}
}

// checkIdentity notices a restarted server (new pid or start time) and drops
// its index: CAS values start again from 1 after a restart.
func (st *serverState) checkIdentity(ctx context.Context) error {
	stats, err := st.srv.Stats(ctx, "")
	if err != nil {
		return err
	}
	now, _ := strconv.ParseInt(stats["time"], 10, 64)
	up, _ := strconv.ParseInt(stats["uptime"], 10, 64)
	pid, started := stats["pid"], now-up
	st.mu.Lock()
	if st.pid != "" && (pid != st.pid || absDiff(started, st.started) > 2) {
		st.forgetLocked(pid)
	}
	st.pid, st.started = pid, started
	st.mu.Unlock()
	return nil
}

// runCrawl crawls the server for batch b (nil: a refresh). keysOnly lists
// with mgdump when the server has it and no CAS is needed (a refresh of a
// complete index, which the watcher keeps current).
func (st *serverState) runCrawl(ctx context.Context, b *matcher, batchIDs map[string]bool, r *ServerResult) error {
	st.crawlMu.Lock()
	defer st.crawlMu.Unlock()
	inv := st.inv
	if err := st.checkIdentity(ctx); err != nil {
		return err
	}
	st.mu.Lock()
	watchEpoch, lossEpoch, watching := st.live.epoch, st.live.lossEpoch, st.live.up
	mode := st.crawlMode
	if b == nil && st.live.complete && st.features.KeyDump && mode == memcache.CrawlHash {
		mode = memcache.CrawlKeys
	}
	st.crawling, st.listed = true, st.listed[:0]
	st.mu.Unlock()
	defer func() {
		st.mu.Lock()
		st.crawling = false
		st.mu.Unlock()
	}()
	c := &crawl{st: st, ctx: ctx, b: b, batch: batchIDs, r: r}
	c.wide = inv.opts.Strategy == Sweep || (b != nil && b.all >= 0)

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
			stats, err := st.srv.Crawl(crawlCtx, mode, q.item)
			r.Crawl = stats
			if err != nil && errors.Is(err, memcache.ErrCrawlModeUnsupported) && stats.Items == 0 {
				switch mode {
				case memcache.CrawlKeys:
					inv.log.Info("memcached does not have mgdump; refreshing with metadump", "server", st.name, "error", err)
					st.mu.Lock()
					st.features.KeyDump = false
					st.mu.Unlock()
					mode = memcache.CrawlHash
					continue
				case memcache.CrawlHash:
					inv.log.Warn("memcached does not support metadump hash; falling back to metadump all, which can miss entries in use (remembered entries are checked directly)",
						"server", st.name, "error", err)
					st.crawlMode, mode = memcache.CrawlLRU, memcache.CrawlLRU
					continue
				}
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
			if werr = c.item(&batch[i]); werr != nil {
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
	if err := c.flushFetch(false); err != nil {
		return err
	}
	if err := c.checkRemembered(); err != nil {
		return err
	}
	if err := c.flushDeletes(); err != nil {
		return err
	}
	st.mu.Lock()
	st.lastCrawl = time.Now()
	st.warm = true
	if st.ix.full {
		st.lose(lossIndexFull)
	} else if watching {
		st.markComplete(watchEpoch, lossEpoch)
	}
	encrypted, total := st.ix.encrypted, st.ix.len()
	st.mu.Unlock()
	inv.noteEncrypted(st, encrypted, total)
	if r.Hidden > 0 {
		inv.log.Warn("crawl did not list remembered entries that still exist; they were read directly and matched",
			"server", st.name, "hidden", r.Hidden, "mode", string(mode))
	}
	return nil
}

// item handles one listed token entry.
func (c *crawl) item(l *listed) error {
	c.r.Scanned++
	st := c.st
	st.mu.Lock()
	slot, known := st.ix.lookup(l.k)
	var e entry
	if known {
		st.listed.add(slot)
		e = st.ix.entry(slot)
	}
	if c.wide {
		if !known {
			st.ix.put(l.k, entry{cas: l.cas, exp: l.exp})
			if slot, ok := st.ix.lookup(l.k); ok {
				st.listed.add(slot)
			}
		}
		st.mu.Unlock()
		if c.b == nil {
			return nil
		}
		return c.del(c.wideRemoval(l.k, false))
	}
	if known && l.exp != 0 {
		st.ix.exp[slot] = l.exp // the TTL may have been extended (touch)
	}
	if known && (l.cas == 0 || e.cas == l.cas) && e.state() != stateKeyOnly {
		var pd pendingDelete
		var ok bool
		if c.b != nil {
			pd, ok, c.keyBuf = decide(c.b, st.ix, l.k, &e, c.keyBuf, nil)
		}
		st.mu.Unlock()
		if ok {
			return c.del(pd)
		}
		if c.b != nil {
			c.r.Kept++
		}
		return nil
	}
	st.mu.Unlock()
	c.fetch = append(c.fetch, l.k)
	c.exps = append(c.exps, l.exp)
	if len(c.fetch) >= st.inv.opts.FetchBatch {
		return c.flushFetch(false)
	}
	return nil
}

// wideRemoval is the removal of k for a sweep or an unbounded batch.
func (c *crawl) wideRemoval(k binKey, remembered bool) pendingDelete {
	i := max(c.b.all, 0)
	return pendingDelete{k: k, reason: c.b.reason(i), eventID: c.b.events[i].ID, remembered: remembered}
}

// flushFetch reads the values of c.fetch, remembers them, and matches them
// against the batch and the recent window. hidden
// marks entries the crawl did not list (remembered ones being checked):
// those found count as Hidden.
func (c *crawl) flushFetch(hidden bool) error {
	if len(c.fetch) == 0 {
		return nil
	}
	st := c.st
	var dels []pendingDelete
	_, n, err := st.read(c.ctx, func() ([]binKey, []uint32) { return c.fetch, c.exps }, func(rv *readValue, recent *matcher) error {
		if !rv.found {
			if !hidden {
				c.r.Gone++
			}
			return nil
		}
		if hidden {
			c.r.Hidden++
			c.r.Scanned++
		}
		var pd pendingDelete
		var ok bool
		st.mu.Lock()
		if c.b != nil {
			pd, ok, c.keyBuf = decide(c.b, st.ix, rv.k, &rv.e, c.keyBuf, nil)
		}
		if !ok {
			pd, ok, c.keyBuf = decide(recent, st.ix, rv.k, &rv.e, c.keyBuf, c.batch)
		}
		st.mu.Unlock()
		switch {
		case ok:
			dels = append(dels, pd)
		case c.b != nil:
			c.r.Kept++
		}
		return nil
	})
	c.r.Fetched += n
	c.fetch, c.exps = c.fetch[:0], c.exps[:0]
	if err != nil {
		return err
	}
	for _, pd := range dels {
		if err := c.del(pd); err != nil {
			return err
		}
	}
	return nil
}

// checkRemembered handles remembered entries the crawl did not list: in a
// sweep or unbounded batch they are deleted (a DELETED answer means the
// crawl missed them), otherwise their current values are read and matched.
// Entries that no longer exist are forgotten.
func (c *crawl) checkRemembered() error {
	st := c.st
	var stale []binKey
	st.mu.Lock()
	st.ix.each(func(slot uint32) {
		if !st.listed.has(slot) {
			stale = append(stale, st.ix.keys[slot])
		}
	})
	st.mu.Unlock()
	if c.b != nil && c.wide {
		for _, k := range stale {
			if err := c.del(c.wideRemoval(k, true)); err != nil {
				return err
			}
		}
		return nil
	}
	for _, k := range stale {
		c.fetch = append(c.fetch, k)
		c.exps = append(c.exps, 0)
		if len(c.fetch) >= st.inv.opts.FetchBatch {
			if err := c.flushFetch(true); err != nil {
				return err
			}
		}
	}
	return c.flushFetch(true)
}

func (c *crawl) del(pd pendingDelete) error {
	c.dels = append(c.dels, pd)
	if len(c.dels) >= c.st.inv.opts.DeleteBatch {
		return c.flushDeletes()
	}
	return nil
}

// flushDeletes deletes the chosen entries.
func (c *crawl) flushDeletes() error {
	if len(c.dels) == 0 {
		return nil
	}
	err := c.st.remove(c.ctx, c.dels, &c.r.Counts)
	c.dels = c.dels[:0]
	return err
}
