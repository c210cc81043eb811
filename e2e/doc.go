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
//
// Put them after the package: go test -v ./e2e/ -e2e.regions=50.
//
// The package has no non-test code besides this comment.
package e2e
