// Package natsconn connects keystone-fanout's components to NATS the way a
// production daemon should: TLS, any of NATS's credential kinds, and reconnects
// that never give up.
package natsconn

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
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
	// ConnectTimeout bounds the first connection; default 10 s. After the first
	// connection reconnects are unlimited.
	ConnectTimeout time.Duration
}

// Validate checks the options without connecting. Errors name the flag.
func (o Options) Validate() error {
	if strings.TrimSpace(o.URL) == "" {
		return errors.New("--nats-url is empty: give the NATS server URL, for example nats://127.0.0.1:4222")
	}
	for _, u := range strings.Split(o.URL, ",") {
		u = strings.TrimSpace(u)
		if !strings.Contains(u, "://") {
			continue // host:port is accepted by nats.go
		}
		switch strings.SplitN(u, "://", 2)[0] {
		case "nats", "tls", "ws", "wss":
		default:
			return fmt.Errorf("--nats-url %q: scheme must be nats:// or tls://", u)
		}
	}
	n := 0
	for _, set := range []bool{o.CredsFile != "", o.NKeySeedFile != "", o.User != "" || o.Password != "", o.Token != ""} {
		if set {
			n++
		}
	}
	if n > 1 {
		return errors.New("--nats-creds-file, --nats-nkey-file, --nats-user/--nats-password and --nats-token are exclusive: give one")
	}
	if (o.CertFile == "") != (o.KeyFile == "") {
		return errors.New("--nats-tls-cert and --nats-tls-key go together: give both or neither")
	}
	for flag, f := range map[string]string{"--nats-tls-ca": o.CAFile, "--nats-tls-cert": o.CertFile,
		"--nats-tls-key": o.KeyFile, "--nats-creds-file": o.CredsFile, "--nats-nkey-file": o.NKeySeedFile} {
		if f == "" {
			continue
		}
		if _, err := os.Stat(f); err != nil {
			return fmt.Errorf("%s: %w", flag, err)
		}
	}
	return nil
}

// Connect connects to NATS with unlimited reconnects, logging disconnects and
// reconnects, and calls onReconnect (when not nil) after each reconnect. The
// first connection is retried until ctx ends or ConnectTimeout passes.
func Connect(ctx context.Context, o Options, name string, log *slog.Logger, onReconnect func()) (*nats.Conn, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
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
			log.Warn("NATS disconnected", "err", err)
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("NATS reconnected", "url", nc.ConnectedUrlRedacted())
			if onReconnect != nil {
				onReconnect()
			}
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			log.Warn("NATS asynchronous error", "subject", subject, "err", err)
		}),
	}
	if o.CAFile != "" || o.CertFile != "" || o.TLSServerName != "" {
		cfg, err := tlsConfig(o)
		if err != nil {
			return nil, err
		}
		opts = append(opts, nats.Secure(cfg))
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
	timeout := o.ConnectTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	deadline := time.Now().Add(timeout)
	retry := backoff.New(100*time.Millisecond, 2*time.Second)
	for {
		nc, err := nats.Connect(o.URL, opts...)
		if err == nil {
			return nc, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("connecting to NATS at %s: %w", redact(o.URL), err)
		}
		log.Warn("NATS not reachable yet, retrying", "url", redact(o.URL), "err", err)
		if !backoff.Sleep(ctx, retry.Next()) {
			return nil, ctx.Err()
		}
	}
}

func tlsConfig(o Options) (*tls.Config, error) {
	return tlsconf.Load(tlsconf.Files{CA: o.CAFile, Cert: o.CertFile, Key: o.KeyFile, ServerName: o.TLSServerName},
		tlsconf.FlagNames{CA: "--nats-tls-ca", Cert: "--nats-tls-cert", Key: "--nats-tls-key"})
}

// redact hides passwords and tokens in URLs for logs.
func redact(urls string) string {
	parts := strings.Split(urls, ",")
	for i, u := range parts {
		if at := strings.LastIndex(u, "@"); at >= 0 {
			if s := strings.Index(u, "://"); s >= 0 && s < at {
				parts[i] = u[:s+3] + "***" + u[at:]
			}
		}
	}
	return strings.Join(parts, ",")
}
