package tlsconf

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// ReloadErrors is keystone_fanout_tls_reload_errors_total{flag}: changed TLS
// files that could not be used (unreadable, half-written, not PEM, a
// certificate and key that do not match, an expired client certificate), by
// the flag that names the file. The last good configuration stays in use.
// Processes register it once (it is shared by all their Reloaders).
var ReloadErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
	Name: "keystone_fanout_tls_reload_errors_total",
	Help: "TLS files (CA bundle, client certificate or key) that changed on disk but could not be used, by the flag naming the file; the last good one stays in use.",
}, []string{"flag"})

// Reloader is a client TLS configuration whose files are re-read when they
// change on disk, so that rotating a CA bundle or a client certificate needs
// no restart. Before each handshake it compares each file's modification
// time, size and inode with the last read (a stat per file, no read when
// nothing changed). A changed file that cannot be used — missing, half
// written, not PEM, a key not matching the certificate, an expired
// certificate — is logged once per change with the flag that names it and
// counted in ReloadErrors; the last good one stays in use, and the next
// change is read again. It is safe for concurrent use.
type Reloader struct {
	files Files
	flags FlagNames
	log   *slog.Logger
	now   func() time.Time

	mu        sync.Mutex
	pool      *x509.CertPool // nil: system roots
	cert      *tls.Certificate
	caStamp   stamp
	certStamp [2]stamp // Cert, Key
	expired   stamp    // certStamp[0] when the expiry of cert was reported
	err       error    // the last change that failed; nil after a good read
}

// stamp identifies one version of a file; the zero stamp is "not readable".
type stamp struct {
	mod  time.Time
	size int64
	ino  uint64
}

func statFile(path string) stamp {
	fi, err := os.Stat(path)
	if err != nil {
		return stamp{}
	}
	s := stamp{mod: fi.ModTime(), size: fi.Size()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.ino = uint64(st.Ino)
	}
	return s
}

// NewReloader reads the files once, failing like Load (each error names the
// flag), and returns a Reloader that keeps them current. log receives the
// re-read messages; nil is slog.Default().
func NewReloader(f Files, flags FlagNames, log *slog.Logger) (*Reloader, error) {
	if log == nil {
		log = slog.Default()
	}
	r := &Reloader{files: f, flags: flags, log: log, now: time.Now}
	if f.CA != "" {
		r.caStamp = statFile(f.CA)
		pool, err := LoadCA(f.CA, flags.CA)
		if err != nil {
			return nil, err
		}
		r.pool = pool
	}
	if (f.Cert == "") != (f.Key == "") {
		return nil, fmt.Errorf("%s and %s go together: give both or neither", flags.Cert, flags.Key)
	}
	if f.Cert != "" {
		r.certStamp = [2]stamp{statFile(f.Cert), statFile(f.Key)}
		cert, err := loadPair(f, flags)
		if err != nil {
			return nil, err
		}
		r.cert = &cert
	}
	return r, nil
}

func loadPair(f Files, flags FlagNames) (tls.Certificate, error) {
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return cert, fmt.Errorf("%s/%s: %w", flags.Cert, flags.Key, err)
	}
	return cert, nil
}

// Config returns the tls.Config of one new connection: TLS 1.2 or later, the
// current CA bundle as RootCAs (standard verification, server name
// included), and the client certificate through GetClientCertificate, which
// re-checks the files at the handshake. ServerName is Files.ServerName, else
// serverName (the host dialled; "" lets the TLS library fill it). Take a new
// Config for every dial: a kept one does not see a new CA bundle.
func (r *Reloader) Config(serverName string) *tls.Config {
	cfg := &tls.Config{
		MinVersion:         tls.VersionTLS12,
		ServerName:         r.files.ServerName,
		RootCAs:            r.RootCAs(),
		InsecureSkipVerify: r.files.InsecureSkipVerify, //nolint:gosec // opt-in, documented as test-only
	}
	if cfg.ServerName == "" {
		cfg.ServerName = serverName
	}
	if r.files.Cert != "" {
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c := r.Certificate()
			return &c, nil
		}
	}
	return cfg
}

// RootCAs returns the current CA pool, re-reading the CA file when it
// changed; nil (the system roots) without a CA file.
func (r *Reloader) RootCAs() *x509.CertPool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.files.CA == "" {
		return nil
	}
	if s := statFile(r.files.CA); s != r.caStamp {
		r.caStamp = s
		pool, err := LoadCA(r.files.CA, r.flags.CA)
		if err != nil {
			r.failed(r.flags.CA, err)
		} else {
			r.pool = pool
			r.reloaded(r.flags.CA, r.files.CA)
		}
	}
	return r.pool
}

// Certificate returns the current client certificate, re-reading the pair
// when either file changed (an empty certificate without Files.Cert).
func (r *Reloader) Certificate() tls.Certificate {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.files.Cert == "" {
		return tls.Certificate{}
	}
	if s := [2]stamp{statFile(r.files.Cert), statFile(r.files.Key)}; s != r.certStamp {
		r.certStamp = s
		cert, err := loadPair(r.files, r.flags)
		if err == nil && cert.Leaf != nil && r.now().After(cert.Leaf.NotAfter) {
			err = fmt.Errorf("%s %s: certificate expired at %s", r.flags.Cert, r.files.Cert, cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
		}
		if err != nil {
			r.failed(r.flags.Cert, err)
		} else {
			r.cert = &cert
			r.reloaded(r.flags.Cert, r.files.Cert)
		}
	}
	if leaf := r.cert.Leaf; leaf != nil && r.now().After(leaf.NotAfter) && r.expired != r.certStamp[0] {
		r.expired = r.certStamp[0]
		r.failed(r.flags.Cert, fmt.Errorf("%s %s: the client certificate in use expired at %s: write a renewed one to the file",
			r.flags.Cert, r.files.Cert, leaf.NotAfter.UTC().Format(time.RFC3339)))
	}
	return *r.cert
}

// Err is the last re-read that failed (nil once a later one succeeded): the
// files on disk are not the ones in use.
func (r *Reloader) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

func (r *Reloader) failed(flag string, err error) {
	r.err = err
	ReloadErrors.WithLabelValues(flag).Inc()
	r.log.Error("TLS file changed but cannot be used; keeping the last good one", "flag", flag, "err", err)
}

func (r *Reloader) reloaded(flag, path string) {
	r.err = nil
	r.log.Info("TLS file changed on disk; new connections use it", "flag", flag, "file", path)
}

// Explain adds to a connection error which TLS file to look at when it is a
// TLS failure: the server refused this client's certificate (an alert from
// the server: flags.Cert), or the server's certificate failed verification
// (flags.CA, or the server name). Other errors, and nil, are returned as
// they are.
func Explain(err error, f Files, flags FlagNames) error {
	if err == nil {
		return nil
	}
	var verr *tls.CertificateVerificationError
	var herr x509.HostnameError
	switch {
	case errors.As(err, &herr):
		return fmt.Errorf("%w (the server's certificate is not for the name checked: set the TLS server name option, or fix the server's certificate)", err)
	case errors.As(err, &verr):
		if f.CA == "" {
			return fmt.Errorf("%w (the server's certificate is not trusted by the system roots: give %s)", err, flags.CA)
		}
		return fmt.Errorf("%w (the server's certificate is not trusted by %s %s)", err, flags.CA, f.CA)
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "remote error" {
		if f.Cert == "" {
			return fmt.Errorf("%w (the server refused the TLS handshake; it may require a client certificate: give %s and %s)", err, flags.Cert, flags.Key)
		}
		return fmt.Errorf("%w (the server refused the TLS handshake: check that %s %s is valid and signed by a CA the server trusts)", err, flags.Cert, f.Cert)
	}
	return err
}

// Files returns the files and settings r was made with.
func (r *Reloader) Files() Files { return r.files }
