package memcache_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// TestTLSRotation: memcached requires a client certificate; the CA, the
// server's and the client's certificates are replaced on disk and memcached
// restarted with them. The same Cluster, not made anew, connects with the new
// files: its CA bundle and client certificate were re-read.
func TestTLSRotation(t *testing.T) {
	dir := t.TempDir()
	files := memcachetest.TLSFiles{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, "server.pem"),
		Key: filepath.Join(dir, "server-key.pem"), ClientCA: filepath.Join(dir, "ca.pem")}
	clientCert, clientKey := filepath.Join(dir, "client.pem"), filepath.Join(dir, "client-key.pem")
	issue := func(name string) *testutil.CA {
		ca := testutil.NewCA(t, name)
		ca.WriteCA(t, files.CA)
		ca.Issue(t, files.Cert, files.Key, testutil.Leaf{Name: "memcached", Hosts: []string{"127.0.0.1", "localhost"}})
		ca.Issue(t, clientCert, clientKey, testutil.Leaf{Name: "agent", Client: true})
		return ca
	}
	issue("first CA")
	srv := memcachetest.StartWith(t, 1, memcachetest.Options{TLSFiles: &files})[0]
	c := newCluster(t, srv.Addr, func(o *memcache.Options) {
		o.TLS = memcache.TLSOptions{Enabled: true, CAFile: files.CA, CertFile: clientCert, KeyFile: clientKey}
		o.Log = testutil.Logger(t)
	})
	s := c.Servers()[0]
	ctx := context.Background()
	use := func(t *testing.T, key string) {
		t.Helper()
		if _, err := s.Version(ctx); err != nil {
			t.Fatalf("Version over TLS: %v", err)
		}
		if err := s.Set(ctx, []memcache.Item{{Key: key, Value: []byte("v")}}, time.Minute); err != nil {
			t.Fatalf("Set over TLS: %v", err)
		}
		found, err := s.Delete(ctx, []string{key})
		if err != nil || len(found) != 1 || !found[0] {
			t.Fatalf("Delete over TLS: %v, %v", found, err)
		}
	}
	use(t, "before")

	issue("second CA")
	srv.Restart() // drops the connections; the server reads the new files
	use(t, "after")

	// A client certificate of a CA memcached does not trust: the error
	// names the flag.
	other := testutil.NewCA(t, "untrusted CA")
	other.Issue(t, clientCert, clientKey, testutil.Leaf{Name: "agent", Client: true})
	srv.Restart()
	_, err := s.Version(ctx)
	if err == nil || !strings.Contains(err.Error(), "--memcached-tls-cert "+clientCert) {
		t.Fatalf("Version with an untrusted client certificate: %v, want an error naming --memcached-tls-cert", err)
	}
}
