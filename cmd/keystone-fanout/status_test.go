package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/app"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/regionagent"
)

// statusWorld is one embedded NATS server with the events stream, on which a
// test arranges regions the way agents would leave them.
type statusWorld struct {
	t   *testing.T
	url string
	js  jetstream.JetStream
	s   jetstream.Stream
}

func newStatusWorld(t *testing.T) *statusWorld {
	t.Helper()
	srv := testutil.StartNATS(t)
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	s, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: regionagent.DefaultStream, Subjects: []string{"keystone.>"}})
	if err != nil {
		t.Fatal(err)
	}
	return &statusWorld{t: t, url: "nats://" + srv.Addr(), js: js, s: s}
}

// publish stores n events.
func (w *statusWorld) publish(n int) {
	w.t.Helper()
	for i := 0; i < n; i++ {
		if _, err := w.js.Publish(context.Background(), "keystone.notification.identity.user.updated", []byte(`{}`)); err != nil {
			w.t.Fatal(err)
		}
	}
}

// consumer creates region's durable consumer as an agent would.
func (w *statusWorld) consumer(region string) jetstream.Consumer {
	w.t.Helper()
	c, err := w.s.CreateOrUpdateConsumer(context.Background(), jetstream.ConsumerConfig{Durable: region, AckPolicy: jetstream.AckExplicitPolicy})
	if err != nil {
		w.t.Fatal(err)
	}
	return c
}

// attach pulls from c as an agent does, acknowledging what it receives
// unless hold is true; it stops when the test ends.
func (w *statusWorld) attach(c jetstream.Consumer, hold bool) {
	w.t.Helper()
	it, err := c.Messages(jetstream.PullMaxMessages(16), jetstream.PullHeartbeat(time.Second), jetstream.PullExpiry(4*time.Second))
	if err != nil {
		w.t.Fatal(err)
	}
	go func() {
		for {
			m, err := it.Next()
			if err != nil {
				return
			}
			if !hold {
				m.DoubleAck(context.Background())
			}
		}
	}()
	w.t.Cleanup(it.Stop)
}

// caughtUp waits until c has acknowledged every event.
func (w *statusWorld) caughtUp(c jetstream.Consumer) {
	w.t.Helper()
	testutil.Eventually(w.t, 10*time.Second, "the consumer to acknowledge every event", func() (bool, string) {
		ci, err := c.Info(context.Background())
		if err != nil {
			return false, err.Error()
		}
		return ci.NumPending == 0 && ci.NumAckPending == 0 && ci.NumWaiting > 0, fmt.Sprintf("%+v", ci)
	})
}

// checkpoint writes region's checkpoint as its agent would.
func (w *statusWorld) checkpoint(region string, cp regionagent.Checkpoint) {
	w.t.Helper()
	ctx := context.Background()
	kv, err := w.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: regionagent.DefaultCheckpointBucket})
	if err != nil {
		w.t.Fatal(err)
	}
	if cp.Stream == "" {
		info, err := w.s.Info(ctx)
		if err != nil {
			w.t.Fatal(err)
		}
		cp.Stream, cp.StreamCreated = info.Config.Name, info.Created
	}
	cp.Updated = time.Now().UTC()
	b, _ := json.Marshal(cp)
	if _, err := kv.Put(ctx, region, b); err != nil {
		w.t.Fatal(err)
	}
}

// healthy leaves region as a running, caught-up agent does.
func (w *statusWorld) healthy(region string) {
	w.t.Helper()
	c := w.consumer(region)
	w.attach(c, false)
	w.caughtUp(c)
	info, err := w.s.Info(context.Background())
	if err != nil {
		w.t.Fatal(err)
	}
	w.checkpoint(region, regionagent.Checkpoint{Seq: info.State.LastSeq})
}

// TestStatusCheckExitCodes runs `keystone-fanout status --check` against an
// embedded NATS server holding regions in each state it judges, and checks
// the exit status and the verdict line of each.
func TestStatusCheckExitCodes(t *testing.T) {
	tests := []struct {
		name     string
		setup    func(w *statusWorld)
		args     []string
		wantCode int
		want     []string // in stdout
	}{
		{
			name:     "every region caught up",
			setup:    func(w *statusWorld) { w.publish(3); w.healthy("regionTwo"); w.healthy("regionThree") },
			args:     []string{"--expect-regions", "regionTwo,regionThree"},
			wantCode: 0,
			want:     []string{"KEYSTONE-FANOUT OK - 2 regions", "'regionTwo_lag'=0.000s;30;120;0", "'regionThree_unacked'=0;;;0"},
		},
		{
			name:     "an expected region not seen",
			setup:    func(w *statusWorld) { w.publish(1); w.healthy("regionTwo") },
			args:     []string{"--expect-regions", "regionTwo", "--expect-regions", "regionThree"},
			wantCode: 2,
			want:     []string{"KEYSTONE-FANOUT CRITICAL - regionThree: not seen"},
		},
		{
			name: "a checkpoint without its consumer",
			setup: func(w *statusWorld) {
				w.publish(1)
				w.healthy("regionTwo")
				w.checkpoint("regionThree", regionagent.Checkpoint{Seq: 1})
			},
			wantCode: 2,
			want:     []string{"CRITICAL - regionThree: not seen: it has a checkpoint but no consumer"},
		},
		{
			name: "a region lagging past --warn-lag",
			setup: func(w *statusWorld) {
				w.publish(2)
				w.attach(w.consumer("regionTwo"), true)
				time.Sleep(100 * time.Millisecond)
			},
			args:     []string{"--warn-lag", "50ms", "--max-lag", "1h"},
			wantCode: 1,
			want:     []string{"KEYSTONE-FANOUT WARNING - regionTwo: lags", "(2 events), above --warn-lag 50ms", "'regionTwo_unacked'=2;;;0"},
		},
		{
			name: "a region lagging past --max-lag",
			setup: func(w *statusWorld) {
				w.publish(2)
				w.attach(w.consumer("regionTwo"), true)
				time.Sleep(100 * time.Millisecond)
			},
			args:     []string{"--warn-lag", "10ms", "--max-lag", "50ms"},
			wantCode: 2,
			want:     []string{"KEYSTONE-FANOUT CRITICAL - regionTwo: lags", "above --max-lag 50ms"},
		},
		{
			name: "events gone after a region's checkpoint",
			setup: func(w *statusWorld) {
				w.publish(5)
				w.healthy("regionTwo")
				w.checkpoint("regionTwo", regionagent.Checkpoint{Seq: 2})
				if err := w.s.Purge(context.Background(), jetstream.WithPurgeSequence(4)); err != nil {
					w.t.Fatal(err)
				}
			},
			wantCode: 2,
			want:     []string{"CRITICAL - regionTwo: gap: the stream no longer holds events after the checkpoint (2; the stream starts at 4)"},
		},
		{
			name: "a checkpoint of an earlier stream",
			setup: func(w *statusWorld) {
				w.publish(1)
				w.healthy("regionTwo")
				w.checkpoint("regionTwo", regionagent.Checkpoint{Stream: regionagent.DefaultStream, StreamCreated: time.Unix(1, 0), Seq: 1})
			},
			wantCode: 2,
			want:     []string{"CRITICAL - regionTwo: gap: the checkpoint is of another stream"},
		},
		{
			name:     "a consumer without its agent",
			setup:    func(w *statusWorld) { w.publish(1); w.consumer("regionTwo") },
			wantCode: 1,
			want:     []string{"WARNING - regionTwo: no agent attached"},
		},
		{
			name: "the lag is shown, not judged, without --check",
			setup: func(w *statusWorld) {
				w.publish(2)
				w.attach(w.consumer("regionTwo"), true)
			},
			args:     []string{"--check=false", "--max-lag", "1ms", "--warn-lag", "1ms"},
			wantCode: 0,
			want:     []string{"REGION", "regionTwo"},
		},
		{
			name:     "no stream",
			args:     []string{"--stream", "ELSEWHERE"},
			wantCode: 2,
			want:     []string{`KEYSTONE-FANOUT CRITICAL - stream "ELSEWHERE" does not exist`},
		},
		{
			name:     "bad flags with --check are UNKNOWN",
			args:     []string{"--warn-lag", "5m", "--max-lag", "1m"},
			wantCode: 3,
			want:     []string{"KEYSTONE-FANOUT UNKNOWN - --warn-lag 5m0s is above --max-lag 1m0s"},
		},
		{
			name:     "an unknown flag with --check is UNKNOWN",
			args:     []string{"--max-lagg", "1m"},
			wantCode: 3,
			want:     []string{"KEYSTONE-FANOUT UNKNOWN - flag provided but not defined: -max-lagg"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newStatusWorld(t)
			if tt.setup != nil {
				tt.setup(w)
			}
			args := append([]string{"status", "--check", "--nats-url", w.url}, tt.args...)
			var out, errOut bytes.Buffer
			code := run(args, &out, &errOut, func(string) string { return "" })
			if code != tt.wantCode {
				t.Fatalf("exit status %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tt.wantCode, out.String(), errOut.String())
			}
			for _, s := range tt.want {
				if !strings.Contains(out.String(), s) {
					t.Errorf("stdout lacks %q:\n%s", s, out.String())
				}
			}
		})
	}
}

// TestStatusCheckExitCodesWithoutCheck: the exit statuses of status without
// --check stay those of every command.
func TestStatusCheckExitCodesWithoutCheck(t *testing.T) {
	w := newStatusWorld(t)
	live, _ := testutil.CountingListener(t)
	tests := []struct {
		name     string
		args     []string
		env      map[string]string
		wantCode int
	}{
		{"bad flag", []string{"--max-lagg", "1m"}, nil, 2},
		{"no stream", []string{"--nats-url", w.url, "--stream", "ELSEWHERE"}, nil, 1},
		{"--check from the environment makes a bad flag UNKNOWN", []string{"--max-lagg", "1m"}, map[string]string{"KEYSTONE_FANOUT_CHECK": "true"}, 3},
		{"NATS not answering under --check", []string{"--check", "--nats-url", "nats://" + live}, nil, 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			code := run(append([]string{"status"}, tt.args...), &out, &errOut, func(k string) string { return tt.env[k] })
			if code != tt.wantCode {
				t.Fatalf("exit status %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tt.wantCode, out.String(), errOut.String())
			}
		})
	}
}

// TestStatusCheckOfARealAgent: a region agent running on real memcached
// servers, idle after handling every event, is judged OK: attached, caught
// up, its checkpoint current.
func TestStatusCheckOfARealAgent(t *testing.T) {
	w := newStatusWorld(t)
	w.publish(2)
	servers := memcachetest.Start(t, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- app.RunAgent(ctx, app.AgentOptions{
			Agent:        regionagent.Options{Region: "regionTwo", SecondPassDelay: 50 * time.Millisecond, AuditInterval: 100 * time.Millisecond},
			Memcache:     memcache.Options{Servers: memcachetest.List(servers)},
			Invalidation: tokencache.Options{Strategy: tokencache.Targeted},
			NATS:         natsconn.Options{URL: w.url},
		}, testLogger(t))
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	args := []string{"status", "--check", "--nats-url", w.url, "--expect-regions", "regionTwo", "--json"}
	testutil.Eventually(t, 30*time.Second, "status --check OK for the agent", func() (bool, string) {
		var out, errOut bytes.Buffer
		code := run(args, &out, &errOut, func(string) string { return "" })
		var st app.Status
		if err := json.Unmarshal(out.Bytes(), &st); err != nil {
			return false, fmt.Sprintf("exit %d: %v: %s %s", code, err, out.String(), errOut.String())
		}
		ok := code == 0 && st.Check != nil && st.Check.State == app.CheckOK && len(st.Consumers) == 1 &&
			st.Consumers[0].Checkpoint != nil && st.Consumers[0].Checkpoint.Seq == 2
		return ok, fmt.Sprintf("exit %d: %s", code, out.String())
	})
}

func testLogger(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}
