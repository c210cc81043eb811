package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	natsgo "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/doctor"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// TestDoctorCommand runs `keystone-fanout doctor agent` as an operator would,
// with --oslo-config and --json: exit status 0 when nothing blocks, 1 when a
// finding does (a memcached started with -X), 2 for a mistake in the flags.
func TestDoctorCommand(t *testing.T) {
	nats := testutil.StartNATS(t)
	nc, err := natsgo.Connect(nats.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	js, _ := jetstream.New(nc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "KEYSTONE", Subjects: []string{"keystone.>"}}); err != nil {
		t.Fatal(err)
	}
	nc.Close()
	healthy := memcachetest.Start(t, 1)
	noDump := memcachetest.StartWith(t, 1, memcachetest.Options{Args: []string{"-X"}})
	nova := func(servers []*memcachetest.Server) string {
		return writeConf(t, "nova.conf", "[keystone_authtoken]\nmemcached_servers = "+memcachetest.List(servers)+
			"\nmemcache_security_strategy = MAC\nmemcache_secret_key = s\ntoken_cache_time = 120\n")
	}
	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		checks map[string]doctor.Level // check -> a level it must have
		stderr string
	}{
		{"healthy memcached: nothing blocks", []string{"doctor", "agent", "--oslo-config", nova(healthy), "--json"}, 0,
			map[string]doctor.Level{"memcached.crawl": doctor.LevelOK, "nats.connect": doctor.LevelOK}, ""},
		{"memcached with -X: blocking", []string{"doctor", "agent", "--oslo-config", nova(noDump), "--json"}, 1,
			map[string]doctor.Level{"memcached.crawl": doctor.LevelFail}, "1 blocking finding(s)"},
		{"a mistake in the flags", []string{"doctor", "agent", "--memcached", "127.0.0.1:11211"}, 2, nil, "--region is required"},
		{"no component", []string{"doctor"}, 2, nil, "doctor bridge or doctor agent"},
		{"unknown component", []string{"doctor", "poller"}, 2, nil, `unknown component "poller"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			args := append(tc.args, "--nats-url", nats.ClientURL(), "--region", "regionTwo", "--timeout", "2s")
			if tc.checks == nil {
				args = tc.args
			}
			code := run(args, &out, &errOut, func(string) string { return "" })
			if code != tc.code {
				t.Fatalf("exit code %d, want %d\nstdout:\n%s\nstderr:\n%s", code, tc.code, out.String(), errOut.String())
			}
			if !strings.Contains(errOut.String(), tc.stderr) {
				t.Errorf("stderr lacks %q:\n%s", tc.stderr, errOut.String())
			}
			if tc.checks == nil {
				return
			}
			var rep doctor.Report
			if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
				t.Fatalf("--json output: %v\n%s", err, out.String())
			}
			for check, level := range tc.checks {
				found := false
				for _, f := range rep.Findings {
					found = found || (f.Check == check && f.Level == level)
				}
				if !found {
					t.Errorf("no %s finding at %s:\n%s", check, level, out.String())
				}
			}
		})
	}
}
