package revoke

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

const testStream = stream.DefaultName

// startJetStream starts an embedded NATS server and returns a JetStream
// context with a stream capturing "keystone.>" with the given duplicate window.
func startJetStream(t testing.TB, duplicates time.Duration) jetstream.JetStream {
	t.Helper()
	s := testutil.StartNATS(t)
	nc, err := nats.Connect(s.ClientURL())
	if err != nil {
		t.Fatalf("connecting to the embedded NATS server: %v", err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	createStream(t, js, duplicates)
	return js
}

func createStream(t testing.TB, js jetstream.JetStream, duplicates time.Duration) {
	t.Helper()
	_, err := js.CreateStream(context.Background(), jetstream.StreamConfig{
		Name:       testStream,
		Subjects:   []string{"keystone.>"},
		Storage:    jetstream.FileStorage,
		Duplicates: duplicates,
	})
	if err != nil {
		t.Fatalf("creating stream: %v", err)
	}
}

// streamMsg is one message of the test stream.
type streamMsg struct {
	Subject string
	MsgID   string
	Event   event.Event
}

// streamMessages reads every revocation event of the test stream (not the
// poller's proofs of progress).
func streamMessages(t testing.TB, js jetstream.JetStream) []streamMsg {
	t.Helper()
	ctx := context.Background()
	s, err := js.Stream(ctx, testStream)
	if err != nil {
		t.Fatalf("stream %s: %v", testStream, err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []streamMsg
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			t.Fatalf("reading message %d: %v", seq, err)
		}
		e, err := event.Unmarshal(m.Data)
		if err != nil {
			t.Fatalf("message %d is not an event: %v: %s", seq, err, m.Data)
		}
		if e.Kind == event.KindPolled {
			continue // the poller's proofs of progress, not Keystone's events
		}
		out = append(out, streamMsg{Subject: m.Subject, MsgID: m.Header.Get(jetstream.MsgIDHeader), Event: e})
	}
	return out
}

// checkOnce fails unless every message id occurs once in msgs.
func checkOnce(t testing.TB, msgs []streamMsg) {
	t.Helper()
	count := map[string]int{}
	for _, m := range msgs {
		count[m.MsgID]++
	}
	var dups []string
	for id, n := range count {
		if n != 1 {
			dups = append(dups, fmt.Sprintf("%s x%d", id, n))
		}
	}
	sort.Strings(dups)
	if len(dups) > 0 {
		t.Fatalf("stream holds duplicates: %s", strings.Join(dups, ", "))
	}
}

// runPoller runs p until the test ends and waits for Run to return then.
func runPoller(t testing.TB, p *Poller) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	var stopped bool
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v, want nil after cancel", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("Run did not return within 30 s of cancel")
		}
	}
	t.Cleanup(stop)
	return stop
}

// metricValue returns the value of the metric name (with the given label
// pairs) gathered from reg, 0 when absent.
func metricValue(t testing.TB, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.Metric {
			if !labelsMatch(m, labels) {
				continue
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			}
		}
	}
	return 0
}

func labelsMatch(m *dto.Metric, pairs []string) bool {
	for i := 0; i+1 < len(pairs); i += 2 {
		found := false
		for _, l := range m.Label {
			if l.GetName() == pairs[i] && l.GetValue() == pairs[i+1] {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

func writeFile(t testing.TB, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
