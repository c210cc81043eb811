package tcpproxy

import (
	"bufio"
	"crypto/tls"
	"path/filepath"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// TestStartTLS: the proxy terminates mutual TLS and forwards plain bytes; a
// client without a certificate the proxy trusts is disconnected.
func TestStartTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewCA(t, "proxy CA")
	srvCert, srvKey := filepath.Join(dir, "s.pem"), filepath.Join(dir, "s-key.pem")
	ca.Issue(t, srvCert, srvKey, testutil.Leaf{Name: "proxy", Hosts: []string{"127.0.0.1"}})
	cliCert, cliKey := filepath.Join(dir, "c.pem"), filepath.Join(dir, "c-key.pem")
	ca.Issue(t, cliCert, cliKey, testutil.Leaf{Name: "client", Client: true})
	pair, err := tls.LoadX509KeyPair(srvCert, srvKey)
	if err != nil {
		t.Fatal(err)
	}
	p, err := StartTLS(echoServer(t), &tls.Config{Certificates: []tls.Certificate{pair},
		ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	client, err := tls.LoadX509KeyPair(cliCert, cliKey)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		certs []tls.Certificate
		ok    bool
	}{
		{name: "client certificate of the CA", certs: []tls.Certificate{client}, ok: true},
		{name: "no client certificate", ok: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := tls.Dial("tcp", p.Addr(), &tls.Config{RootCAs: ca.Pool(), Certificates: tc.certs})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			_, err = c.Write([]byte("hello\n"))
			var got string
			if err == nil {
				got, err = bufio.NewReader(c).ReadString('\n')
			}
			if tc.ok && (err != nil || got != "hello\n") {
				t.Fatalf("echo through the TLS proxy: %q, %v", got, err)
			}
			if !tc.ok && err == nil {
				t.Fatalf("echo without a client certificate: %q, want the connection refused", got)
			}
		})
	}
}
