package memcache_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
)

// BenchmarkCrawl measures one metadump of a server holding n items of size
// bytes (1 byte, and 4,700 bytes like a cached token validation with its
// catalog), in both modes, including parsing every line, with memcached's
// default crawler pauses and with -o lru_crawler_sleep=0.
func BenchmarkCrawl(b *testing.B) {
	for _, sleep := range []string{"default", "0"} {
		for _, c := range []struct{ n, size int }{{0, 1}, {1000, 1}, {10000, 1}, {100000, 1}, {10000, 4700}, {100000, 4700}} {
			var args []string
			if sleep != "default" {
				args = []string{"-o", "lru_crawler_sleep=" + sleep}
			}
			srv := memcachetest.StartWith(b, 1, memcachetest.Options{MemoryMB: c.n*c.size*3/2>>20 + 64, Args: args})
			s := newCluster(b, memcachetest.List(srv)).Servers()[0]
			ctx := context.Background()
			value := make([]byte, c.size)
			var items []memcache.Item
			for i := range c.n {
				items = append(items, memcache.Item{Key: fmt.Sprintf("tokens/%064x", i), Value: value})
				if len(items) == 1000 || i == c.n-1 {
					if err := s.Set(ctx, items, time.Hour); err != nil {
						b.Fatal(err)
					}
					items = items[:0]
				}
			}
			for _, mode := range []memcache.CrawlMode{memcache.CrawlHash, memcache.CrawlLRU} {
				b.Run(fmt.Sprintf("crawler_sleep=%s/items=%d/size=%d/mode=%s", sleep, c.n, c.size, mode), func(b *testing.B) {
					for range b.N {
						got := 0
						if _, err := s.Crawl(ctx, mode, func(*memcache.MetaItem) error { got++; return nil }); err != nil {
							b.Fatal(err)
						}
						if got != c.n && mode == memcache.CrawlHash {
							b.Fatalf("listed %d of %d", got, c.n)
						}
					}
				})
			}
			srv[0].Stop()
		}
	}
}
