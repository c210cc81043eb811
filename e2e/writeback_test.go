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
// through the middleware, as soon as the first pass emptied every region;
// the second pass (--second-pass-delay, 5s here to leave the slow python
// writer a wide margin) must remove them before the events are acknowledged.
func TestStaleWriteBackAfterFirstPass(t *testing.T) {
	e := newEnv(t, envOptions{agentArgs: []string{"--second-pass-delay", "5s"}})
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
	e.writeEntries(allEntries(victims))
	rewritten := time.Now()
	if ok, seen := e.allAcked(e.regions); ok {
		t.Fatalf("expected the events to be still unacknowledged %s after the first pass (second pass delay 5s); they are all acknowledged: %s",
			rewritten.Sub(firstPass).Round(time.Millisecond), seen)
	}
	if ok, _ := e.noneCached(e.regions, keys); ok {
		t.Fatalf("expected the written-back entries to be cached before the second pass")
	}
	v := e.verify(expect{gone: victimTokens(victims), kept: entryTokens(unrelated)})
	var counts []string
	for _, r := range e.regions {
		m, err := r.agent.metrics()
		if err != nil {
			t.Fatal(err)
		}
		counts = append(counts, fmt.Sprintf("%s %v", r.name, m.sum("keystone_fanout_agent_second_pass_removals_total")))
	}
	t.Logf("entries written back %s after the first pass were gone %s after the write-back; second-pass removals by region: %s",
		rewritten.Sub(firstPass).Round(time.Millisecond), v.gone.Sub(rewritten).Round(time.Millisecond), strings.Join(counts, ", "))
}
