package bridge

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/tlsconf"
)

// Queue types for Options.QueueType.
const (
	QueueQuorum  = "quorum"
	QueueClassic = "classic"
)

// Defaults of Options. A zero field means its default.
const (
	DefaultExchange          = "keystone"
	DefaultRoutingKey        = "notifications.info"
	DefaultQueue             = "keystone-fanout"
	DefaultQueueType         = QueueQuorum
	DefaultQueueMessageTTL   = 6 * time.Minute
	DefaultHeartbeat         = 10 * time.Second
	DefaultPrefetch          = 256
	DefaultConnectTimeout    = 15 * time.Second
	DefaultReconnectMin      = 100 * time.Millisecond
	DefaultReconnectMax      = 30 * time.Second
	DefaultPublishWindow     = 256
	DefaultPubAckTimeout     = 5 * time.Second
	DefaultMaxBodySize       = 1 << 20
	DefaultShutdownTimeout   = 10 * time.Second
	DefaultStreamCheckPeriod = 10 * time.Second
	DefaultConnectionName    = "keystone-fanout-bridge"
)

// Options configures a Bridge. Validate fills zero fields with their defaults
// and checks the rest; New calls it, so an invalid Options never connects.
type Options struct {
	// AMQPURLs (--amqp-url, repeatable or comma-separated) are the RabbitMQ
	// brokers, as amqp://, amqps:// or oslo.messaging's
	// rabbit://user:pass@host1:5672,user:pass@host2:5672/vhost (see
	// ParseAMQPURLs). Required. The bridge connects
	// to the first that answers and, after losing a connection, tries the next
	// ones in turn, forever.
	AMQPURLs []string
	// AMQPPassword (--amqp-password, or --amqp-password-file), when not empty,
	// replaces the password of every AMQP URL, so that the URL need not carry it.
	AMQPPassword string

	// Exchange (--exchange, default "keystone") is Keystone's control_exchange.
	// The bridge declares it as oslo.messaging does (topic, durable=false,
	// auto_delete=false); if it already exists with other flags the bridge
	// logs it and uses it as it is.
	Exchange string
	// RoutingKeys (--routing-key, repeatable, default "notifications.info")
	// bind the queue to the exchange: "<topic>.<priority>" of Keystone's
	// [oslo_messaging_notifications] topics.
	RoutingKeys []string
	// Queue (--queue, default "keystone-fanout") is the bridge's own durable
	// queue. Several bridge replicas may share it. It keeps notifications while
	// no bridge runs: nothing sent after the queue was first declared is lost.
	Queue string
	// QueueType (--queue-type) is "quorum" (default; replicated, survives a
	// broker node loss) or "classic". It only matters when the queue is
	// created: an existing queue of the other type is used as it is (logged).
	QueueType string
	// QueueMessageTTL (--queue-message-ttl, default 6 min) is the queue's
	// x-message-ttl: a notification that waited longer while no bridge
	// consumed can no longer concern any cached entry. Set it to the largest
	// token_cache_time of any region plus a minute. It only applies when the
	// queue is created: see docs/OPERATIONS.md.
	QueueMessageTTL time.Duration
	// DeadLetterExchange (--dead-letter-exchange), when not empty, is set as
	// the queue's x-dead-letter-exchange and rejected bodies (not a
	// notification, too large) are nacked to it instead of acked. Create the
	// exchange and a queue bound to it yourself; a missing exchange makes
	// RabbitMQ drop them (the bridge warns at start). Default: none.
	DeadLetterExchange string

	// TLS configures amqps:// connections (--amqp-tls-ca, --amqp-tls-cert,
	// --amqp-tls-key, --amqp-tls-server-name). Empty: system roots, the URL's
	// host as server name (and amqp091's cacertfile/certfile/keyfile URL
	// query parameters apply). Setting any of them requires amqps:// URLs.
	TLS TLSOptions
	// Heartbeat (--amqp-heartbeat, default 10s) is the AMQP heartbeat
	// interval; a silent connection is declared dead after three intervals.
	Heartbeat time.Duration
	// Prefetch (--prefetch, default 256) is how many unacknowledged deliveries
	// RabbitMQ sends ahead (basic.qos).
	Prefetch int
	// ConnectTimeout (--amqp-connect-timeout, default 15s) bounds connecting
	// to one broker (TCP, TLS, AMQP handshake) and the set-up that follows
	// (declarations, bindings, consume). On expiry the connection is dropped
	// and the next broker tried.
	ConnectTimeout time.Duration
	// ReconnectMin and ReconnectMax (default 100ms and 30s) bound the capped
	// exponential back-off between rounds of connection attempts. The bridge
	// never gives up.
	ReconnectMin, ReconnectMax time.Duration
	// ConnectionName (default "keystone-fanout-bridge") is the AMQP
	// connection_name client property, shown by rabbitmqctl list_connections.
	ConnectionName string

	// Stream is the JetStream stream the bridge publishes to (--stream,
	// --subject-prefix, --stream-max-age, --stream-replicas,
	// --stream-duplicate-window); see stream.Config for defaults. The
	// bridge creates it, and raises its limits to these (stream.Ensure).
	Stream stream.Config
	// PublishWindow (--publish-window, default 256) is the most JetStream
	// publishes awaiting their PubAck at once; consumption waits while full.
	PublishWindow int
	// DecodeWorkers (--decode-workers) is ignored, kept so that existing
	// configurations still start: one goroutine decodes and publishes in
	// delivery order, about 3 µs per notification (docs/BENCHMARKS.md).
	DecodeWorkers int
	// PubAckTimeout (--puback-timeout, default 5s) is how long one publish
	// waits for its PubAck. On expiry the delivery is nacked and requeued
	// (the stream dedupes if it was stored after all).
	PubAckTimeout time.Duration
	// StreamCheckPeriod (default 10s) is how often readiness re-checks that
	// the stream is reachable (and re-creates it if it vanished).
	StreamCheckPeriod time.Duration

	// MaxBodySize (--max-body-size, default 1 MiB) is the largest AMQP body
	// decoded; larger ones are rejected with reason too_large.
	MaxBodySize int
	// Filter (--filter, repeatable) lists event type patterns (path.Match
	// syntax) that are acked and counted without being published. nil means
	// event.DefaultFilter; an empty non-nil slice filters nothing. Types that
	// affect tokens are never filtered whatever the patterns say.
	Filter []string

	// ShutdownTimeout (--shutdown-timeout, default 10s) bounds how long Run,
	// once its context ends, waits for the publishes in flight to be settled
	// before it closes the connection (at most 2s more); deliveries left
	// unacknowledged are redelivered by RabbitMQ.
	ShutdownTimeout time.Duration
}

// TLSOptions are the TLS settings of the AMQP connections. Files are PEM.
type TLSOptions struct {
	// CAFile (--amqp-tls-ca) verifies the broker's certificate; empty uses
	// the system roots.
	CAFile string
	// CertFile and KeyFile (--amqp-tls-cert, --amqp-tls-key) are a client
	// certificate for mutual TLS; both or neither.
	CertFile, KeyFile string
	// ServerName (--amqp-tls-server-name) is the name checked in the broker's
	// certificate; empty uses each URL's host.
	ServerName string
}

func (t TLSOptions) empty() bool { return t == TLSOptions{} }

// config loads the files into a tls.Config; nil when no option is set.
func (t TLSOptions) config() (*tls.Config, error) {
	if t.empty() {
		return nil, nil
	}
	return tlsconf.Load(t.files(), amqpFlags)
}

// reloader loads the files and keeps them current (every connection uses the
// CA bundle and client certificate on disk when it dials); nil when no option
// is set.
func (t TLSOptions) reloader(log *slog.Logger) (*tlsconf.Reloader, error) {
	if t.empty() {
		return nil, nil
	}
	return tlsconf.NewReloader(t.files(), amqpFlags, log)
}

func (t TLSOptions) files() tlsconf.Files {
	return tlsconf.Files{CA: t.CAFile, Cert: t.CertFile, Key: t.KeyFile, ServerName: t.ServerName}
}

var amqpFlags = tlsconf.FlagNames{CA: "--amqp-tls-ca", Cert: "--amqp-tls-cert", Key: "--amqp-tls-key"}

// maxMessageTTL is the largest x-message-ttl RabbitMQ accepts (2^32-1 ms).
const maxMessageTTL = (1<<32 - 1) * time.Millisecond

// setDefaults fills zero fields.
func (o *Options) setDefaults() {
	orDefault(&o.Exchange, DefaultExchange)
	if len(o.RoutingKeys) == 0 {
		o.RoutingKeys = []string{DefaultRoutingKey}
	}
	orDefault(&o.Queue, DefaultQueue)
	orDefault(&o.QueueType, DefaultQueueType)
	orDefault(&o.QueueMessageTTL, DefaultQueueMessageTTL)
	orDefault(&o.Heartbeat, DefaultHeartbeat)
	orDefault(&o.Prefetch, DefaultPrefetch)
	orDefault(&o.ConnectTimeout, DefaultConnectTimeout)
	orDefault(&o.ReconnectMin, DefaultReconnectMin)
	orDefault(&o.ReconnectMax, DefaultReconnectMax)
	orDefault(&o.ConnectionName, DefaultConnectionName)
	orDefault(&o.PublishWindow, DefaultPublishWindow)
	orDefault(&o.PubAckTimeout, DefaultPubAckTimeout)
	orDefault(&o.StreamCheckPeriod, DefaultStreamCheckPeriod)
	orDefault(&o.MaxBodySize, DefaultMaxBodySize)
	orDefault(&o.ShutdownTimeout, DefaultShutdownTimeout)
	if o.Filter == nil {
		o.Filter = append([]string(nil), event.DefaultFilter...)
	}
}

// orDefault sets *p to def when it is the zero value.
func orDefault[T comparable](p *T, def T) {
	var zero T
	if *p == zero {
		*p = def
	}
}

// Validate fills zero fields with their defaults and checks every option
// without connecting. Its errors, joined, name the command-line flag and say
// how to fix it.
func (o *Options) Validate() error {
	o.setDefaults()
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if urls, err := o.brokerURLs(); err != nil {
		errs = append(errs, err)
	} else if !o.TLS.empty() {
		for _, u := range urls {
			if !strings.HasPrefix(u, "amqps://") {
				add("--amqp-url %s is not TLS but --amqp-tls-* options are set: "+
					"use amqps:// (or ?ssl=1), or drop the TLS options", redactURL(u))
			}
		}
	}
	if _, err := o.TLS.config(); err != nil {
		errs = append(errs, err)
	}
	for _, n := range [][2]string{{"--exchange", o.Exchange}, {"--queue", o.Queue}, {"--dead-letter-exchange", o.DeadLetterExchange}} {
		if err := checkAMQPName(n[0], n[1]); err != nil {
			errs = append(errs, err)
		}
	}
	if strings.HasPrefix(o.Exchange, "amq.") {
		add("--exchange %q: give Keystone's control_exchange (default %q), not a broker-reserved amq.* exchange", o.Exchange, DefaultExchange)
	}
	for _, k := range o.RoutingKeys {
		if k == "" {
			add("--routing-key: empty key: give <topic>.<priority>, for example %q", DefaultRoutingKey)
		} else if err := checkAMQPName("--routing-key", k); err != nil {
			errs = append(errs, err)
		}
	}
	if strings.HasPrefix(o.Queue, "amq.") {
		add("--queue %q: names starting with amq. are reserved by RabbitMQ: choose another, for example %q", o.Queue, DefaultQueue)
	}
	if o.Queue == DefaultRoutingKey || slices.Contains(o.RoutingKeys, o.Queue) {
		add("--queue %q: that is the queue oslo.messaging itself declares (non-durable) for other consumers: "+
			"give the bridge its own queue, for example %q", o.Queue, DefaultQueue)
	}
	if o.QueueType != QueueQuorum && o.QueueType != QueueClassic {
		add("--queue-type %q: must be %q or %q", o.QueueType, QueueQuorum, QueueClassic)
	}
	if o.QueueMessageTTL < time.Second || o.QueueMessageTTL > maxMessageTTL {
		add("--queue-message-ttl %s: must be from 1s to %s (default %s: the services' token_cache_time plus a minute)",
			o.QueueMessageTTL, maxMessageTTL, DefaultQueueMessageTTL)
	}
	if o.DeadLetterExchange != "" && o.DeadLetterExchange == o.Exchange {
		add("--dead-letter-exchange %q is Keystone's exchange: rejected messages would come back; give a separate exchange", o.DeadLetterExchange)
	}
	for _, d := range []struct {
		flag string
		v    time.Duration
		min  time.Duration
	}{
		{"--amqp-heartbeat", o.Heartbeat, time.Second},
		{"--amqp-connect-timeout", o.ConnectTimeout, 100 * time.Millisecond},
		{"--amqp-reconnect-min", o.ReconnectMin, time.Millisecond},
		{"--amqp-reconnect-max", o.ReconnectMax, time.Millisecond},
		{"--puback-timeout", o.PubAckTimeout, 10 * time.Millisecond},
		{"--stream-check-period", o.StreamCheckPeriod, 10 * time.Millisecond},
		{"--shutdown-timeout", o.ShutdownTimeout, time.Millisecond},
	} {
		if d.v < d.min {
			add("%s %s: must be at least %s", d.flag, d.v, d.min)
		}
	}
	if o.ReconnectMax < o.ReconnectMin {
		add("--amqp-reconnect-max %s is below --amqp-reconnect-min %s: raise it", o.ReconnectMax, o.ReconnectMin)
	}
	if o.Heartbeat > time.Hour {
		add("--amqp-heartbeat %s: at most 1h (RabbitMQ negotiates seconds up to 65535); 10s is usual", o.Heartbeat)
	}
	if o.Prefetch < 1 || o.Prefetch > 65535 {
		add("--prefetch %d: must be from 1 to 65535 (default %d)", o.Prefetch, DefaultPrefetch)
	}
	if o.PublishWindow < 1 || o.PublishWindow > 1<<16 {
		add("--publish-window %d: must be from 1 to 65536 (default %d)", o.PublishWindow, DefaultPublishWindow)
	}
	if o.MaxBodySize < 1024 || o.MaxBodySize > 64<<20 {
		add("--max-body-size %d: must be from 1024 to %d bytes (default %d)", o.MaxBodySize, 64<<20, DefaultMaxBodySize)
	}
	if _, err := event.NewFilter(o.Filter); err != nil {
		add("--filter: %v: patterns use path.Match syntax, for example identity.*.created", err)
	}
	errs = append(errs, o.Stream.Validate())
	return errors.Join(errs...)
}

// brokerURLs is AMQPURLs as the bridge dials them: expanded and normalised
// (ParseAMQPURLs), with AMQPPassword applied.
func (o *Options) brokerURLs() ([]string, error) {
	urls, err := ParseAMQPURLs(o.AMQPURLs)
	if err != nil || o.AMQPPassword == "" {
		return urls, err
	}
	for i, u := range urls {
		if urls[i], err = withPassword(u, o.AMQPPassword); err != nil {
			return nil, fmt.Errorf("--amqp-password: applying it to %s: %v", redactURL(u), err)
		}
	}
	return urls, nil
}

// checkAMQPName checks a short string of the AMQP protocol (at most 255
// bytes, valid UTF-8 without control characters).
func checkAMQPName(flag, s string) error {
	if len(s) > 255 {
		return fmt.Errorf("%s: %d bytes, AMQP allows at most 255", flag, len(s))
	}
	if strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f || r == 0xfffd }) {
		return fmt.Errorf("%s %q: contains control characters or invalid UTF-8", flag, s)
	}
	return nil
}

// redactedURLs is the URLs for logs.
func redactedURLs(urls []string) []string {
	out := make([]string, len(urls))
	for i, u := range urls {
		if p, err := url.Parse(u); err == nil {
			out[i] = p.Redacted()
		} else {
			out[i] = redactURL(u)
		}
	}
	return out
}
