package memcache_test

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

// TestCrawlModesWithConcurrentReaders measures the crawl hazard
// (docs/INVALIDATION.md, "Finding every entry"): entries written by
// keystonemiddleware, aged until memcached moved them out of its HOT LRU, a
// third of them read in a loop by 4 concurrent readers while the server is
// crawled with "metadump all" and with "metadump hash". The hash walk must list every entry in every round; the
// LRU walk's misses are logged (the numbers in the package documentation).
func TestCrawlModesWithConcurrentReaders(t *testing.T) {
	const rounds, perRound = 30, 300
	srv := memcachetest.StartWith(t, 1, memcachetest.Options{MemoryMB: 256})
	c := newCluster(t, memcachetest.List(srv))
	s := c.Servers()[0]
	ctx := context.Background()

	g := kmwtest.NewGen(42)
	sets := make([][]string, rounds) // keys per round
	var entries []kmwtest.Entry
	for r := range rounds {
		for range perRound {
			e := g.Entry(kmwtest.Spec{UserID: g.ID(), UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default",
				Roles: []kmwtest.Role{{ID: g.ID(), Name: "member"}}})
			entries = append(entries, e)
			sets[r] = append(sets[r], kmwtest.NoneKey(e.TokenID))
		}
	}
	for _, w := range kmwtest.Write(t, []string{srv[0].Addr}, kmwtest.None, "", entries) {
		if !w.Stored {
			t.Fatalf("middleware did not store %s", w.Key)
		}
	}
	// Age: wait until the LRU maintainer moved everything out of HOT.
	deadline := time.Now().Add(15 * time.Second)
	for {
		st, err := s.Stats(ctx, "items")
		if err != nil {
			t.Fatal(err)
		}
		hot := 0
		for k, v := range st {
			if strings.HasSuffix(k, ":number_hot") && v != "0" {
				hot++
			}
		}
		if hot == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("items still HOT after 15s: %v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}

	missed := map[memcache.CrawlMode]int{}
	missedActive := map[memcache.CrawlMode]int{}
	roundsWithMiss := map[memcache.CrawlMode]int{}
	for r := range rounds {
		active := sets[r][:perRound/3]
		var stop atomic.Bool
		var reads atomic.Int64
		var wg sync.WaitGroup
		for i := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for !stop.Load() {
					for j := i; j < len(active); j += 4 {
						s.Get(ctx, []string{active[j]}, func(memcache.Item) error { return nil })
						reads.Add(1)
					}
				}
			}()
		}
		// Let every active entry be read at least once before crawling.
		for reads.Load() < int64(len(active)) {
			time.Sleep(time.Millisecond)
		}
		modes := []memcache.CrawlMode{memcache.CrawlLRU, memcache.CrawlHash}
		if r%2 == 1 {
			modes = []memcache.CrawlMode{memcache.CrawlHash, memcache.CrawlLRU}
		}
		for _, mode := range modes {
			seen := map[string]bool{}
			if _, err := s.Crawl(ctx, mode, func(it *memcache.MetaItem) error {
				seen[string(it.Key)] = true
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			n, na := 0, 0
			for _, set := range sets {
				for _, k := range set {
					if !seen[k] {
						n++
					}
				}
			}
			for _, k := range active {
				if !seen[k] {
					na++
				}
			}
			missed[mode] += n
			missedActive[mode] += na
			if n > 0 {
				roundsWithMiss[mode]++
			}
		}
		stop.Store(true)
		wg.Wait()
	}
	for _, mode := range []memcache.CrawlMode{memcache.CrawlLRU, memcache.CrawlHash} {
		t.Logf("metadump %-4s: %d of %d rounds missed entries; %d entries missed in total, %d of them in use (%d in use per round, %d entries on the server)",
			mode, roundsWithMiss[mode], rounds, missed[mode], missedActive[mode], perRound/3, rounds*perRound)
	}
	if missed[memcache.CrawlHash] != 0 {
		t.Fatalf("metadump hash missed %d entries", missed[memcache.CrawlHash])
	}
}
