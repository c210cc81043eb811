package e2e

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// The flag-gated WAN tests: many regions (TestWANManyRegions) and the WAN
// measurements of docs/BENCHMARKS.md (TestWANMeasure). Neither runs by
// default.

// wanBigBurst is the burst of TestWANManyRegions: as many notifications as
// the deletion of a large domain sends (its users, projects, groups and
// assignments, each a bounded notification).
const wanBigBurst = 10000

// wanCachedEvery: one victim in this many has its token cached in every
// region (10,000 entries per region would take the middleware's python
// writers many minutes on 2 cores); the others' notifications are handled
// all the same.
const wanCachedEvery = 50

// TestWANManyRegions (-e2e.wan-regions=N, e.g. 100): N regions behind
// simulated WAN links (-e2e.wan-delay, -e2e.wan-jitter, -e2e.wan-loss), one
// central NATS node. A burst of 10,000 token-affecting notifications is
// published as fast as RabbitMQ confirms while a tenth of the regions (at
// least one) are partitioned; the others finish; after wanPartition the
// partitioned regions heal and catch up with the 10,000 events they missed
// (CATCHUP lines: from the heal to the region's consumer acknowledging
// everything with its entries gone); then the usual end checks hold in every
// region. The agents run with --watch-heartbeat -e2e.wan-watch-heartbeat
// (100ms), as in TestWANMeasure.
//
//	flock /tmp/ksf-heavy.lock go test -count=1 -run 'TestWANManyRegions$' -v -timeout 60m ./e2e/ -e2e.wan-regions=100
func TestWANManyRegions(t *testing.T) {
	n := *flagWANRegions
	if n <= 0 {
		t.Skip("runs only with -e2e.wan-regions=N (100 for the big variant)")
	}
	e := newEnv(t, envOptions{regions: n, serversPerRegion: 1, agentArgs: wanScaleAgentArgs(),
		wan: &wanOptions{delay: *flagWANDelay, jitter: *flagWANJitter, loss: *flagWANLoss}})
	w := e.work
	victims := w.victims(wanBigBurst, 1)
	var cached []*victim
	for i, v := range victims {
		if i%wanCachedEvery == 0 {
			cached = append(cached, v)
		}
	}
	unrelated, _ := w.unrelated(unrelatedN)
	start := time.Now()
	e.writeEntries(append(allEntries(cached), unrelated...))
	t.Logf("%d entries cached in each of %d regions in %s", len(cached)+len(unrelated), n, time.Since(start).Round(time.Millisecond))
	msgs := make([]amqpMessage, len(victims))
	outs := make([]outcome, len(victims))
	now := time.Now()
	for i, v := range victims {
		msgs[i], outs[i] = v.notification(now)
	}

	nCut := max(1, n/10)
	cut, others := e.regions[:nCut], e.regions[nCut:]
	fault := time.Now()
	for _, r := range cut {
		r.partition(t, true)
	}
	t.Logf("%d of %d regions partitioned", nCut, n)
	e.publishNow(msgs, outs)
	published := time.Now()
	t.Logf("%d notifications published in %s", len(msgs), published.Sub(fault).Round(time.Millisecond))
	x := expect{gone: victimTokens(cached), kept: entryTokens(unrelated), timeout: 15 * time.Minute}
	if len(others) > 0 {
		// Acknowledged first: the end checks read the whole stream, which
		// waits less behind the regions' own deliveries then.
		testutil.Eventually(t, x.timeout, "the regions not partitioned to acknowledge every event", func() (bool, string) {
			return e.allAcked(others)
		})
		acked := time.Now()
		xo := x
		xo.regions = others
		e.verify(xo)
		t.Logf("the %d regions not partitioned finished the burst: every event acknowledged %s after the last publish",
			len(others), durSince(published, acked))
	}
	if ok, _ := e.noneCached(cut, tokenKeys(x.gone)); ok {
		t.Fatalf("expected the partitioned regions to still hold entries (they cannot have heard of the events); they hold none")
	}
	time.Sleep(time.Until(fault.Add(wanPartition)))
	heal := time.Now()
	for _, r := range cut {
		r.partition(t, false)
	}
	t.Logf("%d regions healed after %s", nCut, heal.Sub(fault).Round(time.Millisecond))
	took, resumed := e.waitCaughtUp(cut, x.gone, 15*time.Minute)
	var all, res []time.Duration
	for _, r := range cut {
		t.Logf("CATCHUP %s: %d missed events, resumed %s and caught up %s after the heal", r.name, len(msgs),
			resumed[r.name].Round(time.Millisecond), took[r.name].Round(time.Millisecond))
		all, res = append(all, took[r.name]), append(res, resumed[r.name])
	}
	t.Logf("CATCHUP %d regions partitioned for %s during a burst of %d events, %d regions in all, links %s ± %s, loss %g: from the heal to resumed %s; to caught up %s",
		nCut, heal.Sub(fault).Round(time.Second), len(msgs), n, *flagWANDelay, *flagWANJitter, *flagWANLoss, summarize(res), summarize(all))
	e.verify(x)
}

// waitCaughtUp waits until each region's consumer has acknowledged every
// event of the stream and no entry of gone is left in it, and returns how
// long each took from the call, and how long until its consumer's ack floor
// first moved (the region reconnected and resumed).
func (e *env) waitCaughtUp(regions []*region, gone []string, timeout time.Duration) (took, resumed map[string]time.Duration) {
	e.t.Helper()
	start := time.Now()
	took, resumed = map[string]time.Duration{}, map[string]time.Duration{}
	floor0 := map[string]uint64{}
	for _, r := range regions {
		floor0[r.name] = e.consumerAckFloor(r.name)
	}
	keys := tokenKeys(gone)
	testutil.EventuallyEvery(e.t, 50*time.Millisecond, timeout, "the healed regions to catch up", func() (bool, string) {
		var waiting []string
		for _, r := range regions {
			if _, ok := took[r.name]; ok {
				continue
			}
			if _, ok := resumed[r.name]; !ok && e.consumerAckFloor(r.name) > floor0[r.name] {
				resumed[r.name] = time.Since(start)
			}
			acked, why := e.allAcked([]*region{r})
			if acked {
				if clean, seen := e.noneCached([]*region{r}, keys); clean {
					took[r.name] = time.Since(start)
					if _, ok := resumed[r.name]; !ok {
						resumed[r.name] = took[r.name]
					}
					continue
				} else {
					why = seen
				}
			}
			waiting = append(waiting, why)
		}
		return len(waiting) == 0, strings.Join(waiting[:min(3, len(waiting))], "; ")
	})
	return took, resumed
}

// consumerAckFloor is the stream sequence of the region's ack floor (0 when
// unknown).
func (e *env) consumerAckFloor(name string) uint64 {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := e.js.Consumer(ctx, streamName, name)
	if err != nil {
		return 0
	}
	return c.CachedInfo().AckFloor.Stream
}

// TestWANMeasure (-e2e.wan-measure=10,100): for each number of regions, a
// deployment behind simulated WAN links (-e2e.wan-delay, -e2e.wan-jitter,
// -e2e.wan-loss; one central NATS node, one memcached per region) measures
//
//   - WAN bytes while idle (heartbeats, pings), per region and second;
//   - latency: token-affecting notifications published one at a time, from
//     handing each to RabbitMQ until the last region removed its entry (the
//     receipt's "gone" time of each region's agent, taken after memcached
//     answered the deletes: no polling error), and the same minus the
//     one-way link delay, which no design can avoid;
//   - WAN bytes per event and region: a burst, counted by the proxies both
//     ways, less the idle rate over the same time.
//
// The agents run with --watch-heartbeat -e2e.wan-watch-heartbeat (100ms: at
// the default 20ms, 100 idle regions saturated 2 cores).
//
// Lines starting with WAN are the numbers of docs/BENCHMARKS.md.
//
//	flock /tmp/ksf-heavy.lock go test -count=1 -run 'TestWANMeasure$' -v -timeout 60m ./e2e/ -e2e.wan-measure=10,100
func TestWANMeasure(t *testing.T) {
	if *flagWANMeasure == "" {
		t.Skip("runs only with -e2e.wan-measure=10,100 (the region counts to measure)")
	}
	for _, f := range strings.Split(*flagWANMeasure, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			t.Fatalf("-e2e.wan-measure: %q is not a number of regions", f)
		}
		t.Run(fmt.Sprintf("regions=%d", n), func(t *testing.T) { measureWAN(t, n) })
	}
}

// wanMeasureSamples is the number of one-at-a-time notifications.
const wanMeasureSamples = 100

func measureWAN(t *testing.T, n int) {
	wo := &wanOptions{delay: *flagWANDelay, jitter: *flagWANJitter, loss: *flagWANLoss}
	e := newEnv(t, envOptions{regions: n, serversPerRegion: 1, wan: wo, agentArgs: wanScaleAgentArgs()})
	link := fmt.Sprintf("%d regions, links %s ± %s one way, loss %g, --watch-heartbeat %s", n, wo.delay, wo.jitter, wo.loss, *flagWANHeartbeat)
	rc := e.receiptCollector()

	// Idle: after a quiet moment, only heartbeats and pings.
	time.Sleep(5 * time.Second)
	idleFor := 20 * time.Second
	u0, d0 := wanBytes(e.regions)
	time.Sleep(idleFor)
	u1, d1 := wanBytes(e.regions)
	idleUp := float64(u1-u0) / idleFor.Seconds() / float64(n)
	idleDown := float64(d1-d0) / idleFor.Seconds() / float64(n)
	t.Logf("WAN idle (%s): %.0f B/s per region to the central side, %.0f B/s from it", link, idleUp, idleDown)

	// Latency, one notification at a time.
	victims := e.work.victims(wanMeasureSamples, 1)
	e.writeEntries(allEntries(victims))
	var lat, added, central, regional []time.Duration
	for _, v := range victims {
		m, o := v.notification(time.Now())
		done := rc.expect(o.msgID, n)
		start := time.Now()
		e.publishNow([]amqpMessage{m}, []outcome{o})
		var last time.Time
		select {
		case last = <-done:
		case <-time.After(2 * time.Minute):
			t.Fatalf("no receipt from every region within 2 minutes for %s (%s)", o.msgID, rc.missing(o.msgID))
		}
		d := last.Sub(start)
		lat = append(lat, d)
		added = append(added, d-wo.delay)
		if st := rc.storedAt(o.msgID); !st.IsZero() {
			central = append(central, st.Sub(start))
			regional = append(regional, last.Sub(st))
		}
	}
	e.verify(expect{gone: victimTokens(victims), timeout: 10 * time.Minute})
	t.Logf("WAN latency (%s): publish to RabbitMQ -> entry gone in every region: %s", link, summarize(lat))
	t.Logf("WAN latency (%s): the same minus the one-way delay: %s", link, summarize(added))
	t.Logf("WAN latency (%s): of which publish -> stored in the stream (regionOne): %s; stored -> gone in the last region: %s",
		link, summarize(central), summarize(regional))

	// Bytes per event: a burst.
	const burstN = 1000
	burst := e.work.victims(burstN, 1)
	msgs := make([]amqpMessage, burstN)
	outs := make([]outcome, burstN)
	now := time.Now()
	for i, v := range burst {
		msgs[i], outs[i] = v.notification(now)
	}
	u0, d0 = wanBytes(e.regions)
	start := time.Now()
	e.publishNow(msgs, outs)
	testutil.Eventually(t, 10*time.Minute, "every region to acknowledge the burst", func() (bool, string) {
		return e.allAcked(e.regions)
	})
	took := time.Since(start)
	// Settle: the last acknowledgements' own traffic.
	time.Sleep(2 * time.Second)
	took += 2 * time.Second
	u1, d1 = wanBytes(e.regions)
	per := func(b int64, idle float64) float64 {
		return (float64(b) - idle*float64(n)*took.Seconds()) / float64(burstN) / float64(n)
	}
	t.Logf("WAN bytes per event per region (%s, burst of %d in %s): %.0f B from the central side, %.0f B to it (idle rate subtracted)",
		link, burstN, took.Round(time.Millisecond), per(d1-d0, idleDown), per(u1-u0, idleUp))
	e.verify(expect{gone: append(victimTokens(victims), victimTokens(burst)...), timeout: 10 * time.Minute})
}

// receiptCollector follows the regions' receipts on the central side.
type receiptCollector struct {
	mu     sync.Mutex
	gone   map[string]map[string]time.Time // event id -> region -> gone
	stored map[string]time.Time            // event id -> when the stream stored it
	waits  map[string]*receiptWait
}

type receiptWait struct {
	regions int
	done    chan time.Time
}

func (e *env) receiptCollector() *receiptCollector {
	e.t.Helper()
	rc := &receiptCollector{gone: map[string]map[string]time.Time{}, stored: map[string]time.Time{}, waits: map[string]*receiptWait{}}
	sub, err := e.nc.Subscribe(stream.ReceiptSubjectPrefix+".>", func(m *nats.Msg) {
		r, err := stream.UnmarshalReceipt(m.Data)
		if err != nil {
			return
		}
		rc.mu.Lock()
		defer rc.mu.Unlock()
		for _, ev := range r.Events {
			g := rc.gone[ev.ID]
			if g == nil {
				g = map[string]time.Time{}
				rc.gone[ev.ID] = g
			}
			if _, ok := g[r.Region]; !ok {
				g[r.Region] = r.Gone
			}
			if !ev.Stored.IsZero() {
				rc.stored[ev.ID] = ev.Stored
			}
			if w := rc.waits[ev.ID]; w != nil && len(g) == w.regions {
				var last time.Time
				for _, t := range g {
					if t.After(last) {
						last = t
					}
				}
				w.done <- last
				delete(rc.waits, ev.ID)
			}
		}
	})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { sub.Unsubscribe() })
	if err := e.nc.Flush(); err != nil {
		e.t.Fatal(err)
	}
	return rc
}

// expect returns a channel that gets the latest "gone" time once regions
// regions sent a receipt for event id.
func (rc *receiptCollector) expect(id string, regions int) <-chan time.Time {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	w := &receiptWait{regions: regions, done: make(chan time.Time, 1)}
	rc.waits[id] = w
	return w.done
}

// storedAt is when the stream stored event id (zero when no receipt said).
func (rc *receiptCollector) storedAt(id string) time.Time {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return rc.stored[id]
}

func (rc *receiptCollector) missing(id string) string {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return fmt.Sprintf("%d receipts", len(rc.gone[id]))
}
