package e2e

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// soakEvent is one token-affecting notification of the soak and when its
// last concerned entry was seen gone from every region.
type soakEvent struct {
	v          *victim
	sent, gone time.Time
}

// faultWindow is a fault the soak injected.
type faultWindow struct {
	kind, name string
	start, end time.Time
}

// TestSoak publishes mixed notifications at a steady rate across
// -e2e.soak-regions regions for -e2e.soak-duration while injecting faults at
// random (bridge or agent SIGKILL, RabbitMQ connection drop, NATS restart,
// memcached restart, a region cut off from NATS). It reports stale entries
// (must be 0), events lost (must be 0) and the distribution of the latency
// from handing a notification to RabbitMQ to its last concerned entry gone
// from every region. Not in the default run: go test ./e2e -run TestSoak
// -e2e.soak -timeout 30m -v.
func TestSoak(t *testing.T) {
	if !*flagSoak {
		t.Skip("the soak runs only with -e2e.soak (it takes -e2e.soak-duration, 10 minutes by default)")
	}
	seed := uint64(time.Now().UnixNano())
	rng := rand.New(rand.NewPCG(seed, seed>>7))
	t.Logf("soak: %d regions, %.1f token-affecting notifications/s for %s, fault seed %d",
		*flagSoakRegions, *flagSoakRate, *flagSoakDuration, seed)
	e := newEnv(t, envOptions{regions: *flagSoakRegions})

	var mu sync.Mutex
	var events []*soakEvent
	outstanding := map[*soakEvent]bool{}
	var faults []faultWindow
	counts := map[string]int{}

	// Producer: each second, the next second's victims are cached in every
	// region, then their notifications go out one by one at the rate.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	trackCtx, stopTracking := context.WithCancel(context.Background())
	defer stopTracking()
	prodErr := make(chan error, 1)
	go func() {
		prodErr <- func() error {
			perSecond := max(1, int(*flagSoakRate+0.5))
			interval := time.Duration(float64(time.Second) / *flagSoakRate)
			next := time.Now()
			i := 0
			for ctx.Err() == nil {
				batch := e.work.victims(perSecond, 1)
				if msg := e.cacheEntries(allEntries(batch)); msg != "" {
					// A memcached server went down during the write (a
					// fault): the middleware did not cache the entry.
					mu.Lock()
					counts["write failures (memcached down)"]++
					mu.Unlock()
				}
				for _, v := range batch {
					if d := time.Until(next); d > 0 {
						select {
						case <-ctx.Done():
							return nil
						case <-time.After(d): // pacing the load, not synchronisation
						}
					}
					next = next.Add(interval)
					m, o := v.notification(time.Now())
					msgs, outs := []amqpMessage{m}, []outcome{o}
					i++
					kind := "token-affecting"
					if i%4 == 0 {
						hm, ho := e.work.harmless(time.Now())
						msgs, outs = append(msgs, hm), append(outs, ho)
					}
					if i%50 == 0 {
						msgs = append(msgs, keystoneMessage(v.tpl.fx.Meta, []byte("{\"oslo.version\": \"2.0\", \"oslo.message\": 42}")))
						outs = append(outs, outcome{reject: "bad_envelope"})
					}
					ev := &soakEvent{v: v, sent: time.Now()}
					if err := e.publish(context.Background(), msgs, outs, 0, nil); err != nil {
						return err
					}
					mu.Lock()
					events = append(events, ev)
					outstanding[ev] = true
					counts[kind]++
					counts["total published"] += len(msgs)
					mu.Unlock()
				}
			}
			return nil
		}()
	}()

	// Tracker: marks each event gone once no region holds its entries. A
	// memcached server that does not answer serves nothing to the
	// middleware either, so it counts as holding nothing.
	trackDone := make(chan struct{})
	go func() {
		defer close(trackDone)
		for {
			select {
			case <-trackCtx.Done():
				return
			case <-time.After(20 * time.Millisecond): // polling interval
			}
			mu.Lock()
			var evs []*soakEvent
			var keys []string
			for ev := range outstanding {
				evs = append(evs, ev)
				keys = append(keys, ev.v.keys...)
			}
			mu.Unlock()
			if len(evs) == 0 {
				continue
			}
			present := map[string]bool{}
			for _, r := range e.regions {
				for _, s := range r.servers {
					found, err := mcPresent(s.Addr, keys)
					if err != nil {
						continue
					}
					for k := range found {
						present[k] = true
					}
				}
			}
			now := time.Now()
			mu.Lock()
			for _, ev := range evs {
				gone := true
				for _, k := range ev.v.keys {
					if present[k] {
						gone = false
					}
				}
				if gone {
					ev.gone = now
					delete(outstanding, ev)
				}
			}
			mu.Unlock()
		}
	}()

	// Faults, on the test goroutine.
	deadline := time.Now().Add(*flagSoakDuration)
	faultKinds := []string{"bridge SIGKILL", "agent SIGKILL", "RabbitMQ connection drop", "NATS restart", "memcached restart", "region cut off from NATS"}
	for {
		wait := time.Duration(15+rng.IntN(30)) * time.Second
		if time.Now().Add(wait).After(deadline) {
			break
		}
		select {
		case err := <-prodErr:
			t.Fatalf("publishing stopped: %v", err)
		case <-time.After(wait): // the time between faults is the scenario
		}
		if t.Failed() {
			t.FailNow()
		}
		kind := faultKinds[rng.IntN(len(faultKinds))]
		hold := time.Duration(1+rng.IntN(12)) * time.Second
		f := faultWindow{kind: kind, name: kind, start: time.Now()}
		r := e.regions[rng.IntN(len(e.regions))]
		switch kind {
		case "bridge SIGKILL":
			e.bridges[0].kill()
			time.Sleep(hold) // the outage
			e.bridges[0].start(readyTimeout)
		case "agent SIGKILL":
			f.name += " " + r.name
			r.agent.kill()
			time.Sleep(hold)
			r.agent.start(readyTimeout)
		case "RabbitMQ connection drop":
			e.amqpProxy.CloseConnections()
		case "NATS restart":
			e.nodes[0].shutdown()
			time.Sleep(hold)
			e.nodes[0].restart(t)
		case "memcached restart":
			i := rng.IntN(len(r.servers))
			f.name += fmt.Sprintf(" %s/%d", r.name, i)
			r.servers[i].Stop()
			time.Sleep(hold)
			e.restartMemcached(r, i)
		case "region cut off from NATS":
			f.name += " " + r.name
			for _, px := range r.natsProxy {
				px.Refuse(true)
				px.CloseConnections()
			}
			time.Sleep(hold)
			for _, px := range r.natsProxy {
				px.Refuse(false)
			}
		}
		f.end = time.Now()
		t.Logf("fault: %s for %s", f.name, f.end.Sub(f.start).Round(time.Millisecond))
		mu.Lock()
		faults = append(faults, f)
		mu.Unlock()
	}
	time.Sleep(time.Until(deadline))
	cancel()
	if err := <-prodErr; err != nil {
		t.Fatalf("publishing: %v", err)
	}
	end := time.Now()

	// Every event acknowledged everywhere, then count what is left.
	testutil.Eventually(t, 10*time.Minute, "every region's consumer to acknowledge every event after the soak", func() (bool, string) {
		return e.allAcked(e.regions)
	})
	// The tracker's last rounds: entries still cached now are stale.
	settle := time.Now().Add(30 * time.Second)
	for time.Now().Before(settle) {
		mu.Lock()
		n := len(outstanding)
		mu.Unlock()
		if n == 0 {
			break
		}
		time.Sleep(50 * time.Millisecond) // polling interval
	}
	stopTracking()
	<-trackDone
	mu.Lock()
	var allTokens []string
	for _, ev := range events {
		allTokens = append(allTokens, entryTokens(ev.v.entries)...)
	}
	mu.Unlock()
	stale := 0
	for _, r := range e.regions {
		found, err := presentIn(serverAddrs(r), tokenKeys(allTokens))
		if err != nil {
			t.Fatalf("%s: %v", r.name, err)
		}
		stale += len(found)
	}
	want, _ := e.expectedInStream()
	msgs, err := e.readStream()
	if err != nil {
		t.Fatal(err)
	}
	inStream := map[string]int{}
	for _, m := range msgs {
		inStream[m.msgID]++
	}
	lost, dups := 0, 0
	for id := range want {
		switch inStream[id] {
		case 0:
			lost++
		case 1:
		default:
			dups++
		}
	}

	var all, calm, faulty []time.Duration
	mu.Lock()
	for _, ev := range events {
		if ev.gone.IsZero() {
			continue // counted as stale or lost above
		}
		d := ev.gone.Sub(ev.sent)
		all = append(all, d)
		during := false
		for _, f := range faults {
			if ev.sent.Before(f.end.Add(15*time.Second)) && ev.gone.After(f.start) {
				during = true
			}
		}
		if during {
			faulty = append(faulty, d)
		} else {
			calm = append(calm, d)
		}
	}
	byKind := map[string]int{}
	for _, f := range faults {
		byKind[f.kind]++
	}
	unmeasured := len(events) - len(all)
	mu.Unlock()
	var kinds []string
	for k, n := range byKind {
		kinds = append(kinds, fmt.Sprintf("%s x%d", k, n))
	}
	sort.Strings(kinds)
	t.Logf("SOAK %s, %d regions: %d token-affecting notifications (%d AMQP messages in all, harmless and malformed included); "+
		"%d faults (%s); stale entries %d; events lost %d; duplicated in the stream %d; not measured %d; cache writes that failed during memcached faults %d",
		end.Sub(deadline.Add(-*flagSoakDuration)).Round(time.Second), len(e.regions), counts["token-affecting"], counts["total published"],
		len(faults), strings.Join(kinds, ", "), stale, lost, dups, unmeasured, counts["write failures (memcached down)"])
	t.Logf("SOAK latency publish -> last concerned entry gone in every region: all %s", summarize(all))
	t.Logf("SOAK latency, no fault within 15s: %s", summarize(calm))
	t.Logf("SOAK latency, during or up to 15s after a fault: %s", summarize(faulty))
	if stale != 0 || lost != 0 || dups != 0 {
		t.Errorf("expected 0 stale entries, 0 lost and 0 duplicated events; saw %d, %d and %d", stale, lost, dups)
	}
	e.verify(expect{gone: allTokens, timeout: 5 * time.Minute})
}
