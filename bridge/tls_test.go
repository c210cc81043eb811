package bridge

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/tcpproxy"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// testPKI is a CA with a server certificate for "rabbit.test" and a client
// certificate, written as PEM files.
type testPKI struct {
	caFile, serverCert, serverKey, clientCert, clientKey string
	caPool                                               *x509.CertPool
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	dir := t.TempDir()
	ca := testutil.NewCA(t, "keystone-fanout test CA")
	p := &testPKI{caPool: ca.Pool(), caFile: ca.WriteCA(t, filepath.Join(dir, "ca.pem")),
		serverCert: filepath.Join(dir, "rabbit.test.pem"), serverKey: filepath.Join(dir, "rabbit.test-key.pem"),
		clientCert: filepath.Join(dir, "bridge.pem"), clientKey: filepath.Join(dir, "bridge-key.pem")}
	ca.Issue(t, p.serverCert, p.serverKey, testutil.Leaf{Name: "rabbit.test", Hosts: []string{"rabbit.test"}})
	ca.Issue(t, p.clientCert, p.clientKey, testutil.Leaf{Name: "bridge", Client: true})
	return p
}

// tlsTerminator accepts TLS connections that present a client certificate
// of the test CA and forwards the plain bytes to RabbitMQ: an amqps broker.
func tlsTerminator(t *testing.T, p *testPKI) string {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(p.serverCert, p.serverKey)
	if err != nil {
		t.Fatal(err)
	}
	px, err := tcpproxy.StartTLS(brokerAddr(t), &tls.Config{
		Certificates: []tls.Certificate{cert}, ClientCAs: p.caPool,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { px.Close() })
	return px.Addr()
}

func TestAMQPSWithMutualTLS(t *testing.T) {
	pki := newTestPKI(t)
	addr := tlsTerminator(t, pki)
	r := newRig(t)
	n := startNATS(t)
	o := r.options()
	o.AMQPURLs = []string{"rabbit://guest:guest@" + addr + "/?ssl=1"}
	o.TLS = TLSOptions{CAFile: pki.caFile, CertFile: pki.clientCert, KeyFile: pki.clientKey, ServerName: "rabbit.test"}
	br := startBridge(t, o, n.nc)
	if !strings.HasPrefix(br.b.urls[0], "amqps://") {
		t.Fatalf("URL %s, want amqps://", br.b.urls[0])
	}
	msgs, ids := notifications(20)
	r.publish(msgs...)
	testutil.Eventually(t, 20*time.Second, "20 events stored", func() (bool, string) {
		c := n.streamCount(r.stream.Name)
		return c >= 20, fmt.Sprint(c)
	})
	checkStreamHoldsOnce(t, n, r.stream.Name, ids)
}

func TestAMQPSRejectsWrongServerName(t *testing.T) {
	pki := newTestPKI(t)
	addr := tlsTerminator(t, pki)
	r := newRig(t)
	n := startNATS(t)
	o := r.options()
	o.AMQPURLs = []string{"amqps://guest:guest@" + addr + "/"}
	o.TLS = TLSOptions{CAFile: pki.caFile, CertFile: pki.clientCert, KeyFile: pki.clientKey, ServerName: "not-rabbit.test"}
	b, err := New(o, n.nc, prometheus.NewRegistry(), testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	defer func() { cancel(); <-done }()
	testutil.Eventually(t, 20*time.Second, "Ready() to report the certificate error", func() (bool, string) {
		err := b.Ready()
		return err != nil && strings.Contains(err.Error(), "certificate"), fmt.Sprint(err)
	})
}

func TestTLSOptionsFiles(t *testing.T) {
	pki := newTestPKI(t)
	notPEM := filepath.Join(t.TempDir(), "not.pem")
	os.WriteFile(notPEM, []byte("hello"), 0o600)
	tests := []struct {
		name    string
		tls     TLSOptions
		wantErr string
	}{
		{"complete", TLSOptions{CAFile: pki.caFile, CertFile: pki.clientCert, KeyFile: pki.clientKey, ServerName: "x"}, ""},
		{"ca only", TLSOptions{CAFile: pki.caFile}, ""},
		{"ca not PEM", TLSOptions{CAFile: notPEM}, "--amqp-tls-ca"},
		{"key not matching", TLSOptions{CertFile: pki.clientCert, KeyFile: pki.serverKey}, "--amqp-tls-cert/--amqp-tls-key"},
		{"key missing", TLSOptions{CertFile: pki.clientCert}, "--amqp-tls-cert and --amqp-tls-key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := Options{AMQPURLs: []string{"amqps://h/"}, TLS: tc.tls}
			err := o.Validate()
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				cfg, err := o.TLS.config()
				if err != nil || cfg == nil || cfg.MinVersion < tls.VersionTLS12 {
					t.Fatalf("config() = %v, %v; want a TLS 1.2+ config", cfg, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Validate() = %v, want an error naming %s", err, tc.wantErr)
			}
		})
	}
}
