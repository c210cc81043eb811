package tokencache_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/tcpproxy"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

// logBuffer collects an Invalidator's log records for assertions.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// running is an Invalidator with Run running until the test ends.
type running struct {
	*tokencache.Invalidator
	reg  *prometheus.Registry
	logs *logBuffer
}

func runInvalidator(t testing.TB, c *memcache.Cluster, opts tokencache.Options, before ...func(*tokencache.Invalidator)) *running {
	t.Helper()
	reg := prometheus.NewRegistry()
	logs := &logBuffer{}
	inv, err := tokencache.NewInvalidator(c, opts, reg, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range before {
		f(inv)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- inv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run returned %v, want nil", err)
		}
		if t.Failed() {
			t.Logf("invalidator log:\n%s", logs.String())
		}
	})
	return &running{Invalidator: inv, reg: reg, logs: logs}
}

// slowMachineConfirmLag is the Options.MaxConfirmLag of tests that expect a
// batch on the live index: with the default (500 ms) a loaded machine that
// stalls the heartbeat between waitLive and the batch would send it to the
// crawl.
const slowMachineConfirmLag = 10 * time.Second

// waitLive waits until every server's live index is complete and confirmed.
func (r *running) waitLive(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		live := r.Live()
		all := true
		for _, l := range live {
			all = all && l
		}
		if all {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("live indexes not complete after 30s: %v", live)
		}
		time.Sleep(5 * time.Millisecond) // polling the Invalidator's state
	}
}

// metric sums the samples of a metric family whose labels include want.
func (r *running) metric(t testing.TB, name string, want map[string]string) float64 {
	t.Helper()
	mfs, err := r.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if labels[k] != v {
					continue metrics
				}
			}
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			}
		}
	}
	return sum
}

func userEvent(id, user string) event.Event {
	return event.Event{Version: event.SchemaVersion, Kind: event.KindNotification, ID: id, Type: "identity.user.updated",
		Time: time.Now().UTC(), Format: "basic", UserID: user}
}

// userEntries makes n cache entries of user.
func userEntries(g *kmwtest.Gen, user string, n int) []kmwtest.Entry {
	dom := g.ID()
	var out []kmwtest.Entry
	for range n {
		out = append(out, g.Entry(kmwtest.Spec{UserID: user, UserDomainID: dom, ProjectID: g.ID(), ProjectDomainID: dom,
			Roles: []kmwtest.Role{{ID: "r-member", Name: "member"}}}))
	}
	return out
}

func tokenIDs(es []kmwtest.Entry) []string {
	out := make([]string, len(es))
	for i, e := range es {
		out[i] = e.TokenID
	}
	return out
}

// TestLiveBatch checks the live path end to end on entries written by the
// middleware: once the live index is complete, a batch is answered from it
// on every server (no crawl), the concerned entries go and the others stay;
// a store the watcher reported just before the batch is read first and
// removed by it.
func TestLiveBatch(t *testing.T) {
	servers := memcachetest.Start(t, 2)
	c := newCluster(t, servers)
	mw := kmwtest.Start(t, memcachetest.Addrs(servers), kmwtest.MAC, secret, 0)
	g := kmwtest.NewGen(21)
	victim, other := g.ID(), g.ID()
	victims, others := userEntries(g, victim, 8), userEntries(g, other, 8)
	mw.Write(append(append([]kmwtest.Entry{}, victims...), others...))
	inv := runInvalidator(t, c, tokencache.Options{MaxConfirmLag: slowMachineConfirmLag})
	inv.waitLive(t)

	// One more of the victim's entries, stored just before the batch.
	late := userEntries(g, victim, 1)
	mw.Write(late)
	res, err := inv.Invalidate(context.Background(), []event.Event{userEvent("e1", victim)})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range res.Servers {
		if !r.Live || r.Crawl.Items != 0 {
			t.Errorf("server %s: Live %v, crawl of %d items; want the batch answered from the live index", r.Server, r.Live, r.Crawl.Items)
		}
	}
	// The last store may reach the watcher after the batch: it is then
	// removed as a late write-back. Either way it goes.
	all := append(victims, late...)
	testutilEventually(t, 5*time.Second, func() bool { return len(mw.Read(tokenIDs(all))) == 0 })
	if got := mw.Read(tokenIDs(others)); len(got) != len(others) {
		t.Fatalf("%d of the other user's %d entries are left, want all", len(got), len(others))
	}
	if n := inv.metric(t, "keystone_fanout_invalidator_server_batches_total", map[string]string{"path": "live"}); n != 2 {
		t.Errorf("server_batches_total{path=live} = %v, want 2", n)
	}
}

func testutilEventually(t testing.TB, d time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %v", d)
		}
		time.Sleep(2 * time.Millisecond) // polling memcached
	}
}

// TestLiveIndexMatchesCrawl checks the completeness invariant against a
// real memcached: after 7,000 random stores of new keys (and keys
// stored again with another user), expiries (TTLs of 1 and 2 s), evictions
// (a 16 MiB server that holds about 2,500 of the 4.6 KB values), deletes by
// the Invalidator itself (batches on the live path) and by another client,
// every entry the server holds is in the index with the CAS of its current
// value, and the index holds nothing else but entries the server removed
// without telling a watcher (another client's deletes: memcached 1.6.18 has
// no "watch deletions"; its slab mover's evictions), which the next crawl
// forgets: after it the index equals the crawl.
func TestLiveIndexMatchesCrawl(t *testing.T) {
	servers := memcachetest.StartWith(t, 1, memcachetest.Options{MemoryMB: 16})
	c := newCluster(t, servers)
	s := c.Servers()[0]
	inv := runInvalidator(t, c, tokencache.Options{})
	inv.waitLive(t)

	rng := rand.New(rand.NewPCG(7, 8))
	g := kmwtest.NewGen(8)
	// Batches concern the first 40 users; the stores of their tokens after
	// their batch are removed as late write-backs (by design), so most
	// stores are of the other 360.
	users := make([]string, 400)
	for i := range users {
		users[i] = g.ID()
	}
	var keys []string
	ctx := context.Background()
	deletedByOthers := map[string]bool{}
	ops := map[string]int{}
	// A count, not a duration: on a loaded machine 3 s held too few stores
	// to fill the server (about 7,000 are done in 3 s on an idle one).
	for n := 0; ops["store"] < 7000; n++ {
		switch op := rng.IntN(100); {
		case op < 60 || len(keys) == 0: // a new entry
			ttl := []time.Duration{time.Second, 2 * time.Second, 5 * time.Minute}[rng.IntN(3)]
			e := userEntries(g, users[rng.IntN(len(users))], 1)[0]
			if err := kmwtest.WriteNone(ctx, s, []kmwtest.Entry{e}, ttl); err != nil {
				t.Fatal(err)
			}
			keys = append(keys, kmwtest.NoneKey(e.TokenID))
			ops["store"]++
		case op < 80: // an existing key stored again (another validation)
			k := keys[rng.IntN(len(keys))]
			e := userEntries(g, users[rng.IntN(len(users))], 1)[0]
			if err := s.Set(ctx, []memcache.Item{{Key: k, Value: kmwtest.NoneValue(e.TokenID, e.Body)}}, 5*time.Minute); err != nil {
				t.Fatal(err)
			}
			delete(deletedByOthers, k)
			ops["store again"]++
		case op < 90: // a batch, on the live path when the index is usable
			if _, err := inv.Invalidate(ctx, []event.Event{userEvent(fmt.Sprint("ev", n), users[rng.IntN(40)])}); err != nil {
				t.Fatal(err)
			}
			ops["batch"]++
		default: // another client deletes an entry
			k := keys[rng.IntN(len(keys))]
			if _, err := s.Delete(ctx, []string{k}); err != nil {
				t.Fatal(err)
			}
			deletedByOthers[k] = true
			ops["delete by another client"]++
		}
	}
	// Quiet: every reported store read, the heartbeat current.
	testutilEventually(t, 10*time.Second, func() bool { return tokencache.Pending(inv.Invalidator, 0) == 0 && inv.Live()[0] })
	st, err := s.Stats(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("operations %v; memcached evictions %s, expired_unfetched %s, reclaimed %s", ops, st["evictions"], st["expired_unfetched"], st["reclaimed"])
	if st["evictions"] == "0" {
		t.Error("expected evictions: the test wants some")
	}

	crawl := func() map[string]memcache.MetaItem {
		out := map[string]memcache.MetaItem{}
		if _, err := s.Crawl(ctx, memcache.CrawlHash, func(it *memcache.MetaItem) error {
			if tokencache.IsTokenKey(string(it.Key)) {
				m := *it
				m.Key = nil
				out[string(it.Key)] = m
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return out
	}
	listed := crawl()
	ix := tokencache.IndexSnapshot(inv.Invalidator, 0)
	now := time.Now().Unix()
	for k, m := range listed {
		e, ok := ix[k]
		switch {
		case !ok:
			t.Errorf("memcached holds %s (cas %d), the live index does not", k, m.CAS)
		case e.CAS != m.CAS:
			t.Errorf("%s: the live index has cas %d, memcached %d", k, e.CAS, m.CAS)
		case m.Exp > 0 && (e.Exp == 0 || absDiff(int64(e.Exp), m.Exp) > 1):
			t.Errorf("%s: the live index has expiry %d, memcached %d", k, e.Exp, m.Exp)
		}
	}
	extra := map[string]int{}
	for k, e := range ix {
		if _, ok := listed[k]; ok {
			continue
		}
		switch {
		case e.Exp != 0 && int64(e.Exp) <= now+1:
			extra["expired"]++
		case deletedByOthers[k]:
			extra["deleted by another client"]++
		default:
			extra["removed silently by memcached"]++
			if have := present(t, c, []string{k}); have[k] {
				t.Errorf("%s is not listed by the crawl but memcached still has it", k)
			}
		}
	}
	t.Logf("listed %d, indexed %d; indexed but gone: %v", len(listed), len(ix), extra)
	if len(listed) == 0 {
		t.Fatal("expected entries on the server")
	}

	if _, err := inv.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	listed = crawl()
	ix = tokencache.IndexSnapshot(inv.Invalidator, 0)
	for k := range ix {
		if _, ok := listed[k]; !ok {
			t.Errorf("after a crawl the index still holds %s, which memcached does not", k)
		}
	}
	for k := range listed {
		if _, ok := ix[k]; !ok {
			t.Errorf("after a crawl the index lacks %s", k)
		}
	}
	if n := inv.metric(t, "keystone_fanout_invalidator_index_losses_total", nil); n != 0 {
		t.Errorf("index_losses_total = %v, want 0 under this load", n)
	}
}

func absDiff(a, b int64) int64 {
	if a > b {
		return a - b
	}
	return b - a
}

// TestWatcherFailures breaks the watcher in each way it can break and
// checks that the server's index stops being complete (a batch then
// crawls), that the stores made meanwhile are not missed by the batch, and
// that the index becomes complete again.
func TestWatcherFailures(t *testing.T) {
	cases := []struct {
		name string
		// break_ breaks the watcher; stores are then made by write.
		break_ func(t *testing.T, inv *running, srv *memcachetest.Server, proxy *tcpproxy.Proxy, write func([]kmwtest.Entry))
		loss   string
		// markerTimeout is Options.MarkerTimeout: long enough for the slow
		// watcher to reach the skipped=N line rather than count as stalled.
		markerTimeout time.Duration
	}{
		{name: "skipped lines (a watcher that reads slowly under a burst of stores)", loss: "skipped", markerTimeout: 20 * time.Second,
			break_: func(t *testing.T, inv *running, srv *memcachetest.Server, proxy *tcpproxy.Proxy, write func([]kmwtest.Entry)) {
				// More lines than the kernel's socket buffers and memcached's
				// 8 KiB watcher buffer hold while the watcher crawls along.
				tokencache.SetWatchDelay(inv.Invalidator, 5*time.Millisecond)
				c := newCluster(t, []*memcachetest.Server{srv})
				items := make([]memcache.Item, 150000)
				for i := range items {
					items[i] = memcache.Item{Key: fmt.Sprintf("burst-%d", i), Value: []byte("x")}
				}
				if err := c.Servers()[0].Set(context.Background(), items, time.Minute); err != nil {
					t.Fatal(err)
				}
				tokencache.SetWatchDelay(inv.Invalidator, 0)
			}},
		{name: "the watcher's connection cut", loss: "watch_down", markerTimeout: 300 * time.Millisecond,
			break_: func(t *testing.T, inv *running, srv *memcachetest.Server, proxy *tcpproxy.Proxy, write func([]kmwtest.Entry)) {
				proxy.Refuse(true)
				proxy.CloseConnections()
			}},
		{name: "memcached restarted", loss: "watch_down", markerTimeout: 300 * time.Millisecond,
			break_: func(t *testing.T, inv *running, srv *memcachetest.Server, proxy *tcpproxy.Proxy, write func([]kmwtest.Entry)) {
				srv.Restart()
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := memcachetest.StartWith(t, 1, memcachetest.Options{Args: []string{"-o", "watcher_logbuf_size=8"}})
			proxy, err := tcpproxy.Start(srv[0].Addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { proxy.Close() })
			c, err := memcache.New(memcache.Options{Servers: proxy.Addr(), IOTimeout: 2 * time.Second, DialTimeout: time.Second})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			direct := newCluster(t, srv)
			write := func(es []kmwtest.Entry) {
				t.Helper()
				if err := kmwtest.WriteNone(context.Background(), direct.Servers()[0], es, 5*time.Minute); err != nil {
					t.Fatal(err)
				}
			}
			g := kmwtest.NewGen(31)
			victim, other := g.ID(), g.ID()
			before, others := userEntries(g, victim, 5), userEntries(g, other, 5)
			write(append(append([]kmwtest.Entry{}, before...), others...))
			inv := runInvalidator(t, c, tokencache.Options{MarkerTimeout: tc.markerTimeout})
			inv.waitLive(t)

			tc.break_(t, inv, srv[0], proxy, write)
			during := userEntries(g, victim, 5)
			write(during) // stored while the watcher is broken
			testutilEventually(t, 20*time.Second, func() bool {
				return inv.metric(t, "keystone_fanout_invalidator_index_losses_total", map[string]string{"reason": tc.loss}) > 0
			})
			if inv.Live()[0] {
				t.Error("the live index is still complete after the loss")
			}
			proxy.Refuse(false)
			ctx := context.Background()
			keys := func(es []kmwtest.Entry) []string {
				var out []string
				for _, e := range es {
					out = append(out, kmwtest.NoneKey(e.TokenID))
				}
				return out
			}
			var res tokencache.Result
			testutilEventually(t, 10*time.Second, func() bool {
				res, err = inv.Invalidate(ctx, []event.Event{userEvent("e-"+tc.loss, victim)})
				return err == nil
			})
			if left := present(t, direct, append(keys(before), keys(during)...)); len(left) > 0 {
				t.Fatalf("%d of the victim's entries are left after the batch: %v", len(left), left)
			}
			if tc.name != "memcached restarted" {
				if have := present(t, direct, keys(others)); len(have) != len(others) {
					t.Fatalf("%d of the other user's %d entries are left, want all", len(have), len(others))
				}
			}
			// Complete again, and later batches are answered from memory.
			inv.waitLive(t)
			after := userEntries(g, victim, 3)
			write(after)
			testutilEventually(t, 5*time.Second, func() bool { return tokencache.Pending(inv.Invalidator, 0) == 0 })
			res, err = inv.Invalidate(ctx, []event.Event{userEvent("e-after-"+tc.loss, victim)})
			if err != nil {
				t.Fatal(err)
			}
			testutilEventually(t, 5*time.Second, func() bool { return len(present(t, direct, keys(after))) == 0 })
			_ = res
		})
	}
}

// TestLateWriteBacks stores, through the middleware, stale validations of a
// user whose change was handled 0.05, 0.3, 1, 3 and 10 s before, and of a
// token revoked by a revocation event; each is removed as soon as the
// watcher reports its store. A validation of another user stored at the
// same moments, and one of a token issued after the revocation, stay.
func TestLateWriteBacks(t *testing.T) {
	servers := memcachetest.Start(t, 2)
	c := newCluster(t, servers)
	mw := kmwtest.Start(t, memcachetest.Addrs(servers), kmwtest.None, "", 0)
	inv := runInvalidator(t, c, tokencache.Options{})
	inv.waitLive(t)
	g := kmwtest.NewGen(41)
	victim, other, revokedUser := g.ID(), g.ID(), g.ID()
	ctx := context.Background()
	if _, err := inv.Invalidate(ctx, []event.Event{userEvent("change", victim)}); err != nil {
		t.Fatal(err)
	}
	issuedBefore := time.Now().UTC()
	revocation := event.Event{Version: event.SchemaVersion, Kind: event.KindRevocation, ID: "rev", Type: "revocation",
		Time: issuedBefore, Revocation: &event.Revocation{UserID: revokedUser, IssuedBefore: issuedBefore}}
	if _, err := inv.Invalidate(ctx, []event.Event{revocation}); err != nil {
		t.Fatal(err)
	}
	changed := time.Now()
	dom := g.ID()
	revokedEntry := func(issued time.Time) kmwtest.Entry {
		return g.Entry(kmwtest.Spec{UserID: revokedUser, UserDomainID: dom, ProjectID: g.ID(), ProjectDomainID: dom, IssuedAt: issued})
	}
	var lat []time.Duration
	for _, after := range []time.Duration{50 * time.Millisecond, 300 * time.Millisecond, time.Second, 3 * time.Second, 10 * time.Second} {
		time.Sleep(time.Until(changed.Add(after)))
		stale := append(userEntries(g, victim, 1), revokedEntry(issuedBefore.Add(-time.Minute)))
		keep := append(userEntries(g, other, 1), revokedEntry(issuedBefore.Add(time.Second)))
		mw.Write(append(append([]kmwtest.Entry{}, stale...), keep...))
		stored := time.Now()
		testutilEventually(t, 5*time.Second, func() bool { return len(mw.Read(tokenIDs(stale))) == 0 })
		lat = append(lat, time.Since(stored))
		if got := mw.Read(tokenIDs(keep)); len(got) != len(keep) {
			t.Fatalf("%v after the change: %d of %d control entries left, want all", after, len(got), len(keep))
		}
	}
	t.Logf("stale validations stored 0.05, 0.3, 1, 3, 10 s after the change were gone %v after their store (as seen through the middleware)", lat)
	if n := inv.metric(t, "keystone_fanout_invalidator_late_writebacks_removed_total", nil); n != 10 {
		t.Errorf("late_writebacks_removed_total = %v, want 10", n)
	}
}

// TestCompressedValues checks entries the middleware stored through
// python-binary-memcached (flags 16, zlib-compressed with flags 24), as a
// region with memcache_tls_enabled has them: they are read and matched, on
// the crawl path and on the live path, over TLS.
func TestCompressedValues(t *testing.T) {
	servers := memcachetest.StartWith(t, 2, memcachetest.Options{TLS: true})
	c := newCluster(t, servers, func(o *memcache.Options) {
		o.TLS = memcache.TLSOptions{Enabled: true, CAFile: servers[0].CAFile}
	})
	g := kmwtest.NewGen(51)
	for _, strategy := range []kmwtest.Strategy{kmwtest.None, kmwtest.MAC} {
		t.Run(string(strategy), func(t *testing.T) {
			if err := c.FlushAll(context.Background()); err != nil {
				t.Fatal(err)
			}
			mw := kmwtest.StartWith(t, kmwtest.Options{Servers: memcachetest.Addrs(servers), Strategy: strategy, Secret: secret,
				Client: kmwtest.BinaryMemcached, TLSCA: servers[0].CAFile})
			v1, v2, other := g.ID(), g.ID(), g.ID()
			others := userEntries(g, other, 3)
			mw.Write(append(append(userEntries(g, v1, 3), userEntries(g, v2, 3)...), others...))
			ctx := context.Background()
			// Crawl path: no Run.
			inv := newInvalidator(t, c, tokencache.Options{})
			res, err := inv.Invalidate(ctx, []event.Event{userEvent("c1", v1)})
			if err != nil {
				t.Fatal(err)
			}
			if res.Removed != 6 || res.UnreadableRemoved != 0 || res.Kept != 12 {
				t.Fatalf("crawl path: %+v; want 6 removed (3 entries on each server), none unreadable, 12 kept", res.Counts)
			}
			// Live path.
			live := runInvalidator(t, c, tokencache.Options{MaxConfirmLag: slowMachineConfirmLag})
			live.waitLive(t)
			res, err = live.Invalidate(ctx, []event.Event{userEvent("c2", v2)})
			if err != nil {
				t.Fatal(err)
			}
			if !res.Servers[0].Live || res.Removed != 6 || res.UnreadableRemoved != 0 {
				t.Fatalf("live path: %+v (live %v); want 6 removed, none unreadable", res.Counts, res.Servers[0].Live)
			}
			if got := mw.Read(tokenIDs(others)); len(got) != len(others) {
				t.Fatalf("%d of the other user's %d entries left, want all", len(got), len(others))
			}
		})
	}
}

// TestServersThatCannotBeWatchedOrListed checks the fallbacks for servers
// that refuse what the live index needs: each is told to the operator in
// the log and the server_mode metric, and batches still remove what they
// must.
func TestServersThatCannotBeWatchedOrListed(t *testing.T) {
	cases := []struct {
		name, args, mode, log string
		// live: the index becomes complete (watch works)
		live         bool
		path         string
		nonTokenKept bool
	}{
		{name: "watch refused (-W): every batch crawls", args: "-W", mode: "crawl", log: "memcached refuses watch",
			path: "crawl", nonTokenKept: true},
		{name: "dumps disabled (-X): flush_all once at start, then the live index", args: "-X", mode: "flush", log: "falls back to flush_all",
			live: true, path: "live", nonTokenKept: true},
		{name: "dumps and watch disabled (-X -W): every batch flushes", args: "-X -W", mode: "flush", log: "falls back to flush_all",
			path: "flush"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			servers := memcachetest.StartWith(t, 1, memcachetest.Options{Args: strings.Fields(tc.args)})
			c := newCluster(t, servers)
			g := kmwtest.NewGen(61)
			victim, other := g.ID(), g.ID()
			ctx := context.Background()
			s := c.Servers()[0]
			inv := runInvalidator(t, c, tokencache.Options{MaxConfirmLag: slowMachineConfirmLag})
			testutilEventually(t, 10*time.Second, func() bool {
				return inv.metric(t, "keystone_fanout_invalidator_server_mode", map[string]string{"mode": tc.mode}) == 1
			})
			if !strings.Contains(inv.logs.String(), tc.log) {
				t.Fatalf("the log does not say %q:\n%s", tc.log, inv.logs.String())
			}
			if tc.live {
				inv.waitLive(t)
			}
			if err := s.Set(ctx, []memcache.Item{{Key: "not-a-token", Value: []byte("x")}}, time.Minute); err != nil {
				t.Fatal(err)
			}
			vs, os := userEntries(g, victim, 3), userEntries(g, other, 3)
			if err := kmwtest.WriteNone(ctx, s, append(append([]kmwtest.Entry{}, vs...), os...), time.Minute); err != nil {
				t.Fatal(err)
			}
			if _, err := inv.Invalidate(ctx, []event.Event{userEvent("x", victim)}); err != nil {
				t.Fatal(err)
			}
			var keys, otherKeys []string
			for _, e := range vs {
				keys = append(keys, kmwtest.NoneKey(e.TokenID))
			}
			for _, e := range os {
				otherKeys = append(otherKeys, kmwtest.NoneKey(e.TokenID))
			}
			// On the live path a store the watcher had not reported when the
			// batch ran is removed when it is (a late write-back).
			testutilEventually(t, 5*time.Second, func() bool { return len(present(t, c, keys)) == 0 })
			if have := present(t, c, append(otherKeys, "not-a-token")); have["not-a-token"] != tc.nonTokenKept || (tc.nonTokenKept && len(have) != len(otherKeys)+1) {
				t.Fatalf("left %v; want the other user's entries and the non-token key kept: %v", have, tc.nonTokenKept)
			}
			if n := inv.metric(t, "keystone_fanout_invalidator_server_batches_total", map[string]string{"path": tc.path}); n != 1 {
				t.Fatalf("server_batches_total{path=%s} = %v, want 1", tc.path, n)
			}
		})
	}
}

// TestEncryptIsLoud checks that ENCRYPT entries are told at start, in the
// log and in the encrypted_entries metric, and removed for every event.
func TestEncryptIsLoud(t *testing.T) {
	servers := memcachetest.Start(t, 1)
	c := newCluster(t, servers)
	g := kmwtest.NewGen(71)
	mw := kmwtest.Start(t, memcachetest.Addrs(servers), kmwtest.Encrypt, secret, 0)
	mw.Write(append(userEntries(g, g.ID(), 2), userEntries(g, g.ID(), 2)...))
	inv := runInvalidator(t, c, tokencache.Options{})
	inv.waitLive(t)
	testutilEventually(t, 5*time.Second, func() bool {
		return inv.metric(t, "keystone_fanout_invalidator_encrypted_entries", nil) == 4
	})
	if !strings.Contains(inv.logs.String(), "memcache_security_strategy = MAC") {
		t.Fatalf("the log does not recommend MAC:\n%s", inv.logs.String())
	}
	res, err := inv.Invalidate(context.Background(), []event.Event{userEvent("x", "nobody")})
	if err != nil || res.Removed != 4 || res.UnreadableRemoved != 4 {
		t.Fatalf("Invalidate = %+v, %v; want the 4 ENCRYPT entries removed", res.Counts, err)
	}
}

// TestSASLServerIsReported checks a server that refuses the text protocol
// (memcached -S): the agent says so, shows it in server_mode, and every
// batch fails naming the server (nothing is acknowledged).
func TestSASLServerIsReported(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "memcached.conf"), []byte("mech_list: plain\nsasldb_path: "+filepath.Join(dir, "sasldb2")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	servers := memcachetest.StartWith(t, 1, memcachetest.Options{Args: []string{"-S"}, Env: []string{"SASL_CONF_PATH=" + dir}})
	c := newCluster(t, servers, func(o *memcache.Options) { o.IOTimeout = 500 * time.Millisecond })
	inv := runInvalidator(t, c, tokencache.Options{})
	testutilEventually(t, 10*time.Second, func() bool {
		return inv.metric(t, "keystone_fanout_invalidator_server_mode", map[string]string{"mode": "unusable"}) == 1
	})
	if !strings.Contains(inv.logs.String(), "does not accept the text protocol") {
		t.Fatalf("the log does not say why the server cannot be used:\n%s", inv.logs.String())
	}
	_, err := inv.Invalidate(context.Background(), []event.Event{userEvent("x", "u")})
	if !errors.Is(err, memcache.ErrSASL) || !strings.Contains(err.Error(), servers[0].Addr) {
		t.Fatalf("Invalidate = %v, want an error naming %s and SASL", err, servers[0].Addr)
	}
}
