package memcache

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/tlsconf"
)

// Defaults for Options fields left zero.
const (
	DefaultDialTimeout = 2 * time.Second
	DefaultIOTimeout   = 5 * time.Second
	DefaultMaxIdle     = 2
	// DefaultCrawlTimeout bounds one whole metadump, including BUSY retries.
	DefaultCrawlTimeout = 60 * time.Second
)

// Options configure a Cluster. Validate before use; New does.
type Options struct {
	// Servers is the region's memcached server list in the format of
	// [keystone_authtoken] memcached_servers ("host:port,host:port"; see
	// ParseServers). Required. Use the same list, in the same order, as the
	// services of the region.
	Servers string
	// TLS configures TLS towards every server. Off by default.
	TLS TLSOptions
	// DialTimeout bounds connecting (and the TLS handshake) to one server.
	// Default DefaultDialTimeout.
	DialTimeout time.Duration
	// IOTimeout bounds every read or write on a connection, so that one
	// operation on a hung server fails rather than blocks. A context
	// deadline that is sooner wins. Default DefaultIOTimeout.
	IOTimeout time.Duration
	// MaxIdlePerServer is how many idle connections are kept per server.
	// Default DefaultMaxIdle.
	MaxIdlePerServer int
	// CrawlTimeout bounds one metadump crawl of one server, including the
	// time spent retrying while memcached answers BUSY. Default
	// DefaultCrawlTimeout.
	CrawlTimeout time.Duration
	// Log receives the messages about TLS files re-read after they changed
	// (see TLSOptions); nil means slog.Default().
	Log *slog.Logger
}

// TLSOptions configure TLS towards memcached (memcached -Z). The files are
// read at start-up and again, before a connection's handshake, whenever they
// changed on disk (tlsconf.Reloader): rotating them needs no restart.
type TLSOptions struct {
	// Enabled turns TLS on for every server.
	Enabled bool
	// CAFile is a PEM bundle of CAs that sign the servers' certificates.
	// Empty means the system roots.
	CAFile string
	// CertFile and KeyFile are a PEM client certificate and key, for servers
	// that verify clients (memcached -o ssl_verify_mode). Both or neither.
	CertFile string
	KeyFile  string
	// ServerName overrides the name checked in the servers' certificates.
	// Empty means the host of each server address.
	ServerName string
	// InsecureSkipVerify disables certificate verification. Off by default;
	// for tests only.
	InsecureSkipVerify bool
}

func (o *Options) withDefaults() Options {
	c := *o
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.IOTimeout == 0 {
		c.IOTimeout = DefaultIOTimeout
	}
	if c.MaxIdlePerServer == 0 {
		c.MaxIdlePerServer = DefaultMaxIdle
	}
	if c.CrawlTimeout == 0 {
		c.CrawlTimeout = DefaultCrawlTimeout
	}
	return c
}

// Validate fills zero fields with their defaults and checks the options
// without connecting anywhere. Errors name the field and say how to fix it.
func (o *Options) Validate() error {
	*o = o.withDefaults()
	var errs []error
	if _, err := ParseServers(o.Servers); err != nil {
		errs = append(errs, fmt.Errorf("memcache Servers: %w", err))
	}
	if o.DialTimeout < 0 {
		errs = append(errs, errors.New("memcache DialTimeout must not be negative (0 means the default 2s)"))
	}
	if o.IOTimeout < 0 {
		errs = append(errs, errors.New("memcache IOTimeout must not be negative (0 means the default 5s)"))
	}
	if o.CrawlTimeout < 0 {
		errs = append(errs, errors.New("memcache CrawlTimeout must not be negative (0 means the default 60s)"))
	}
	if o.MaxIdlePerServer < 0 {
		errs = append(errs, errors.New("memcache MaxIdlePerServer must not be negative (0 means the default 2)"))
	}
	if _, err := o.TLS.config(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// config builds the tls.Config, or nil when TLS is off. It reads the files,
// so that a bad path fails at start-up rather than at the first connection.
func (t *TLSOptions) config() (*tls.Config, error) {
	if !t.Enabled {
		if t.CAFile != "" || t.CertFile != "" || t.KeyFile != "" || t.ServerName != "" || t.InsecureSkipVerify {
			return nil, errors.New("--memcached-tls-ca, --memcached-tls-cert, --memcached-tls-key or --memcached-tls-server-name is set but --memcached-tls is not: enable TLS or remove them")
		}
		return nil, nil
	}
	cfg, err := tlsconf.Load(t.files(), memcachedFlags)
	if err != nil {
		return nil, err
	}
	return cfg, nil
}

// reloader is config's files kept current; nil when TLS is off.
func (t *TLSOptions) reloader(log *slog.Logger) (*tlsconf.Reloader, error) {
	if _, err := t.config(); err != nil || !t.Enabled {
		return nil, err
	}
	return tlsconf.NewReloader(t.files(), memcachedFlags, log)
}

func (t *TLSOptions) files() tlsconf.Files {
	return tlsconf.Files{CA: t.CAFile, Cert: t.CertFile, Key: t.KeyFile,
		ServerName: t.ServerName, InsecureSkipVerify: t.InsecureSkipVerify}
}

var memcachedFlags = tlsconf.FlagNames{CA: "--memcached-tls-ca", Cert: "--memcached-tls-cert", Key: "--memcached-tls-key"}
