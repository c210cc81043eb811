package regionagent

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
)

// The child process mode of the test binary: TestMain runs an agent instead
// of the tests when these are set.
const (
	childURLEnv = "REGIONAGENT_TEST_CHILD_NATS_URL"
	childOutEnv = "REGIONAGENT_TEST_CHILD_OUT"
	// childBackoffEnv, when set, is the child's RedeliveryBackoff (one
	// duration).
	childBackoffEnv = "REGIONAGENT_TEST_CHILD_BACKOFF"
	// childHoldEnv, when set, makes every invalidation of the child wait until
	// the child dies: the events it gets stay unacknowledged.
	childHoldEnv = "REGIONAGENT_TEST_CHILD_HOLD"
)

func TestMain(m *testing.M) {
	if url := os.Getenv(childURLEnv); url != "" {
		os.Exit(runChild(url, os.Getenv(childOutEnv)))
	}
	os.Exit(m.Run())
}

// fileInvalidator appends "<pass> <event id>" for every event of every
// successful call to a file, one write per call, so that a SIGKILL loses
// nothing written before it. Calls alternate first/second passes per event,
// which the agent's log cannot tell; the parent only counts.
type fileInvalidator struct {
	mu   sync.Mutex
	f    *os.File
	hold bool
}

func (fi *fileInvalidator) Invalidate(ctx context.Context, evs []event.Event) (tokencache.Result, error) {
	if fi.hold {
		<-ctx.Done()
		return tokencache.Result{}, ctx.Err()
	}
	select { // a memcached crawl takes a little while
	case <-time.After(10 * time.Millisecond):
	case <-ctx.Done():
		return tokencache.Result{}, ctx.Err()
	}
	var b strings.Builder
	for _, e := range evs {
		fmt.Fprintf(&b, "%d %s\n", os.Getpid(), e.ID)
	}
	fi.mu.Lock()
	defer fi.mu.Unlock()
	_, err := fi.f.WriteString(b.String())
	return tokencache.Result{Counts: tokencache.Counts{Removed: len(evs)}}, err
}

func runChild(url, out string) int {
	f, err := os.OpenFile(out, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	o := testOptions()
	o.BatchSize = 10
	o.SecondPassDelay = 100 * time.Millisecond
	if b := os.Getenv(childBackoffEnv); b != "" {
		d, err := time.ParseDuration(b)
		if err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			return 1
		}
		o.RedeliveryBackoff = []time.Duration{d}
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if os.Getenv("REGIONAGENT_TEST_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil)).With("pid", os.Getpid())
	}
	a, err := New(o, nc, &fileInvalidator{f: f, hold: os.Getenv(childHoldEnv) != ""}, prometheus.NewRegistry(), log)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := a.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	return 0
}

// startChild starts an agent process; env adds "NAME=value" settings.
func startChild(t *testing.T, url, out string, env ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childURLEnv+"="+url, childOutEnv+"="+out)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting the agent process: %v", err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	})
	return cmd
}

// handledBy reads the child output: for each event id, how many successful
// invalidation calls included it, per process.
func handledBy(t *testing.T, out string) map[string]map[string]int {
	t.Helper()
	f, err := os.Open(out)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := map[string]map[string]int{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		pid, id, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue // a line cut by the kill cannot happen (one write per call), but be lenient
		}
		if got[id] == nil {
			got[id] = map[string]int{}
		}
		got[id][pid]++
	}
	return got
}

func TestAgentKilledMidBurst(t *testing.T) {
	env := newEnv(t)
	out := filepath.Join(t.TempDir(), "handled")
	first := startChild(t, env.srv.ClientURL(), out)
	firstPID := fmt.Sprint(first.Process.Pid)

	burst := events(0, 400)
	published := make(chan []uint64, 1)
	go func() { published <- env.publish(burst...) }()
	testutil.Eventually(t, 30*time.Second, "the first agent process to acknowledge part of the burst", func() (bool, string) {
		ci, err := env.consumerInfo()
		if err != nil {
			return false, err.Error()
		}
		return ci.AckFloor.Stream >= 60, fmt.Sprintf("ack floor %d", ci.AckFloor.Stream)
	})
	if err := first.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = first.Wait()
	seqs := <-published
	done := handledBy(t, out)
	if len(done) >= len(burst) {
		t.Logf("the first process handled all %d events before the kill; the restart still has to be clean", len(done))
	}
	ci, err := env.consumerInfo()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("killed after %d events; consumer: ack floor %d, ack pending %d, pending %d",
		len(done), ci.AckFloor.Stream, ci.NumAckPending, ci.NumPending)

	second := startChild(t, env.srv.ClientURL(), out)
	secondPID := fmt.Sprint(second.Process.Pid)
	env.waitAcked(seqs[len(seqs)-1], 60*time.Second)
	got := handledBy(t, out)
	var missing []string
	for _, id := range ids(burst) {
		// Acknowledged means both passes ran in one process: at least two
		// successful calls by the same process.
		if got[id][firstPID] < 2 && got[id][secondPID] < 2 {
			missing = append(missing, id)
		}
	}
	if len(missing) > 0 {
		t.Fatalf("%d of %d events were acknowledged without both passes in one process: %v", len(missing), len(burst), missing[:min(len(missing), 10)])
	}
	redone := 0
	for _, id := range ids(burst) {
		if got[id][firstPID] > 0 && got[id][secondPID] > 0 {
			redone++
		}
	}
	t.Logf("%d events handled again by the second process (at least once)", redone)
	if err := second.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := second.Wait(); err != nil {
		t.Fatalf("the second agent process after SIGTERM: %v", err)
	}
}

// TestAgentKilledHoldingEvents: an agent is killed (SIGKILL) while it holds
// events it has not acknowledged. The restarted agent resets the consumer to
// its ack floor and handles them at once, not after the first redelivery
// back-off (a minute here, so that only the reset can explain a quick
// recovery).
func TestAgentKilledHoldingEvents(t *testing.T) {
	env := newEnv(t)
	out := filepath.Join(t.TempDir(), "handled")
	const backoff = time.Minute
	first := startChild(t, env.srv.ClientURL(), out, childBackoffEnv+"="+backoff.String(), childHoldEnv+"=1")
	held := events(0, 5)
	seqs := env.publish(held...)
	testutil.Eventually(t, 30*time.Second, "the first agent process to hold every event unacknowledged", func() (bool, string) {
		ci, err := env.consumerInfo()
		if err != nil {
			return false, err.Error()
		}
		return ci.NumAckPending == len(held), fmt.Sprintf("ack pending %d, ack floor %d", ci.NumAckPending, ci.AckFloor.Stream)
	})
	if err := first.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = first.Wait()
	killed := time.Now()
	if got := handledBy(t, out); len(got) != 0 {
		t.Fatalf("the holding agent handled events: %v", got)
	}

	second := startChild(t, env.srv.ClientURL(), out, childBackoffEnv+"="+backoff.String())
	secondPID := fmt.Sprint(second.Process.Pid)
	// Well under the back-off: the reset, not a redelivery, brought them.
	env.waitAcked(seqs[len(seqs)-1], backoff/2)
	t.Logf("the events the killed agent held were handled and acknowledged %s after the kill (redelivery back-off %s)",
		time.Since(killed).Round(time.Millisecond), backoff)
	got := handledBy(t, out)
	for _, id := range ids(held) {
		if got[id][secondPID] < 2 {
			t.Fatalf("event %s: %d successful passes by the restarted agent, want 2 (handled by: %v)", id, got[id][secondPID], got[id])
		}
	}
	if err := second.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := second.Wait(); err != nil {
		t.Fatalf("the second agent process after SIGTERM: %v", err)
	}
}
