package main

import (
	"context"
	"errors"
	"flag"
	"io"

	"github.com/keystone-fanout/keystone-fanout/internal/app"
	"github.com/keystone-fanout/keystone-fanout/internal/config"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

const bridgeUsage = `Usage: keystone-fanout bridge [flags]

Runs in regionOne. Consumes Keystone's notifications from its own durable RabbitMQ
queue bound to Keystone's exchange, normalises them and publishes each to a NATS
JetStream stream with Nats-Msg-Id = the oslo message_id, acknowledging RabbitMQ only
after JetStream did. Without --nats-url it runs an embedded NATS server.
With --keystone-url it also polls Keystone's revocation events.`

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
	o := app.BridgeOptions{Bridge: f.b, NATS: f.nats, Embedded: f.embedded, HTTPAddr: f.httpAddr, ShutdownTimeout: f.shutdown}
	if f.revoke.URL != "" {
		r := f.revoke
		o.Revoke = &r
	}
	if err := o.Validate(); err != nil {
		return usageError{err}
	}
	return app.RunBridge(ctx, o, log)
}

const statusUsage = `Usage: keystone-fanout status [flags]

Prints the stream and every region agent's consumer: how many events each region
has still to handle, and whether one missed events the stream no longer holds.`

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	var o app.StatusOptions
	s := config.New("status", statusUsage, stderr)
	registerNATS(s, &o.NATS, "nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
	s.String(&o.Stream, "stream", stream.DefaultName, "JetStream stream carrying the events")
	s.Bool(&o.JSON, "json", false, "print JSON")
	var logFormat string
	s.String(&logFormat, "log-format", "text", "log format: json or text")
	if err := s.Parse(args, getenv); err != nil {
		return parseErr(err)
	}
	if err := o.NATS.Validate(); err != nil {
		return usageError{err}
	}
	log, err := newLogger(stderr, logFormat, "warn")
	if err != nil {
		return err
	}
	return app.RunStatus(ctx, o, stdout, log)
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
provider deleted or disabled.`

func runSweep(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	var o app.SweepOptions
	s := config.New("sweep", sweepUsage, stderr)
	registerNATS(s, &o.NATS, "nats://127.0.0.1:4222", "NATS server URL(s), comma-separated")
	s.String(&o.SubjectPrefix, "subject-prefix", stream.DefaultSubjectPrefix, "first token of the stream's subjects")
	s.String(&o.Reason, "reason", "", "why every region should drop its cached tokens (logged by every agent)")
	if err := s.Parse(args, getenv); err != nil {
		return parseErr(err)
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
