package kmwtest_test

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

func cluster(t *testing.T, servers []*memcachetest.Server) *memcache.Cluster {
	t.Helper()
	c, err := memcache.New(memcache.Options{Servers: memcachetest.List(servers)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// rawValues returns every key and value on server.
func rawValues(t *testing.T, s *memcache.Server) map[string][]byte {
	t.Helper()
	ctx := context.Background()
	var keys []string
	if _, err := s.Crawl(ctx, memcache.CrawlHash, func(it *memcache.MetaItem) error {
		keys = append(keys, string(it.Key))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	if err := s.Get(ctx, keys, func(it memcache.Item) error {
		if it.Flags != 0 {
			t.Errorf("key %s has flags %d, want 0", it.Key, it.Flags)
		}
		out[it.Key] = bytes.Clone(it.Value)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// TestGoWriterMatchesMiddleware checks WriteNone, NoneKey, NoneValue and
// ServerFor against what keystonemiddleware itself writes: same key, same
// bytes, same server.
func TestGoWriterMatchesMiddleware(t *testing.T) {
	servers := memcachetest.Start(t, 3)
	c := cluster(t, servers)
	g := kmwtest.NewGen(1)
	domain, project, user := g.ID(), g.ID(), g.ID()
	var entries []kmwtest.Entry
	for i := range 12 {
		spec := kmwtest.Spec{UserID: user, UserDomainID: domain, ProjectID: project, ProjectDomainID: domain,
			Roles: []kmwtest.Role{{ID: g.ID(), Name: "member"}}}
		switch i % 4 {
		case 1:
			spec = kmwtest.Spec{UserID: user, UserDomainID: domain, DomainID: domain, Roles: spec.Roles}
		case 2:
			spec.TrustID, spec.TrustorID, spec.TrusteeID = g.ID(), g.ID(), user
		case 3:
			spec.AppCredID = g.ID()
		}
		entries = append(entries, g.Entry(spec))
	}
	written := kmwtest.Write(t, memcachetest.Addrs(servers), kmwtest.None, "", entries)
	byServer := map[string]map[string][]byte{}
	for i, s := range c.Servers() {
		byServer[servers[i].Addr] = rawValues(t, s)
	}
	for i, w := range written {
		e := entries[i]
		if !w.Stored {
			t.Fatalf("entry %d not stored by the middleware", i)
		}
		if w.Key != kmwtest.NoneKey(e.TokenID) {
			t.Errorf("key: middleware %q, NoneKey %q", w.Key, kmwtest.NoneKey(e.TokenID))
		}
		if want := servers[kmwtest.ServerFor(w.Key, len(servers))].Addr; w.Server != want {
			t.Errorf("server: middleware chose %s, ServerFor says %s", w.Server, want)
		}
		got := byServer[w.Server][w.Key]
		if want := kmwtest.NoneValue(e.TokenID, e.Body); !bytes.Equal(got, want) {
			t.Errorf("value of entry %d differs:\nmiddleware %s\nNoneValue  %s", i, got, want)
		}
	}

	// And the middleware reads what the Go writer wrote.
	if err := c.FlushAll(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		key := kmwtest.NoneKey(e.TokenID)
		if err := kmwtest.WriteNone(context.Background(), c.Servers()[kmwtest.ServerFor(key, 3)], []kmwtest.Entry{e}, time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	ids := make([]string, len(entries))
	for i, e := range entries {
		ids[i] = e.TokenID
	}
	got := kmwtest.Read(t, memcachetest.Addrs(servers), kmwtest.None, "", ids)
	for _, e := range entries {
		data, ok := got[e.TokenID]
		if !ok {
			t.Fatalf("middleware did not find the Go-written entry of %s", e.TokenID[:12])
		}
		var want map[string]any
		json.Unmarshal(kmwtest.NoneValue(e.TokenID, e.Body), &want)
		var have map[string]any
		json.Unmarshal(data, &have)
		wb, _ := json.Marshal(want)
		hb, _ := json.Marshal(have)
		if !bytes.Equal(wb, hb) {
			t.Errorf("middleware read %s, want %s", hb, wb)
		}
	}
}

func TestSecureStrategiesKeyShape(t *testing.T) {
	servers := memcachetest.Start(t, 2)
	g := kmwtest.NewGen(2)
	for _, st := range []kmwtest.Strategy{kmwtest.MAC, kmwtest.Encrypt} {
		t.Run(string(st), func(t *testing.T) {
			e := g.Entry(kmwtest.Spec{UserID: g.ID(), UserDomainID: "default", ProjectID: g.ID(), ProjectDomainID: "default"})
			w := kmwtest.Write(t, memcachetest.Addrs(servers), st, "secret", []kmwtest.Entry{e})
			if !w[0].Stored || !strings.HasPrefix(w[0].Key, "tokens/b'") || !strings.HasSuffix(w[0].Key, "'") || len(w[0].Key) != 34 {
				t.Fatalf("written %+v, want a stored tokens/b'<24 base64>' key", w[0])
			}
			if got := kmwtest.Read(t, memcachetest.Addrs(servers), st, "secret", []string{e.TokenID}); got[e.TokenID] == nil {
				t.Fatalf("middleware cannot read back its own %s entry", st)
			}
			if got := kmwtest.Read(t, memcachetest.Addrs(servers), st, "other-secret", []string{e.TokenID}); got[e.TokenID] != nil {
				t.Fatalf("middleware read a %s entry with the wrong secret", st)
			}
		})
	}
}
