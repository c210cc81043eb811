package kmwtest_test

import (
	"bytes"
	"compress/zlib"
	"context"
	"encoding/json"
	"io"
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

// TestBinaryMemcachedFormat checks what the middleware stores through
// python-binary-memcached, over TLS as a region with memcache_tls_enabled
// does: the same key and, once inflated, the same bytes as through
// python-memcache, with flags 16 (bytes), plus 8 (zlib) for a value longer
// than 128 bytes that zlib makes smaller, on every server; the middleware
// reads its entries back.
func TestBinaryMemcachedFormat(t *testing.T) {
	servers := memcachetest.StartWith(t, 2, memcachetest.Options{TLS: true})
	c, err := memcache.New(memcache.Options{Servers: memcachetest.List(servers),
		TLS: memcache.TLSOptions{Enabled: true, CAFile: servers[0].CAFile}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	plain := memcachetest.Start(t, 1)
	g := kmwtest.NewGen(3)
	user, domain := g.ID(), g.ID()
	e := g.Entry(kmwtest.Spec{UserID: user, UserDomainID: domain, ProjectID: g.ID(), ProjectDomainID: domain})
	for _, strategy := range []kmwtest.Strategy{kmwtest.None, kmwtest.MAC} {
		t.Run(string(strategy), func(t *testing.T) {
			bin := kmwtest.StartWith(t, kmwtest.Options{Servers: memcachetest.Addrs(servers), Strategy: strategy, Secret: "s3cret",
				Client: kmwtest.BinaryMemcached, TLSCA: servers[0].CAFile})
			w := bin.Write([]kmwtest.Entry{e})
			if !w[0].Stored || w[0].Server != "*" {
				t.Fatalf("python-binary-memcached write = %+v, want stored on every server", w[0])
			}
			if got := bin.Read([]string{e.TokenID}); len(got) != 1 {
				t.Fatal("the middleware does not read back what python-binary-memcached stored")
			}
			ref := kmwtest.Write(t, memcachetest.Addrs(plain), strategy, "s3cret", []kmwtest.Entry{e})
			if ref[0].Key != w[0].Key {
				t.Fatalf("key %q through python-binary-memcached, %q through python-memcache", w[0].Key, ref[0].Key)
			}
			for _, s := range c.Servers() {
				var item memcache.Item
				if err := s.Get(context.Background(), []string{w[0].Key}, func(it memcache.Item) error {
					item = it
					item.Value = bytes.Clone(it.Value)
					return nil
				}); err != nil {
					t.Fatal(err)
				}
				if item.Flags != 16|8 {
					t.Fatalf("%s: flags %d, want 24 (bytes, zlib)", s, item.Flags)
				}
				zr, err := zlib.NewReader(bytes.NewReader(item.Value))
				if err != nil {
					t.Fatalf("%s: not zlib: %v", s, err)
				}
				inflated, err := io.ReadAll(zr)
				if err != nil {
					t.Fatal(err)
				}
				refValue := rawValues(t, cluster(t, plain).Servers()[0])[ref[0].Key]
				if strategy == kmwtest.None && !bytes.Equal(inflated, refValue) {
					t.Fatalf("%s: inflated value differs from python-memcache's:\n%s\n%s", s, inflated, refValue)
				}
				if strategy == kmwtest.MAC && len(inflated) != len(refValue) {
					t.Fatalf("%s: inflated MAC value is %d bytes, python-memcache's %d", s, len(inflated), len(refValue))
				}
			}
		})
	}
}
