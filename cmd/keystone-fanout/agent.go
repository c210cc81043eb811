package main

import (
	"context"
	"io"

	"github.com/keystone-fanout/keystone-fanout/internal/app"
	"github.com/keystone-fanout/keystone-fanout/internal/config"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/regionagent"
)

const agentUsage = `Usage: keystone-fanout agent --region NAME --memcached HOST:PORT[,HOST:PORT...] [flags]

Runs in a region whose services cache token validations in memcached. Consumes the
stream through a durable consumer named after the region, removes the cache entries
each event concerns from every memcached server of the region, and acknowledges an
event only after that. After a restart it replays what it missed; when the stream no
longer holds events the region missed, it removes every token entry. With --oslo-config
/etc/nova/nova.conf it takes the memcached servers, their TLS and token_cache_time from
a service's [keystone_authtoken].`

// agentFlags maps `keystone-fanout agent` flags onto its options.
type agentFlags struct {
	common
	o        app.AgentOptions
	strategy string
}

// registerAgent registers the agent's own flags; withNATS adds the NATS client
// flags (all-in-one shares the bridge's).
func (f *agentFlags) registerAgent(s *config.Set) {
	a := &f.o.Agent
	s.String(&a.Region, "region", "", "this region's name, also its durable consumer's name (required)")
	s.Seconds(&a.TokenCacheTime, "token-cache-time", regionagent.DefaultTokenCacheTime, "the services' [keystone_authtoken] token_cache_time")
	s.String(&f.o.Memcache.Servers, "memcached", "", "the region's memcached servers, as [keystone_authtoken] memcached_servers (required)")
	s.String(&f.strategy, "strategy", string(tokencache.Targeted), "targeted (remove what an event concerns), sweep (every token entry) or flush (flush_all: only for a memcached that keystonemiddleware alone uses)")
	s.Bool(&f.o.Memcache.TLS.Enabled, "memcached-tls", false, "connect to memcached with TLS")
	t := &f.o.Memcache.TLS
	registerTLS(s, "memcached", "memcached servers", &t.CAFile, &t.CertFile, &t.KeyFile, &t.ServerName)
	s.Seconds(&a.SecondPassDelay, "second-pass-delay", regionagent.DefaultSecondPassDelay, "the same invalidation again after this delay, for validations in flight during the first (0: the default; it cannot be turned off)")
	s.Seconds(&f.o.Invalidation.TokenLifetime, "token-lifetime", tokencache.DefaultTokenLifetime, "Keystone's [token] expiration: how long a revocation event removes validations of the tokens it revokes written back after it")
	s.Seconds(&f.o.Invalidation.LateWriteBackWindow, "late-write-back-window", tokencache.DefaultLateWriteBackWindow, "how long a notification removes validations of older tokens it concerns written back after it")
	s.Duration(&f.o.Invalidation.HeartbeatInterval, "watch-heartbeat", tokencache.DefaultHeartbeatInterval, "how often the agent stores a marker on each memcached server to prove its watch current (one small set each); the index answers only while the last three are confirmed within 500ms, so at most 125ms")
	s.Seconds(&a.ReplayMargin, "replay-margin", regionagent.DefaultReplayMargin, "added to --token-cache-time when replaying a new consumer's history")
	s.Int(&a.BatchSize, "batch-size", regionagent.DefaultBatchSize, "most events handled by one invalidation")
	s.Duration(&a.BatchLinger, "batch-linger", regionagent.DefaultBatchLinger, "how long an idle agent's first event waits for others to share its invalidation (0: no wait)")
	s.Int(&a.MaxAckPending, "max-ack-pending", regionagent.DefaultMaxAckPending, "most events delivered and not yet acknowledged")
	s.Durations(&a.RedeliveryBackoff, "redelivery-backoff", regionagent.DefaultRedeliveryBackoff, "JetStream redelivery delays of an event whose agent went silent")
	s.Duration(&a.RetryMin, "retry-min", regionagent.DefaultRetryMin, "first wait before retrying a failed invalidation; doubles up to --retry-max")
	s.Duration(&a.RetryMax, "retry-max", regionagent.DefaultRetryMax, "longest wait between retries of a failed invalidation (never given up)")
	s.Duration(&a.InvalidateTimeout, "invalidate-timeout", regionagent.DefaultInvalidateTimeout, "bound on one invalidation; running out counts as a failure and is retried")
	s.Duration(&a.AuditInterval, "audit-interval", regionagent.DefaultAuditInterval, "how often the consumer's and stream's state are checked (lag, deleted consumer, purged events)")
	s.Duration(&a.Heartbeat, "consumer-heartbeat", regionagent.DefaultHeartbeat, "idle heartbeat of the agent's pull requests")
	s.String(&a.CheckpointBucket, "checkpoint-bucket", regionagent.DefaultCheckpointBucket, "JetStream key-value bucket recording each region's position, to detect purged events")
	s.Bool(&a.NoCheckpoint, "no-checkpoint", false, "do not record the region's position (events purged while the agent is stopped go unnoticed)")
	s.String(&a.JetStreamDomain, "js-domain", "", "JetStream domain of the stream, when reached through a leaf node")
	s.String(&a.MirrorFrom, "mirror-from", "", "JetStream domain of the central stream: keep a mirror of it in the region's domain (--js-domain) and consume the mirror")
	s.Duration(&a.ResolveWait, "resolve-wait", regionagent.DefaultResolveWait, "how long a CADF group membership notification waits for the revocation poller's events before it removes every token entry (0: the default)")
	s.String(&a.PollerBucket, "poller-bucket", regionagent.DefaultPollerBucket, "key-value bucket of the revocation poller's lease (the bridge's --keystone-url poller)")
}

// register registers every flag of `keystone-fanout agent`.
func (f *agentFlags) register(s *config.Set) {
	f.common.register(s, "127.0.0.1:9091")
	f.registerAgent(s)
	s.String(&f.o.Agent.Stream, "stream", regionagent.DefaultStream, "JetStream stream carrying the events")
	registerNATS(s, &f.o.NATS, "nats://127.0.0.1:4222", "NATS server URL(s) of the stream, comma-separated")
}

// finish applies what needs more than one flag, after parsing.
func (f *agentFlags) finish() error {
	if err := f.oslo.apply(agentSide); err != nil {
		return err
	}
	st, err := tokencache.ParseStrategy(f.strategy)
	if err != nil {
		return err
	}
	f.o.Invalidation.Strategy = st
	if f.o.Agent.BatchLinger == 0 {
		f.o.Agent.BatchLinger = -1 // --batch-linger 0: no wait (0 in Options is the default)
	}
	f.o.Agent.ShutdownTimeout = min(f.shutdown/2, regionagent.DefaultShutdownTimeout)
	f.o.HTTPAddr, f.o.ShutdownTimeout = f.httpAddr, f.shutdown
	return nil
}

func runAgent(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	var f agentFlags
	s := config.New("agent", agentUsage, stderr)
	f.register(s)
	if err := s.Parse(args, getenv); err != nil {
		return parseErr(err)
	}
	if err := f.finish(); err != nil {
		return usageError{err}
	}
	log, err := f.logger(stderr)
	if err != nil {
		return err
	}
	if err := f.o.Validate(); err != nil {
		return usageError{f.oslo.explain(err)}
	}
	return app.RunAgent(ctx, f.o, log)
}

const allInOneUsage = `Usage: keystone-fanout all-in-one --memcached HOST:PORT [flags]

Runs the embedded NATS server (unless --nats-url is given), the bridge and one region
agent in one process: for one machine, a demo, or a single-region cloud. Takes the
bridge's flags and the agent's; --region defaults to regionOne.`

func runAllInOne(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	var bf bridgeFlags
	var af agentFlags
	s := config.New("all-in-one", allInOneUsage, stderr)
	bf.register(s)
	af.registerAgent(s)
	if err := s.Parse(args, getenv); err != nil {
		return parseErr(err)
	}
	if af.o.Agent.Region == "" {
		af.o.Agent.Region = "regionOne"
	}
	af.common = bf.common
	if err := bf.finish(); err != nil {
		return usageError{err}
	}
	if err := af.finish(); err != nil {
		return usageError{err}
	}
	log, err := bf.logger(stderr)
	if err != nil {
		return err
	}
	af.o.Agent.Stream = bf.b.Stream.Name
	o := app.AllInOneOptions{
		Bridge: app.BridgeOptions{Bridge: bf.b, NATS: bf.nats, Embedded: bf.embedded, HTTPAddr: bf.httpAddr, ShutdownTimeout: bf.shutdown, Confirm: bf.confirm},
		Agent:  af.o,
	}
	if bf.revoke.URL != "" {
		r := bf.revoke
		o.Bridge.Revoke = &r
	}
	if err := o.Validate(); err != nil {
		return usageError{bf.oslo.explain(err)}
	}
	return app.RunAllInOne(ctx, o, log)
}
