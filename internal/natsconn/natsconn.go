// Package natsconn connects keystone-fanout's components to NATS the way a
// production daemon should: TLS, any of NATS's credential kinds, and reconnects
// that never give up.
package natsconn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/keystone-fanout/keystone-fanout/internal/backoff"
	"github.com/keystone-fanout/keystone-fanout/internal/tlsconf"
)

// Options says where NATS is and how to authenticate. At most one of
// CredsFile, NKeySeedFile, User/Password and Token may be set.
type Options struct {
	// URL is one or more comma-separated server URLs (nats://, tls://).
	URL string
	// CAFile verifies the servers' certificates; empty uses the system roots.
	CAFile string
	// CertFile and KeyFile are a client certificate for mutual TLS.
	CertFile, KeyFile string
	// TLSServerName overrides the name checked in the server certificate.
	TLSServerName string
	// CredsFile is a NATS .creds file (JWT and nkey seed).
	CredsFile string
	// NKeySeedFile holds an nkey seed ("SU...").
	NKeySeedFile string
	// User and Password authenticate with a user name; Password may come from
	// a file through the configuration layer.
	User, Password string
	// Token is an authentication token.
	Token string
	// InboxPrefix (--nats-inbox-prefix) is the prefix of the reply subjects
	// this client subscribes to. Default "_INBOX". Under least privilege
	// give each user its own (the shipped deploy/nats configuration allows
	// user U to subscribe to "_INBOX_U.>" only), so that no user can read
	// another's replies.
	InboxPrefix string
	// ConnectTimeout bounds the first connection; default 10 s. After the first
	// connection reconnects are unlimited. Ignored with KeepTrying.
	ConnectTimeout time.Duration
	// KeepTrying makes Connect return at once even when no server answers
	// yet: the connection keeps trying in the background, forever, in status
	// RECONNECTING until it succeeds (NotConnected says why). Long-running
	// commands set it, so that they serve /healthz meanwhile and /readyz says
	// why they wait; one-shot commands leave it false and fail after
	// ConnectTimeout.
	KeepTrying bool
}

// Validate fills ConnectTimeout's default and checks the options without
// connecting: every error, joined, each naming the flag and the fix. The TLS
// files are loaded, so that a bad one fails here rather than at the first
// connection.
func (o *Options) Validate() error {
	if o.ConnectTimeout == 0 {
		o.ConnectTimeout = defaultConnectTimeout
	}
	var errs []error
	if o.InboxPrefix != "" && (strings.ContainsAny(o.InboxPrefix, " \t\r\n*>.") || o.InboxPrefix == "") {
		errs = append(errs, fmt.Errorf("--nats-inbox-prefix %q: one subject token without '.', '*', '>' or spaces, for example _INBOX_bridge", o.InboxPrefix))
	}
	if strings.TrimSpace(o.URL) == "" {
		errs = append(errs, errors.New("--nats-url is empty: give the NATS server URL, for example nats://127.0.0.1:4222"))
	}
	for _, u := range strings.Split(o.URL, ",") {
		u = strings.TrimSpace(u)
		if u == "" {
			continue
		}
		scheme, rest, found := strings.Cut(u, "://")
		if !found {
			// nats.go would take host:port, but also misspelt schemes
			// ("nats//h:4222") as a host name: only a connection attempt
			// would tell. The credentials are left out of the message.
			shown, fixed := u, u
			for _, p := range []string{"nats:", "nats/", "tls:", "tls/"} {
				if len(fixed) > len(p) && strings.EqualFold(fixed[:len(p)], p) {
					fixed = strings.TrimLeft(fixed[len(p):], "/")
					break
				}
			}
			if at := strings.LastIndex(u, "@"); at >= 0 {
				shown = "***" + u[at:]
				fixed = "***" + fixed[strings.LastIndex(fixed, "@"):]
			}
			errs = append(errs, fmt.Errorf("--nats-url %q has no scheme: write nats://HOST:PORT (tls://HOST:PORT for TLS), here nats://%s",
				shown, fixed))
			continue
		}
		switch scheme {
		case "nats", "tls", "ws", "wss":
		default:
			hostPort := rest[strings.LastIndex(rest, "@")+1:]
			errs = append(errs, fmt.Errorf("--nats-url %q: scheme must be nats:// or tls://, for example nats://%s", Redact(u), hostPort))
		}
	}
	n := 0
	for _, set := range []bool{o.CredsFile != "", o.NKeySeedFile != "", o.User != "" || o.Password != "", o.Token != ""} {
		if set {
			n++
		}
	}
	if n > 1 {
		errs = append(errs, errors.New("--nats-creds-file, --nats-nkey-file, --nats-user/--nats-password and --nats-token are exclusive: give one"))
	}
	if (o.CertFile == "") != (o.KeyFile == "") {
		errs = append(errs, errors.New("--nats-tls-cert and --nats-tls-key go together: give both or neither"))
	}
	missing := false
	for _, f := range []struct{ flag, path string }{{"--nats-tls-ca", o.CAFile}, {"--nats-tls-cert", o.CertFile},
		{"--nats-tls-key", o.KeyFile}, {"--nats-creds-file", o.CredsFile}, {"--nats-nkey-file", o.NKeySeedFile}} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f.flag, err))
			missing = true
		}
	}
	if !missing && (o.CertFile == "") == (o.KeyFile == "") && (o.CAFile != "" || o.CertFile != "") {
		if _, err := tlsConfig(*o); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

const defaultConnectTimeout = 10 * time.Second

// Connect connects to NATS with unlimited reconnects, logging disconnects and
// reconnects, and calls onReconnect (when not nil) after each reconnect. The
// first connection is retried until ctx ends or ConnectTimeout passes, or,
// with KeepTrying, in the background for as long as the connection is open
// (onReconnect is then also called when it first succeeds).
func Connect(ctx context.Context, o Options, name string, log *slog.Logger, onReconnect func()) (*nats.Conn, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	var failures atomic.Int64 // connection attempts failed in a row
	opts := []nats.Option{
		nats.Name(name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(500 * time.Millisecond),
		nats.ReconnectJitter(250*time.Millisecond, time.Second),
		nats.ReconnectBufSize(-1), // fail publishes while disconnected rather than buffer them unacknowledged
		nats.PingInterval(10 * time.Second),
		nats.MaxPingsOutstanding(3),
		nats.RetryOnFailedConnect(false),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err == nil { // closed on purpose
				log.Debug("NATS connection closed")
				return
			}
			log.Warn("NATS disconnected", "err", tlsconf.Explain(err, tlsFiles(o), natsFlags))
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			failures.Store(0)
			log.Info("NATS reconnected", "url", nc.ConnectedUrlRedacted())
			if onReconnect != nil {
				onReconnect()
			}
		}),
		nats.ReconnectErrHandler(func(_ *nats.Conn, err error) {
			// Every failed attempt would be a line every second or so during
			// an outage: log the 1st, 2nd, 4th, 8th... and let /readyz and the
			// connection's status tell the rest.
			if n := failures.Add(1); n&(n-1) == 0 {
				log.Warn("NATS not reachable, still trying", "url", Redact(o.URL), "attempts", n, "err", tlsconf.Explain(err, tlsFiles(o), natsFlags))
			}
		}),
		nats.ConnectHandler(func(nc *nats.Conn) { failures.Store(0) }),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			log.Warn("NATS asynchronous error", "subject", subject, "err", err)
		}),
	}
	sec, err := Security(o, log)
	if err != nil {
		return nil, err
	}
	opts = append(opts, sec...)
	if o.KeepTrying {
		nc, err := nats.Connect(o.URL, append(opts, nats.RetryOnFailedConnect(true))...)
		if err != nil {
			return nil, fmt.Errorf("connecting to NATS at %s: %w", Redact(o.URL), err)
		}
		if !nc.IsConnected() {
			log.Warn("NATS not reachable yet, trying in the background", "url", Redact(o.URL), "err", nc.LastError())
		}
		return nc, nil
	}
	deadline := time.Now().Add(o.ConnectTimeout)
	retry := backoff.New(100*time.Millisecond, 2*time.Second)
	for {
		nc, err := nats.Connect(o.URL, opts...)
		if err == nil {
			return nc, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("connecting to NATS at %s: %w", Redact(o.URL), err)
		}
		log.Warn("NATS not reachable yet, retrying", "url", Redact(o.URL), "err", err)
		if !backoff.Sleep(ctx, retry.Next()) {
			return nil, ctx.Err()
		}
	}
}

// Security returns the nats.go options for o's reply prefix, TLS files and
// credentials
// (Connect uses them; keystone-fanout doctor connects with them and its own
// error handler). The TLS files are re-read when they change (see
// tlsconf.Reloader; log, nil for slog.Default(), gets its messages): every
// connection and reconnection uses the CA bundle and client certificate on
// disk at that moment.
func Security(o Options, log *slog.Logger) ([]nats.Option, error) {
	var opts []nats.Option
	if o.InboxPrefix != "" {
		opts = append(opts, nats.CustomInboxPrefix(o.InboxPrefix))
	}
	if o.CAFile != "" || o.CertFile != "" || o.TLSServerName != "" {
		r, err := tlsconf.NewReloader(tlsFiles(o), natsFlags, log)
		if err != nil {
			return nil, err
		}
		// nats.go clones this for each connection, keeping
		// GetClientCertificate (the client certificate on disk at the
		// handshake), and asks RootCAsCB for the CAs of each connection.
		opts = append(opts, nats.Secure(r.Config("")))
		if o.CAFile != "" {
			opts = append(opts, nats.ClientTLSConfig(nil, func() (*x509.CertPool, error) { return r.RootCAs(), nil }))
		}
	}
	switch {
	case o.CredsFile != "":
		opts = append(opts, nats.UserCredentials(o.CredsFile))
	case o.NKeySeedFile != "":
		opt, err := nats.NkeyOptionFromSeed(o.NKeySeedFile)
		if err != nil {
			return nil, fmt.Errorf("--nats-nkey-file: %w", err)
		}
		opts = append(opts, opt)
	case o.User != "" || o.Password != "":
		opts = append(opts, nats.UserInfo(o.User, o.Password))
	case o.Token != "":
		opts = append(opts, nats.Token(o.Token))
	}
	return opts, nil
}

// NotConnected says why nc is not connected now, naming the servers (without
// credentials) and the last error; nil when it is connected.
func NotConnected(nc *nats.Conn, o Options) error {
	if nc.IsConnected() {
		return nil
	}
	if err := nc.LastError(); err != nil {
		return fmt.Errorf("NATS at %s is %s: %w", Redact(o.URL), nc.Status(), tlsconf.Explain(err, tlsFiles(o), natsFlags))
	}
	return fmt.Errorf("NATS at %s is %s", Redact(o.URL), nc.Status())
}

func tlsConfig(o Options) (*tls.Config, error) {
	return tlsconf.Load(tlsFiles(o), natsFlags)
}

func tlsFiles(o Options) tlsconf.Files {
	return tlsconf.Files{CA: o.CAFile, Cert: o.CertFile, Key: o.KeyFile, ServerName: o.TLSServerName}
}

var natsFlags = tlsconf.FlagNames{CA: "--nats-tls-ca", Cert: "--nats-tls-cert", Key: "--nats-tls-key"}

// Redact hides the credentials of comma-separated NATS URLs
// ("nats://user:pass@host:4222", "nats://token@host:4222", "user:pass@host")
// for logs and messages.
func Redact(urls string) string {
	parts := strings.Split(urls, ",")
	for i, u := range parts {
		u = strings.TrimSpace(u)
		if at := strings.LastIndex(u, "@"); at >= 0 {
			prefix := ""
			if s := strings.Index(u, "://"); s >= 0 && s < at {
				prefix = u[:s+3]
			}
			u = prefix + "***" + u[at:]
		}
		parts[i] = u
	}
	return strings.Join(parts, ",")
}
