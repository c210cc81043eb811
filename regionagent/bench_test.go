package regionagent

import (
	"testing"
	"time"
)

// BenchmarkThroughput measures events per second through an agent (embedded
// NATS, a no-op Invalidator, batches of 256, second pass 100 ms): the agent's
// own overhead, not memcached's.
//
//	go test -run '^$' -bench Throughput -benchtime 20000x ./regionagent/
func BenchmarkThroughput(b *testing.B) {
	env := newEnv(b)
	inv := &fakeInvalidator{}
	o := testOptions()
	o.SecondPassDelay = 100 * time.Millisecond
	ra := startAgent(b, env.nc, o, inv)
	ra.waitBound(b)
	evs := events(0, b.N)
	b.ResetTimer()
	seqs := env.publish(evs...)
	env.waitAcked(seqs[len(seqs)-1], 10*time.Minute)
	b.StopTimer()
	b.ReportMetric(float64(len(inv.snapshot()))/float64(b.N), "calls/event")
}
