package bridge

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

// childEnv, when set, makes the test binary run a bridge instead of the tests
// (the re-exec pattern): the parent test can then kill it with SIGKILL.
const childEnv = "KEYSTONE_FANOUT_BRIDGE_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(runChild())
	}
	os.Exit(m.Run())
}

// runChild runs a bridge configured by the environment until SIGTERM.
func runChild() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	nc, err := natsconn.Connect(ctx, natsconn.Options{URL: os.Getenv("KSF_CHILD_NATS_URL")}, "bridge-test-child", log, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	defer nc.Close()
	o := Options{
		AMQPURLs:       strings.Split(os.Getenv("KSF_CHILD_AMQP_URL"), " "),
		Exchange:       os.Getenv("KSF_CHILD_EXCHANGE"),
		Queue:          os.Getenv("KSF_CHILD_QUEUE"),
		Stream:         stream.Config{Name: os.Getenv("KSF_CHILD_STREAM"), SubjectPrefix: os.Getenv("KSF_CHILD_PREFIX")},
		ReconnectMin:   20 * time.Millisecond,
		ReconnectMax:   500 * time.Millisecond,
		ConnectionName: os.Getenv("KSF_CHILD_NAME"),
	}
	b, err := New(o, nc, prometheus.NewRegistry(), log)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	if err := b.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	return 0
}
