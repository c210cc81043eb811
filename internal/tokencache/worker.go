package tokencache

import (
	"context"
	"sync"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
)

// pendingDelete is an entry chosen for removal.
type pendingDelete struct {
	k               binKey
	reason, eventID string
	unreadable      bool
	// remembered: not listed by the crawl, deleted on the strength of the
	// index (sweep or unbounded batch).
	remembered bool
}

// worker runs one pass over one server, under the server's lock.
type worker struct {
	inv *Invalidator
	st  *serverState
	m   *matcher // nil for a refresh
	gen uint32
	r   *ServerResult
	ctx context.Context

	keyBuf []uint64 // scratch for matcher.match
	next   uint32   // slot guess for the next listed entry
	order  []uint32 // slots in listing order
	misses int      // listed entries whose slot was not the guess
	parser valueParser
	fetch  []binKey
	dels   []pendingDelete
}

// keysOnly says entries are removed without reading values: strategy Sweep,
// or a batch with an event that widens to every token.
func (w *worker) keysOnly() bool {
	return w.inv.opts.Strategy == Sweep || (w.m != nil && w.m.all >= 0)
}

// listed is a token entry a crawl listed.
type listed struct {
	k   binKey
	cas uint64
}

// listQueue carries crawl lines from the goroutine reading the metadump to
// the worker, without bound, so that the metadump is always read as fast as
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
	// maxSpare bounds the batches kept for reuse between passes.
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
	q.cur = append(q.cur, listed{k, it.CAS})
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

// item handles one listed token entry.
func (w *worker) item(k binKey, cas uint64) error {
	w.r.Scanned++
	ix := w.st.ix
	var e *entry
	slot, known := ix.lookup(k, w.next)
	if known {
		if slot != w.next {
			w.misses++
		}
		e = &ix.entries[slot]
		w.next = slot + 1
		w.order = append(w.order, slot)
	}
	if w.keysOnly() {
		if known {
			e.gen = w.gen
		} else {
			ix.put(k, entry{cas: cas, gen: w.gen})
		}
		if w.m == nil {
			return nil
		}
		return w.del(w.wide(k, false))
	}
	if known && e.cas == cas && e.state != stateKeyOnly {
		e.gen = w.gen
		if w.m == nil {
			return nil
		}
		return w.decide(k, e)
	}
	if known {
		e.gen = w.gen // listed; its value is read below
	}
	w.fetch = append(w.fetch, k)
	if len(w.fetch) >= w.inv.opts.FetchBatch {
		return w.flushFetch(false)
	}
	return nil
}

// wide is the removal of k for a sweep or an unbounded batch.
func (w *worker) wide(k binKey, remembered bool) pendingDelete {
	if w.inv.opts.Strategy == Sweep {
		return pendingDelete{k: k, reason: "sweep", remembered: remembered}
	}
	return pendingDelete{k: k, reason: "unbounded", eventID: w.m.events[w.m.all].ID, remembered: remembered}
}

// decide matches an entry whose value is known and removes it if an event
// of the batch concerns it. Unreadable entries are removed for every batch.
func (w *worker) decide(k binKey, e *entry) error {
	if e.state == stateUnreadable {
		return w.del(pendingDelete{k: k, reason: "unreadable", eventID: w.m.events[0].ID, unreadable: true})
	}
	var i int32
	i, w.keyBuf = w.m.match(w.st.ix, e, w.keyBuf)
	if i >= 0 {
		return w.del(pendingDelete{k: k, reason: w.m.reason(i), eventID: w.m.events[i].ID})
	}
	w.r.Kept++
	return nil
}

// flushFetch reads the values of w.fetch, remembers them, and matches them.
// hidden marks entries the crawl did not list (remembered ones being
// checked): those found count as Hidden.
func (w *worker) flushFetch(hidden bool) error {
	if len(w.fetch) == 0 {
		return nil
	}
	keys := make([]string, len(w.fetch))
	for i := range w.fetch {
		keys[i] = w.fetch[i].String()
	}
	found := make(map[binKey]bool, len(keys))
	ix := w.st.ix
	err := w.st.srv.Get(w.ctx, keys, func(it memcache.Item) error {
		k, ok := parseKey([]byte(it.Key))
		if !ok || found[k] {
			return nil
		}
		found[k] = true
		w.r.Fetched++
		if hidden {
			w.r.Hidden++
			w.r.Scanned++
		}
		if w.inv.opts.Strategy == Sweep {
			// Only a refresh fetches in sweep mode (to check remembered keys).
			ix.put(k, entry{cas: it.CAS, gen: w.gen})
			return nil
		}
		tok, perr := w.parser.parse(k.kind(), it.Flags, it.Value)
		e := ix.makeEntry(it.CAS, w.gen, &tok, perr != nil)
		ix.put(k, e) // when the index is full, e is only matched
		if w.m == nil {
			return nil
		}
		return w.decide(k, &e)
	})
	if err != nil {
		return err
	}
	for _, k := range w.fetch {
		if !found[k] {
			ix.remove(k)
			if !hidden {
				w.r.Gone++
			}
		}
	}
	w.fetch = w.fetch[:0]
	return nil
}

// checkRemembered handles remembered entries the crawl did not list: in a
// sweep or unbounded batch they are deleted (a DELETED answer means the
// crawl missed them), otherwise their current values are read and matched.
// Entries that no longer exist are forgotten.
func (w *worker) checkRemembered() error {
	ix := w.st.ix
	var stale []binKey
	ix.each(func(k binKey, e *entry) {
		if e.gen != w.gen {
			stale = append(stale, k)
		}
	})
	if w.m != nil && w.keysOnly() {
		for _, k := range stale {
			if err := w.del(w.wide(k, true)); err != nil {
				return err
			}
		}
		return nil
	}
	for _, k := range stale {
		w.fetch = append(w.fetch, k)
		if len(w.fetch) >= w.inv.opts.FetchBatch {
			if err := w.flushFetch(true); err != nil {
				return err
			}
		}
	}
	return w.flushFetch(true)
}

func (w *worker) del(pd pendingDelete) error {
	w.dels = append(w.dels, pd)
	if len(w.dels) >= w.inv.opts.DeleteBatch {
		return w.flushDeletes()
	}
	return nil
}

// flushDeletes deletes the chosen entries and forgets them.
func (w *worker) flushDeletes() error {
	if len(w.dels) == 0 {
		return nil
	}
	keys := make([]string, len(w.dels))
	for i := range w.dels {
		keys[i] = w.dels[i].k.String()
	}
	found, err := w.st.srv.Delete(w.ctx, keys)
	if err != nil {
		return err
	}
	for i := range w.dels {
		pd := &w.dels[i]
		w.st.ix.remove(pd.k)
		if !found[i] {
			if !pd.remembered {
				w.r.Gone++
			}
			continue
		}
		w.r.Removed++
		if pd.unreadable {
			w.r.UnreadableRemoved++
		}
		if pd.remembered {
			w.r.Hidden++
			w.r.Scanned++
		}
		w.inv.m.removed.WithLabelValues(w.st.name, pd.reason).Inc()
		if fn := w.inv.opts.OnRemove; fn != nil {
			fn(Removal{Server: w.st.name, Key: keys[i], Reason: pd.reason, EventID: pd.eventID})
		}
	}
	w.dels = w.dels[:0]
	return nil
}
