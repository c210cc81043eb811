package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// TestStaleWriteBackAfterFirstPass: keystonemiddleware asks Keystone first
// and writes the answer to memcached after, so a validation that Keystone
// answered just before a change can write a stale entry back after the
// agents' first pass removed it. The test writes the very same entries again,
// through the middleware, as soon as the first pass emptied every region.
// Each agent's live index reads every store memcached reports and removes at
// once those an event of its recent window concerns: the write-backs must be
// gone before the second pass (--second-pass-delay, 10s here) could run, the
// events still unacknowledged, and the second pass must find nothing left.
func TestStaleWriteBackAfterFirstPass(t *testing.T) {
	e := newEnv(t, envOptions{agentArgs: []string{"--second-pass-delay", "10s", "--late-write-back-window", "20s"}})
	w := e.work
	victims := w.victims(30, 1)
	unrelated, _ := w.unrelated(20)
	e.writeEntries(append(allEntries(victims), unrelated...))
	msgs, outs := w.mixed(victims)
	e.publishNow(msgs, outs)
	keys := allKeys(victims)
	testutil.EventuallyEvery(t, 2*time.Millisecond, 60*time.Second, "the first pass to remove every concerned entry in every region", func() (bool, string) {
		return e.noneCached(e.regions, keys)
	})
	firstPass := time.Now()
	// The middleware reads each entry back after writing it; the agents may
	// have removed it by then, so "could not store" is expected here. That
	// every one was stored shows in the late write-back counts below.
	e.cacheEntriesReport(allEntries(victims))
	rewritten := time.Now()
	testutil.EventuallyEvery(t, 2*time.Millisecond, 60*time.Second, "the written-back entries removed in every region", func() (bool, string) {
		return e.noneCached(e.regions, keys)
	})
	gone := time.Now()
	if ok, seen := e.allAcked(e.regions); ok {
		t.Fatalf("expected the events to be still unacknowledged when the write-backs were gone (%s after the first pass, second pass delay 10s); they are all acknowledged: %s",
			gone.Sub(firstPass).Round(time.Millisecond), seen)
	}
	e.verify(expect{gone: victimTokens(victims), kept: entryTokens(unrelated)})
	var counts []string
	var late, second float64
	for _, r := range e.regions {
		m, err := r.agent.metrics()
		if err != nil {
			t.Fatal(err)
		}
		l, s := m.sum("keystone_fanout_invalidator_late_writebacks_removed_total"), m.sum("keystone_fanout_agent_second_pass_removals_total")
		late, second = late+l, second+s
		counts = append(counts, fmt.Sprintf("%s %v late, %v by the second pass", r.name, l, s))
	}
	if want := float64(len(keys) * len(e.regions)); late != want || second != 0 {
		t.Fatalf("expected the %v written-back entries removed as late write-backs and none left for the second pass; removals: %s",
			want, strings.Join(counts, ", "))
	}
	t.Logf("entries written back %s after the first pass were gone %s after the write-back; removals by region: %s",
		rewritten.Sub(firstPass).Round(time.Millisecond), gone.Sub(rewritten).Round(time.Millisecond), strings.Join(counts, ", "))
}
