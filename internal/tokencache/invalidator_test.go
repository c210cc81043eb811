package tokencache_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-multierror"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/fixtures"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

const secret = "memcache-secret-for-tests"

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newCluster(t testing.TB, servers []*memcachetest.Server, mod ...func(*memcache.Options)) *memcache.Cluster {
	t.Helper()
	o := memcache.Options{Servers: memcachetest.List(servers), IOTimeout: 2 * time.Second, DialTimeout: time.Second}
	for _, m := range mod {
		m(&o)
	}
	c, err := memcache.New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func newInvalidator(t testing.TB, c *memcache.Cluster, opts tokencache.Options) *tokencache.Invalidator {
	t.Helper()
	inv, err := tokencache.NewInvalidator(c, opts, prometheus.NewRegistry(), quietLog())
	if err != nil {
		t.Fatal(err)
	}
	return inv
}

// snapshot is every item of every server, as written by the middleware.
type snapshot [][]memcache.Item

func takeSnapshot(t testing.TB, c *memcache.Cluster) snapshot {
	t.Helper()
	ctx := context.Background()
	var snap snapshot
	for _, s := range c.Servers() {
		var keys []string
		if _, err := s.Crawl(ctx, memcache.CrawlHash, func(it *memcache.MetaItem) error {
			keys = append(keys, string(it.Key))
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		var items []memcache.Item
		if err := s.Get(ctx, keys, func(it memcache.Item) error {
			it.Value = bytes.Clone(it.Value)
			items = append(items, it)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		snap = append(snap, items)
	}
	return snap
}

// restore empties the servers and puts the snapshot back, byte for byte,
// on the servers the middleware chose.
func (snap snapshot) restore(t testing.TB, c *memcache.Cluster) {
	t.Helper()
	ctx := context.Background()
	if err := c.FlushAll(ctx); err != nil {
		t.Fatal(err)
	}
	for i, s := range c.Servers() {
		if err := s.Set(ctx, snap[i], 5*time.Minute); err != nil {
			t.Fatal(err)
		}
	}
}

// present returns which of keys exist on any server.
func present(t testing.TB, c *memcache.Cluster, keys []string) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	for _, s := range c.Servers() {
		if err := s.Get(context.Background(), keys, func(it memcache.Item) error {
			out[it.Key] = true
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// fixtureIDs are the ids of one fixture directory (ids differ between basic
// and cadf).
type fixtureIDs struct {
	u1, u2, u3, p1, p2, d, g1, member, capRole, appCred, trust, observer string
}

func loadFixtures(t testing.TB) (map[string][]fixtures.Notification, map[string]fixtureIDs) {
	t.Helper()
	all, err := fixtures.All()
	if err != nil {
		t.Fatal(err)
	}
	byFormat := map[string][]fixtures.Notification{}
	decoded := map[string]map[string]event.Event{}
	for _, n := range all {
		byFormat[n.Format] = append(byFormat[n.Format], n)
		e, err := event.Decode(n.Body)
		if err != nil {
			continue
		}
		if decoded[n.Format] == nil {
			decoded[n.Format] = map[string]event.Event{}
		}
		decoded[n.Format][n.Name] = e
	}
	ids := map[string]fixtureIDs{}
	for format, d := range decoded {
		get := func(name string) event.Event {
			e, ok := d[name]
			if !ok {
				t.Fatalf("fixture %s/%s missing", format, name)
			}
			return e
		}
		var obs struct {
			Msg struct {
				Payload struct {
					Observer struct{ ID string } `json:"observer"`
				} `json:"payload"`
			} `json:"oslo.message"`
		}
		for _, n := range byFormat[format] {
			if strings.HasPrefix(n.Name, "08-") {
				raw, _ := n.Decoded()
				json.Unmarshal(raw, &obs)
			}
		}
		ra := get("08-role-assignment-created-user-project--identity.role_assignment.created")
		ids[format] = fixtureIDs{
			u1:       get("27-user-updated-admin--identity.user.updated").UserID,
			u2:       get("41-domain-deleted--identity.user.deleted").UserID,
			u3:       get("32-user-deleted--identity.user.deleted").UserID,
			p1:       ra.ProjectID,
			p2:       get("36-project-disabled--identity.project.updated").ProjectID,
			d:        get("13-role-assignment-created-user-domain--identity.role_assignment.created").DomainID,
			g1:       get("11-role-assignment-created-group-project--identity.role_assignment.created").GroupID,
			member:   ra.RoleID,
			capRole:  get("09-role-assignment-created-user-project-2--identity.role_assignment.created").RoleID,
			appCred:  get("23-application-credential-deleted--identity.application_credential.deleted").AppCredID,
			trust:    get("25-trust-deleted--identity.OS-TRUST_trust.deleted").TrustID,
			observer: obs.Msg.Payload.Observer.ID,
		}
		if ids[format].observer == "" {
			t.Fatalf("no observer id in %s fixture 08", format)
		}
	}
	return byFormat, ids
}

// regionTokens are the cached tokens of the fixture test, named.
func regionTokens(g *kmwtest.Gen, id fixtureIDs) (names []string, entries map[string]kmwtest.Entry) {
	g.KeystoneServiceID = id.observer // the catalog carries the observer id, as in real tokens
	admin, pa, raAdmin := g.ID(), g.ID(), g.ID()
	dx, ux, px := g.ID(), g.ID(), g.ID()
	u10, u11, px2 := g.ID(), g.ID(), g.ID()
	member := kmwtest.Role{ID: id.member, Name: "member"}
	capRole := kmwtest.Role{ID: id.capRole, Name: "caprole"}
	adminRole := kmwtest.Role{ID: raAdmin, Name: "admin"}
	u1p1Audit := g.AuditID()
	specs := map[string]kmwtest.Spec{
		"u1-p1":          {UserID: id.u1, UserDomainID: id.d, ProjectID: id.p1, ProjectDomainID: id.d, Roles: []kmwtest.Role{member, capRole}, AuditIDs: []string{u1p1Audit}},
		"u1-p1-rescoped": {UserID: id.u1, UserDomainID: id.d, ProjectID: id.p1, ProjectDomainID: id.d, Roles: []kmwtest.Role{member}, AuditIDs: []string{g.AuditID(), u1p1Audit}},
		"u1-domain":      {UserID: id.u1, UserDomainID: id.d, DomainID: id.d, Roles: []kmwtest.Role{capRole}},
		"u1-appcred":     {UserID: id.u1, UserDomainID: id.d, ProjectID: id.p1, ProjectDomainID: id.d, AppCredID: id.appCred, Roles: []kmwtest.Role{member}},
		"u2-trust":       {UserID: id.u2, UserDomainID: id.d, ProjectID: id.p1, ProjectDomainID: id.d, TrustID: id.trust, TrustorID: id.u1, TrusteeID: id.u2, Roles: []kmwtest.Role{member}},
		"u3-p2":          {UserID: id.u3, UserDomainID: "default", ProjectID: id.p2, ProjectDomainID: "default", Roles: []kmwtest.Role{member}},
		"admin-pa":       {UserID: admin, UserDomainID: "default", ProjectID: pa, ProjectDomainID: "default", Roles: []kmwtest.Role{adminRole, member}},
		"admin-system":   {UserID: admin, UserDomainID: "default", System: true, Roles: []kmwtest.Role{adminRole}},
		"ux-px":          {UserID: ux, UserDomainID: dx, ProjectID: px, ProjectDomainID: dx, Roles: []kmwtest.Role{member}},
		"u10-p1":         {UserID: u10, UserDomainID: "default", ProjectID: id.p1, ProjectDomainID: id.d, Roles: []kmwtest.Role{capRole}},
		"u10-domain":     {UserID: u10, UserDomainID: "default", DomainID: id.d, Roles: []kmwtest.Role{capRole}},
		"u11-px2":        {UserID: u11, UserDomainID: id.d, ProjectID: px2, ProjectDomainID: id.d, Roles: []kmwtest.Role{member}},
	}
	entries = map[string]kmwtest.Entry{}
	for name, s := range specs {
		names = append(names, name)
		entries[name] = g.Entry(s)
	}
	sort.Strings(names)
	return names, entries
}

// expectedRemoved is, per fixture message, the tokens of regionTokens it
// concerns (docs/INVALIDATION.md applied by hand). nil means every token.
func expectedRemoved(name, format string) ([]string, bool) {
	u1 := []string{"u1-p1", "u1-p1-rescoped", "u1-domain", "u1-appcred", "u2-trust"}
	p1 := []string{"u1-p1", "u1-p1-rescoped", "u1-appcred", "u2-trust", "u10-p1"}
	d := []string{"u1-p1", "u1-p1-rescoped", "u1-domain", "u1-appcred", "u2-trust", "u10-p1", "u10-domain", "u11-px2"}
	step, typ, _ := strings.Cut(name, "--")
	num := step[:2]
	switch {
	case typ == "identity.role_assignment.created" || typ == "identity.role_assignment.deleted":
		switch num {
		case "08", "09", "10", "13", "14", "15", "16":
			return u1, true
		case "11", "12":
			return p1, true
		case "17", "18":
			return d, true
		}
	case typ == "identity.group.updated":
		if format == "basic" {
			return u1, true // the user is named
		}
		return nil, true // CADF does not name the user
	case typ == "identity.application_credential.deleted":
		return []string{"u1-appcred"}, true
	case typ == "identity.OS-TRUST_trust.deleted":
		return []string{"u2-trust"}, true
	case typ == "identity.user.updated" || name == "41-domain-deleted--identity.user.deleted.2":
		return u1, true
	case name == "41-domain-deleted--identity.user.deleted":
		return []string{"u2-trust"}, true
	case typ == "identity.user.deleted" && num == "32":
		return []string{"u3-p2"}, true
	case num == "36" || num == "37":
		return []string{"u3-p2"}, true
	case typ == "identity.group.deleted", typ == "identity.role.deleted":
		return nil, true
	case num == "40", typ == "identity.domain.deleted", typ == "identity.project.deleted.2":
		return d, true
	case typ == "identity.project.deleted" && num == "41":
		return p1, true
	}
	return nil, false
}

var nonTokenKeys = []string{
	"nova:cache:instance-1",
	`tokens/b"JsGjdnh4i3JEQ0jIu45y5g=="`,
	"tokens/" + strings.Repeat("ABCDEF0123456789", 4),
	"tokens/short",
	"oslo_cache.d3b07384d113edec49eaa6238ad5ff00",
}

// corruptKey is token-shaped but holds garbage: unreadable, so removed for
// every event.
var corruptKey = "tokens/" + strings.Repeat("0f", 32)

// TestInvalidateFixtures runs every token-affecting captured notification
// against a 3-server region whose entries the middleware wrote, for each
// memcache_security_strategy, and checks through the middleware itself what
// is still cached.
func TestInvalidateFixtures(t *testing.T) {
	byFormat, ids := loadFixtures(t)
	filter, err := event.NewFilter(event.DefaultFilter)
	if err != nil {
		t.Fatal(err)
	}
	for _, strategy := range kmwtest.Strategies {
		t.Run(string(strategy), func(t *testing.T) {
			for _, format := range []string{"basic", "cadf"} {
				t.Run(format, func(t *testing.T) {
					servers := memcachetest.Start(t, 3)
					c := newCluster(t, servers)
					addrs := memcachetest.Addrs(servers)
					names, entries := regionTokens(kmwtest.NewGen(uint64(len(format))), ids[format])
					var list []kmwtest.Entry
					byToken := map[string]string{}
					for _, n := range names {
						list = append(list, entries[n])
						byToken[entries[n].TokenID] = n
					}
					mw := kmwtest.Start(t, addrs, strategy, secret, 0)
					perServer := map[string]int{}
					for _, w := range mw.Write(list) {
						if !w.Stored {
							t.Fatalf("middleware did not store %s", byToken[w.TokenID])
						}
						perServer[w.Server]++
					}
					if len(perServer) < 2 {
						t.Fatalf("the middleware put every entry on one server (%v); the test wants them spread", perServer)
					}
					ctx := context.Background()
					var others []memcache.Item
					for _, k := range nonTokenKeys {
						others = append(others, memcache.Item{Key: k, Value: []byte("not a token")})
					}
					others = append(others, memcache.Item{Key: corruptKey, Value: []byte("\x80\x04garbage")})
					for _, s := range c.Servers() {
						if err := s.Set(ctx, others, 5*time.Minute); err != nil {
							t.Fatal(err)
						}
					}
					snap := takeSnapshot(t, c)

					tokenIDs := make([]string, len(names))
					for i, n := range names {
						tokenIDs[i] = entries[n].TokenID
					}
					cases := 0
					for i, n := range byFormat[format] {
						e, err := event.Decode(n.Body)
						if err != nil || filter.Filtered(e.Type) {
							continue
						}
						cases++
						want, ok := expectedRemoved(n.Name, format)
						if !ok {
							t.Fatalf("no expectation for fixture %s", n.Name)
						}
						if want == nil || strategy == kmwtest.Encrypt {
							want = names // every token (ENCRYPT entries are unreadable)
						}
						t.Run(n.Name, func(t *testing.T) {
							snap.restore(t, c)
							// A new Invalidator: restoring the snapshot stores
							// again entries an earlier case's event concerns,
							// which an Invalidator that saw that event removes
							// as late write-backs.
							inv := newInvalidator(t, c, tokencache.Options{})
							warm := i%2 == 0
							if warm {
								if _, err := inv.Refresh(ctx); err != nil {
									t.Fatal(err)
								}
							}
							res, err := inv.Invalidate(ctx, []event.Event{e})
							if err != nil {
								t.Fatalf("Invalidate: %v", err)
							}
							if warm && res.Fetched != 0 && strategy != kmwtest.Encrypt {
								t.Errorf("warm index: %d values fetched, want 0", res.Fetched)
							}
							cached := mw.Read(tokenIDs)
							var removed []string
							for _, tid := range tokenIDs {
								if _, ok := cached[tid]; !ok {
									removed = append(removed, byToken[tid])
								}
							}
							sort.Strings(removed)
							w := slices.Clone(want)
							sort.Strings(w)
							if !slices.Equal(removed, w) {
								t.Errorf("removed %v\nwant    %v", removed, w)
							}
							have := present(t, c, append(slices.Clone(nonTokenKeys), corruptKey))
							for _, k := range nonTokenKeys {
								if !have[k] {
									t.Errorf("non-token key %q was removed", k)
								}
							}
							if have[corruptKey] {
								t.Errorf("unreadable token-shaped entry %q was kept", corruptKey)
							}
							wantRemoved := len(w) + 3 // the corrupt entry is on every server
							if res.Removed != wantRemoved || res.Kept != len(names)-len(w) || res.NonToken != 3*len(nonTokenKeys) {
								t.Errorf("result %+v, want Removed %d Kept %d NonToken %d", res.Counts, wantRemoved, len(names)-len(w), 3*len(nonTokenKeys))
							}
						})
					}
					if cases != 32 {
						t.Errorf("ran %d token-affecting fixtures, want 32", cases)
					}
				})
			}
		})
	}
}

// TestInvalidateIdempotent checks that a second pass of the same batch
// removes nothing more, fails nothing, and that entries stored again after
// the first pass (a validation that raced with the event) are caught by it.
func TestInvalidateIdempotent(t *testing.T) {
	servers := memcachetest.Start(t, 2)
	c := newCluster(t, servers)
	g := kmwtest.NewGen(11)
	user := g.ID()
	var entries []kmwtest.Entry
	for range 6 {
		entries = append(entries, g.Entry(kmwtest.Spec{UserID: user, UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"}))
	}
	other := g.Entry(kmwtest.Spec{UserID: g.ID(), UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"})
	mw := kmwtest.Start(t, memcachetest.Addrs(servers), kmwtest.None, "", 0)
	mw.Write(append(slices.Clone(entries), other))
	var removals []tokencache.Removal
	var mu sync.Mutex
	reg := prometheus.NewRegistry()
	inv, err := tokencache.NewInvalidator(c, tokencache.Options{OnRemove: func(r tokencache.Removal) {
		mu.Lock()
		removals = append(removals, r)
		mu.Unlock()
	}}, reg, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	ev := event.Event{Version: 1, Kind: event.KindNotification, ID: "m1", Type: "identity.user.updated", UserID: user}
	ctx := context.Background()
	res, err := inv.Invalidate(ctx, []event.Event{ev})
	if err != nil || res.Removed != len(entries) || res.Kept != 1 {
		t.Fatalf("first pass: %+v, %v; want %d removed, 1 kept", res.Counts, err, len(entries))
	}
	if len(removals) != len(entries) {
		t.Fatalf("OnRemove called %d times, want %d", len(removals), len(entries))
	}
	for _, r := range removals {
		if r.Reason != "identity.user.updated" || r.EventID != "m1" || !tokencache.IsTokenKey(r.Key) {
			t.Fatalf("removal %+v does not describe the entry and event", r)
		}
	}
	if got := testutil.ToFloat64(must(t, reg, "keystone_fanout_invalidator_entries_removed_total")); got != float64(len(entries)) {
		t.Fatalf("entries_removed_total = %v, want %d", got, len(entries))
	}
	res, err = inv.Invalidate(ctx, []event.Event{ev})
	if err != nil || res.Removed != 0 || res.Kept != 1 {
		t.Fatalf("second pass: %+v, %v; want nothing removed, 1 kept", res.Counts, err)
	}
	// A service validated one of the tokens just before the change and
	// stores it after the first pass: the second pass catches it.
	mw.Write(entries[:1])
	res, err = inv.Invalidate(ctx, []event.Event{ev})
	if err != nil || res.Removed != 1 {
		t.Fatalf("pass after a late store: %+v, %v; want 1 removed", res.Counts, err)
	}
	if got := mw.Read([]string{entries[0].TokenID, other.TokenID}); got[entries[0].TokenID] != nil || got[other.TokenID] == nil {
		t.Fatalf("after the passes the middleware still finds the user's token, or lost the other one: %v", keysOf(got))
	}
}

func keysOf[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// must returns the single series of a metric family summed into a
// collector-like value for testutil.
func must(t testing.TB, reg *prometheus.Registry, name string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	total := 0.0
	found := false
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		found = true
		for _, m := range mf.GetMetric() {
			if c := m.GetCounter(); c != nil {
				total += c.GetValue()
			}
			if g := m.GetGauge(); g != nil {
				total += g.GetValue()
			}
		}
	}
	if !found {
		t.Fatalf("metric %s not registered", name)
	}
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "sum"})
	c.Add(total)
	return c
}

func TestStrategies(t *testing.T) {
	servers := memcachetest.Start(t, 2)
	c := newCluster(t, servers)
	g := kmwtest.NewGen(12)
	var entries []kmwtest.Entry
	for range 8 {
		entries = append(entries, g.Entry(kmwtest.Spec{UserID: g.ID(), UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"}))
	}
	ids := make([]string, len(entries))
	for i, e := range entries {
		ids[i] = e.TokenID
	}
	ctx := context.Background()
	ev := event.Event{Version: 1, Kind: event.KindNotification, ID: "m", Type: "identity.user.deleted", UserID: "nobody-cached"}
	cases := []struct {
		name         string
		strategy     tokencache.Strategy
		wantTokens   int // left
		wantNonToken bool
	}{
		{"targeted keeps unconcerned entries", tokencache.Targeted, len(entries), true},
		{"sweep removes every token entry and nothing else", tokencache.Sweep, 0, true},
		{"flush empties the servers", tokencache.Flush, 0, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if err := c.FlushAll(ctx); err != nil {
				t.Fatal(err)
			}
			mw := kmwtest.Start(t, memcachetest.Addrs(servers), kmwtest.MAC, secret, 0)
			mw.Write(entries)
			for _, s := range c.Servers() {
				if err := s.Set(ctx, []memcache.Item{{Key: nonTokenKeys[0], Value: []byte("x")}}, time.Minute); err != nil {
					t.Fatal(err)
				}
			}
			inv := newInvalidator(t, c, tokencache.Options{Strategy: tc.strategy})
			res, err := inv.Invalidate(ctx, []event.Event{ev})
			if err != nil {
				t.Fatal(err)
			}
			if got := len(mw.Read(ids)); got != tc.wantTokens {
				t.Errorf("%d tokens still cached, want %d (result %+v)", got, tc.wantTokens, res.Counts)
			}
			if got := present(t, c, nonTokenKeys[:1])[nonTokenKeys[0]]; got != tc.wantNonToken {
				t.Errorf("non-token key present = %v, want %v", got, tc.wantNonToken)
			}
			if tc.strategy == tokencache.Flush {
				for _, s := range res.Servers {
					if !s.Flushed {
						t.Errorf("server %s not flushed", s.Server)
					}
				}
			}
		})
	}
	if _, err := tokencache.ParseStrategy("purge"); err == nil {
		t.Error("ParseStrategy accepted an unknown strategy")
	}
}

// TestServerDown: a server that is down or hung fails the batch with an
// error naming it, while the other servers are done; once it is back, the
// same call completes.
func TestServerDown(t *testing.T) {
	servers := memcachetest.Start(t, 3)
	c := newCluster(t, servers, func(o *memcache.Options) { o.IOTimeout = 2 * time.Second }) // short, yet no healthy server misses it
	g := kmwtest.NewGen(13)
	user := g.ID()
	var entries []kmwtest.Entry
	for range 30 {
		entries = append(entries, g.Entry(kmwtest.Spec{UserID: user, UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"}))
	}
	ids := make([]string, len(entries))
	for i, e := range entries {
		ids[i] = e.TokenID
	}
	mw := kmwtest.Start(t, memcachetest.Addrs(servers), kmwtest.None, "", 0)
	written := mw.Write(entries)
	onServer := map[string][]string{}
	for _, w := range written {
		onServer[w.Server] = append(onServer[w.Server], w.TokenID)
	}
	if len(onServer[servers[1].Addr]) == 0 {
		t.Fatalf("no entry on %s: %v", servers[1].Addr, onServer)
	}
	ev := event.Event{Version: 1, Kind: event.KindNotification, ID: "m", Type: "identity.user.updated", UserID: user}
	inv := newInvalidator(t, c, tokencache.Options{})
	ctx := context.Background()

	t.Run("hung server", func(t *testing.T) {
		servers[1].Pause()
		res, err := inv.Invalidate(ctx, []event.Event{ev})
		servers[1].Resume()
		checkOneServerFailed(t, err, servers[1].Addr)
		if res.Servers[1].Err == nil || res.Servers[0].Err != nil || res.Servers[2].Err != nil {
			t.Fatalf("per-server errors %v %v %v, want only the hung one", res.Servers[0].Err, res.Servers[1].Err, res.Servers[2].Err)
		}
		// The others were done; the hung server's entries are still there.
		left := mw.Read(ids)
		if len(left) != len(onServer[servers[1].Addr]) {
			t.Fatalf("%d entries left, want the %d on the hung server", len(left), len(onServer[servers[1].Addr]))
		}
		res, err = inv.Invalidate(ctx, []event.Event{ev})
		if err != nil || res.Removed != len(onServer[servers[1].Addr]) {
			t.Fatalf("retry after resume: %+v, %v; want %d removed", res.Counts, err, len(onServer[servers[1].Addr]))
		}
		if left := mw.Read(ids); len(left) != 0 {
			t.Fatalf("after the retry %d entries are left", len(left))
		}
	})

	t.Run("stopped server", func(t *testing.T) {
		mw.Write(entries)
		servers[2].Stop()
		_, err := inv.Invalidate(ctx, []event.Event{ev})
		checkOneServerFailed(t, err, servers[2].Addr)
		servers[2].Restart()
		res, err := inv.Invalidate(ctx, []event.Event{ev})
		if err != nil {
			t.Fatalf("retry after restart: %v", err)
		}
		if left := mw.Read(ids); len(left) != 0 {
			t.Fatalf("after the retry %d entries are left (%+v)", len(left), res.Counts)
		}
	})
}

func checkOneServerFailed(t *testing.T, err error, addr string) {
	t.Helper()
	var merr *multierror.Error
	if !errors.As(err, &merr) || len(merr.Errors) != 1 {
		t.Fatalf("Invalidate = %v, want a multierror with one server", err)
	}
	var se *memcache.ServerError
	if !errors.As(merr.Errors[0], &se) || se.Server != addr || !strings.Contains(err.Error(), addr) {
		t.Fatalf("error %q does not name %s", err, addr)
	}
}

// TestRestartedServerForgetsIndex: after a restart CAS values start again,
// so the server's index must be dropped rather than trusted.
func TestRestartedServerForgetsIndex(t *testing.T) {
	servers := memcachetest.Start(t, 1)
	c := newCluster(t, servers)
	g := kmwtest.NewGen(14)
	e := g.Entry(kmwtest.Spec{UserID: "u-old", UserDomainID: "default", ProjectID: "p", ProjectDomainID: "default"})
	ctx := context.Background()
	if err := kmwtest.WriteNone(ctx, c.Servers()[0], []kmwtest.Entry{e}, time.Minute); err != nil {
		t.Fatal(err)
	}
	inv := newInvalidator(t, c, tokencache.Options{})
	if _, err := inv.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	servers[0].Restart()
	// Same key (same token), different user after the restart; its CAS is
	// again 1, like the first entry's was.
	e2 := kmwtest.Entry{TokenID: e.TokenID, Body: g.Body(kmwtest.Spec{UserID: "u-new", UserDomainID: "default", ProjectID: "p", ProjectDomainID: "default"})}
	if err := kmwtest.WriteNone(ctx, c.Servers()[0], []kmwtest.Entry{e2}, time.Minute); err != nil {
		t.Fatal(err)
	}
	var res tokencache.Result
	var err error
	for range 2 { // the first call may meet the pooled connection to the old process
		if res, err = inv.Invalidate(ctx, []event.Event{{Version: 1, Kind: event.KindNotification, ID: "m", Type: "identity.user.updated", UserID: "u-new"}}); err == nil {
			break
		}
	}
	if err != nil || res.Removed != 1 {
		t.Fatalf("after a restart: %+v, %v; want the new entry removed", res.Counts, err)
	}
}

// waitCold waits until memcached has moved every item out of its HOT LRU
// (items read while in COLD are those the LRU crawl misses).
func waitCold(t testing.TB, s *memcache.Server) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		st, err := s.Stats(context.Background(), "items")
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
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("items still in the HOT LRU after 15s: %v", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// readers reads keys on every server in a loop until stop is called, like
// services validating tokens in use. It returns once every key was read at
// least once; stop returns the number of reads, and n the number done
// before readers returned.
func readers(t testing.TB, c *memcache.Cluster, keys []string, workers int) (stop func() int64, n int64) {
	var done atomic.Bool
	var reads atomic.Int64
	var wg sync.WaitGroup
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !done.Load() {
				for j := i; j < len(keys); j += workers {
					for _, s := range c.Servers() {
						s.Get(context.Background(), []string{keys[j]}, func(memcache.Item) error { return nil })
					}
					reads.Add(1)
				}
			}
		}()
	}
	deadline := time.Now().Add(10 * time.Second)
	for reads.Load() < int64(len(keys)) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	return func() int64 {
		done.Store(true)
		wg.Wait()
		return reads.Load()
	}, reads.Load()
}

// TestEntriesInActiveUse: the entries of the event's user, written by the
// middleware and aged until memcached moved them out of its HOT LRU, are read
// over and over by concurrent readers while Invalidate runs. In each of 30
// rounds (a different user each time) all of them must be gone and every
// other entry kept. Rounds alternate a cold index (only the crawl can find the
// entries) and a warm one.
func TestEntriesInActiveUse(t *testing.T) {
	const rounds, perUser = 30, 50
	servers := memcachetest.StartWith(t, 2, memcachetest.Options{MemoryMB: 128})
	c := newCluster(t, servers)
	g := kmwtest.NewGen(15)
	users := make([]string, rounds)
	active := make([][]kmwtest.Entry, rounds)
	var all []kmwtest.Entry
	for r := range rounds {
		users[r] = g.ID()
		for range perUser {
			e := g.Entry(kmwtest.Spec{UserID: users[r], UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"})
			active[r] = append(active[r], e)
			all = append(all, e)
		}
	}
	var idle []kmwtest.Entry
	for range 100 {
		e := g.Entry(kmwtest.Spec{UserID: g.ID(), UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"})
		idle = append(idle, e)
		all = append(all, e)
	}
	mw := kmwtest.Start(t, memcachetest.Addrs(servers), kmwtest.None, "", 0)
	for _, w := range mw.Write(all) {
		if !w.Stored {
			t.Fatalf("middleware did not store %s", w.Key)
		}
	}
	for _, s := range c.Servers() {
		waitCold(t, s)
	}
	ctx := context.Background()
	warm := newInvalidator(t, c, tokencache.Options{})
	hidden := 0
	var reads int64
	for r := range rounds {
		keys := make([]string, perUser)
		ids := make([]string, perUser)
		for i, e := range active[r] {
			keys[i], ids[i] = kmwtest.NoneKey(e.TokenID), e.TokenID
		}
		inv := warm
		if r%2 == 0 {
			inv = newInvalidator(t, c, tokencache.Options{})
		} else if _, err := inv.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
		stop, n := readers(t, c, keys, 4)
		ev := event.Event{Version: 1, Kind: event.KindNotification, ID: fmt.Sprint("m", r), Type: "identity.user.updated", UserID: users[r]}
		res, err := inv.Invalidate(ctx, []event.Event{ev})
		reads += stop() - n
		if err != nil {
			t.Fatalf("round %d: %v", r, err)
		}
		hidden += res.Hidden
		if left := mw.Read(ids); len(left) != 0 {
			t.Fatalf("round %d: %d of %d entries in use survived (result %+v)", r, len(left), perUser, res.Counts)
		}
		if res.Removed != perUser {
			t.Fatalf("round %d: result %+v, want %d removed", r, res.Counts, perUser)
		}
		var others []string
		for _, e := range idle {
			others = append(others, e.TokenID)
		}
		for _, later := range active[r+1:] {
			for _, e := range later {
				others = append(others, e.TokenID)
			}
		}
		if kept := mw.Read(others); len(kept) != len(others) {
			t.Fatalf("round %d: %d of %d unconcerned entries kept", r, len(kept), len(others))
		}
	}
	t.Logf("%d rounds, %d entries in use each (%d reads during the invalidations): all removed; metadump hash missed %d", rounds, perUser, reads, hidden)
	if hidden != 0 {
		t.Errorf("metadump hash missed %d entries in use (they were caught by the index)", hidden)
	}
}

// TestLRUCrawlMissesAreCaught forces the LRU walk ("metadump all"), which
// misses entries in use, and checks that the remembered-keys defence still
// removes every one of them.
func TestLRUCrawlMissesAreCaught(t *testing.T) {
	servers := memcachetest.Start(t, 1)
	c := newCluster(t, servers)
	g := kmwtest.NewGen(16)
	user := g.ID()
	var active []kmwtest.Entry
	for range 100 {
		active = append(active, g.Entry(kmwtest.Spec{UserID: user, UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"}))
	}
	var idle []kmwtest.Entry
	for range 200 {
		idle = append(idle, g.Entry(kmwtest.Spec{UserID: g.ID(), UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"}))
	}
	ctx := context.Background()
	if err := kmwtest.WriteNone(ctx, c.Servers()[0], append(slices.Clone(active), idle...), 5*time.Minute); err != nil {
		t.Fatal(err)
	}
	inv := newInvalidator(t, c, tokencache.Options{})
	tokencache.SetCrawlMode(inv, memcache.CrawlLRU)
	if _, err := inv.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	waitCold(t, c.Servers()[0])
	keys := make([]string, len(active))
	for i, e := range active {
		keys[i] = kmwtest.NoneKey(e.TokenID)
	}
	hidden := 0
	for round := range 5 {
		stop, _ := readers(t, c, keys, 4)
		res, err := inv.Invalidate(ctx, []event.Event{{Version: 1, Kind: event.KindNotification, ID: "m", Type: "identity.role.updated", RoleID: "none"}})
		stop()
		if err != nil {
			t.Fatal(err)
		}
		hidden += res.Hidden
		if res.Scanned != len(active)+len(idle) {
			t.Fatalf("round %d: %d entries scanned, want %d (listed or found directly)", round, res.Scanned, len(active)+len(idle))
		}
	}
	stop, _ := readers(t, c, keys, 4)
	res, err := inv.Invalidate(ctx, []event.Event{{Version: 1, Kind: event.KindNotification, ID: "m", Type: "identity.user.updated", UserID: user}})
	stop()
	if err != nil {
		t.Fatal(err)
	}
	hidden += res.Hidden
	if n := len(present(t, c, keys)); n != 0 || res.Removed != len(active) {
		t.Fatalf("%d entries in use survived an LRU-walk invalidation (result %+v)", n, res.Counts)
	}
	t.Logf("metadump all missed %d entries in use over 6 passes; all were found through the index", hidden)
}

func TestOptionsValidate(t *testing.T) {
	cases := []struct {
		name    string
		opts    tokencache.Options
		wantErr string
	}{
		{"defaults", tokencache.Options{}, ""},
		{"unknown strategy", tokencache.Options{Strategy: "purge"}, "targeted, sweep or flush"},
		{"negative fetch batch", tokencache.Options{FetchBatch: -1}, "FetchBatch"},
		{"huge delete batch", tokencache.Options{DeleteBatch: 1e6}, "DeleteBatch"},
		{"bad index limit", tokencache.Options{IndexLimit: -2}, "IndexLimit"},
		{"negative refresh", tokencache.Options{RefreshInterval: -time.Second}, "RefreshInterval"},
		{"a slower heartbeat", tokencache.Options{HeartbeatInterval: 100 * time.Millisecond}, ""},
		{"a heartbeat too slow to confirm", tokencache.Options{HeartbeatInterval: 200 * time.Millisecond}, "--watch-heartbeat 200ms: at most 125ms"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.opts.Validate()
			if (tc.wantErr == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("Validate() = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

func TestRunKeepsIndexWarm(t *testing.T) {
	servers := memcachetest.Start(t, 2)
	c := newCluster(t, servers)
	g := kmwtest.NewGen(17)
	var entries []kmwtest.Entry
	for range 20 {
		entries = append(entries, g.Entry(kmwtest.Spec{UserID: g.ID(), UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"}))
	}
	kmwtest.Write(t, memcachetest.Addrs(servers), kmwtest.None, "", entries)
	inv := newInvalidator(t, c, tokencache.Options{RefreshInterval: 200 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- inv.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for !inv.Warm() || tokencache.IndexLen(inv, 0)+tokencache.IndexLen(inv, 1) != len(entries) {
		if time.Now().After(deadline) {
			t.Fatalf("index not warm after 10s: warm=%v, %d+%d entries", inv.Warm(), tokencache.IndexLen(inv, 0), tokencache.IndexLen(inv, 1))
		}
		time.Sleep(10 * time.Millisecond)
	}
	res, err := inv.Invalidate(context.Background(), []event.Event{{Version: 1, Kind: event.KindNotification, ID: "m", Type: "identity.user.updated", UserID: "nobody"}})
	if err != nil || res.Fetched != 0 || res.Kept != len(entries) {
		t.Fatalf("batch on a warm index: %+v, %v; want nothing fetched, %d kept", res.Counts, err, len(entries))
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run returned %v after cancel, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
}

func TestRevocationEventsAgainstIndex(t *testing.T) {
	servers := memcachetest.Start(t, 1)
	c := newCluster(t, servers)
	g := kmwtest.NewGen(18)
	user := g.ID()
	issued := time.Now().UTC().Add(-time.Minute).Truncate(time.Second)
	early := g.Entry(kmwtest.Spec{UserID: user, UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default", IssuedAt: issued})
	late := g.Entry(kmwtest.Spec{UserID: user, UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default", IssuedAt: issued.Add(30 * time.Second)})
	audit := g.AuditID()
	single := g.Entry(kmwtest.Spec{UserID: g.ID(), UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default", AuditIDs: []string{audit}, IssuedAt: issued})
	mw := kmwtest.Start(t, memcachetest.Addrs(servers), kmwtest.MAC, secret, 0)
	mw.Write([]kmwtest.Entry{early, late, single})
	inv := newInvalidator(t, c, tokencache.Options{})
	ctx := context.Background()
	for _, warm := range []bool{false, true} {
		if warm {
			if _, err := inv.Refresh(ctx); err != nil {
				t.Fatal(err)
			}
		}
		evs := []event.Event{
			{Version: 1, Kind: event.KindRevocation, ID: "r1", Type: "revocation", Revocation: &event.Revocation{UserID: user, IssuedBefore: issued.Add(10 * time.Second)}},
			{Version: 1, Kind: event.KindRevocation, ID: "r2", Type: "revocation", Revocation: &event.Revocation{AuditID: audit, IssuedBefore: issued.Add(time.Hour)}},
		}
		res, err := inv.Invalidate(ctx, evs)
		if err != nil {
			t.Fatal(err)
		}
		got := mw.Read([]string{early.TokenID, late.TokenID, single.TokenID})
		if got[early.TokenID] != nil || got[single.TokenID] != nil || got[late.TokenID] == nil {
			t.Fatalf("warm=%v: after revocations cached are %v (result %+v); want only the token issued after issued_before", warm, keysOf(got), res.Counts)
		}
		mw.Write([]kmwtest.Entry{early, single})
	}
}

// TestWithoutIndex: with IndexLimit -1 nothing is remembered and every batch
// reads every value, with the same outcome.
func TestWithoutIndex(t *testing.T) {
	servers := memcachetest.Start(t, 2)
	c := newCluster(t, servers)
	g := kmwtest.NewGen(19)
	user := g.ID()
	var mine, others []kmwtest.Entry
	for range 5 {
		mine = append(mine, g.Entry(kmwtest.Spec{UserID: user, UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"}))
		others = append(others, g.Entry(kmwtest.Spec{UserID: g.ID(), UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"}))
	}
	mw := kmwtest.Start(t, memcachetest.Addrs(servers), kmwtest.None, "", 0)
	mw.Write(append(slices.Clone(mine), others...))
	inv := newInvalidator(t, c, tokencache.Options{IndexLimit: -1})
	ctx := context.Background()
	for pass := range 2 {
		res, err := inv.Invalidate(ctx, []event.Event{{Version: 1, Kind: event.KindNotification, ID: "m", Type: "identity.user.updated", UserID: user}})
		wantRemoved := len(mine)
		if pass == 1 {
			wantRemoved = 0
		}
		if err != nil || res.Removed != wantRemoved || res.Fetched != len(mine)+len(others)-(len(mine)-wantRemoved) || res.Kept != len(others) {
			t.Fatalf("pass %d: %+v, %v", pass, res.Counts, err)
		}
		if tokencache.IndexLen(inv, 0)+tokencache.IndexLen(inv, 1) != 0 {
			t.Fatal("IndexLimit -1 remembered entries")
		}
	}
}

func TestEmptyBatch(t *testing.T) {
	servers := memcachetest.Start(t, 1)
	inv := newInvalidator(t, newCluster(t, servers), tokencache.Options{})
	servers[0].Stop()
	res, err := inv.Invalidate(context.Background(), nil)
	if err != nil || res.Scanned != 0 {
		t.Fatalf("empty batch = %+v, %v; want nothing done", res, err)
	}
}
