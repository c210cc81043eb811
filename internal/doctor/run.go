package doctor

import (
	"context"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/revoke"
	"github.com/keystone-fanout/keystone-fanout/internal/tlsconf"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
)

// DefaultTimeout bounds each network step of a check.
const DefaultTimeout = 5 * time.Second

// DefaultSample is how many token entries are read per memcached server.
const DefaultSample = 50

// BridgeOptions are the bridge's settings, validated as the bridge validates
// them (AMQP URLs normalised, credentials in them).
type BridgeOptions struct {
	AMQPURLs        []string
	AMQPTLS         tlsconf.Files
	Exchange        string
	RoutingKeys     []string
	Queue           string
	QueueMessageTTL time.Duration
	// NATS is where the stream lives; an empty URL means the bridge runs an
	// embedded NATS server storing in DataDir.
	NATS    natsconn.Options
	DataDir string
	// Stream and SubjectPrefix name the stream and its subjects.
	Stream, SubjectPrefix string
	// Keystone is the revocation poller's options, nil without --keystone-url.
	Keystone *revoke.Options
	// Notes are what --oslo-config asks that the bridge does differently.
	Notes []string
	// Timeout bounds each network step (default DefaultTimeout).
	Timeout time.Duration
}

func (o *BridgeOptions) timeout() time.Duration { return orDefault(o.Timeout) }

// AgentOptions are an agent's settings, validated as the agent validates them.
type AgentOptions struct {
	Region          string
	Stream          string
	JetStreamDomain string
	// MirrorFrom is --mirror-from: the stream checked is then the regional
	// mirror, which the agent creates at its first start.
	MirrorFrom string
	// CheckpointBucket is the key-value bucket of the region's position;
	// empty with --no-checkpoint.
	CheckpointBucket string
	NATS             natsconn.Options
	Memcache         memcache.Options
	// Strategy is --strategy.
	Strategy tokencache.Strategy
	// SecurityStrategy is memcache_security_strategy from --oslo-config,
	// empty when not given.
	SecurityStrategy string
	Notes            []string
	// Sample is how many token entries are read per server (default
	// DefaultSample).
	Sample  int
	Timeout time.Duration
}

func (o *AgentOptions) timeout() time.Duration { return orDefault(o.Timeout) }

func (o *AgentOptions) sample() int {
	if o.Sample <= 0 {
		return DefaultSample
	}
	return o.Sample
}

func orDefault(d time.Duration) time.Duration {
	if d <= 0 {
		return DefaultTimeout
	}
	return d
}

// Bridge checks what the bridge needs: RabbitMQ, NATS and, with the
// poller, Keystone.
func Bridge(ctx context.Context, o BridgeOptions) *Report {
	start := time.Now()
	r := &Report{Component: "bridge"}
	notes(o.Notes, r)
	rabbitmq(ctx, &o, r)
	if o.NATS.URL == "" {
		checkEmbedded(o.DataDir, r)
	} else if s := connectNATS(ctx, o.NATS, "", o.timeout(), r); s != nil {
		sent := time.Now()
		si := s.checkStream(ctx, o.Stream, o.SubjectPrefix, false, r)
		clockNATS(si, sent, time.Now(), r)
		ops := s.streamOps(o.Stream, o.SubjectPrefix)
		if o.Keystone != nil {
			ops = append(ops, s.kvOps(ctx, bucketOr(o.Keystone.Bucket, revoke.DefaultBucket), keyOr(o.Keystone.Key, revoke.DefaultKey))...)
		}
		s.tryOps(ctx, ops, "", r)
		s.close()
	}
	if o.Keystone != nil {
		keystone(ctx, o.Keystone, o.timeout(), r)
	}
	r.Took = time.Since(start)
	return r
}

// Agent checks what a region agent needs: NATS (the stream, its consumer,
// its checkpoint) and every memcached server of the region, and what the
// region's entries make each event cost.
func Agent(ctx context.Context, o AgentOptions) *Report {
	start := time.Now()
	r := &Report{Component: "agent " + o.Region}
	notes(o.Notes, r)
	if s := connectNATS(ctx, o.NATS, o.JetStreamDomain, o.timeout(), r); s != nil {
		sent := time.Now()
		if o.MirrorFrom != "" {
			r.add(Finding{Check: "nats.mirror", Level: LevelInfo, Summary: "the stream checked is the regional mirror (--mirror-from " + o.MirrorFrom +
				"): the agent creates it and its source consumer on the central stream at its first start; the central side's permissions for them are checked then (/readyz)"})
		}
		si := s.checkStream(ctx, o.Stream, "", o.MirrorFrom == "", r)
		clockNATS(si, sent, time.Now(), r)
		ops := []op{{name: "look up the stream", subject: s.api + "STREAM.INFO." + o.Stream, try: s.request(s.api+"STREAM.INFO."+o.Stream, nil)}}
		more, untested := s.consumerOps(ctx, o.Stream, o.Region)
		ops = append(ops, more...)
		if o.CheckpointBucket != "" {
			ops = append(ops, s.kvOps(ctx, o.CheckpointBucket, o.Region)...)
		}
		s.tryOps(ctx, ops, untested, r)
		s.close()
	}
	memcached(ctx, &o, r)
	r.Took = time.Since(start)
	return r
}

func notes(ns []string, r *Report) {
	for _, n := range ns {
		r.add(Finding{Check: "oslo-config", Level: LevelInfo, Summary: n})
	}
}

func bucketOr(b, def string) string {
	if b == "" {
		return def
	}
	return b
}

func keyOr(k, def string) string { return bucketOr(k, def) }
