package main

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// TestBadOptionExitsTwoBeforeConnecting: bridge, agent and all-in-one report
// the same mistake the same way, with exit status 2 and the flag's name,
// before they connect anywhere (every address given is a live listener that
// counts connections).
func TestBadOptionExitsTwoBeforeConnecting(t *testing.T) {
	live, accepted := testutil.CountingListener(t)
	commands := map[string][]string{
		"bridge":     {"bridge", "--amqp-url", "amqp://" + live + "/", "--nats-url", "nats://" + live, "--http-addr", ""},
		"agent":      {"agent", "--region", "regionTwo", "--memcached", live, "--nats-url", "nats://" + live, "--http-addr", ""},
		"all-in-one": {"all-in-one", "--amqp-url", "amqp://" + live + "/", "--memcached", live, "--nats-url", "nats://" + live, "--http-addr", ""},
	}
	mistakes := []struct {
		name string
		args []string
		env  map[string]string
		want []string
	}{
		{name: "NATS URL without a scheme", args: []string{"--nats-url", live},
			want: []string{"--nats-url", "has no scheme", "nats://" + live}},
		{name: "NATS URL with a misspelt scheme", args: []string{"--nats-url", "nats//" + live},
			want: []string{"--nats-url", "nats://" + live}},
		{name: "negative duration", args: []string{"--shutdown-timeout", "-1s"},
			want: []string{"-shutdown-timeout", "negative"}},
		{name: "negative duration from the environment", env: map[string]string{"KEYSTONE_FANOUT_SHUTDOWN_TIMEOUT": "-1s"},
			want: []string{"KEYSTONE_FANOUT_SHUTDOWN_TIMEOUT", "negative"}},
	}
	for _, cmd := range []string{"bridge", "agent", "all-in-one"} {
		for _, m := range mistakes {
			t.Run(cmd+"/"+m.name, func(t *testing.T) {
				var out, errOut bytes.Buffer
				args := append(append([]string(nil), commands[cmd]...), m.args...)
				code := run(args, &out, &errOut, func(k string) string { return m.env[k] })
				all := out.String() + errOut.String()
				if code != 2 {
					t.Fatalf("exit code %d, want 2; output:\n%s", code, all)
				}
				for _, w := range m.want {
					if !strings.Contains(all, w) {
						t.Errorf("output lacks %q:\n%s", w, all)
					}
				}
				if n := accepted.Load(); n != 0 {
					t.Fatalf("%d connection(s) made before the bad option was reported", n)
				}
			})
		}
	}
}

// TestAgentDurationFlags: the agent's durations whose zero or negative values
// mean something.
func TestAgentDurationFlags(t *testing.T) {
	live, _ := testutil.CountingListener(t)
	base := []string{"--region", "regionTwo", "--memcached", live, "--nats-url", "nats://" + live, "--http-addr", ""}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"negative second pass delay", []string{"--second-pass-delay", "-1s"}, "-second-pass-delay"},
		{"negative second pass delay in seconds", []string{"--second-pass-delay", "-1"}, "-second-pass-delay"},
		{"negative batch linger", []string{"--batch-linger=-1ms"}, "-batch-linger"},
		{"negative redelivery backoff", []string{"--redelivery-backoff", "3s,-30s"}, "-redelivery-backoff"},
	}
	for _, cmd := range []string{"agent", "all-in-one"} {
		for _, tt := range tests {
			t.Run(cmd+"/"+tt.name, func(t *testing.T) {
				var out, errOut bytes.Buffer
				args := append(append([]string{cmd}, base...), tt.args...)
				code := run(args, &out, &errOut, func(string) string { return "" })
				if code != 2 || !strings.Contains(errOut.String(), tt.want) {
					t.Fatalf("exit code %d, want 2 and an error naming %s:\n%s", code, tt.want, errOut.String())
				}
			})
		}
	}
	for _, tt := range []struct {
		name   string
		linger string
		want   time.Duration
	}{
		{"batch linger 0 is no wait", "0", -1},
		{"batch linger default", "", 2 * time.Millisecond},
		{"batch linger given", "5ms", 5 * time.Millisecond},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var f agentFlags
			f.o.Agent.BatchLinger = 2 * time.Millisecond
			if tt.linger != "" {
				d, err := time.ParseDuration(tt.linger)
				if err != nil {
					t.Fatal(err)
				}
				f.o.Agent.BatchLinger = d
			}
			f.strategy = "targeted"
			if err := f.finish(); err != nil {
				t.Fatal(err)
			}
			if f.o.Agent.BatchLinger != tt.want {
				t.Fatalf("BatchLinger %s, want %s", f.o.Agent.BatchLinger, tt.want)
			}
		})
	}
}

// TestHelpExampleVariableIsAFlagOfTheCommand: the help's example variable
// belongs to a flag the command has.
func TestHelpExampleVariableIsAFlagOfTheCommand(t *testing.T) {
	tests := []struct {
		cmd     string
		want    string
		notWant string
	}{
		{"status", "for example KEYSTONE_FANOUT_NATS_URL", "KEYSTONE_FANOUT_HTTP_ADDR"},
		{"sweep", "for example KEYSTONE_FANOUT_NATS_URL", "KEYSTONE_FANOUT_HTTP_ADDR"},
		{"bridge", "for example KEYSTONE_FANOUT_HTTP_ADDR", ""},
		{"agent", "for example KEYSTONE_FANOUT_HTTP_ADDR", ""},
		{"all-in-one", "for example KEYSTONE_FANOUT_HTTP_ADDR", ""},
	}
	for _, tt := range tests {
		t.Run(tt.cmd, func(t *testing.T) {
			var out, errOut bytes.Buffer
			if code := run([]string{tt.cmd, "--help"}, &out, &errOut, func(string) string { return "" }); code != 0 {
				t.Fatalf("exit code %d, want 0", code)
			}
			help := out.String() + errOut.String()
			if !strings.Contains(help, tt.want) {
				t.Errorf("help lacks %q:\n%s", tt.want, help)
			}
			if tt.notWant != "" && strings.Contains(help, tt.notWant) {
				t.Errorf("help mentions %s, a flag %s does not have:\n%s", tt.notWant, tt.cmd, help)
			}
		})
	}
}

// TestLoggerWritesReadableDurations: durations are logged as "5m0s", not as
// nanoseconds, in both formats.
func TestLoggerWritesReadableDurations(t *testing.T) {
	tests := []struct {
		format string
		want   []string
	}{
		{"json", []string{`"token_cache_time":"5m0s"`, `"g":{"retry_in":"150ms","backoff":["3s","30s"],"n":7}`}},
		{"text", []string{"token_cache_time=5m0s", "g.retry_in=150ms", `g.backoff="[3s 30s]"`, "g.n=7"}},
	}
	for _, tt := range tests {
		t.Run(tt.format, func(t *testing.T) {
			var buf bytes.Buffer
			log, err := newLogger(&buf, tt.format, "info")
			if err != nil {
				t.Fatal(err)
			}
			log.With("token_cache_time", 5*time.Minute).WithGroup("g").Info("agent starting",
				slog.Duration("retry_in", 150*time.Millisecond), "backoff", []time.Duration{3 * time.Second, 30 * time.Second}, "n", 7)
			line := buf.String()
			for _, w := range tt.want {
				if !strings.Contains(line, w) {
					t.Errorf("log line lacks %s:\n%s", w, line)
				}
			}
			if strings.Contains(line, "300000000000") || strings.Count(line, "\n") != 1 {
				t.Errorf("log line has nanoseconds or is not one line:\n%s", line)
			}
		})
	}
}
