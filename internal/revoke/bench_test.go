package revoke

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/keystonetest"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// BenchmarkRevokeToPubAck measures, against the real Keystone, the time from
// sending DELETE /v3/auth/tokens to the revocation event being stored in the
// stream (delivered by an ordered consumer, which JetStream does once it has
// stored the message, when it also sends the PubAck), for two poll
// intervals. One operation is one revoked token; ns/op is the mean latency,
// p50/p95/max are reported too.
//
//	go test -run '^$' -bench RevokeToPubAck -benchtime 20x ./internal/revoke/
func BenchmarkRevokeToPubAck(b *testing.B) {
	for _, interval := range []time.Duration{DefaultPollInterval, time.Second} {
		b.Run("interval="+interval.String(), func(b *testing.B) {
			ctx := context.Background()
			js := startJetStream(b, 2*time.Minute)
			o := keystoneOptions(b)
			o.PollInterval = interval
			p, _ := newKeystonePoller(b, o, js)
			runPoller(b, p)

			// Deliver every new message of the stream, as it is stored.
			arrived := make(chan *event.Revocation, 1024)
			cons, err := js.OrderedConsumer(ctx, testStream, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverNewPolicy})
			if err != nil {
				b.Fatal(err)
			}
			cc, err := cons.Consume(func(m jetstream.Msg) {
				if e, err := event.Unmarshal(m.Data()); err == nil && e.Revocation != nil {
					arrived <- e.Revocation
				}
			})
			if err != nil {
				b.Fatal(err)
			}
			defer cc.Stop()

			project, err := ks.CreateProject(ctx, keystonetest.UniqueName("bench"))
			if err != nil {
				b.Fatal(err)
			}
			user, err := ks.CreateUser(ctx, keystonetest.UniqueName("bench"), "pw", project)
			if err != nil {
				b.Fatal(err)
			}
			member, _ := ks.RoleID(ctx, "member")
			if err := ks.AssignProjectRole(ctx, user, project, member); err != nil {
				b.Fatal(err)
			}
			testutil.Eventually(b, 20*time.Second, "the poller ready", func() (bool, string) { err := p.Ready(); return err == nil, fmt.Sprint(err) })

			var lat []time.Duration
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				tok, body, err := ks.IssueToken(ctx, user, "pw", project)
				if err != nil {
					b.Fatal(err)
				}
				var issued struct {
					Token struct {
						AuditIDs []string `json:"audit_ids"`
					} `json:"token"`
				}
				_ = json.Unmarshal(body, &issued)
				audit := issued.Token.AuditIDs[0]
				// Start at a random point of the poll cycle, as real revocations do.
				time.Sleep(rand.N(interval))
				b.StartTimer()
				start := time.Now()
				if err := ks.RevokeToken(ctx, tok); err != nil {
					b.Fatal(err)
				}
				timeout := time.After(30 * time.Second)
			wait:
				for {
					select {
					case r := <-arrived:
						if r.AuditID == audit {
							break wait
						}
					case <-timeout:
						b.Fatalf("the revocation of audit id %s did not arrive within 30 s", audit)
					}
				}
				lat = append(lat, time.Since(start))
			}
			b.StopTimer()
			slices.Sort(lat)
			pct := func(q float64) float64 { return float64(lat[int(q*float64(len(lat)-1))].Milliseconds()) }
			b.ReportMetric(pct(0.5), "p50-ms")
			b.ReportMetric(pct(0.95), "p95-ms")
			b.ReportMetric(pct(1), "max-ms")
		})
	}
}

// BenchmarkPollerLoad measures what a poller costs Keystone: it runs one
// poller with the default interval for 30 s (b.N is ignored: use
// -benchtime 1x) and reports the requests per second Keystone logged from it
// and the CPU time Keystone's uwsgi spent per second meanwhile, and per poll:
// once against the shared Keystone with its in-memory cache (as production
// Keystone caches in memcached), once against a Keystone without a cache.
//
//	go test -run '^$' -bench PollerLoad -benchtime 1x ./internal/revoke/
func BenchmarkPollerLoad(b *testing.B) {
	b.Run("keystone-cache=memory", func(b *testing.B) { pollerLoad(b, ks) })
	b.Run("keystone-cache=off", func(b *testing.B) {
		pollerLoad(b, keystonetest.StartTest(b, keystonetest.Options{TLS: true, NoCache: true, Processes: 2}))
	})
}

func pollerLoad(b *testing.B, k *keystonetest.Keystone) {
	const window = 30 * time.Second
	js := startJetStream(b, 2*time.Minute)
	o := keystoneOptionsFor(b, k)
	o.PollInterval = DefaultPollInterval
	p, reg := newKeystonePoller(b, o, js)
	// Let the first polls (and the publication of all existing events) pass.
	stop := runPoller(b, p)
	testutil.Eventually(b, 20*time.Second, "the poller ready", func() (bool, string) { err := p.Ready(); return err == nil, fmt.Sprint(err) })

	b.ResetTimer()
	gets0, _ := k.CountRequests("GET", "/v3/OS-REVOKE/events")
	auths0, _ := k.CountRequests("POST", "/v3/auth/tokens")
	polls0 := metricValue(b, reg, "keystone_fanout_revoke_polls_total")
	cpu0, err := k.CPUTime()
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	time.Sleep(window)
	elapsed := time.Since(start)
	cpu1, _ := k.CPUTime()
	polls := metricValue(b, reg, "keystone_fanout_revoke_polls_total") - polls0
	gets1, _ := k.CountRequests("GET", "/v3/OS-REVOKE/events")
	auths1, _ := k.CountRequests("POST", "/v3/auth/tokens")
	b.StopTimer()
	stop()

	sec := elapsed.Seconds()
	b.ReportMetric(float64(gets1-gets0)/sec, "list-req/s")
	b.ReportMetric(float64(auths1-auths0)/sec, "auth-req/s")
	b.ReportMetric(float64((cpu1-cpu0).Milliseconds())/sec, "keystone-cpu-ms/s")
	if polls > 0 {
		b.ReportMetric(float64((cpu1-cpu0).Milliseconds())/polls, "keystone-cpu-ms/poll")
	}
}
