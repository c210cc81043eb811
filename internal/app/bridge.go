package app

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/bridge"
	"github.com/keystone-fanout/keystone-fanout/internal/confirm"
	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/revoke"
)

// BridgeOptions configures `keystone-fanout bridge`.
type BridgeOptions struct {
	Bridge bridge.Options
	// NATS is where the stream lives. An empty NATS.URL starts the embedded
	// server described by Embedded and connects to it.
	NATS     natsconn.Options
	Embedded natsserver.Options
	// Revoke, when not nil (--keystone-url given), also runs the revocation
	// event poller.
	Revoke *revoke.Options
	// Confirm configures the collector of the regions' receipts
	// (--expect-regions, --confirm-deadline), which every bridge runs.
	Confirm confirm.Options
	// HTTPAddr (--http-addr, default 127.0.0.1:9090) serves /healthz, /readyz
	// and /metrics; empty serves nothing.
	HTTPAddr string
	// ShutdownTimeout (--shutdown-timeout) bounds the stop after SIGTERM.
	ShutdownTimeout time.Duration

	// Registry collects the metrics; nil makes a new one (tests pass their own).
	Registry *prometheus.Registry
	// OnListen is told the bound HTTP address (tests listen on port 0).
	OnListen func(addr string)
	// OnNATS is told the embedded NATS server's client URL (tests listen on
	// port -1).
	OnNATS func(url string)
}

// Validate fills defaults and checks every option before anything is started.
func (o *BridgeOptions) Validate() error {
	errs := []error{o.Bridge.Validate(), validateNATS(&o.NATS, &o.Embedded), o.Confirm.Validate()}
	if r := o.revokeOptions(); r != nil {
		errs = append(errs, r.Validate())
	}
	return errors.Join(errs...)
}

// revokeOptions is Revoke publishing under the bridge's subject prefix; nil
// without a poller.
func (o *BridgeOptions) revokeOptions() *revoke.Options {
	if o.Revoke == nil {
		return nil
	}
	r := *o.Revoke
	r.SubjectPrefix = o.Bridge.Stream.SubjectPrefix
	r.Stream = o.Bridge.Stream.Name
	if r.BucketReplicas == 0 {
		// The lease and position survive a node as the stream does.
		r.BucketReplicas = max(o.Bridge.Stream.Replicas, 1)
	}
	return &r
}

func validateNATS(n *natsconn.Options, embedded *natsserver.Options) error {
	if n.URL == "" {
		return embedded.Validate()
	}
	return n.Validate()
}

// embeddedNATS is the embedded server as a component, started before the others.
type embeddedNATS struct{ srv *natsserver.Server }

func (e *embeddedNATS) run(ctx context.Context) error {
	<-ctx.Done()
	e.srv.Shutdown()
	return nil
}

// connectNATS starts the embedded server when no URL is given, then connects.
// The returned components are the embedded server (if any) and the connection,
// in start order. A NATS server that does not answer yet does not stop the
// start: the connection keeps trying in the background (natsconn KeepTrying)
// while the process serves /healthz, and its readiness says why it waits.
func connectNATS(ctx context.Context, o natsconn.Options, embedded natsserver.Options, onEmbedded func(string),
	name string, log *slog.Logger) (*nats.Conn, []component, error) {
	var comps []component
	if o.URL == "" {
		srv, err := natsserver.Start(embedded)
		if err != nil {
			return nil, nil, err
		}
		log.Info("embedded NATS server with JetStream started", "url", srv.ClientURL(), "data_dir", embedded.DataDir)
		e := &embeddedNATS{srv: srv}
		comps = append(comps, component{name: "embedded NATS server", run: e.run})
		o.URL = srv.ClientURL()
		if onEmbedded != nil {
			onEmbedded(o.URL)
		}
	}
	o.KeepTrying = true
	nc, err := natsconn.Connect(ctx, o, name, log, nil)
	if err != nil {
		stopAll(comps)
		return nil, nil, err
	}
	comps = append(comps, component{
		name: "NATS connection",
		run: func(ctx context.Context) error {
			<-ctx.Done()
			// Flush what was published, then close: Drain closes the
			// connection when done; wait for that at most 5 s.
			closed := make(chan struct{})
			nc.SetClosedHandler(func(*nats.Conn) { close(closed) })
			if nc.IsClosed() {
				return nil
			}
			if err := nc.Drain(); err != nil {
				nc.Close()
			}
			select {
			case <-closed:
			case <-time.After(5 * time.Second):
				nc.Close()
			}
			return nil
		},
		ready: func() error { return natsconn.NotConnected(nc, o) },
	})
	return nc, comps, nil
}

// bridgeComponents builds the bridge and, when configured, the revocation
// poller on an open connection.
func bridgeComponents(o *BridgeOptions, nc *nats.Conn, reg prometheus.Registerer, log *slog.Logger) ([]component, error) {
	b, err := bridge.New(o.Bridge, nc, reg, log.With("component", "bridge"))
	if err != nil {
		return nil, err
	}
	comps := []component{{name: "bridge", run: b.Run, ready: b.Ready}}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	co := o.Confirm
	co.Stream = o.Bridge.Stream.Name
	c, err := confirm.New(co, js, reg, log.With("component", "confirmations"))
	if err != nil {
		return nil, err
	}
	comps = append(comps, component{name: "confirmations", run: c.Run})
	if r := o.revokeOptions(); r != nil {
		p, err := revoke.New(*r, js, reg, log.With("component", "revocation-poller"))
		if err != nil {
			return nil, err
		}
		comps = append(comps, component{name: "revocation poller", run: p.Run, ready: p.Ready})
	}
	return comps, nil
}

// RunBridge runs the bridge (and the embedded NATS server and the revocation
// poller when configured) until ctx ends.
func RunBridge(ctx context.Context, o BridgeOptions, log *slog.Logger) error {
	if err := o.Validate(); err != nil {
		return err
	}
	reg := registry(o.Registry)
	nc, comps, err := connectNATS(ctx, o.NATS, o.Embedded, o.OnNATS, "keystone-fanout-bridge", log)
	if err != nil {
		return err
	}
	more, err := bridgeComponents(&o, nc, reg, log)
	if err != nil {
		stopAll(comps)
		return err
	}
	comps = append(comps, more...)
	return runComponents(ctx, log, o.HTTPAddr, reg, o.ShutdownTimeout, o.OnListen, comps...)
}
