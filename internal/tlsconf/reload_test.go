package tlsconf

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	ktestutil "github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// mtlsServer is a TLS server that requires a client certificate and answers
// each connection with the common name of the client certificate it
// verified. Its certificate and client CA can be swapped (use).
type mtlsServer struct {
	addr string
	cfg  atomic.Pointer[tls.Config]
}

func startMTLSServer(t *testing.T) *mtlsServer {
	t.Helper()
	s := &mtlsServer{}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return s.cfg.Load(), nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	s.addr = ln.Addr().String()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				tc := c.(*tls.Conn)
				if tc.Handshake() != nil {
					return
				}
				c.Write([]byte(tc.ConnectionState().PeerCertificates[0].Subject.CommonName + "\n"))
			}()
		}
	}()
	return s
}

// use makes the server present a certificate for 127.0.0.1 and localhost
// signed by ca and accept clients signed by clientCA.
func (s *mtlsServer) use(t *testing.T, ca, clientCA *ktestutil.CA) {
	t.Helper()
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "server.pem"), filepath.Join(dir, "server-key.pem")
	ca.Issue(t, cert, key, ktestutil.Leaf{Name: "server", Hosts: []string{"127.0.0.1", "localhost"}})
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	s.cfg.Store(&tls.Config{Certificates: []tls.Certificate{pair}, ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs: clientCA.Pool(), MinVersion: tls.VersionTLS12})
}

// talk connects with cfg and returns the client name the server saw.
func (s *mtlsServer) talk(cfg *tls.Config) (string, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", s.addr, cfg)
	if err != nil {
		return "", err
	}
	defer c.Close()
	// TLS 1.3: the server's verdict on the client certificate arrives
	// after the client's handshake, with the first read.
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

func TestReloaderRotation(t *testing.T) {
	dir := t.TempDir()
	f := Files{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, "client.pem"), Key: filepath.Join(dir, "client-key.pem")}
	flags := FlagNames{CA: "--x-tls-ca", Cert: "--x-tls-cert", Key: "--x-tls-key"}
	caA := ktestutil.NewCA(t, "CA A")
	caA.WriteCA(t, f.CA)
	caA.Issue(t, f.Cert, f.Key, ktestutil.Leaf{Name: "client-a", Client: true})
	srv := startMTLSServer(t)
	srv.use(t, caA, caA)

	r, err := NewReloader(f, flags, ktestutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	expect := func(t *testing.T, serverName, want string) {
		t.Helper()
		got, err := srv.talk(r.Config(serverName))
		if err != nil || got != want {
			t.Fatalf("handshake as %q: client %q, %v; want %q", serverName, got, err, want)
		}
	}
	expect(t, "127.0.0.1", "client-a")
	expect(t, "localhost", "client-a")

	// Rotation: a new CA and a client certificate it signed, written to the
	// same paths; the server moves to the new CA for both directions.
	caB := ktestutil.NewCA(t, "CA B")
	caB.WriteCA(t, f.CA)
	caB.Issue(t, f.Cert, f.Key, ktestutil.Leaf{Name: "client-b", Client: true})
	srv.use(t, caB, caB)
	expect(t, "127.0.0.1", "client-b")
	if err := r.Err(); err != nil {
		t.Errorf("Err() after a good rotation = %v", err)
	}

	tests := []struct {
		name  string
		write func(t *testing.T)
		flag  string // ReloadErrors label that must grow
		want  string // in Err()
	}{
		{name: "ca not PEM", write: func(t *testing.T) { ktestutil.WriteFileAtomic(t, f.CA, []byte("-----BEGIN CERT")) },
			flag: "--x-tls-ca", want: "--x-tls-ca"},
		{name: "ca half written", write: func(t *testing.T) { ktestutil.WriteFileAtomic(t, f.CA, caB.PEM[:len(caB.PEM)/2]) },
			flag: "--x-tls-ca", want: "no PEM certificate"},
		{name: "ca removed", write: func(t *testing.T) { os.Remove(f.CA) }, flag: "--x-tls-ca", want: "no such file"},
		{name: "key of another certificate", write: func(t *testing.T) {
			caB.Issue(t, filepath.Join(dir, "other.pem"), f.Key, ktestutil.Leaf{Name: "other", Client: true})
		}, flag: "--x-tls-cert", want: "--x-tls-cert/--x-tls-key"},
		{name: "expired client certificate", write: func(t *testing.T) {
			caB.Issue(t, f.Cert, f.Key, ktestutil.Leaf{Name: "expired", Client: true, NotAfter: time.Now().Add(-time.Minute)})
		}, flag: "--x-tls-cert", want: "certificate expired"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := testutil.ToFloat64(ReloadErrors.WithLabelValues(tc.flag))
			tc.write(t)
			// The last good CA and certificate stay in use.
			expect(t, "127.0.0.1", "client-b")
			expect(t, "localhost", "client-b") // no second report for the same change
			if got := testutil.ToFloat64(ReloadErrors.WithLabelValues(tc.flag)); got != before+1 {
				t.Errorf("ReloadErrors{flag=%q} grew by %v, want 1", tc.flag, got-before)
			}
			if err := r.Err(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Err() = %v, want it to contain %q", err, tc.want)
			}
			// Repair for the next case.
			caB.WriteCA(t, f.CA)
			caB.Issue(t, f.Cert, f.Key, ktestutil.Leaf{Name: "client-b", Client: true})
			expect(t, "127.0.0.1", "client-b")
			if err := r.Err(); err != nil {
				t.Errorf("Err() after the repair = %v", err)
			}
		})
	}

	t.Run("server name mismatch refused", func(t *testing.T) {
		_, err := srv.talk(r.Config("keystone.example"))
		var herr x509.HostnameError
		if !errors.As(err, &herr) {
			t.Fatalf("handshake as keystone.example: %v, want a x509.HostnameError", err)
		}
	})
	t.Run("server of the old CA refused", func(t *testing.T) {
		srv.use(t, caA, caB)
		_, err := srv.talk(r.Config("127.0.0.1"))
		if err == nil || !strings.Contains(Explain(err, f, flags).Error(), "not trusted by --x-tls-ca "+f.CA) {
			t.Fatalf("handshake with a server of the old CA: %v; explained: %v", err, Explain(err, f, flags))
		}
	})
	t.Run("client certificate the server does not trust", func(t *testing.T) {
		srv.use(t, caB, caA)
		_, err := srv.talk(r.Config("127.0.0.1"))
		if err == nil || !strings.Contains(Explain(err, f, flags).Error(), "check that --x-tls-cert "+f.Cert) {
			t.Fatalf("client certificate refused: %v; explained: %v", err, Explain(err, f, flags))
		}
	})
}

// TestReloaderExpiresInUse: a certificate that expires while in use (no
// file change) is reported once, naming the flag.
func TestReloaderExpiresInUse(t *testing.T) {
	dir := t.TempDir()
	f := Files{Cert: filepath.Join(dir, "client.pem"), Key: filepath.Join(dir, "client-key.pem")}
	ca := ktestutil.NewCA(t, "CA")
	ca.Issue(t, f.Cert, f.Key, ktestutil.Leaf{Name: "client", Client: true, NotAfter: time.Now().Add(time.Hour)})
	r, err := NewReloader(f, FlagNames{CA: "--x-tls-ca", Cert: "--x-tls-cert", Key: "--x-tls-key"}, ktestutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	r.Certificate()
	if err := r.Err(); err != nil {
		t.Fatalf("Err() = %v before expiry", err)
	}
	r.now = func() time.Time { return time.Now().Add(2 * time.Hour) }
	before := testutil.ToFloat64(ReloadErrors.WithLabelValues("--x-tls-cert"))
	r.Certificate()
	r.Certificate()
	if err := r.Err(); err == nil || !strings.Contains(err.Error(), "--x-tls-cert "+f.Cert+": the client certificate in use expired") {
		t.Errorf("Err() = %v, want the expiry named with the flag", err)
	}
	if got := testutil.ToFloat64(ReloadErrors.WithLabelValues("--x-tls-cert")); got != before+1 {
		t.Errorf("ReloadErrors grew by %v, want 1", got-before)
	}
}

// TestReloaderStartupErrors: NewReloader fails like Load.
func TestReloaderStartupErrors(t *testing.T) {
	p := newPKI(t)
	flags := FlagNames{CA: "--x-tls-ca", Cert: "--x-tls-cert", Key: "--x-tls-key"}
	for _, f := range []Files{{CA: p.key}, {Cert: p.cert}, {Cert: p.cert, Key: p.otherKey}, {CA: filepath.Join(t.TempDir(), "missing")}} {
		_, lerr := Load(f, flags)
		_, rerr := NewReloader(f, flags, nil)
		if lerr == nil || rerr == nil || lerr.Error() != rerr.Error() {
			t.Errorf("%+v: Load error %v, NewReloader error %v; want the same error", f, lerr, rerr)
		}
	}
}

// BenchmarkReloaderConfig is the cost the re-read check adds to each new
// connection when nothing changed: a stat of the CA, certificate and key.
func BenchmarkReloaderConfig(b *testing.B) {
	dir := b.TempDir()
	f := Files{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, "c.pem"), Key: filepath.Join(dir, "k.pem")}
	ca := ktestutil.NewCA(b, "bench CA")
	ca.WriteCA(b, f.CA)
	ca.Issue(b, f.Cert, f.Key, ktestutil.Leaf{Name: "client", Client: true})
	r, err := NewReloader(f, FlagNames{CA: "--ca", Cert: "--cert", Key: "--key"}, nil)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		cfg := r.Config("127.0.0.1")
		if _, err := cfg.GetClientCertificate(nil); err != nil {
			b.Fatal(err)
		}
	}
}
