package tlsconf

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
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
	write := func(name, typ string, der []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	newKey := func() (*ecdsa.PrivateKey, []byte) {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return k, der
	}
	caKey, _ := newKey()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tlsconf test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	var p pki
	if p.caCert, err = x509.ParseCertificate(caDER); err != nil {
		t.Fatal(err)
	}
	p.ca = write("ca.pem", "CERTIFICATE", caDER)
	clientKey, clientKeyDER := newKey()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "client"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.caCert, &clientKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	p.cert = write("client.pem", "CERTIFICATE", der)
	p.key = write("client-key.pem", "EC PRIVATE KEY", clientKeyDER)
	_, otherDER := newKey()
	p.otherKey = write("other-key.pem", "EC PRIVATE KEY", otherDER)
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
