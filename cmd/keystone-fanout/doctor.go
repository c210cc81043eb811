package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/app"
	"github.com/keystone-fanout/keystone-fanout/internal/config"
	"github.com/keystone-fanout/keystone-fanout/internal/doctor"
	"github.com/keystone-fanout/keystone-fanout/internal/tlsconf"
)

const doctorUsage = `Usage: keystone-fanout doctor bridge|agent [the flags of that command] [--json]

Checks a deployment before it goes live, with the flags, variables and --oslo-config
files the bridge or the agent runs with, and explains each finding with its fix. It
changes nothing. Exit status 1 when a finding is blocking (the component would not
work, or would leave stale entries), 0 otherwise; 2 for a mistake in the flags.

  bridge  RabbitMQ: every broker (address, TLS, login, vhost), Keystone's exchange,
          the bridge's queue and whether notifications arrive in it; NATS: JetStream,
          the stream, the permissions the bridge needs; with --keystone-url, Keystone:
          the poller's credentials, the policy on revocation events, clock skew.
  agent   NATS: JetStream, the stream, the permissions on the region's consumer and
          checkpoint; every memcached server: version, TLS, crawl allowed
          (lru_crawler metadump); from a sample of cache entries, what each event
          costs the region (targeted, or every event sweeps with ENCRYPT).`

// doctorFlags are doctor's own flags, added to the component's.
type doctorFlags struct {
	json    bool
	timeout time.Duration
	sample  int
}

func (d *doctorFlags) register(s *config.Set, agent bool) {
	s.Bool(&d.json, "json", false, "print the findings as JSON, for scripts")
	s.Duration(&d.timeout, "timeout", doctor.DefaultTimeout, "bound on each network step of a check")
	if agent {
		s.Int(&d.sample, "sample", doctor.DefaultSample, "token entries read from each memcached server to tell the strategy")
	}
}

// errBlocking is doctor's error when a finding is blocking (exit status 1).
type errBlocking int

func (e errBlocking) Error() string { return fmt.Sprintf("%d blocking finding(s)", int(e)) }

func runDoctor(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, doctorUsage)
		return usageError{errors.New("say which component to check: doctor bridge or doctor agent")}
	}
	var rep *doctor.Report
	var d doctorFlags
	switch args[0] {
	case "-h", "--help", "help":
		fmt.Fprintln(stderr, doctorUsage)
		return flag.ErrHelp
	case "bridge":
		var f bridgeFlags
		s := config.New("doctor bridge", doctorUsage, stderr)
		f.register(s)
		d.register(s, false)
		if err := s.Parse(args[1:], getenv); err != nil {
			return parseErr(err)
		}
		if err := f.finish(); err != nil {
			return usageError{err}
		}
		o := app.BridgeOptions{Bridge: f.b, NATS: f.nats, Embedded: f.embedded, HTTPAddr: f.httpAddr, ShutdownTimeout: f.shutdown, Confirm: f.confirm}
		if f.revoke.URL != "" {
			r := f.revoke
			o.Revoke = &r
		}
		if err := o.Validate(); err != nil {
			return usageError{f.oslo.explain(err)}
		}
		b := o.Bridge
		rep = doctor.Bridge(ctx, doctor.BridgeOptions{
			AMQPURLs: b.AMQPURLs,
			AMQPTLS:  tlsconf.Files{CA: b.TLS.CAFile, Cert: b.TLS.CertFile, Key: b.TLS.KeyFile, ServerName: b.TLS.ServerName},
			Exchange: b.Exchange, RoutingKeys: b.RoutingKeys, Queue: b.Queue, QueueMessageTTL: b.QueueMessageTTL,
			NATS: o.NATS, DataDir: o.Embedded.DataDir, Stream: b.Stream.Name, SubjectPrefix: b.Stream.SubjectPrefix,
			Keystone: o.Revoke, Notes: f.oslo.noteTexts(), Timeout: d.timeout,
		})
	case "agent":
		var f agentFlags
		s := config.New("doctor agent", doctorUsage, stderr)
		f.register(s)
		d.register(s, true)
		if err := s.Parse(args[1:], getenv); err != nil {
			return parseErr(err)
		}
		if err := f.finish(); err != nil {
			return usageError{err}
		}
		if err := f.o.Validate(); err != nil {
			return usageError{f.oslo.explain(err)}
		}
		a := f.o.Agent
		bucket := a.CheckpointBucket
		if a.NoCheckpoint {
			bucket = ""
		}
		rep = doctor.Agent(ctx, doctor.AgentOptions{
			Region: a.Region, Stream: a.Stream, JetStreamDomain: a.JetStreamDomain, MirrorFrom: a.MirrorFrom, CheckpointBucket: bucket,
			NATS: f.o.NATS, Memcache: f.o.Memcache, Strategy: f.o.Invalidation.Strategy,
			SecurityStrategy: f.oslo.strategy, Notes: f.oslo.noteTexts(), Sample: d.sample, Timeout: d.timeout,
		})
	default:
		fmt.Fprintln(stderr, doctorUsage)
		return usageError{fmt.Errorf("unknown component %q: doctor bridge or doctor agent", args[0])}
	}
	var err error
	if d.json {
		err = rep.WriteJSON(stdout)
	} else {
		err = rep.WriteText(stdout)
	}
	if err != nil {
		return err
	}
	if rep.Blocking > 0 {
		return errBlocking(rep.Blocking)
	}
	return nil
}
