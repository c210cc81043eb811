package tokencache

import "github.com/keystone-fanout/keystone-fanout/internal/memcache"

// SetCrawlMode forces the metadump mode of every server (tests of the
// crawl-hazard defence with the LRU walk).
func SetCrawlMode(inv *Invalidator, mode memcache.CrawlMode) {
	for _, st := range inv.servers {
		st.mu.Lock()
		st.mode = mode
		st.mu.Unlock()
	}
}

// IndexLen returns how many entries the index remembers for server i.
func IndexLen(inv *Invalidator, i int) int {
	st := inv.servers[i]
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.ix.len()
}
