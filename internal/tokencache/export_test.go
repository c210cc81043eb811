package tokencache

import (
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
)

// SetCrawlMode forces the metadump mode of every server (tests of the
// crawl-hazard defence with the LRU walk).
func SetCrawlMode(inv *Invalidator, mode memcache.CrawlMode) {
	for _, st := range inv.servers {
		st.crawlMu.Lock()
		st.crawlMode = mode
		st.crawlMu.Unlock()
	}
}

// IndexLen returns how many entries the index remembers for server i.
func IndexLen(inv *Invalidator, i int) int {
	st := inv.servers[i]
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.ix.len()
}

// Indexed is what the index remembers of one entry.
type Indexed struct {
	CAS uint64
	// Exp is the expiry in Unix seconds, 0 for none.
	Exp uint32
}

// IndexSnapshot returns server i's index by key.
func IndexSnapshot(inv *Invalidator, i int) map[string]Indexed {
	st := inv.servers[i]
	st.mu.Lock()
	defer st.mu.Unlock()
	out := map[string]Indexed{}
	st.ix.each(func(slot uint32) {
		out[st.ix.keys[slot].String()] = Indexed{CAS: st.ix.cas[slot], Exp: st.ix.exp[slot]}
	})
	return out
}

// Pending returns how many reported stores of server i wait to be read.
func Pending(inv *Invalidator, i int) int {
	st := inv.servers[i]
	st.mu.Lock()
	defer st.mu.Unlock()
	return len(st.pending)
}

// SetWatchDelay makes the watcher take d to handle each line: a watcher
// that reads slowly.
func SetWatchDelay(inv *Invalidator, d time.Duration) { inv.watchDelay.Store(int64(d)) }

// Remembers reports whether server i's index holds key.
func Remembers(inv *Invalidator, i int, key string) bool {
	k, ok := parseKey([]byte(key))
	if !ok {
		return false
	}
	st := inv.servers[i]
	st.mu.Lock()
	defer st.mu.Unlock()
	_, ok = st.ix.lookup(k)
	return ok
}
