package tokencache_test

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

var (
	flagBenchSizes = flag.String("tokencache.bench-sizes", "1000,10000,100000",
		"BenchmarkInvalidate: token entries per server, comma-separated")
	flagBenchNoCatalog = flag.Bool("tokencache.bench-no-catalog", false,
		"BenchmarkInvalidate: token bodies without a catalog (1.2 KB values instead of 4.6 KB), for sizes the machine cannot hold otherwise")
)

// BenchmarkInvalidate measures one identity.user.updated batch against a
// region of 2 memcached servers holding n token entries each (realistic
// bodies with a catalog, about 4.6 KB per value, written in the strategy-None
// format the middleware uses), about 5 tokens per user and 3 per project.
//
// path=crawl is the crawl path (no Run, so no live index; the index is
// warmed once by a cold crawl): before each iteration the user's 10 tokens
// are stored again, so every batch crawls both servers, reads 10 new values
// and deletes 10 entries. path=live runs Run and waits for the live index:
// before each iteration 10 tokens of a new user are stored and read by the
// watcher's reader (untimed), and the batch finds and deletes them from
// memory.
//
// Reported: p50/p99 latency of Invalidate, the first (cold) crawl that reads
// every value, the Go heap the index takes per entry, the live heap after the
// cold crawl, the peak RSS of the process during the timed batches (after
// the garbage of generating the entries was returned to the system; the test
// binary itself adds a few MiB), and allocations per batch.
func BenchmarkInvalidate(b *testing.B) {
	for _, f := range strings.Split(*flagBenchSizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 10 {
			b.Fatalf("-tokencache.bench-sizes: %q is not a number of entries (at least 10)", f)
		}
		for _, path := range []string{"crawl", "live"} {
			b.Run(fmt.Sprintf("entries=%d/path=%s", n, path), func(b *testing.B) { benchInvalidate(b, n, path) })
		}
	}
}

func benchInvalidate(b *testing.B, perServer int, path string) {
	const servers = 2
	mem := perServer*9/1000 + 64 // MB: ~4.7 KB per entry, slab rounding and slack
	srv := memcachetest.StartWith(b, servers, memcachetest.Options{MemoryMB: mem})
	c := newCluster(b, srv)
	ctx := context.Background()
	g := kmwtest.NewGen(uint64(perServer))
	g.NoCatalog = *flagBenchNoCatalog
	roles := []kmwtest.Role{{ID: g.ID(), Name: "member"}, {ID: g.ID(), Name: "reader"}}
	domains := []string{"default", g.ID(), g.ID(), g.ID()}
	tokensOf := func(user string) []kmwtest.Entry {
		var out []kmwtest.Entry
		for range 10 {
			out = append(out, g.Entry(kmwtest.Spec{UserID: user, UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default", Roles: roles}))
		}
		return out
	}
	user := g.ID()
	mine := tokensOf(user)
	// Others: about 5 tokens per user, 3 per project.
	for _, s := range c.Servers() {
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
	}
	store := func(es []kmwtest.Entry) {
		for _, e := range es {
			k := kmwtest.NoneKey(e.TokenID)
			if err := kmwtest.WriteNone(ctx, c.Servers()[kmwtest.ServerFor(k, servers)], []kmwtest.Entry{e}, 30*time.Minute); err != nil {
				b.Fatal(err)
			}
		}
	}
	store(mine)

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	var inv *tokencache.Invalidator
	start := time.Now()
	if path == "live" {
		r := runInvalidator(b, c, tokencache.Options{})
		r.waitLive(b)
		inv = r.Invalidator
	} else {
		inv = newInvalidator(b, c, tokencache.Options{})
		res, err := inv.Refresh(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if res.Fetched != servers*perServer+len(mine) {
			b.Fatalf("cold pass fetched %d values, want %d", res.Fetched, servers*perServer+len(mine))
		}
	}
	cold := time.Since(start)
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	indexBytes := float64(after.HeapAlloc) - float64(before.HeapAlloc)

	// Give back the garbage of generating the entries, then measure the
	// peak RSS of the batches alone.
	debug.FreeOSMemory()
	resetPeakRSS()
	var lat []time.Duration
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		ev := []event.Event{{Version: 1, Kind: event.KindNotification, ID: fmt.Sprint("m", i), Type: "identity.user.updated", UserID: user}}
		if path == "live" {
			// A new user each time: a user with an event in the recent window
			// has its stores removed as late write-backs.
			u := g.ID()
			es := tokensOf(u)
			store(es)
			waitIndexed(b, inv, es, servers)
			ev[0].UserID = u
		} else {
			store(mine)
		}
		b.StartTimer()
		t0 := time.Now()
		res, err := inv.Invalidate(ctx, ev)
		lat = append(lat, time.Since(t0))
		if err != nil {
			b.Fatal(err)
		}
		if os.Getenv("BENCH_DEBUG") != "" {
			for _, s := range res.Servers {
				b.Logf("server %s: live %v, %v, crawl %v (%d items, %d busy) %+v", s.Server, s.Live, s.Duration, s.Crawl.Duration, s.Crawl.Items, s.Crawl.BusyRetries, s.Counts)
			}
		}
		wantFetched := len(mine)
		if path == "live" {
			wantFetched = 0
			for _, s := range res.Servers {
				if !s.Live {
					b.Fatalf("server %s did not answer from its live index", s.Server)
				}
			}
		}
		if res.Removed != len(mine) || res.Fetched != wantFetched {
			b.Fatalf("batch %+v: want %d removed and %d fetched", res.Counts, len(mine), wantFetched)
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

// waitIndexed waits until the live index remembers every entry of es (the
// watcher reported their stores and they were read).
func waitIndexed(tb testing.TB, inv *tokencache.Invalidator, es []kmwtest.Entry, servers int) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, e := range es {
		k := kmwtest.NoneKey(e.TokenID)
		for !tokencache.Remembers(inv, kmwtest.ServerFor(k, servers), k) {
			if time.Now().After(deadline) {
				tb.Fatalf("the live index did not learn %s within 10s", k)
			}
			time.Sleep(100 * time.Microsecond) // polling the index
		}
	}
}

// BenchmarkLateWriteBack measures how long a stale validation stays cached
// when it is written back after its change was handled: a live Invalidator
// over one memcached server holding 10,000 other entries handles one
// identity.user.updated event, then each iteration stores one more of that
// user's tokens (issued before the change, as the middleware would store a
// validation that raced with it) and times from just before the store to the
// end of its delete (Options.OnRemove). Stores are 5 to 20 ms apart.
//
// heartbeat is Options.HeartbeatInterval: the markers also keep memcached's
// logger thread awake, and the delay of a reported store follows it.
func BenchmarkLateWriteBack(b *testing.B) {
	for _, hb := range []time.Duration{tokencache.DefaultHeartbeatInterval, 100 * time.Millisecond} {
		b.Run(fmt.Sprint("heartbeat=", hb), func(b *testing.B) { benchLateWriteBack(b, hb) })
	}
}

func benchLateWriteBack(b *testing.B, heartbeat time.Duration) {
	srv := memcachetest.StartWith(b, 1, memcachetest.Options{MemoryMB: 128})
	c := newCluster(b, srv)
	ctx := context.Background()
	s := c.Servers()[0]
	g := kmwtest.NewGen(99)
	var others []kmwtest.Entry
	for range 10000 {
		others = append(others, g.Entry(kmwtest.Spec{UserID: g.ID(), UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"}))
	}
	if err := kmwtest.WriteNone(ctx, s, others, 30*time.Minute); err != nil {
		b.Fatal(err)
	}
	removed := make(chan tokencache.Removal, 1024)
	r := runInvalidator(b, c, tokencache.Options{HeartbeatInterval: heartbeat, OnRemove: func(rm tokencache.Removal) { removed <- rm }})
	r.waitLive(b)
	victim := g.ID()
	if _, err := r.Invalidate(ctx, []event.Event{{Version: 1, Kind: event.KindNotification, ID: "change", Type: "identity.user.updated",
		UserID: victim, Time: time.Now().UTC()}}); err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	var lat []time.Duration
	b.ResetTimer()
	for range b.N {
		e := userEntries(g, victim, 1)[0]
		key := kmwtest.NoneKey(e.TokenID)
		t0 := time.Now()
		if err := kmwtest.WriteNone(ctx, s, []kmwtest.Entry{e}, 5*time.Minute); err != nil {
			b.Fatal(err)
		}
		for rm := range removed {
			if rm.Key == key {
				if !rm.Late {
					b.Fatalf("removal of %s not marked late: %+v", key, rm)
				}
				lat = append(lat, time.Since(t0))
				break
			}
		}
		b.StopTimer()
		time.Sleep(time.Duration(5+rng.IntN(16)) * time.Millisecond)
		b.StartTimer()
	}
	b.StopTimer()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max-ms")
}

// BenchmarkStoreCost measures what watching costs memcached: CPU time of the
// memcached process (user + system, from /proc) per item stored, while 8
// connections store 50,000 token entries (4.6 KB each) as fast as they can,
// and per second while idle. watcher=none: nobody watches; watcher=raw: one
// connection runs "watch mutations evictions" and drains it; watcher=live: a
// live Invalidator runs (its watcher, its heartbeat markers and stats, and
// the read of every stored token key; heartbeat=Options.HeartbeatInterval).
func BenchmarkStoreCost(b *testing.B) {
	for _, mode := range []string{"none", "raw", "live"} {
		hbs := []time.Duration{0}
		if mode == "live" {
			hbs = []time.Duration{tokencache.DefaultHeartbeatInterval, 100 * time.Millisecond}
		}
		for _, hb := range hbs {
			name := "watcher=" + mode
			if hb > 0 {
				name += fmt.Sprint("/heartbeat=", hb)
			}
			b.Run(name, func(b *testing.B) { benchStoreCost(b, mode, hb) })
		}
	}
}

func benchStoreCost(b *testing.B, mode string, heartbeat time.Duration) {
	const n = 50000
	srv := memcachetest.StartWith(b, 1, memcachetest.Options{MemoryMB: 512})
	c := newCluster(b, srv)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := c.Servers()[0]
	var r *running
	switch mode {
	case "raw":
		started := make(chan struct{})
		go s.Watch(ctx, []string{"mutations", "evictions"}, func() { close(started) }, func(*memcache.WatchLine) error { return nil })
		<-started
	case "live":
		r = runInvalidator(b, c, tokencache.Options{HeartbeatInterval: heartbeat})
		r.waitLive(b)
	}
	g := kmwtest.NewGen(5)
	entries := make([]kmwtest.Entry, n)
	for i := range entries {
		entries[i] = g.Entry(kmwtest.Spec{UserID: g.ID(), UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"})
	}
	// Idle first: the heartbeat's own cost.
	idle0 := procCPU(b, srv[0].PID())
	time.Sleep(5 * time.Second)
	idle := procCPU(b, srv[0].PID()) - idle0
	b.ResetTimer()
	for range b.N {
		cpu0 := procCPU(b, srv[0].PID())
		if err := kmwtest.WriteNone(ctx, s, entries, 30*time.Minute); err != nil {
			b.Fatal(err)
		}
		if r != nil {
			testutilEventually(b, 30*time.Second, func() bool { return tokencache.Pending(r.Invalidator, 0) == 0 })
		}
		cpu := procCPU(b, srv[0].PID()) - cpu0
		b.ReportMetric(float64(cpu.Microseconds())/n, "memcached-cpu-us/item")
	}
	b.ReportMetric(float64(idle.Microseconds())/5000, "memcached-idle-cpu-ms/s")
}

// procCPU is the user + system CPU time process pid has used.
func procCPU(tb testing.TB, pid int) time.Duration {
	tb.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		tb.Fatal(err)
	}
	// Fields after the command name (in parentheses, which may hold spaces).
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	const clkTck = 100 // sysconf(_SC_CLK_TCK) on Linux
	return time.Duration(ut+st) * time.Second / clkTck
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
