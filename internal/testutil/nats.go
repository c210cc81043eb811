package testutil

import (
	"fmt"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
)

// StartNATS starts an embedded NATS server with JetStream on a port the
// server picks (Port -1), with its storage in a temporary directory, and
// stops it when the test ends.
func StartNATS(t testing.TB) *natsserver.Server {
	t.Helper()
	s, err := natsserver.Start(natsserver.Options{Listen: "127.0.0.1:-1", DataDir: t.TempDir(), ServerName: "test"})
	if err != nil {
		t.Fatalf("starting embedded NATS server: %v", err)
	}
	t.Cleanup(s.Shutdown)
	return s
}

// StartNATSCluster starts an n-node NATS cluster with JetStream, every
// client and cluster port picked by the servers themselves, and stops it
// when the test ends. Node i routes to the nodes before it and gossip
// completes the mesh. JetStream in a cluster needs a configured route even
// on the first node, started before any other's address is known: its route
// is a listener the test holds, which refuses to speak NATS. Each configure
// function may change a node's options before it starts (leaf-node port,
// JetStream domain).
func StartNATSCluster(t testing.TB, n int, name string, configure ...func(*natsserver.Options)) []*natsserver.Server {
	t.Helper()
	holder, _ := CountingListener(t) // closed after the servers stopped
	routes := []string{"nats://" + holder}
	var servers []*natsserver.Server
	for i := range n {
		o := natsserver.Options{Listen: "127.0.0.1:-1", DataDir: t.TempDir(),
			ServerName: fmt.Sprintf("%s-n%d", name, i+1), Cluster: "127.0.0.1:-1", ClusterName: name,
			Routes: routes, ReadyTimeout: 30 * time.Second}
		for _, c := range configure {
			c(&o)
		}
		s, err := natsserver.Start(o)
		if err != nil {
			t.Fatalf("starting NATS cluster node %d: %v", i+1, err)
		}
		t.Cleanup(s.Shutdown)
		servers = append(servers, s)
		if i == 0 {
			routes = nil
		}
		routes = append(routes, "nats://"+s.ClusterAddr())
	}
	return servers
}
