// Command keystone-fanout makes OpenStack token revocation take effect in every
// region: `bridge` carries Keystone's notifications from RabbitMQ to NATS
// JetStream, `agent` removes the affected keystonemiddleware cache entries in
// one region, `status` shows where every region is, `trace` when a change took
// effect in each region.
//
// This file only reads flags and signals; internal/app runs the components.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/app"
)

const usage = `keystone-fanout: OpenStack token revocation in every region within milliseconds.

Usage: keystone-fanout <command> [flags]

Commands:
  bridge      regionOne: Keystone notifications from RabbitMQ into a NATS JetStream stream
  agent       one per region: remove revoked tokens' cache entries from the region's memcached
  all-in-one  the embedded NATS server, the bridge and one agent in one process
  status      the stream and every region's position in it
  sweep       make every region remove every token entry once (changes Keystone does not announce)
  trace       when a change (message id or user id) took effect in each region, and where not yet
  doctor      check a bridge's or an agent's deployment before it goes live, with fixes
  version     print the version

Run 'keystone-fanout <command> --help' for a command's flags. Every flag can also be
set in the environment as KEYSTONE_FANOUT_<FLAG> (dashes as underscores).
`

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type command func(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error

var commands = map[string]command{
	"bridge":     runBridge,
	"agent":      runAgent,
	"all-in-one": runAllInOne,
	"status":     runStatus,
	"sweep":      runSweep,
	"trace":      runTrace,
	"doctor":     runDoctor,
}

func main() {
	app.Version = version
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr, os.Getenv))
}

func run(args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stdout, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	if args[0] == "version" || args[0] == "--version" {
		fmt.Fprintln(stdout, "keystone-fanout", version)
		return 0
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "keystone-fanout: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err := cmd(ctx, args[1:], stdout, stderr, getenv)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, new(exitStatus)):
		var code exitStatus
		errors.As(err, &code)
		return int(code) // the command printed what it had to say
	case errors.As(err, new(usageError)):
		fmt.Fprintf(stderr, "keystone-fanout %s: %v\n", args[0], err)
		return 2
	default:
		fmt.Fprintf(stderr, "keystone-fanout %s: %v\n", args[0], err)
		return 1
	}
}

// exitStatus is an error that chooses the exit status itself (status
// --check's monitoring-plugin codes); its command already printed its output.
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// usageError is bad configuration, reported before anything is started.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// newLogger returns the process logger: JSON (default) or text on stderr.
func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, usageError{fmt.Errorf("--log-level %q: want debug, info, warn or error", level)}
	}
	opts := &slog.HandlerOptions{Level: lv, ReplaceAttr: readableDurations}
	switch strings.ToLower(format) {
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return nil, usageError{fmt.Errorf("--log-format %q: want json or text", format)}
}

// readableDurations logs time.Duration values as Go writes them ("5m0s"),
// not as the JSON handler would (integer nanoseconds); lists of durations
// too.
func readableDurations(_ []string, a slog.Attr) slog.Attr {
	switch a.Value.Kind() {
	case slog.KindDuration:
		a.Value = slog.StringValue(a.Value.Duration().String())
	case slog.KindAny:
		if ds, ok := a.Value.Any().([]time.Duration); ok {
			s := make([]string, len(ds))
			for i, d := range ds {
				s[i] = d.String()
			}
			a.Value = slog.AnyValue(s)
		}
	}
	return a
}
