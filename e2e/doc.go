// Package e2e holds keystone-fanout's end-to-end tests: the real binary, run as
// separate processes (one bridge in regionOne, one agent per other region),
// against the real RabbitMQ, NATS JetStream servers started by the test,
// memcached processes per region and cache entries written by
// keystonemiddleware's own code. They prove what operators are promised: after
// any token-affecting change no region keeps a stale cache entry, whatever
// fails along the way (docs/BENCHMARKS.md, "End to end", has the numbers).
//
// Flags (after -args, or directly with go test):
//
//	-e2e.regions=N       agent regions (default 3: regionTwo..regionFour)
//	-e2e.soak            run the soak test (TestSoak, 10 minutes by default)
//	-e2e.soak-duration   how long the soak publishes (default 10m)
//	-e2e.soak-regions    regions of the soak (default 10)
//	-e2e.soak-rate       token-affecting notifications per second (default 5)
//	-e2e.keep-logs       keep the processes' log files even when tests pass
//	-e2e.wan-regions=N   run TestWANManyRegions with N regions behind WAN links
//	-e2e.wan-measure=L   run TestWANMeasure at these region counts (10,100)
//	-e2e.wan-delay       one-way delay of those links (default 50ms)
//	-e2e.wan-jitter      its jitter (default 10ms)
//	-e2e.wan-loss        share of packets each link drops (default 0.001)
//	-e2e.wan-watch-heartbeat  the agents' --watch-heartbeat there (default 100ms)
//
// Put them after the package: go test -v ./e2e/ -e2e.regions=50.
//
// # Regions behind WAN links
//
// TestWANRegions (in the default run) and the flag-gated WAN tests put each
// region in its own network namespace, with its own NATS leaf node, behind a
// link that delays, loses and can partition (wan_test.go says how). They
// need root, iproute2 and iptables (deploy/dev/install.sh --tests). Loss and
// partitions are iptables rules in the region's namespace (statistic DROP,
// DROP), real packet drops.
//
// Why the delay is a userspace proxy: the kernels these tests run on may
// lack netem (CONFIG_NET_SCH_NETEM), the only qdisc that delays packets;
// iptables can drop but not delay. The proxy delays the byte stream of each
// TCP connection instead of its packets. What that means: the delay applies
// to data, not to TCP's own segments, so the handshake, ACKs and
// retransmissions between the leaf and the proxy run at veth speed (a lost
// segment is resent after fast retransmit or, when it was the last one in
// flight, the kernel's minimum retransmission timeout of 200 ms, where a real
// link would add at least one round trip), congestion control never sees the
// long round trip, and bandwidth is not limited. Jitter never reorders
// a connection's bytes: a chunk is delivered at max(previous delivery,
// arrival + delay + jitter), so jitter bunches chunks the way a real link's
// queue does. For what keystone-fanout sends (small messages, long-lived
// connections) the latency it adds is the one a real link of that delay adds.
//
// The package has no non-test code besides this comment.
package e2e
