package memcache_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-multierror"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
)

func TestParseServers(t *testing.T) {
	cases := []struct {
		name    string
		in      string
		want    []memcache.Address
		wantErr string
	}{
		{name: "host:port list", in: "10.0.0.1:11211, mc2.example.net:11212",
			want: []memcache.Address{{"tcp", "10.0.0.1:11211", "10.0.0.1:11211"}, {"tcp", "mc2.example.net:11212", "mc2.example.net:11212"}}},
		{name: "default port", in: "mc1", want: []memcache.Address{{"tcp", "mc1:11211", "mc1"}}},
		{name: "inet prefix", in: "inet:10.0.0.1:11211", want: []memcache.Address{{"tcp", "10.0.0.1:11211", "inet:10.0.0.1:11211"}}},
		{name: "inet prefix without port", in: "inet:mc1", want: []memcache.Address{{"tcp", "mc1:11211", "inet:mc1"}}},
		{name: "bracketed ipv6", in: "[::1]:11211", want: []memcache.Address{{"tcp", "[::1]:11211", "[::1]:11211"}}},
		{name: "bracketed ipv6 without port", in: "[fd00::5]", want: []memcache.Address{{"tcp", "[fd00::5]:11211", "[fd00::5]"}}},
		{name: "inet6 prefix", in: "inet6:[::1]:11300", want: []memcache.Address{{"tcp", "[::1]:11300", "inet6:[::1]:11300"}}},
		{name: "unix socket", in: "unix:/run/memcached.sock", want: []memcache.Address{{"unix", "/run/memcached.sock", "unix:/run/memcached.sock"}}},
		{name: "empty", in: " ", wantErr: "empty"},
		{name: "empty entry", in: "a:1,,b:2", wantErr: "empty entry"},
		{name: "bad port", in: "a:http", wantErr: "port must be a number"},
		{name: "port out of range", in: "a:70000", wantErr: "port must be a number"},
		{name: "unbracketed ipv6", in: "::1:11211", wantErr: "brackets"},
		{name: "inet6 without brackets", in: "inet6:::1", wantErr: "brackets"},
		{name: "bracketed ipv4", in: "[10.0.0.1]:1", wantErr: "not an IPv6"},
		{name: "duplicate", in: "a:1,a:1", wantErr: "listed twice"},
		{name: "empty port", in: "a:", wantErr: "empty port"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := memcache.ParseServers(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("ParseServers(%q) error = %v, want one containing %q", tc.in, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseServers(%q): %v", tc.in, err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) || len(got) != len(tc.want) {
				t.Fatalf("ParseServers(%q) = %#v, want %#v", tc.in, got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("ParseServers(%q)[%d] = %#v, want %#v", tc.in, i, got[i], tc.want[i])
				}
			}
		})
	}
}

func TestOptionsValidate(t *testing.T) {
	cases := []struct {
		name    string
		opts    memcache.Options
		wantErr string
	}{
		{name: "minimal", opts: memcache.Options{Servers: "127.0.0.1:11211"}},
		{name: "no servers", opts: memcache.Options{}, wantErr: "Servers"},
		{name: "negative timeout", opts: memcache.Options{Servers: "a", IOTimeout: -1}, wantErr: "IOTimeout"},
		{name: "tls options without tls", opts: memcache.Options{Servers: "a", TLS: memcache.TLSOptions{CAFile: "/x"}}, wantErr: "--memcached-tls is not"},
		{name: "missing CA file", opts: memcache.Options{Servers: "a", TLS: memcache.TLSOptions{Enabled: true, CAFile: "/nonexistent/ca.pem"}}, wantErr: "--memcached-tls-ca"},
		{name: "cert without key", opts: memcache.Options{Servers: "a", TLS: memcache.TLSOptions{Enabled: true, CertFile: "/x"}}, wantErr: "together"},
		{name: "tls with system roots", opts: memcache.Options{Servers: "a", TLS: memcache.TLSOptions{Enabled: true}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.opts.Validate()
			if tc.wantErr == "" && err != nil {
				t.Fatalf("Validate() = %v, want nil", err)
			}
			if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("Validate() = %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestParseMetaLine(t *testing.T) {
	cases := []struct {
		name    string
		line    string
		want    memcache.MetaItem
		wantKey string
		wantErr bool
	}{
		{name: "mac key with quotes and base64",
			line:    "key=tokens%2Fb%27ab%2B%2Fcd%3D%3D%27 exp=1795357214 la=1795356914 cas=17 fetch=yes cls=19 size=4600",
			wantKey: "tokens/b'ab+/cd=='",
			want:    memcache.MetaItem{Exp: 1795357214, LastAccess: 1795356914, CAS: 17, Fetched: true, Class: 19, Size: 4600}},
		{name: "no expiry", line: "key=noexp exp=-1 la=5 cas=2 fetch=no cls=1 size=66", wantKey: "noexp",
			want: memcache.MetaItem{Exp: -1, LastAccess: 5, CAS: 2, Class: 1, Size: 66}},
		{name: "unknown fields ignored", line: "key=a exp=1 la=1 cas=1 fetch=no cls=1 size=1 future=x", wantKey: "a",
			want: memcache.MetaItem{Exp: 1, LastAccess: 1, CAS: 1, Class: 1, Size: 1}},
		{name: "lowercase escapes", line: "key=%2f%7e exp=1", wantKey: "/~", want: memcache.MetaItem{Exp: 1}},
		{name: "no key", line: "exp=1 la=1", wantErr: true},
		{name: "truncated escape", line: "key=ab%2", wantErr: true},
		{name: "bad escape", line: "key=ab%zz", wantErr: true},
		{name: "bad number", line: "key=a cas=x", wantErr: true},
		{name: "field without =", line: "key=a junk", wantErr: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var it memcache.MetaItem
			_, err := memcache.ParseMetaLine([]byte(tc.line), &it, nil)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("parse(%q) = %+v, want an error", tc.line, it)
				}
				return
			}
			if err != nil {
				t.Fatalf("parse(%q): %v", tc.line, err)
			}
			if string(it.Key) != tc.wantKey {
				t.Errorf("key = %q, want %q", it.Key, tc.wantKey)
			}
			it.Key = nil
			if fmt.Sprintf("%+v", it) != fmt.Sprintf("%+v", tc.want) {
				t.Errorf("parse(%q) = %+v, want %+v", tc.line, it, tc.want)
			}
		})
	}
}

func newCluster(t testing.TB, list string, mod ...func(*memcache.Options)) *memcache.Cluster {
	t.Helper()
	o := memcache.Options{Servers: list}
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

func crawlKeys(t testing.TB, s *memcache.Server, mode memcache.CrawlMode) map[string]memcache.MetaItem {
	t.Helper()
	out := map[string]memcache.MetaItem{}
	_, err := s.Crawl(context.Background(), mode, func(it *memcache.MetaItem) error {
		c := *it
		c.Key = nil
		out[string(it.Key)] = c
		return nil
	})
	if err != nil {
		t.Fatalf("crawl %s: %v", mode, err)
	}
	return out
}

func TestServerOperations(t *testing.T) {
	srv := memcachetest.Start(t, 1)
	c := newCluster(t, memcachetest.List(srv))
	s := c.Servers()[0]
	ctx := context.Background()

	v, err := s.Version(ctx)
	if err != nil || !strings.HasPrefix(v, "1.") {
		t.Fatalf("Version() = %q, %v", v, err)
	}
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("Ping: %v", err)
	}

	keys := []string{"tokens/b'JsGjdnh4i3JEQ0jIu45y5g=='", "tokens/b'a+/b'", "plain", "tokens/" + strings.Repeat("ab", 32)}
	var items []memcache.Item
	for i, k := range keys {
		items = append(items, memcache.Item{Key: k, Value: []byte(fmt.Sprintf("value %d\r\nwith CRLF inside", i)), Flags: uint32(i)})
	}
	if err := s.Set(ctx, items, time.Minute); err != nil {
		t.Fatalf("Set: %v", err)
	}
	got := map[string]memcache.Item{}
	err = s.Get(ctx, append(keys, "missing"), func(it memcache.Item) error {
		it.Value = bytes.Clone(it.Value)
		got[it.Key] = it
		return nil
	})
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	if len(got) != len(keys) {
		t.Fatalf("Get returned %d items, want %d: %v", len(got), len(keys), got)
	}
	for i, k := range keys {
		if string(got[k].Value) != string(items[i].Value) || got[k].Flags != uint32(i) || got[k].CAS == 0 {
			t.Errorf("Get(%q) = %+v, want value %q flags %d and a cas", k, got[k], items[i].Value, i)
		}
	}

	dump := crawlKeys(t, s, memcache.CrawlHash)
	for _, k := range keys {
		m, ok := dump[k]
		if !ok {
			t.Fatalf("metadump hash lacks %q; has %v", k, dump)
		}
		if m.CAS != got[k].CAS || m.Exp < time.Now().Unix() {
			t.Errorf("metadump of %q = %+v, want cas %d and a future exp", k, m, got[k].CAS)
		}
	}
	if lru := crawlKeys(t, s, memcache.CrawlLRU); len(lru) != len(keys) {
		t.Errorf("metadump all listed %d keys, want %d", len(lru), len(keys))
	}

	found, err := s.Delete(ctx, []string{keys[0], "missing", keys[1]})
	if err != nil || !found[0] || found[1] || !found[2] {
		t.Fatalf("Delete = %v, %v; want [true false true]", found, err)
	}
	if n, err := c.Delete(ctx, []string{keys[0], keys[2]}); err != nil || n != 1 {
		t.Fatalf("Cluster.Delete = %d, %v; want 1 (only %q was left)", n, err, keys[2])
	}
	if err := c.FlushAll(ctx); err != nil {
		t.Fatalf("FlushAll: %v", err)
	}
	if d := crawlKeys(t, s, memcache.CrawlHash); len(d) != 0 {
		t.Fatalf("after flush_all the metadump lists %v", d)
	}
	if err := s.Get(ctx, []string{"bad key"}, func(memcache.Item) error { return nil }); err == nil {
		t.Fatal("Get accepted a key with a space")
	}
}

// TestGetManyKeys checks that long multi-gets (the invalidator fetches 100
// keys of 71 characters per command) work.
func TestGetManyKeys(t *testing.T) {
	srv := memcachetest.Start(t, 1)
	s := newCluster(t, memcachetest.List(srv)).Servers()[0]
	ctx := context.Background()
	var items []memcache.Item
	var keys []string
	for i := range 1000 {
		k := fmt.Sprintf("tokens/%064x", i)
		keys = append(keys, k)
		items = append(items, memcache.Item{Key: k, Value: []byte(k)})
	}
	if err := s.Set(ctx, items, time.Minute); err != nil {
		t.Fatal(err)
	}
	n := 0
	if err := s.Get(ctx, keys, func(it memcache.Item) error {
		if string(it.Value) != it.Key {
			t.Errorf("value of %s is %s", it.Key, it.Value)
		}
		n++
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n != len(keys) {
		t.Fatalf("got %d of %d values", n, len(keys))
	}
	found, err := s.Delete(ctx, keys)
	if err != nil {
		t.Fatal(err)
	}
	for i, f := range found {
		if !f {
			t.Fatalf("key %d not deleted", i)
		}
	}
}

func TestServerDownAndBack(t *testing.T) {
	srv := memcachetest.Start(t, 2)
	c := newCluster(t, memcachetest.List(srv), func(o *memcache.Options) { o.DialTimeout = time.Second })
	ctx := context.Background()
	if err := c.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	srv[1].Stop()
	err := c.Ping(ctx)
	var merr *multierror.Error
	if !errors.As(err, &merr) || len(merr.Errors) != 1 {
		t.Fatalf("Ping with one server down = %v, want a multierror with one entry", err)
	}
	var se *memcache.ServerError
	if !errors.As(merr.Errors[0], &se) || se.Server != srv[1].Addr || !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("error %v does not name %s with connection refused", err, srv[1].Addr)
	}
	if !strings.Contains(err.Error(), srv[1].Addr) {
		t.Fatalf("error text %q does not name %s", err, srv[1].Addr)
	}
	if _, err := c.Delete(ctx, []string{"k"}); err == nil || !strings.Contains(err.Error(), srv[1].Addr) {
		t.Fatalf("Delete with a server down = %v, want an error naming %s", err, srv[1].Addr)
	}
	srv[1].Restart()
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("Ping after restart: %v", err)
	}
	// Pooled connections to the restarted server are dead; the first use
	// fails and later ones reconnect.
	srv[0].Restart()
	var last error
	for range 3 {
		if last = c.Ping(ctx); last == nil {
			break
		}
	}
	if last != nil {
		t.Fatalf("Ping keeps failing after a restart: %v", last)
	}
}

// TestHungServer checks that a server that accepts connections but never
// answers fails the call within the context deadline, naming the server.
func TestHungServer(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	defer func() {
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	}()
	c := newCluster(t, l.Addr().String(), func(o *memcache.Options) { o.IOTimeout = 200 * time.Millisecond })
	start := time.Now()
	_, err = c.Servers()[0].Version(context.Background())
	if err == nil || !strings.Contains(err.Error(), l.Addr().String()) {
		t.Fatalf("Version on a hung server = %v, want a timeout naming it", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err = c.Servers()[0].Crawl(ctx, memcache.CrawlHash, func(*memcache.MetaItem) error { return nil })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Crawl on a hung server with a 50ms context = %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("calls on a hung server took %v", d)
	}
}

func TestTLS(t *testing.T) {
	srv := memcachetest.StartWith(t, 1, memcachetest.Options{TLS: true})
	ctx := context.Background()
	cases := []struct {
		name    string
		tls     memcache.TLSOptions
		wantErr bool
	}{
		{name: "verified with CA", tls: memcache.TLSOptions{Enabled: true, CAFile: srv[0].CAFile}},
		{name: "server name override", tls: memcache.TLSOptions{Enabled: true, CAFile: srv[0].CAFile, ServerName: "localhost"}},
		{name: "unknown CA", tls: memcache.TLSOptions{Enabled: true}, wantErr: true},
		{name: "wrong server name", tls: memcache.TLSOptions{Enabled: true, CAFile: srv[0].CAFile, ServerName: "other"}, wantErr: true},
		{name: "insecure skip verify", tls: memcache.TLSOptions{Enabled: true, InsecureSkipVerify: true}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newCluster(t, srv[0].Addr, func(o *memcache.Options) { o.TLS = tc.tls })
			s := c.Servers()[0]
			_, err := s.Version(ctx)
			if tc.wantErr {
				if err == nil {
					t.Fatal("Version succeeded, want a TLS error")
				}
				return
			}
			if err != nil {
				t.Fatalf("Version over TLS: %v", err)
			}
			if err := s.Set(ctx, []memcache.Item{{Key: "tokens/b'x'", Value: []byte("v")}}, time.Minute); err != nil {
				t.Fatal(err)
			}
			if d := crawlKeys(t, s, memcache.CrawlHash); len(d) != 1 {
				t.Fatalf("metadump over TLS = %v", d)
			}
		})
	}
	// Plain text to a TLS server fails rather than hangs.
	c := newCluster(t, srv[0].Addr, func(o *memcache.Options) { o.IOTimeout = time.Second })
	if _, err := c.Servers()[0].Version(ctx); err == nil {
		t.Fatal("plain-text Version to a TLS-only server succeeded")
	}
}

// TestCrawlBusy keeps memcached's crawler busy with a slow metadump from
// another connection ("lru_crawler sleep" makes it pause 1 s per 1000 items),
// and checks that Crawl retries BUSY, never reporting it as an empty cache,
// and succeeds once the crawler is free.
func TestCrawlBusy(t *testing.T) {
	srv := memcachetest.Start(t, 1)
	c := newCluster(t, memcachetest.List(srv))
	s := c.Servers()[0]
	ctx := context.Background()
	const n = 5000
	var items []memcache.Item
	for i := range n {
		items = append(items, memcache.Item{Key: fmt.Sprint("k", i), Value: []byte("v")})
	}
	if err := s.Set(ctx, items, 10*time.Minute); err != nil {
		t.Fatal(err)
	}
	control, err := net.Dial("tcp", srv[0].Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer control.Close()
	controlR := bufio.NewReader(control)
	setSleep := func(us int) {
		t.Helper()
		fmt.Fprintf(control, "lru_crawler sleep %d\r\n", us)
		if l, err := controlR.ReadString('\n'); err != nil || l != "OK\r\n" {
			t.Fatalf("lru_crawler sleep %d: %q, %v", us, l, err)
		}
	}
	setSleep(1000000)

	blocker, err := net.Dial("tcp", srv[0].Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer blocker.Close()
	if _, err := blocker.Write([]byte("lru_crawler metadump all\r\n")); err != nil {
		t.Fatal(err)
	}
	blockerDone := make(chan int, 1)
	go func() { // drain it, so that memcached's crawler never blocks on a full socket
		lines := 0
		r := bufio.NewReader(blocker)
		for {
			l, err := r.ReadString('\n')
			if err != nil || strings.HasPrefix(l, "END") {
				blockerDone <- lines
				return
			}
			lines++
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := s.Stats(ctx, "")
		if err != nil {
			t.Fatal(err)
		}
		if st["lru_crawler_running"] == "1" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the slow metadump never started: lru_crawler_running=%s", st["lru_crawler_running"])
		}
		time.Sleep(5 * time.Millisecond)
	}

	short, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	st, err := s.Crawl(short, memcache.CrawlHash, func(*memcache.MetaItem) error { return nil })
	cancel()
	if !errors.Is(err, memcache.ErrCrawlerBusy) || st.BusyRetries == 0 || st.Items != 0 {
		t.Fatalf("Crawl while the crawler is busy = %+v, %v; want ErrCrawlerBusy after retries", st, err)
	}
	if !strings.Contains(err.Error(), "BUSY") || !strings.Contains(err.Error(), srv[0].Addr) {
		t.Fatalf("error %q should quote memcached's BUSY answer and name the server", err)
	}

	type result struct {
		st   memcache.CrawlStats
		seen int
		err  error
	}
	done := make(chan result, 1)
	go func() {
		seen := 0
		st, err := s.Crawl(ctx, memcache.CrawlHash, func(*memcache.MetaItem) error { seen++; return nil })
		done <- result{st, seen, err}
	}()
	setSleep(100) // memcached's default: the other crawl finishes
	select {
	case r := <-done:
		if r.err != nil || r.seen != n || r.st.Items != n {
			t.Fatalf("Crawl started while busy = %+v (%d items seen), %v; want all %d items", r.st, r.seen, r.err, n)
		}
		t.Logf("crawl started while busy: %d BUSY answers, %v", r.st.BusyRetries, r.st.Duration)
	case <-time.After(30 * time.Second):
		t.Fatal("Crawl did not finish within 30s")
	}
	select {
	case lines := <-blockerDone:
		if lines != n {
			t.Fatalf("the other metadump listed %d lines, want %d", lines, n)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the other metadump did not end")
	}
}

func TestCrawlCallbackErrorAbandonsCrawl(t *testing.T) {
	srv := memcachetest.Start(t, 1)
	s := newCluster(t, memcachetest.List(srv)).Servers()[0]
	ctx := context.Background()
	var items []memcache.Item
	for i := range 5000 {
		items = append(items, memcache.Item{Key: fmt.Sprint("k", i), Value: []byte("v")})
	}
	if err := s.Set(ctx, items, time.Minute); err != nil {
		t.Fatal(err)
	}
	stop := errors.New("stop")
	calls := 0
	_, err := s.Crawl(ctx, memcache.CrawlHash, func(*memcache.MetaItem) error {
		calls++
		if calls == 10 {
			return stop
		}
		return nil
	})
	if err != stop || calls != 10 {
		t.Fatalf("Crawl = %v after %d calls, want the callback's error after 10", err, calls)
	}
	// memcached's crawler notices the closed connection; a new crawl works
	// (possibly after BUSY retries).
	if got := crawlKeys(t, s, memcache.CrawlHash); len(got) != len(items) {
		t.Fatalf("next crawl listed %d keys, want %d", len(got), len(items))
	}
}

// TestCrawlRefused checks the errors of servers that cannot be crawled.
func TestCrawlRefused(t *testing.T) {
	cases := []struct {
		name string
		args []string
		want string
	}{
		{"dumping disabled (-X)", []string{"-X"}, "metadump not allowed"},
		{"crawler disabled", []string{"-o", "no_lru_crawler"}, "lru crawler disabled"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := memcachetest.StartWith(t, 1, memcachetest.Options{Args: tc.args})
			s := newCluster(t, memcachetest.List(srv)).Servers()[0]
			_, err := s.Crawl(context.Background(), memcache.CrawlHash, func(*memcache.MetaItem) error { return nil })
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), srv[0].Addr) || !errors.Is(err, memcache.ErrProtocol) {
				t.Fatalf("Crawl = %v, want an error naming %s and quoting %q", err, srv[0].Addr, tc.want)
			}
		})
	}
}
