package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"

	"github.com/keystone-fanout/keystone-fanout/internal/app"
	"github.com/keystone-fanout/keystone-fanout/internal/config"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/regionagent"
)

const bridgeUsage = `Usage: keystone-fanout bridge [flags]

Runs in regionOne. Consumes Keystone's notifications from its own durable RabbitMQ
queue bound to Keystone's exchange, normalises them and publishes each to a NATS
JetStream stream with Nats-Msg-Id = the oslo message_id, acknowledging RabbitMQ only
after JetStream did. Without --nats-url it runs an embedded NATS server.
With --keystone-url it also polls Keystone's revocation events. With --oslo-config
/etc/keystone/keystone.conf it takes the brokers, their TLS, the exchange and the
topics from Keystone's own configuration.`

func runBridge(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	var f bridgeFlags
	s := config.New("bridge", bridgeUsage, stderr)
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
	o := app.BridgeOptions{Bridge: f.b, NATS: f.nats, Embedded: f.embedded, HTTPAddr: f.httpAddr, ShutdownTimeout: f.shutdown, Confirm: f.confirm}
	if f.revoke.URL != "" {
		r := f.revoke
		o.Revoke = &r
	}
	if err := o.Validate(); err != nil {
		return usageError{f.oslo.explain(err)}
	}
	return app.RunBridge(ctx, o, log)
}

const statusUsage = `Usage: keystone-fanout status [flags]

Prints the stream and every region: its agent's consumer (how many events the region
has still to handle, and how old the oldest is), its checkpoint, and whether it missed
events the stream no longer holds.

The NATS connection is found as the nats command finds it: a --nats-* flag (or its
KEYSTONE_FANOUT_* variable), else NATS_URL and the selected nats CLI context
(NATS_CONTEXT, or ~/.config/nats/context.txt), else the defaults.

With --check it is a monitoring check: a first line "KEYSTONE-FANOUT STATE - ..." with
performance data, and the exit status of a Nagios plugin:
  0 OK        every region has acknowledged every event older than --warn-lag
  1 WARNING   a region lags past --warn-lag, or no agent is attached to its consumer
  2 CRITICAL  a region lags past --max-lag, has a gap, or is not seen (a region of
              --expect-regions without a consumer, or a checkpoint without one); or
              the stream does not exist
  3 UNKNOWN   the check could not be made: bad flags, NATS not answering
Without --check: 0 done, 1 NATS or the stream could not be read, 2 bad flags.`

// statusFlags maps `keystone-fanout status` flags onto its options.
type statusFlags struct {
	o         app.StatusOptions
	check     bool
	c         app.CheckOptions
	logFormat string
}

func (f *statusFlags) register(s *config.Set) {
	registerNATS(s, &f.o.NATS, "nats://127.0.0.1:4222", "NATS server URL(s), comma-separated (default: NATS_URL, then the nats CLI's context)")
	s.String(&f.o.JetStreamDomain, "js-domain", "", "JetStream domain of the stream, when reached through a leaf node (default: the nats CLI context's)")
	s.String(&f.o.Stream, "stream", stream.DefaultName, "JetStream stream carrying the events")
	s.String(&f.o.CheckpointBucket, "checkpoint-bucket", regionagent.DefaultCheckpointBucket, "the agents' --checkpoint-bucket")
	s.Bool(&f.o.JSON, "json", false, "print JSON")
	s.String(&f.logFormat, "log-format", "text", "log format: json or text")
	s.Bool(&f.check, "check", false, "judge the status and exit 0 OK, 1 WARNING, 2 CRITICAL or 3 UNKNOWN (a monitoring check)")
	s.List(&f.c.Regions, "expect-regions", nil, "with --check: regions that must have an agent's consumer; one without is CRITICAL")
	s.Duration(&f.c.WarnLag, "warn-lag", app.DefaultWarnLag, "with --check: WARNING when a region's oldest unacknowledged event is older")
	s.Duration(&f.c.MaxLag, "max-lag", app.DefaultMaxLag, "with --check: CRITICAL when a region's oldest unacknowledged event is older")
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	var f statusFlags
	s := config.New("status", statusUsage, stderr)
	f.register(s)
	err := s.Parse(args, getenv)
	if errors.Is(err, flag.ErrHelp) {
		return err
	}
	if err == nil {
		_, err = natsCLIDefaults(s, getenv)
	}
	if err == nil {
		err = f.o.NATS.Validate()
	}
	if err == nil && f.check {
		err = f.c.Validate()
	}
	var log *slog.Logger
	if err == nil {
		log, err = newLogger(stderr, f.logFormat, "warn")
	}
	if err != nil {
		if f.check || checkRequested(args, getenv) {
			return unknown(stdout, err)
		}
		return parseErr(err)
	}
	if f.check {
		f.o.Check = &f.c
	}
	err = app.RunStatus(ctx, f.o, stdout, log)
	var ce *app.CheckError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ce):
		return exitStatus(ce.State) // the verdict line is printed
	case f.check:
		return unknown(stdout, err)
	}
	return err
}

// unknown prints the verdict of a check that could not be made.
func unknown(stdout io.Writer, err error) error {
	fmt.Fprintf(stdout, "KEYSTONE-FANOUT UNKNOWN - %s\n", strings.ReplaceAll(err.Error(), "\n", "; "))
	return exitStatus(app.CheckUnknown)
}

// checkRequested reports whether --check is among args or in the
// environment, for flags that did not parse.
func checkRequested(args []string, getenv func(string) string) bool {
	for _, a := range args {
		if a == "--" {
			break
		}
		switch strings.TrimLeft(a, "-") {
		case "check", "check=true", "check=1":
			return strings.HasPrefix(a, "-")
		}
	}
	b, _ := strconv.ParseBool(getenv(config.EnvName("check")))
	return b
}

// parseErr keeps --help as flag.ErrHelp and marks the rest as usage errors.
func parseErr(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, flag.ErrHelp) {
		return err
	}
	return usageError{err}
}

const sweepUsage = `Usage: keystone-fanout sweep --reason TEXT [flags]

Publishes one event that makes every region agent remove every token entry of its
region, once. For changes that Keystone announces nowhere, such as an identity
provider deleted or disabled. The NATS connection is found as for status: flags,
KEYSTONE_FANOUT_* variables, NATS_URL and the selected nats CLI context, defaults.`

func runSweep(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	var o app.SweepOptions
	s := config.New("sweep", sweepUsage, stderr)
	registerNATS(s, &o.NATS, "nats://127.0.0.1:4222", "NATS server URL(s), comma-separated (default: NATS_URL, then the nats CLI's context)")
	s.String(&o.JetStreamDomain, "js-domain", "", "JetStream domain of the stream, when reached through a leaf node (default: the nats CLI context's)")
	s.String(&o.SubjectPrefix, "subject-prefix", stream.DefaultSubjectPrefix, "first token of the stream's subjects")
	s.String(&o.Reason, "reason", "", "why every region should drop its cached tokens (logged by every agent)")
	if err := s.Parse(args, getenv); err != nil {
		return parseErr(err)
	}
	if _, err := natsCLIDefaults(s, getenv); err != nil {
		return usageError{err}
	}
	if err := o.NATS.Validate(); err != nil {
		return usageError{err}
	}
	if o.Reason == "" {
		return usageError{errors.New("--reason is required: say why every region should drop its cached tokens")}
	}
	log, err := newLogger(stderr, "text", "warn")
	if err != nil {
		return err
	}
	return app.RunSweep(ctx, o, stdout, log)
}

const traceUsage = `Usage: keystone-fanout trace <message id | user id> [flags]

Shows, region by region, when a change took effect: each region's agent publishes a
receipt after every invalidation, naming the events it removed the cache entries of
and when they were gone. Prints every event whose message id (oslo's message_id, the
stream's Nats-Msg-Id) or user id is the one given, and the regions that have not
confirmed it yet (every region with a consumer on the stream, or --expect-regions).
Exit status: 0 every region confirmed every such event, 1 some region has not (or
no receipt names it), 2 bad flags. The NATS connection is found as for status.`

func runTrace(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	var o app.TraceOptions
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		o.Query, args = args[0], args[1:]
	}
	s := config.New("trace", traceUsage, stderr)
	registerNATS(s, &o.NATS, "nats://127.0.0.1:4222", "NATS server URL(s), comma-separated (default: NATS_URL, then the nats CLI's context)")
	s.String(&o.JetStreamDomain, "js-domain", "", "JetStream domain of the streams, when reached through a leaf node (default: the nats CLI context's)")
	s.String(&o.Stream, "stream", stream.DefaultName, "JetStream stream carrying the events (its consumers name the regions)")
	s.List(&o.Regions, "expect-regions", nil, "regions that must confirm (default: every region with a consumer or a receipt)")
	s.Bool(&o.JSON, "json", false, "print JSON")
	if err := s.Parse(args, getenv); err != nil {
		return parseErr(err)
	}
	if o.Query == "" {
		return usageError{errors.New("give a message id or a user id first: keystone-fanout trace <id> [flags]")}
	}
	if _, err := natsCLIDefaults(s, getenv); err != nil {
		return usageError{err}
	}
	if err := o.NATS.Validate(); err != nil {
		return usageError{err}
	}
	log, err := newLogger(stderr, "text", "warn")
	if err != nil {
		return err
	}
	err = app.RunTrace(ctx, o, stdout, log)
	if errors.Is(err, app.ErrNotConfirmed) {
		return exitStatus(1) // printed
	}
	return err
}
