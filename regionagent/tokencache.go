package regionagent

import (
	"context"
	"slices"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
)

// TokenCache adapts internal/tokencache's Invalidator to the agent's
// Invalidator. cluster, the Invalidator's server list, answers Ready's
// reachability check (Ping); nil skips the check. The caller also runs
// inv.Run, which keeps its index of every server warm.
func TokenCache(inv *tokencache.Invalidator, cluster *memcache.Cluster) Invalidator {
	return &tokenCache{inv: inv, cluster: cluster}
}

type tokenCache struct {
	inv     *tokencache.Invalidator
	cluster *memcache.Cluster
}

func (t *tokenCache) Invalidate(ctx context.Context, events []event.Event) (Result, error) {
	res, err := t.inv.Invalidate(ctx, events)
	out := Result{Removed: res.Removed, Kept: res.Kept}
	switch res.Strategy {
	case tokencache.Sweep:
		out.Swept = err == nil
	case tokencache.Flush:
		out.Flushed = slices.ContainsFunc(res.Servers, func(s tokencache.ServerResult) bool { return s.Flushed })
	default:
		out.Swept = err == nil && slices.ContainsFunc(events, func(e event.Event) bool { return e.Unbounded() })
	}
	return out, err
}

func (t *tokenCache) Ping(ctx context.Context) error {
	if t.cluster == nil {
		return nil
	}
	return t.cluster.Ping(ctx)
}
