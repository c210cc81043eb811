package tlsconf

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// pki is a throw-away CA and a client certificate it signed, as PEM files,
// plus a second, unrelated key.
type pki struct {
	ca, cert, key, otherKey string
	caCert                  *x509.Certificate
}

func newPKI(t *testing.T) pki {
	t.Helper()
	dir := t.TempDir()
	ca := testutil.NewCA(t, "tlsconf test CA")
	p := pki{ca: ca.WriteCA(t, filepath.Join(dir, "ca.pem")), caCert: ca.Cert,
		cert: filepath.Join(dir, "client.pem"), key: filepath.Join(dir, "client-key.pem"),
		otherKey: filepath.Join(dir, "other-key.pem")}
	ca.Issue(t, p.cert, p.key, testutil.Leaf{Name: "client", Client: true})
	ca.Issue(t, filepath.Join(dir, "other.pem"), p.otherKey, testutil.Leaf{Name: "other", Client: true})
	return p
}

func TestLoad(t *testing.T) {
	p := newPKI(t)
	notPEM := filepath.Join(t.TempDir(), "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(t.TempDir(), "missing.pem")
	flags := FlagNames{CA: "--x-tls-ca", Cert: "--x-tls-cert", Key: "--x-tls-key"}
	tests := []struct {
		name     string
		files    Files
		wantErr  []string // substrings of the error; nil: success
		wantCA   bool
		wantCert bool
	}{
		{name: "nothing: system roots", files: Files{}},
		{name: "server name only", files: Files{ServerName: "rabbit.test"}},
		{name: "insecure skip verify", files: Files{InsecureSkipVerify: true}},
		{name: "ca only", files: Files{CA: p.ca}, wantCA: true},
		{name: "complete", files: Files{CA: p.ca, Cert: p.cert, Key: p.key, ServerName: "x"}, wantCA: true, wantCert: true},
		{name: "client certificate without ca", files: Files{Cert: p.cert, Key: p.key}, wantCert: true},
		{name: "ca missing", files: Files{CA: missing}, wantErr: []string{"--x-tls-ca", "no such file"}},
		{name: "ca not PEM", files: Files{CA: notPEM}, wantErr: []string{"--x-tls-ca", notPEM, "no PEM certificate"}},
		{name: "ca is a key", files: Files{CA: p.key}, wantErr: []string{"--x-tls-ca", "no PEM certificate"}},
		{name: "cert without key", files: Files{Cert: p.cert}, wantErr: []string{"--x-tls-cert and --x-tls-key go together"}},
		{name: "key without cert", files: Files{Key: p.key}, wantErr: []string{"--x-tls-cert and --x-tls-key go together"}},
		{name: "key not matching", files: Files{Cert: p.cert, Key: p.otherKey}, wantErr: []string{"--x-tls-cert/--x-tls-key"}},
		{name: "cert file missing", files: Files{Cert: missing, Key: p.key}, wantErr: []string{"--x-tls-cert/--x-tls-key", "no such file"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := Load(tc.files, flags)
			if tc.wantErr != nil {
				if err == nil {
					t.Fatalf("Load() = %v, want an error containing %q", cfg, tc.wantErr)
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("Load() error %q does not contain %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("Load() = %v, want nil", err)
			}
			if cfg.MinVersion != tls.VersionTLS12 {
				t.Errorf("MinVersion = %x, want TLS 1.2 (%x)", cfg.MinVersion, tls.VersionTLS12)
			}
			if cfg.ServerName != tc.files.ServerName || cfg.InsecureSkipVerify != tc.files.InsecureSkipVerify {
				t.Errorf("ServerName %q, InsecureSkipVerify %v; want %q, %v", cfg.ServerName, cfg.InsecureSkipVerify,
					tc.files.ServerName, tc.files.InsecureSkipVerify)
			}
			if got := cfg.RootCAs != nil; got != tc.wantCA {
				t.Errorf("RootCAs set: %v, want %v", got, tc.wantCA)
			}
			if tc.wantCA {
				want := x509.NewCertPool()
				want.AddCert(p.caCert)
				if !cfg.RootCAs.Equal(want) {
					t.Error("RootCAs is not the test CA")
				}
			}
			if got := len(cfg.Certificates) == 1; got != tc.wantCert {
				t.Errorf("%d client certificates, want one: %v", len(cfg.Certificates), tc.wantCert)
			}
		})
	}
}
