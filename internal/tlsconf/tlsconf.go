// Package tlsconf builds the client *tls.Config of keystone-fanout's
// connections (RabbitMQ, NATS, memcached, Keystone) from PEM files, with
// errors that name the option to fix. Load reads them once (one-shot
// commands); a Reloader reads them again whenever they change on disk, so
// that long-running processes pick up rotated certificates at their next
// connection.
package tlsconf

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
)

// Files are the PEM files and settings of one client TLS configuration.
type Files struct {
	// CA is a PEM bundle of the CAs the server certificate is checked
	// against; empty uses the system roots.
	CA string
	// Cert and Key are a client certificate and its key, for servers that
	// verify clients; both or neither.
	Cert, Key string
	// ServerName is the name checked in the server certificate; empty lets
	// the client use the host it dials.
	ServerName string
	// InsecureSkipVerify disables certificate verification (tests only).
	InsecureSkipVerify bool
}

// FlagNames are the names the errors give to Files' fields: the command-line
// flags ("--nats-tls-ca") or option fields ("TLS.CAFile") the user sets.
type FlagNames struct {
	CA, Cert, Key string
}

// Load reads the files into a client tls.Config with MinVersion TLS 1.2. It
// fails, naming the flag, when a file cannot be read, when the CA file holds
// no PEM certificate, when only one of Cert and Key is given, or when they
// are not a matching pair. It never returns nil without an error.
func Load(f Files, flags FlagNames) (*tls.Config, error) {
	cfg := &tls.Config{
		MinVersion:         tls.VersionTLS12,
		ServerName:         f.ServerName,
		InsecureSkipVerify: f.InsecureSkipVerify, //nolint:gosec // opt-in, documented as test-only
	}
	if f.CA != "" {
		pool, err := LoadCA(f.CA, flags.CA)
		if err != nil {
			return nil, err
		}
		cfg.RootCAs = pool
	}
	if (f.Cert == "") != (f.Key == "") {
		return nil, fmt.Errorf("%s and %s go together: give both or neither", flags.Cert, flags.Key)
	}
	if f.Cert != "" {
		cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
		if err != nil {
			return nil, fmt.Errorf("%s/%s: %w", flags.Cert, flags.Key, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// LoadCA reads a PEM CA bundle into a pool; flag names it in errors.
func LoadCA(path, flag string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", flag, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s %s: no PEM certificate found: give the PEM file of the CA that signed the server's certificate", flag, path)
	}
	return pool, nil
}
