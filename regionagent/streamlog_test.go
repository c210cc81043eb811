package regionagent

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// recordedLog keeps the level and error of every "consumer unavailable"
// record.
type recordedLog struct {
	mu      sync.Mutex
	records []string // "LEVEL err"
}

func (r *recordedLog) Enabled(context.Context, slog.Level) bool { return true }
func (r *recordedLog) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *recordedLog) WithGroup(string) slog.Handler            { return r }
func (r *recordedLog) Handle(_ context.Context, rec slog.Record) error {
	if !strings.HasPrefix(rec.Message, "consumer unavailable") {
		return nil
	}
	line := rec.Level.String()
	rec.Attrs(func(a slog.Attr) bool {
		if a.Key == "err" {
			line += " " + a.Value.String()
		}
		return true
	})
	r.mu.Lock()
	r.records = append(r.records, line)
	r.mu.Unlock()
	return nil
}

// count returns how many records at level mention a missing stream, and all
// records.
func (r *recordedLog) count(level slog.Level) (int, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, l := range r.records {
		if strings.HasPrefix(l, level.String()+" ") && strings.Contains(l, "does not exist") {
			n++
		}
	}
	return n, fmt.Sprint(r.records)
}

// TestMissingStreamLogLevel: an agent started before the bridge created the
// stream says so at Info (expected on a first start); once it has seen the
// stream, its disappearance is a warning.
func TestMissingStreamLogLevel(t *testing.T) {
	env := newEnv(t)
	cfg := env.streamInfo().Config
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := env.js.DeleteStream(ctx, testStream); err != nil {
		t.Fatal(err)
	}

	logs := &recordedLog{}
	a, err := New(testOptions(), env.nc, &fakeInvalidator{}, prometheus.NewRegistry(), slog.New(logs))
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(runCtx) }()
	t.Cleanup(func() { stop(); <-done })

	testutil.Eventually(t, 10*time.Second, "two retries logged while the stream was never there", func() (bool, string) {
		n, all := logs.count(slog.LevelInfo)
		return n >= 2, all
	})
	if n, all := logs.count(slog.LevelWarn); n != 0 {
		t.Fatalf("%d warnings about a stream that never existed yet: %s", n, all)
	}

	if _, err := env.js.CreateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "the agent bound to its consumer", func() (bool, string) {
		return a.bound.Load(), "not bound"
	})
	if err := env.js.DeleteStream(ctx, testStream); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "a warning once the stream it had seen is gone", func() (bool, string) {
		n, all := logs.count(slog.LevelWarn)
		return n >= 1, all
	})
}
