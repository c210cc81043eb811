package app

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/bridge"
	"github.com/keystone-fanout/keystone-fanout/internal/keystonetest"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/revoke"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
	"github.com/keystone-fanout/keystone-fanout/regionagent"
)

// TestKeystoneRevocationsLeaveTheRegion runs a real Keystone (no notifications
// at all: only its revocation events) and the whole daemon with --keystone-url.
// Tokens issued by that Keystone are cached by keystonemiddleware's own code
// with the bodies Keystone returns for them. Revoking one token removes that
// token's entry only; disabling a user removes that user's entries only. The
// time from Keystone's answer to the entry gone is logged.
func TestKeystoneRevocationsLeaveTheRegion(t *testing.T) {
	ctx := context.Background()
	ks := keystonetest.StartTest(t, keystonetest.Options{})
	project, err := ks.CreateProject(ctx, keystonetest.UniqueName("p"))
	if err != nil {
		t.Fatal(err)
	}
	member, err := ks.EnsureRole(ctx, "member")
	if err != nil {
		t.Fatal(err)
	}
	users := map[string]string{} // name -> id
	for _, name := range []string{"alice", "bob"} {
		id, err := ks.CreateUser(ctx, keystonetest.UniqueName(name), "pw-"+name, project)
		if err != nil {
			t.Fatal(err)
		}
		if err := ks.AssignProjectRole(ctx, id, project, member); err != nil {
			t.Fatal(err)
		}
		users[name] = id
	}
	// Two tokens each, cached as a service in the region would cache them.
	servers := memcachetest.Start(t, 2)
	cache := kmwtest.Start(t, memcachetest.Addrs(servers), kmwtest.MAC, "region-secret", 0)
	tokens := map[string][]string{}
	var entries []kmwtest.Entry
	for _, name := range []string{"alice", "bob"} {
		for i := 0; i < 2; i++ {
			tok, _, err := ks.IssueToken(ctx, users[name], "pw-"+name, project)
			if err != nil {
				t.Fatal(err)
			}
			body, err := ks.TokenBody(ctx, tok)
			if err != nil {
				t.Fatal(err)
			}
			tokens[name] = append(tokens[name], tok)
			entries = append(entries, kmwtest.Entry{TokenID: tok, Body: json.RawMessage(body)})
		}
	}
	for _, w := range cache.Write(entries) {
		if !w.Stored {
			t.Fatalf("the middleware did not store a token")
		}
	}

	pw := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pw, []byte(ks.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := testutil.NameSuffix()
	exchange, queue := "app-ks-x-"+s, "app-ks-q-"+s
	t.Cleanup(func() { deleteAMQP(t, exchange, queue) })
	o := AllInOneOptions{
		Bridge: BridgeOptions{
			Bridge:   bridge.Options{AMQPURLs: []string{testutil.AMQPURL()}, Exchange: exchange, Queue: queue, QueueType: bridge.QueueClassic},
			Embedded: natsserver.Options{Listen: "127.0.0.1:-1", DataDir: t.TempDir()},
			Revoke: &revoke.Options{URL: ks.URL, CAFile: ks.CAFile, Username: ks.AdminUser, PasswordFile: pw,
				Project: ks.AdminProject, PollInterval: 200 * time.Millisecond, MaxBackoff: time.Second},
			Registry: prometheus.NewRegistry(), ShutdownTimeout: 20 * time.Second,
		},
		Agent: AgentOptions{
			Agent:        regionagent.Options{Region: "regionTwo", SecondPassDelay: 200 * time.Millisecond},
			Memcache:     memcache.Options{Servers: memcachetest.List(servers)},
			Invalidation: tokencache.Options{Strategy: tokencache.Targeted},
		},
	}
	runAllInOne(t, o)

	cached := func(name string) []string {
		found := cache.Read(tokens[name])
		var out []string
		for i, tok := range tokens[name] {
			if _, ok := found[tok]; ok {
				out = append(out, fmt.Sprintf("%s#%d", name, i))
			}
		}
		sort.Strings(out)
		return out
	}
	state := func() string { return fmt.Sprint(cached("alice"), cached("bob")) }

	// One token revoked (DELETE /v3/auth/tokens, which Keystone announces on no bus).
	start := time.Now()
	if err := ks.RevokeToken(ctx, tokens["alice"][0]); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 60*time.Second, "alice's first token gone, her second and bob's kept", func() (bool, string) {
		s := state()
		return s == "[alice#1] [bob#0 bob#1]", s
	})
	t.Logf("DELETE /v3/auth/tokens to the entry gone in the region: %s (poll interval 200ms)", time.Since(start).Round(time.Millisecond))

	// A user disabled: Keystone records a user_id revocation event.
	start = time.Now()
	if err := ks.DisableUser(ctx, users["bob"]); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 60*time.Second, "bob's tokens gone, alice's second kept", func() (bool, string) {
		s := state()
		return s == "[alice#1] []", s
	})
	t.Logf("user disabled to its entries gone in the region: %s", time.Since(start).Round(time.Millisecond))
}

// runAllInOne runs the whole daemon until the test ends, then stops it and
// fails the test unless it stopped cleanly within 30 s.
func runAllInOne(t *testing.T, o AllInOneOptions) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- RunAllInOne(ctx, o, testutil.Logger(t)) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("daemon stopped with %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("daemon did not stop within 30s")
		}
	})
}
