package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/keystone-fanout/keystone-fanout/bridge"
	"github.com/keystone-fanout/keystone-fanout/internal/config"
	"github.com/keystone-fanout/keystone-fanout/internal/confirm"
	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/revoke"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

// common are the flags of every long-running command.
type common struct {
	logFormat, logLevel string
	httpAddr            string
	shutdown            time.Duration
	oslo                *osloConfig // --oslo-config (oslo.go)
}

func (c *common) register(s *config.Set, httpDefault string) {
	s.String(&c.httpAddr, "http-addr", httpDefault, "address serving /healthz, /readyz and /metrics (empty: none)")
	s.String(&c.logFormat, "log-format", "json", "log format: json or text")
	s.String(&c.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	s.Duration(&c.shutdown, "shutdown-timeout", 30*time.Second, "how long a stop (SIGTERM) may take in all; in-flight work is drained within it")
	c.oslo = &osloConfig{}
	c.oslo.register(s)
}

func (c *common) logger(w io.Writer) (*slog.Logger, error) {
	log, err := newLogger(w, c.logFormat, c.logLevel)
	if err == nil {
		c.oslo.logNotes(log)
	}
	return log, err
}

// registerTLS registers --<prefix>-tls-ca, -cert, -key and -server-name, the
// TLS files of one kind of connection; peers names the other ends (for help texts).
func registerTLS(s *config.Set, prefix, peers string, ca, cert, key, serverName *string) {
	s.String(ca, prefix+"-tls-ca", "", "PEM CA bundle that the certificates of "+peers+" are checked against (default: system roots); re-read when it changes")
	s.String(cert, prefix+"-tls-cert", "", "PEM client certificate for mutual TLS with "+peers+"; re-read with its key when either changes")
	s.String(key, prefix+"-tls-key", "", "PEM key of --"+prefix+"-tls-cert")
	s.String(serverName, prefix+"-tls-server-name", "", "name checked in the certificates of "+peers+" (default: each address's host)")
}

// registerNATS registers the client flags of a NATS connection.
func registerNATS(s *config.Set, o *natsconn.Options, urlDefault, urlUsage string) {
	s.String(&o.URL, "nats-url", urlDefault, urlUsage)
	registerTLS(s, "nats", "NATS servers", &o.CAFile, &o.CertFile, &o.KeyFile, &o.TLSServerName)
	s.String(&o.CredsFile, "nats-creds-file", "", "NATS credentials file (JWT and nkey seed)")
	s.String(&o.NKeySeedFile, "nats-nkey-file", "", "file holding an nkey seed for NATS")
	s.String(&o.User, "nats-user", "", "NATS user name (with --nats-password)")
	s.Secret(&o.Password, "nats-password", "NATS password")
	s.Secret(&o.Token, "nats-token", "NATS authentication token")
	s.String(&o.InboxPrefix, "nats-inbox-prefix", "", "prefix of this client's reply subjects (default _INBOX); with deploy/nats's permissions, _INBOX_<user>")
}

// registerEmbedded registers the embedded NATS server's flags.
func registerEmbedded(s *config.Set, o *natsserver.Options) {
	s.String(&o.Listen, "nats-listen", "127.0.0.1:4222", "client address of the embedded NATS server (used when --nats-url is empty)")
	s.String(&o.DataDir, "data-dir", "/var/lib/keystone-fanout", "directory of the embedded NATS server's JetStream storage")
}

// registerStream registers the stream's name and subject prefix flags.
func registerStream(s *config.Set, c *stream.Config) {
	d := stream.Default()
	s.String(&c.Name, "stream", d.Name, "JetStream stream carrying the events")
	s.String(&c.SubjectPrefix, "subject-prefix", d.SubjectPrefix, "first token of the stream's subjects (<prefix>.>)")
}

// bridgeFlags maps `keystone-fanout bridge` flags onto its options.
type bridgeFlags struct {
	common
	amqpURLFile    string
	nats           natsconn.Options
	embedded       natsserver.Options
	b              bridge.Options
	revoke         revoke.Options
	revokeInterval time.Duration
	confirm        confirm.Options
}

func (f *bridgeFlags) register(s *config.Set) {
	f.common.register(s, "127.0.0.1:9090")
	o := &f.b
	s.List(&o.AMQPURLs, "amqp-url", []string{"amqp://guest:guest@127.0.0.1:5672/"},
		"RabbitMQ broker: amqp://, amqps://, or keystone.conf's transport_url rabbit://user:pass@host1:5672,user:pass@host2:5672/vhost")
	s.String(&f.amqpURLFile, "amqp-url-file", "", "file holding --amqp-url (one per line), so that its password is not on the command line")
	s.Secret(&o.AMQPPassword, "amqp-password", "replaces the password of every --amqp-url")
	s.String(&o.Exchange, "exchange", bridge.DefaultExchange, "Keystone's notification exchange ([DEFAULT] control_exchange)")
	s.List(&o.RoutingKeys, "routing-key", []string{bridge.DefaultRoutingKey}, "routing keys binding the queue to the exchange (<topic>.<priority>)")
	s.String(&o.Queue, "queue", bridge.DefaultQueue, "the bridge's own durable queue; bridge replicas share it")
	s.String(&o.QueueType, "queue-type", bridge.DefaultQueueType, "queue type when the bridge creates it: quorum or classic")
	s.Duration(&o.QueueMessageTTL, "queue-message-ttl", bridge.DefaultQueueMessageTTL, "x-message-ttl of the queue when the bridge creates it: longer than the services' token_cache_time, after which a waiting notification can no longer matter")
	s.String(&o.DeadLetterExchange, "dead-letter-exchange", "", "exchange that rejected bodies are dead-lettered to (default: acknowledged and counted)")
	registerTLS(s, "amqp", "RabbitMQ brokers (amqps://)", &o.TLS.CAFile, &o.TLS.CertFile, &o.TLS.KeyFile, &o.TLS.ServerName)
	s.Duration(&o.Heartbeat, "amqp-heartbeat", bridge.DefaultHeartbeat, "AMQP heartbeat interval")
	s.Duration(&o.ConnectTimeout, "amqp-connect-timeout", bridge.DefaultConnectTimeout, "bound on connecting to one broker and setting up the queue")
	s.Duration(&o.ReconnectMin, "amqp-reconnect-min", bridge.DefaultReconnectMin, "first wait before reconnecting to RabbitMQ; doubles up to --amqp-reconnect-max")
	s.Duration(&o.ReconnectMax, "amqp-reconnect-max", bridge.DefaultReconnectMax, "longest wait between reconnection rounds (the bridge never gives up)")
	s.Int(&o.DecodeWorkers, "decode-workers", 0, "ignored (one goroutine decodes, in delivery order); kept so that existing configurations start")
	s.Duration(&o.StreamCheckPeriod, "stream-check-period", bridge.DefaultStreamCheckPeriod, "how often readiness re-checks the stream (and re-creates it if it vanished)")
	s.Int(&o.Prefetch, "prefetch", bridge.DefaultPrefetch, "unacknowledged deliveries RabbitMQ sends ahead")
	s.Int(&o.PublishWindow, "publish-window", bridge.DefaultPublishWindow, "JetStream publishes awaiting their PubAck at once")
	s.Duration(&o.PubAckTimeout, "puback-timeout", bridge.DefaultPubAckTimeout, "how long a publish waits for JetStream's PubAck before the delivery is requeued")
	s.Int(&o.MaxBodySize, "max-body-size", bridge.DefaultMaxBodySize, "largest notification body decoded, in bytes; larger ones are rejected")
	s.List(&o.Filter, "filter", event.DefaultFilter, "event type patterns acknowledged without publishing (token-affecting types are never filtered)")
	d := stream.Default()
	registerStream(s, &o.Stream)
	s.Duration(&o.Stream.MaxAge, "stream-max-age", d.MaxAge, "how long the stream keeps events; an agent away longer sweeps its caches")
	s.Int(&o.Stream.Replicas, "stream-replicas", d.Replicas, "stream replicas (3 on a NATS cluster)")
	s.Duration(&o.Stream.DuplicateWindow, "stream-duplicate-window", d.DuplicateWindow, "how long the stream drops a repeated Nats-Msg-Id")
	registerNATS(s, &f.nats, "", "NATS server URL(s), comma-separated; empty runs an embedded NATS server with JetStream")
	registerEmbedded(s, &f.embedded)

	r := &f.revoke
	s.String(&r.URL, "keystone-url", "", "Keystone v3 endpoint (http://keystone:5000/v3): also poll its revocation events")
	s.String(&r.Username, "keystone-username", "", "Keystone user that lists revocation events")
	s.String(&r.PasswordFile, "keystone-password-file", "", "file holding --keystone-username's password (read at every authentication)")
	s.String(&r.UserDomain, "keystone-user-domain", revoke.DefaultDomain, "domain name of --keystone-username")
	s.String(&r.Project, "keystone-project", "", "project name the poller's token is scoped to")
	s.String(&r.ProjectDomain, "keystone-project-domain", revoke.DefaultDomain, "domain name of --keystone-project")
	s.String(&r.AppCredID, "keystone-app-cred-id", "", "application credential id, instead of a user and password")
	s.String(&r.AppCredSecretFile, "keystone-app-cred-secret-file", "", "file holding the application credential's secret")
	s.String(&r.CAFile, "keystone-ca-file", "", "PEM CA bundle that Keystone's certificate is checked against; re-read when it changes")
	s.Duration(&f.revokeInterval, "revocation-poll-interval", revoke.DefaultPollInterval, "time between two polls of Keystone's revocation events (notifications also make the poller poll at once)")
	s.Duration(&r.LeaseTTL, "revocation-lease-ttl", revoke.DefaultLeaseTTL, "one bridge replica polls at a time: how long its lease lasts without renewal before another takes over")

	c := &f.confirm
	s.List(&c.Regions, "expect-regions", nil, "regions whose receipts confirm each event (keystone_fanout_confirm_* metrics); default: every region with a consumer on the stream")
	s.Duration(&c.Deadline, "confirm-deadline", confirm.DefaultDeadline, "how long after an event each expected region has to confirm it before it counts as unconfirmed")
}

// finish applies what needs more than one flag, after parsing.
func (f *bridgeFlags) finish() error {
	if err := f.oslo.apply(bridgeSide); err != nil {
		return err
	}
	f.b.ShutdownTimeout = min(f.shutdown/2, bridge.DefaultShutdownTimeout)
	if f.amqpURLFile != "" {
		b, err := os.ReadFile(f.amqpURLFile)
		if err != nil {
			return fmt.Errorf("--amqp-url-file: %w", err)
		}
		var urls []string
		for _, line := range strings.Split(string(b), "\n") {
			if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
				urls = append(urls, line)
			}
		}
		if len(urls) == 0 {
			return fmt.Errorf("--amqp-url-file %s holds no URL", f.amqpURLFile)
		}
		f.b.AMQPURLs = urls
	}
	f.revoke.PollInterval = f.revokeInterval
	if f.revoke.URL == "" && (f.revoke.Username != "" || f.revoke.AppCredID != "") {
		return errors.New("--keystone-username or --keystone-app-cred-id without --keystone-url: give the Keystone v3 endpoint to poll")
	}
	return nil
}
