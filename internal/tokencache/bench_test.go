package tokencache_test

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

// BenchmarkInvalidate measures one identity.user.updated batch against a
// region of 2 memcached servers holding n token entries each (realistic
// bodies with a catalog, about 4.6 KB per value, written in the strategy-None
// format the middleware uses), with a warm index (as Run keeps it). Before
// each iteration the user's 10 tokens are stored again, so every batch reads
// 10 new values and deletes 10 entries. Reported: p50/p99 latency of
// Invalidate, the first (cold) pass that reads every value, the Go heap the
// index takes per entry, the live heap after the cold pass (index plus the
// benchmark's own small state), the peak RSS of the process during the timed
// batches (after the garbage of generating the entries was returned to the
// system; the test binary itself adds a few MiB), and allocations per batch.
//
// crawler_sleep=default runs memcached with its defaults; crawler_sleep=0 with
// -o lru_crawler_sleep=0, which removes the crawler's pauses (100 µs each)
// from the hash walk.
func BenchmarkInvalidate(b *testing.B) {
	for _, n := range []int{1000, 10000, 100000} {
		for _, sleep := range []string{"default", "0"} {
			b.Run(fmt.Sprintf("entries=%d/crawler_sleep=%s", n, sleep), func(b *testing.B) { benchInvalidate(b, n, sleep) })
		}
	}
}

func benchInvalidate(b *testing.B, perServer int, sleep string) {
	const servers = 2
	mem := perServer*9/1000 + 64 // MB: ~4.7 KB per entry, slab rounding and slack
	var args []string
	if sleep != "default" {
		args = []string{"-o", "lru_crawler_sleep=" + sleep}
	}
	srv := memcachetest.StartWith(b, servers, memcachetest.Options{MemoryMB: mem, Args: args})
	c := newCluster(b, srv)
	ctx := context.Background()
	g := kmwtest.NewGen(uint64(perServer))
	roles := []kmwtest.Role{{ID: g.ID(), Name: "member"}, {ID: g.ID(), Name: "reader"}}
	domains := []string{"default", g.ID(), g.ID(), g.ID()}
	user := g.ID()
	var mine []kmwtest.Entry
	for range 10 {
		mine = append(mine, g.Entry(kmwtest.Spec{UserID: user, UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default", Roles: roles}))
	}
	// Others: about 5 tokens per user, 3 per project.
	for i, s := range c.Servers() {
		var batch []kmwtest.Entry
		uid, pid, dom := "", "", ""
		for j := range perServer {
			if j%5 == 0 {
				uid, dom = g.ID(), domains[j%len(domains)]
			}
			if j%3 == 0 {
				pid = g.ID()
			}
			batch = append(batch, g.Entry(kmwtest.Spec{UserID: uid, UserDomainID: dom, ProjectID: pid, ProjectDomainID: dom, Roles: roles}))
			if len(batch) == 2000 || j == perServer-1 {
				if err := kmwtest.WriteNone(ctx, s, batch, 30*time.Minute); err != nil {
					b.Fatal(err)
				}
				batch = batch[:0]
			}
		}
		_ = i
	}
	storeMine := func() {
		for _, e := range mine {
			k := kmwtest.NoneKey(e.TokenID)
			if err := kmwtest.WriteNone(ctx, c.Servers()[kmwtest.ServerFor(k, servers)], []kmwtest.Entry{e}, 30*time.Minute); err != nil {
				b.Fatal(err)
			}
		}
	}
	storeMine()

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	inv := newInvalidator(b, c, tokencache.Options{})
	start := time.Now()
	res, err := inv.Refresh(ctx)
	cold := time.Since(start)
	if err != nil {
		b.Fatal(err)
	}
	if res.Fetched != servers*perServer+len(mine) {
		b.Fatalf("cold pass fetched %d values, want %d", res.Fetched, servers*perServer+len(mine))
	}
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	indexBytes := float64(after.HeapAlloc) - float64(before.HeapAlloc)

	ev := []event.Event{{Version: 1, Kind: event.KindNotification, ID: "m", Type: "identity.user.updated", UserID: user}}
	// Give back the garbage of generating the entries, then measure the
	// peak RSS of the batches alone.
	debug.FreeOSMemory()
	resetPeakRSS()
	var lat []time.Duration
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		storeMine()
		b.StartTimer()
		t0 := time.Now()
		res, err := inv.Invalidate(ctx, ev)
		lat = append(lat, time.Since(t0))
		if err != nil {
			b.Fatal(err)
		}
		if os.Getenv("BENCH_DEBUG") != "" {
			for _, s := range res.Servers {
				b.Logf("server %s: pass %v crawl %v (%d items, %d busy) %+v", s.Server, s.Duration, s.Crawl.Duration, s.Crawl.Items, s.Crawl.BusyRetries, s.Counts)
			}
		}
		if res.Removed != len(mine) || res.Fetched != len(mine) {
			b.Fatalf("batch %+v: want %d removed and fetched", res.Counts, len(mine))
		}
	}
	b.StopTimer()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(float64(cold.Milliseconds()), "cold-ms")
	b.ReportMetric(indexBytes/float64(servers*perServer), "index-B/entry")
	b.ReportMetric(float64(after.HeapAlloc)/(1<<20), "live-heap-MiB")
	b.ReportMetric(float64(peakRSSKB())/1024, "peak-rss-MiB")
}

// resetPeakRSS resets the kernel's peak RSS of this process (Linux).
func resetPeakRSS() { os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) }

// peakRSSKB is this process's peak resident set size since resetPeakRSS.
func peakRSSKB() int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(f), "kB")))
			return n
		}
	}
	return 0
}

// BenchmarkParseValue reads one realistic cached validation (strategy None,
// catalog of 8 services): the cost of every new entry a batch meets.
func BenchmarkParseValue(b *testing.B) {
	g := kmwtest.NewGen(3)
	body := g.Body(kmwtest.Spec{UserID: g.ID(), UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default",
		Roles: []kmwtest.Role{{ID: g.ID(), Name: "member"}, {ID: g.ID(), Name: "reader"}}})
	v := kmwtest.NoneValue(g.TokenID(), body)
	b.SetBytes(int64(len(v)))
	b.ReportAllocs()
	for range b.N {
		if _, err := tokencache.ParseValue(tokencache.KeyNone, 0, v); err != nil {
			b.Fatal(err)
		}
	}
}
