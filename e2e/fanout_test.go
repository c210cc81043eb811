package e2e

import (
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// TestEveryCaptureEveryRegion publishes notifications exactly as Keystone
// 22 sent them and proves that every region ends without an entry they
// concern:
//
//   - first one notification per bounded capture (every token-affecting
//     type, basic and cadf, with the test's own object ids and fresh message
//     ids) mixed with harmless ones (creations, authentications): every
//     entry they concern is gone from every region and no other entry was
//     removed (targeted), although the unrelated tokens belong to the admin
//     named as initiator in every CADF payload and every token's catalog
//     holds Keystone's observer id;
//   - then every capture of fixtures.All(), in Keystone's order, byte for
//     byte but for the timestamps: the role and group deletions among them
//     concern every token, so every token entry goes; non-token keys stay.
func TestEveryCaptureEveryRegion(t *testing.T) {
	e := newEnv(t, envOptions{})
	w := e.work

	victims := w.victims(len(w.bounded), 2)
	unrelated, _ := w.unrelated(24)
	e.writeEntries(append(allEntries(victims), unrelated...))
	msgs, outs := w.mixed(victims)
	start := time.Now()
	e.publishNow(msgs, outs)
	published := time.Now()
	v := e.verify(expect{gone: victimTokens(victims), kept: entryTokens(unrelated)})
	t.Logf("%d notifications (%d token-affecting, %d capture templates) to %d regions: published in %s; "+
		"every concerned entry gone %s after the last publish, every event acknowledged after %s",
		len(msgs), len(victims), len(w.bounded), len(e.regions), published.Sub(start).Round(time.Millisecond),
		v.gone.Sub(published).Round(time.Millisecond), v.acked.Sub(published).Round(time.Millisecond))

	// Phase 2: the captures themselves.
	more, _ := w.unrelated(8)
	subjects := w.victims(8, 1)
	e.writeEntries(append(allEntries(subjects), more...))
	var raw []amqpMessage
	var rawOuts []outcome
	now := time.Now()
	for _, tpl := range loadTemplates(t) {
		body := tpl.renderKeepingIDs(now)
		raw = append(raw, tpl.message(body))
		o := outcome{published: !tpl.filtered, filtered: tpl.filtered, msgID: tpl.messageID}
		rawOuts = append(rawOuts, o)
	}
	e.publishNow(raw, rawOuts)
	e.verify(expect{gone: append(append(entryTokens(unrelated), entryTokens(more)...), victimTokens(subjects)...)})
}

// renderKeepingIDs is the capture as Keystone sent it, with the current time
// in place of the capture's.
func (tpl *template) renderKeepingIDs(now time.Time) []byte {
	s := string(tpl.fx.Body)
	now = now.UTC()
	s = timestampRE.ReplaceAllString(s, "${1}"+now.Format("2006-01-02 15:04:05.000000")+"${2}")
	s = eventTimeRE.ReplaceAllString(s, "${1}"+now.Format("2006-01-02T15:04:05.000000")+"+0000${2}")
	return []byte(s)
}

// TestFanoutLatency publishes token-affecting notifications one at a time
// and measures, for each, the time from handing it to RabbitMQ until its
// last concerned entry is gone from every region. With -e2e.regions=50 it is
// the fan-out benchmark of docs/BENCHMARKS.md.
func TestFanoutLatency(t *testing.T) {
	const n = 30
	e := newEnv(t, envOptions{serversPerRegion: 1})
	w := e.work
	victims := w.victims(n, 1)
	e.writeEntries(allEntries(victims))
	lat := make([]time.Duration, 0, n)
	for _, v := range victims {
		m, o := v.notification(time.Now())
		start := time.Now()
		e.publishNow([]amqpMessage{m}, []outcome{o})
		testutil.EventuallyEvery(t, 2*time.Millisecond, 60*time.Second, "the entries of "+v.tpl.fx.Name+" to be gone from every region", func() (bool, string) {
			return e.noneCached(e.regions, v.keys)
		})
		lat = append(lat, time.Since(start))
	}
	e.verify(expect{gone: victimTokens(victims)})
	t.Logf("publish to RabbitMQ -> last concerned entry gone in all %d regions, %d notifications one at a time: %s",
		len(e.regions), n, summarize(lat))
}

// summarize renders a latency distribution.
func summarize(d []time.Duration) string {
	if len(d) == 0 {
		return "no samples"
	}
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	q := func(p float64) time.Duration { return s[min(len(s)-1, int(p*float64(len(s))))] }
	var parts []string
	for _, x := range []struct {
		name string
		v    time.Duration
	}{{"min", s[0]}, {"p50", q(0.5)}, {"p90", q(0.9)}, {"p99", q(0.99)}, {"max", s[len(s)-1]}} {
		parts = append(parts, fmt.Sprintf("%s %s", x.name, x.v.Round(100*time.Microsecond)))
	}
	return fmt.Sprintf("n=%d %s", len(s), strings.Join(parts, " "))
}
