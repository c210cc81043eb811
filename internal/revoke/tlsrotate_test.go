package revoke

import (
	"crypto/tls"
	"fmt"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// TestFakeTLSRotation: Keystone moves to a certificate of a new CA. Until
// --keystone-ca-file holds the new CA the poller's requests fail with an
// error naming the flag; once the file is replaced on disk, the running
// poller (not made anew) trusts the new CA and polls again.
func TestFakeTLSRotation(t *testing.T) {
	dir := t.TempDir()
	caFile := filepath.Join(dir, "ca.pem")
	var current atomic.Pointer[tls.Config]
	serve := func(ca *testutil.CA) {
		cert, key := filepath.Join(dir, "server.pem"), filepath.Join(dir, "server-key.pem")
		ca.Issue(t, cert, key, testutil.Leaf{Name: "keystone", Hosts: []string{"127.0.0.1", "localhost"}})
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			t.Fatal(err)
		}
		current.Store(&tls.Config{Certificates: []tls.Certificate{pair}})
	}
	first := testutil.NewCA(t, "Keystone CA 1")
	first.WriteCA(t, caFile)
	serve(first)

	f := newFakeKeystoneTLS(&tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return current.Load(), nil }})
	defer f.Close()
	js := startJetStream(t, 2*time.Minute)
	o := fakeOptions(f)
	o.CAFile = caFile
	p, err := New(o, js, prometheus.NewRegistry(), testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	runPoller(t, p)
	testutil.Eventually(t, 10*time.Second, "ready over TLS", func() (bool, string) { err := p.Ready(); return err == nil, fmt.Sprint(err) })

	second := testutil.NewCA(t, "Keystone CA 2")
	serve(second)
	f.srv.CloseClientConnections()
	testutil.Eventually(t, 20*time.Second, "an error naming --keystone-ca-file", func() (bool, string) {
		err := p.Ready()
		return err != nil && strings.Contains(err.Error(), "not trusted by --keystone-ca-file "+caFile), fmt.Sprint(err)
	})

	second.WriteCA(t, caFile)
	_, lists := f.counts()
	testutil.Eventually(t, 20*time.Second, "polling again with the new CA", func() (bool, string) {
		err := p.Ready()
		_, n := f.counts()
		return err == nil && n > lists+1, fmt.Sprintf("%v; %d lists (%d at the rotation)", err, n, lists)
	})
}
