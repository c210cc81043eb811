package tokencache

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
)

// serverState is what an Invalidator knows of one memcached server.
//
// Locks, always taken in this order: crawlMu (one crawl at a time), readMu
// (reads of values, see read), mu (everything else, held briefly and never
// across a network call).
type serverState struct {
	inv  *Invalidator
	srv  *memcache.Server
	name string

	crawlMu sync.Mutex
	// crawlMode is the listing mode (CrawlHash, or CrawlLRU on a server
	// without the hash walk); guarded by crawlMu.
	crawlMode memcache.CrawlMode
	spare     [][]listed // crawl queue batches kept for the next crawl

	readMu sync.Mutex
	parser valueParser // guarded by readMu

	mu sync.Mutex
	ix *serverIndex
	// listed, during a crawl, holds the slots the crawl listed or read.
	listed   slotSet
	crawling bool
	// pending holds the token keys whose stores the watcher reported and
	// that were not read yet, with their expiry.
	pending map[binKey]uint32
	// pid and started identify the memcached process (restart detection).
	pid     string
	started int64
	// probed is set once Probe answered; features is what it found.
	probed   bool
	features memcache.Features
	// unusable is why the server cannot be used at all (SASL, binary only,
	// login required), nil otherwise.
	unusable  error
	lastCrawl time.Time
	warm      bool
	live      liveState
	// scratch are the slot sets of the live path, reused between batches.
	scratch [2]slotSet
}

func newServerState(inv *Invalidator, s *memcache.Server) *serverState {
	return &serverState{inv: inv, srv: s, name: s.String(), crawlMode: memcache.CrawlHash,
		ix: newServerIndex(inv.indexLimit()), pending: map[binKey]uint32{}}
}

// pendingDelete is an entry chosen for removal.
type pendingDelete struct {
	k               binKey
	reason, eventID string
	unreadable      bool
	// remembered: not listed by the crawl, deleted on the strength of the
	// index (sweep or unbounded batch).
	remembered bool
	// late: removed by an event of an earlier batch (a late write-back).
	late bool
}

// readValue is a value read, as onValue sees it: its entry, or found false
// when the key is gone.
type readValue struct {
	k     binKey
	e     entry
	found bool
}

// read takes keys to read (take runs with the read lock held; exp[i] is
// the expiry to record for keys[i], 0 for unknown), fetches their values,
// remembers them in the index and calls onValue for each key, found or not,
// in the order memcached answered, with the matcher of the recent window as
// it was when the read began. Reads of one server are serialised (readMu)
// and each result is applied to the index before the next read starts, so
// the index always ends with the value read last, whichever of the crawl,
// the watcher's reads or a batch read it; and a batch that takes the read
// lock after adding its events to the recent window knows that every read
// after it matches them, and every read before it is in the index. A key
// that is gone is forgotten. It returns how many keys take gave and how many
// values were found.
func (st *serverState) read(ctx context.Context, take func() ([]binKey, []uint32), onValue func(*readValue, *matcher) error) (taken, fetched int, err error) {
	st.readMu.Lock()
	defer st.readMu.Unlock()
	keys, exp := take()
	if len(keys) == 0 {
		return 0, 0, nil
	}
	recent := st.inv.recent.matcher(time.Now())
	strs := make([]string, len(keys))
	expOf := make(map[binKey]uint32, len(keys))
	for i := range keys {
		strs[i] = keys[i].String()
		if exp != nil {
			expOf[keys[i]] = exp[i]
		}
	}
	found := make(map[binKey]bool, len(keys))
	var cbErr error
	sweep := st.inv.opts.Strategy == Sweep
	err = st.srv.Get(ctx, strs, func(it memcache.Item) error {
		k, ok := parseKey([]byte(it.Key))
		if !ok || found[k] {
			return nil
		}
		found[k] = true
		fetched++
		state := stateKeyOnly
		var tok Token
		if !sweep {
			var perr error
			tok, perr = st.parser.parse(k.kind(), it.Flags, it.Value)
			switch {
			case perr == nil:
				state = stateReadable
			case errors.Is(perr, ErrEncrypted):
				state = stateEncrypted
			default:
				state = stateUnreadable
			}
		}
		st.mu.Lock()
		rv := readValue{k: k, found: true, e: st.ix.makeEntry(it.CAS, expOf[k], &tok, state)}
		if st.ix.put(k, rv.e) && st.crawling {
			if slot, ok := st.ix.lookup(k); ok {
				st.listed.add(slot)
			}
		}
		st.mu.Unlock()
		if cbErr == nil {
			cbErr = onValue(&rv, recent)
		}
		return nil
	})
	if err != nil {
		return len(keys), fetched, err
	}
	for _, k := range keys {
		if found[k] {
			continue
		}
		st.mu.Lock()
		st.ix.remove(k)
		st.mu.Unlock()
		if cbErr == nil {
			cbErr = onValue(&readValue{k: k}, recent)
		}
	}
	return len(keys), fetched, cbErr
}

// remove forgets dels in the index and then deletes them from the server:
// in that order, so that a store after the delete is reported, read and
// remembered again. It counts what it did in r. A delete that fails leaves
// the index without keys the server may still hold: that is a loss (see
// live.go).
func (st *serverState) remove(ctx context.Context, dels []pendingDelete, r *Counts) error {
	if len(dels) == 0 {
		return nil
	}
	keys := make([]string, len(dels))
	st.mu.Lock()
	for i := range dels {
		st.ix.remove(dels[i].k)
		keys[i] = dels[i].k.String()
	}
	st.mu.Unlock()
	found, err := st.srv.Delete(ctx, keys)
	if err != nil {
		st.mu.Lock()
		st.lose(lossDeleteFailed)
		st.mu.Unlock()
		return err
	}
	m := st.inv.m
	for i := range dels {
		pd := &dels[i]
		if !found[i] {
			if !pd.remembered {
				r.Gone++
			}
			continue
		}
		r.Removed++
		if pd.unreadable {
			r.UnreadableRemoved++
		}
		if pd.remembered {
			r.Hidden++
			r.Scanned++
		}
		if pd.late {
			r.LateRemoved++
			m.lateRemoved.WithLabelValues(st.name).Inc()
		}
		m.removed.WithLabelValues(st.name, pd.reason).Inc()
		if fn := st.inv.opts.OnRemove; fn != nil {
			fn(Removal{Server: st.name, Key: keys[i], Reason: pd.reason, EventID: pd.eventID, Late: pd.late})
		}
	}
	return nil
}

// decide returns the removal of an entry whose value is known if an event
// of m concerns it; unreadable entries are removed for every event. late
// marks a removal by an event of an earlier batch; batch, when not nil,
// tells the batch's events from the others.
func decide(m *matcher, ix *serverIndex, k binKey, e *entry, buf []uint64, batch map[string]bool) (pendingDelete, bool, []uint64) {
	if m == nil || m.none() {
		return pendingDelete{}, false, buf
	}
	if e.removedForEvery() {
		return pendingDelete{k: k, reason: "unreadable", eventID: m.events[0].ID, unreadable: true,
			late: batch != nil && !batch[m.events[0].ID]}, true, buf
	}
	if e.state() == stateKeyOnly {
		if m.all >= 0 {
			return pendingDelete{k: k, reason: m.reason(m.all), eventID: m.events[m.all].ID,
				late: batch != nil && !batch[m.events[m.all].ID]}, true, buf
		}
		return pendingDelete{}, false, buf
	}
	var i int32
	i, buf = m.match(ix, e, buf)
	if i < 0 {
		return pendingDelete{}, false, buf
	}
	id := m.events[i].ID
	return pendingDelete{k: k, reason: m.reason(i), eventID: id, late: batch != nil && !batch[id]}, true, buf
}
