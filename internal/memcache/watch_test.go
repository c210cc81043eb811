package memcache_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
)

// watchLine is a copy of a memcache.WatchLine with its key.
type watchLine struct {
	kind   memcache.WatchKind
	key    string
	stored bool
	ttl    int64
	n      uint64
}

// startWatch runs s.Watch until the test ends and returns its lines.
func startWatch(t *testing.T, s *memcache.Server, topics ...string) (<-chan watchLine, <-chan error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	lines := make(chan watchLine, 1<<16)
	errc := make(chan error, 1)
	started := make(chan struct{})
	go func() {
		errc <- s.Watch(ctx, topics, func() { close(started) }, func(wl *memcache.WatchLine) error {
			lines <- watchLine{wl.Kind, string(wl.Key), wl.Stored, wl.TTL, wl.Skipped}
			return nil
		})
	}()
	t.Cleanup(cancel)
	select {
	case <-started:
	case err := <-errc:
		t.Fatalf("Watch(%v) = %v before OK", topics, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Watch did not start within 5s")
	}
	return lines, errc
}

func nextLine(t *testing.T, lines <-chan watchLine) watchLine {
	t.Helper()
	select {
	case l := <-lines:
		return l
	case <-time.After(5 * time.Second):
		t.Fatal("expected a watch line within 5s (memcached's logger sleeps at most 1s)")
	}
	return watchLine{}
}

// TestWatch runs the watch against memcached 1.6.18, in plain text and over
// TLS: every store is reported, with its key decoded, whether it changed the
// item, and its TTL.
func TestWatch(t *testing.T) {
	for _, tlsOn := range []bool{false, true} {
		t.Run(fmt.Sprintf("tls=%v", tlsOn), func(t *testing.T) {
			srv := memcachetest.StartWith(t, 1, memcachetest.Options{TLS: tlsOn})
			s := newCluster(t, srv[0].Addr, func(o *memcache.Options) {
				o.TLS = memcache.TLSOptions{Enabled: tlsOn, CAFile: srv[0].CAFile}
			}).Servers()[0]
			lines, _ := startWatch(t, s, "mutations", "evictions")
			ctx := context.Background()
			mac := "tokens/b'JsGjdnh4i3JEQ0jIu45y5g=='"
			if err := s.Set(ctx, []memcache.Item{{Key: mac, Value: []byte("v1"), Flags: 16}}, 300*time.Second); err != nil {
				t.Fatal(err)
			}
			if l := nextLine(t, lines); l != (watchLine{kind: memcache.WatchStore, key: mac, stored: true, ttl: 300}) {
				t.Fatalf("line after set = %+v", l)
			}
			if err := s.Set(ctx, []memcache.Item{{Key: "plain", Value: []byte("x")}}, 0); err != nil {
				t.Fatal(err)
			}
			if l := nextLine(t, lines); l != (watchLine{kind: memcache.WatchStore, key: "plain", stored: true}) {
				t.Fatalf("line after set without TTL = %+v", l)
			}
			// Deletes are not mutations: nothing is reported for them.
			if _, err := s.Delete(ctx, []string{"plain"}); err != nil {
				t.Fatal(err)
			}
			if err := s.Set(ctx, []memcache.Item{{Key: mac, Value: []byte("v2")}}, time.Minute); err != nil {
				t.Fatal(err)
			}
			if l := nextLine(t, lines); l.key != mac || !l.stored || l.ttl != 60 {
				t.Fatalf("line after the second set = %+v, want the store of %s (the delete is not a mutation)", l, mac)
			}
		})
	}
}

// TestWatchRefused checks the errors of servers that cannot be watched, or
// not with a topic.
func TestWatchRefused(t *testing.T) {
	cases := []struct {
		name   string
		args   []string
		topics []string
		want   error
	}{
		{"watch disabled (-W)", []string{"-W"}, []string{"mutations"}, memcache.ErrWatchRefused},
		{"deletions is newer than 1.6.18", nil, []string{"mutations", "deletions"}, memcache.ErrWatchTopicUnsupported},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := memcachetest.StartWith(t, 1, memcachetest.Options{Args: tc.args})
			s := newCluster(t, srv[0].Addr).Servers()[0]
			err := s.Watch(context.Background(), tc.topics, func() { t.Error("started called") }, func(*memcache.WatchLine) error { return nil })
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), srv[0].Addr) {
				t.Fatalf("Watch = %v, want %v naming %s", err, tc.want, srv[0].Addr)
			}
		})
	}
}

// TestWatchSkipsLines forces memcached to drop lines: the watcher reads
// nothing while 200,000 items are stored (more than the kernel's socket
// buffers and memcached's 1 KiB watcher buffer hold), and then finds a
// skipped=N line.
func TestWatchSkipsLines(t *testing.T) {
	srv := memcachetest.StartWith(t, 1, memcachetest.Options{Args: []string{"-o", "watcher_logbuf_size=1"}})
	s := newCluster(t, srv[0].Addr).Servers()[0]
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	release := make(chan struct{})
	started := make(chan struct{})
	var skipped, stores uint64
	var mu sync.Mutex
	done := make(chan error, 1)
	go func() {
		first := true
		done <- s.Watch(ctx, []string{"mutations"}, func() { close(started) }, func(wl *memcache.WatchLine) error {
			if first {
				first = false
				<-release // a reader that stalls
			}
			mu.Lock()
			defer mu.Unlock()
			switch wl.Kind {
			case memcache.WatchSkipped:
				skipped += wl.Skipped
			case memcache.WatchStore:
				stores++
			}
			return nil
		})
	}()
	<-started
	const n = 200000
	items := make([]memcache.Item, n)
	for i := range items {
		items[i] = memcache.Item{Key: fmt.Sprint("k", i), Value: []byte("v")}
	}
	if err := s.Set(ctx, items, time.Minute); err != nil {
		t.Fatal(err)
	}
	close(release)
	// Wait until the lines stop coming: memcached also drops lines its
	// worker threads could not hand to its logger (log_worker_dropped).
	last, quiet := uint64(0), time.Now()
	for time.Since(quiet) < 500*time.Millisecond {
		time.Sleep(20 * time.Millisecond)
		mu.Lock()
		total := skipped + stores
		mu.Unlock()
		if total != last {
			last, quiet = total, time.Now()
		}
	}
	st, err := s.Stats(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if skipped == 0 || st["log_watcher_skipped"] == "0" {
		t.Fatalf("expected skipped lines; the watch reported %d stores and %d skipped (stats log_watcher_skipped %s, log_worker_dropped %s)",
			stores, skipped, st["log_watcher_skipped"], st["log_worker_dropped"])
	}
	t.Logf("%d stores reported, %d skipped (memcached: log_watcher_skipped %s, log_worker_dropped %s)",
		stores, skipped, st["log_watcher_skipped"], st["log_worker_dropped"])
}

// TestWatchEndsWithTheServer checks that a killed server ends the watch
// with an error, and that cancelling the context ends it with nil.
func TestWatchEndsWithTheServer(t *testing.T) {
	srv := memcachetest.Start(t, 1)
	s := newCluster(t, srv[0].Addr).Servers()[0]
	_, errc := startWatch(t, s, "mutations")
	srv[0].Stop()
	select {
	case err := <-errc:
		if err == nil || !strings.Contains(err.Error(), srv[0].Addr) {
			t.Fatalf("Watch after the server died = %v, want an error naming it", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Watch did not end within 5s of the server's death")
	}
	srv[0].Restart()
	ctx, cancel := context.WithCancel(context.Background())
	errc2 := make(chan error, 1)
	go func() {
		errc2 <- s.Watch(ctx, []string{"mutations"}, cancel, func(*memcache.WatchLine) error { return nil })
	}()
	select {
	case err := <-errc2:
		if err != nil {
			t.Fatalf("Watch after its context ended = %v, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Watch did not end within 5s of its context")
	}
}

// TestProbe checks what Probe finds on memcached 1.6.18 started in each of
// the ways that change what keystone-fanout can do.
func TestProbe(t *testing.T) {
	saslDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(saslDir, "memcached.conf"),
		[]byte("mech_list: plain\nsasldb_path: "+filepath.Join(saslDir, "sasldb2")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name           string
		o              memcachetest.Options
		wantErr        error
		dumps, crawler bool
	}{
		{name: "defaults", dumps: true, crawler: true},
		{name: "dumps disabled (-X)", o: memcachetest.Options{Args: []string{"-X"}}, crawler: true},
		{name: "crawler disabled", o: memcachetest.Options{Args: []string{"-o", "no_lru_crawler"}}, dumps: true},
		{name: "SASL (-S)", o: memcachetest.Options{Args: []string{"-S"}, Env: []string{"SASL_CONF_PATH=" + saslDir}}, wantErr: memcache.ErrSASL},
		{name: "binary protocol only (-B binary)", o: memcachetest.Options{Args: []string{"-B", "binary"}}, wantErr: memcache.ErrBinaryOnly},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := memcachetest.StartWith(t, 1, tc.o)
			s := newCluster(t, srv[0].Addr, func(o *memcache.Options) { o.IOTimeout = 2 * time.Second }).Servers()[0] // -S and -B binary answer by this timeout
			f, err := s.Probe(context.Background())
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) || !strings.Contains(err.Error(), srv[0].Addr) {
					t.Fatalf("Probe = %+v, %v; want %v naming %s", f, err, tc.wantErr, srv[0].Addr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if f.Version != "1.6.18" || f.PID == "" || f.Dumps != tc.dumps || f.Crawler != tc.crawler || f.KeyDump || f.DumpOKLine ||
				time.Since(f.Started) > time.Minute {
				t.Fatalf("Probe = %+v; want 1.6.18 with dumps %v, crawler %v, no mgdump", f, tc.dumps, tc.crawler)
			}
		})
	}
}
