package app

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime/debug"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/regionagent"
)

// AgentOptions configures `keystone-fanout agent`.
type AgentOptions struct {
	Agent regionagent.Options
	// Memcache is the region's memcached servers (--memcached), the same list
	// as the services' [keystone_authtoken] memcached_servers.
	Memcache memcache.Options
	// Invalidation chooses the strategy (--strategy) and its tuning.
	Invalidation tokencache.Options
	NATS         natsconn.Options
	// HTTPAddr (--http-addr, default 127.0.0.1:9091) serves /healthz, /readyz
	// and /metrics; empty serves nothing.
	HTTPAddr        string
	ShutdownTimeout time.Duration

	Registry *prometheus.Registry
	OnListen func(addr string)
}

// Validate checks every option before anything is started.
func (o *AgentOptions) Validate() error {
	return errors.Join(o.validateRegion(), o.NATS.Validate())
}

// validateRegion checks the options of the agent itself, the memcached
// servers and the strategy: all but NATS, which all-in-one shares with the
// bridge.
func (o *AgentOptions) validateRegion() error {
	var errs []error
	if err := o.Agent.Validate(); err != nil {
		errs = append(errs, err)
	}
	if o.Memcache.Servers == "" {
		errs = append(errs, errors.New("--memcached is required: give the region's [keystone_authtoken] memcached_servers, for example 10.0.0.5:11211,10.0.0.6:11211"))
	} else if err := o.Memcache.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("--memcached: %w", err))
	}
	if err := o.Invalidation.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("--strategy: %w", err))
	}
	return errors.Join(errs...)
}

// agentGCPercent is the garbage collector's target (GOGC) of a process that
// runs an agent, unless the GOGC environment variable sets one. Most of the
// agent's heap is the token cache's index: large, long-lived and free of
// pointers, so the collector has almost nothing to scan in it and collecting
// at 25% growth instead of Go's default 100% costs little CPU, while the
// resident size stays near the index instead of twice it.
const agentGCPercent = 25

// agentComponents builds the region agent on an open NATS connection: the
// invalidator (which keeps its live index of each memcached server) and the
// consumer that feeds it.
func agentComponents(o *AgentOptions, nc *nats.Conn, reg prometheus.Registerer, log *slog.Logger) ([]component, func(), error) {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(agentGCPercent)
	}
	mo := o.Memcache
	if mo.Log == nil {
		mo.Log = log.With("component", "memcached", "region", o.Agent.Region)
	}
	cluster, err := memcache.New(mo)
	if err != nil {
		return nil, nil, fmt.Errorf("--memcached: %w", err)
	}
	// The second pass must come after the live index's heartbeat confirmed
	// the first pass's answer (see regionagent Options.SecondPassDelay).
	io := o.Invalidation
	if lag := cmp.Or(io.MaxConfirmLag, tokencache.DefaultMaxConfirmLag); o.Agent.SecondPassDelay > 0 && lag >= o.Agent.SecondPassDelay {
		io.MaxConfirmLag = o.Agent.SecondPassDelay / 2
		// Three heartbeat markers confirm the index: they must fit.
		if hb := cmp.Or(io.HeartbeatInterval, tokencache.DefaultHeartbeatInterval); 4*hb > io.MaxConfirmLag {
			io.HeartbeatInterval = io.MaxConfirmLag / 4
			log.Info("a short --second-pass-delay: the memcached watch heartbeat is faster to confirm the index in time",
				"second_pass_delay", o.Agent.SecondPassDelay.String(), "watch_heartbeat", io.HeartbeatInterval.String())
		}
	}
	inv, err := tokencache.NewInvalidator(cluster, io, reg, log.With("component", "invalidator", "region", o.Agent.Region))
	if err != nil {
		cluster.Close()
		return nil, nil, err
	}
	a, err := regionagent.New(o.Agent, nc, inv, reg, log)
	if err != nil {
		cluster.Close()
		return nil, nil, err
	}
	comps := []component{
		{name: "invalidator", run: inv.Run},
		{name: "region agent", run: a.Run, ready: a.Ready},
	}
	return comps, func() { cluster.Close() }, nil
}

// RunAgent runs one region's agent until ctx ends.
func RunAgent(ctx context.Context, o AgentOptions, log *slog.Logger) error {
	if err := o.Validate(); err != nil {
		return err
	}
	reg := registry(o.Registry)
	nc, comps, err := connectNATS(ctx, o.NATS, natsserver.Options{}, nil, "keystone-fanout-agent-"+o.Agent.Region, log)
	if err != nil {
		return err
	}
	more, closeCluster, err := agentComponents(&o, nc, reg, log)
	if err != nil {
		stopAll(comps)
		return err
	}
	defer closeCluster()
	comps = append(comps, more...)
	return runComponents(ctx, log, o.HTTPAddr, reg, o.ShutdownTimeout, o.OnListen, comps...)
}

// AllInOneOptions runs the embedded NATS server, the bridge and one region
// agent in one process.
type AllInOneOptions struct {
	Bridge BridgeOptions
	Agent  AgentOptions
}

// Validate checks every option before anything is started: the bridge's, and
// the agent's own (the agent shares the bridge's NATS options).
func (o *AllInOneOptions) Validate() error {
	return errors.Join(o.Bridge.Validate(), o.Agent.validateRegion())
}

// RunAllInOne runs the embedded NATS server (unless Bridge.NATS.URL is set),
// the bridge and one agent, sharing one connection, one registry and one HTTP
// server (Bridge.HTTPAddr). On stop the bridge stops first, then the agent,
// then NATS.
func RunAllInOne(ctx context.Context, o AllInOneOptions, log *slog.Logger) error {
	if err := o.Validate(); err != nil {
		return err
	}
	reg := registry(o.Bridge.Registry)
	nc, comps, err := connectNATS(ctx, o.Bridge.NATS, o.Bridge.Embedded, o.Bridge.OnNATS, "keystone-fanout", log)
	if err != nil {
		return err
	}
	agent, closeCluster, err := agentComponents(&o.Agent, nc, reg, log)
	if err != nil {
		stopAll(comps)
		return err
	}
	defer closeCluster()
	bridge, err := bridgeComponents(&o.Bridge, nc, reg, log)
	if err != nil {
		stopAll(comps)
		return err
	}
	comps = append(comps, agent...)
	comps = append(comps, bridge...)
	return runComponents(ctx, log, o.Bridge.HTTPAddr, reg, o.Bridge.ShutdownTimeout, o.Bridge.OnListen, comps...)
}
