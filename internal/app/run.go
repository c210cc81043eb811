// Package app composes keystone-fanout's components into the processes that the
// command runs: it validates every option before it connects anywhere, starts
// the components in order, serves their health, readiness and metrics, and
// stops them in reverse order within a bound.
package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"runtime/debug"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/keystone-fanout/keystone-fanout/internal/ops"
	"github.com/keystone-fanout/keystone-fanout/internal/tlsconf"
)

// component is one long-running part of a process.
type component struct {
	name  string
	run   func(ctx context.Context) error
	ready func() error // nil: always ready
}

// stopAll stops components that were started but never ran together (a
// later one failed to build), last first: the NATS connection, then the
// embedded server, which frees its port and data directory.
func stopAll(comps []component) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for i := len(comps) - 1; i >= 0; i-- {
		_ = comps[i].run(ctx)
	}
}

// DefaultShutdownTimeout bounds the whole stop of a process.
const DefaultShutdownTimeout = 30 * time.Second

// Version is the program's version, the version label of
// keystone_fanout_build_info. The command sets it (from main.version, given
// at build time with -ldflags "-X main.version=...") before running anything.
var Version = "dev"

// buildInfo is keystone_fanout_build_info: always 1, its labels say what runs.
func buildInfo() prometheus.Collector {
	revision := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				revision = s.Value
			}
		}
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "keystone_fanout_build_info",
		Help:        "Always 1; the labels say which build runs (version, Go version, source revision when the build recorded it).",
		ConstLabels: prometheus.Labels{"version": Version, "goversion": runtime.Version(), "revision": revision},
	})
	g.Set(1)
	return g
}

// registry returns reg, or a new registry when it is nil, with the Go runtime
// and process collectors, keystone_fanout_build_info and
// keystone_fanout_tls_reload_errors_total added (once).
func registry(reg *prometheus.Registry) *prometheus.Registry {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	for _, c := range []prometheus.Collector{collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), buildInfo(), tlsconf.ReloadErrors} {
		if err := reg.Register(c); err != nil && !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
			panic(err) // constant collectors: cannot fail
		}
	}
	return reg
}

// runComponents serves /healthz, /readyz and /metrics on httpAddr (unless it is
// empty) and runs comps until ctx ends or one of them fails. Then it stops them
// one at a time, last started first, so that the bridge stops taking
// deliveries before the NATS server it publishes to goes away. The whole stop
// is bounded by shutdown; a component still running then is abandoned and
// reported.
//
// onListen, when not nil, is told the bound HTTP address (tests use port 0).
func runComponents(ctx context.Context, log *slog.Logger, httpAddr string, g prometheus.Gatherer,
	shutdown time.Duration, onListen func(string), comps ...component) error {
	if shutdown <= 0 {
		shutdown = DefaultShutdownTimeout
	}
	ready := func() error {
		var errs []error
		for _, c := range comps {
			if c.ready == nil {
				continue
			}
			if err := c.ready(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", c.name, err))
			}
		}
		return errors.Join(errs...)
	}
	if httpAddr != "" {
		srv, err := ops.Listen(httpAddr, g, ready, log)
		if err != nil {
			return err
		}
		if onListen != nil {
			onListen(srv.Addr())
		}
		// First in the list: the endpoints are the last thing to stop.
		comps = append([]component{{name: "http", run: srv.Run}}, comps...)
	}

	type running struct {
		cancel context.CancelFunc
		done   chan error
	}
	failed := make(chan struct{}, len(comps))
	var started []running
	for _, c := range comps {
		cctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		r := running{cancel: cancel, done: make(chan error, 1)}
		go func(c component) {
			err := c.run(cctx)
			if err != nil && cctx.Err() == nil {
				err = fmt.Errorf("%s: %w", c.name, err)
				log.Error("component failed; stopping the process", "component", c.name, "err", err)
				failed <- struct{}{}
			} else if err == nil && cctx.Err() == nil {
				err = fmt.Errorf("%s stopped unexpectedly", c.name)
				failed <- struct{}{}
			}
			r.done <- err
		}(c)
		started = append(started, r)
	}

	select {
	case <-ctx.Done():
		log.Info("stopping", "reason", context.Cause(ctx))
	case <-failed:
	}

	deadline := time.NewTimer(shutdown)
	defer deadline.Stop()
	var errs []error
	for i := len(started) - 1; i >= 0; i-- {
		started[i].cancel()
		select {
		case err := <-started[i].done:
			if err != nil && !errors.Is(err, context.Canceled) {
				errs = append(errs, err)
			}
		case <-deadline.C:
			errs = append(errs, fmt.Errorf("shutdown took longer than %s; %s and the components started before it were abandoned", shutdown, comps[i].name))
			for j := i - 1; j >= 0; j-- {
				started[j].cancel()
			}
			return errors.Join(errs...)
		}
	}
	return errors.Join(errs...)
}
