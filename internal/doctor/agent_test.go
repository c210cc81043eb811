package doctor

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

// cache writes n token entries with keystonemiddleware's own code and
// strategy to the servers.
func cache(t *testing.T, servers []*memcachetest.Server, strategy kmwtest.Strategy, n int) {
	t.Helper()
	gen := kmwtest.NewGen(1)
	entries := make([]kmwtest.Entry, n)
	for i := range entries {
		entries[i] = gen.Entry(kmwtest.Spec{UserID: gen.ID(), ProjectID: gen.ID()})
	}
	for _, w := range kmwtest.Write(t, memcachetest.Addrs(servers), strategy, "region-secret", entries) {
		if !w.Stored {
			t.Fatalf("the middleware did not store token %s", w.TokenID)
		}
	}
}

func TestAgent(t *testing.T) {
	natsURL := startNATS(t)
	createStream(t, natsURL, true)
	bare := startNATS(t) // no stream
	opts := func(servers []*memcachetest.Server, user, pw string) AgentOptions {
		return AgentOptions{
			Region: "regionTwo", Stream: "KEYSTONE", CheckpointBucket: "keystone-fanout-agents",
			NATS:     natsconn.Options{URL: natsURL, User: user, Password: pw},
			Memcache: memcache.Options{Servers: memcachetest.List(servers)},
			Strategy: tokencache.Targeted, Timeout: 15 * time.Second,
		}
	}
	for _, tc := range []struct {
		name     string
		setup    func(t *testing.T) AgentOptions
		blocking bool
		want     []want
	}{
		{
			name: "healthy with MAC entries: targeted",
			setup: func(t *testing.T) AgentOptions {
				servers := memcachetest.Start(t, 2)
				cache(t, servers, kmwtest.MAC, 20)
				o := opts(servers, "agent", "agent-pw")
				o.SecurityStrategy = "MAC"
				return o
			},
			want: []want{
				{"nats.stream", LevelOK, "1 event(s)"},
				{"nats.permissions", LevelOK, "allowed: look up the stream, look up consumer regionTwo, create consumer regionTwo, pull events, read keystone-fanout-agents/regionTwo, write keystone-fanout-agents/regionTwo"},
				{"memcached.connect", LevelOK, "over plain TCP"},
				{"memcached.crawl", LevelOK, "lru_crawler metadump allowed"},
				{"strategy", LevelOK, "targeted: every sampled entry is readable (MAC 20)"},
			},
		},
		{
			name: "ENCRYPT entries: every event sweeps",
			setup: func(t *testing.T) AgentOptions {
				servers := memcachetest.Start(t, 1)
				cache(t, servers, kmwtest.Encrypt, 10)
				o := opts(servers, "agent", "agent-pw")
				o.SecurityStrategy = "ENCRYPT"
				return o
			},
			want: []want{
				{"strategy", LevelWarn, "every event sweeps: no sampled entry is readable (ENCRYPT 10)"},
				{"strategy", LevelWarn, "memcache_security_strategy = MAC"},
			},
		},
		{
			name: "None and ENCRYPT services share the servers",
			setup: func(t *testing.T) AgentOptions {
				servers := memcachetest.Start(t, 1)
				cache(t, servers, kmwtest.None, 5)
				cache(t, servers, kmwtest.Encrypt, 5)
				o := opts(servers, "agent", "agent-pw")
				o.SecurityStrategy = "None"
				return o
			},
			want: []want{
				{"strategy", LevelInfo, "mixed: None 5, ENCRYPT 5"},
				{"strategy", LevelInfo, "another service of the region writes ENCRYPT entries"},
			},
		},
		{
			name: "memcached started with -X",
			setup: func(t *testing.T) AgentOptions {
				return opts(memcachetest.StartWith(t, 1, memcachetest.Options{Args: []string{"-X"}}), "agent", "agent-pw")
			},
			blocking: true,
			want:     []want{{"memcached.crawl", LevelFail, "memcached runs with -X (--disable-dumping)"}},
		},
		{
			name: "a memcached server down",
			setup: func(t *testing.T) AgentOptions {
				servers := memcachetest.Start(t, 2)
				cache(t, servers, kmwtest.None, 4)
				servers[1].Stop()
				return opts(servers, "agent", "agent-pw")
			},
			blocking: true,
			want: []want{
				{"memcached.connect", LevelFail, "no answer to version"},
				{"memcached.crawl", LevelOK, "lru_crawler metadump allowed"},
			},
		},
		{
			name: "memcached with TLS",
			setup: func(t *testing.T) AgentOptions {
				servers := memcachetest.StartWith(t, 1, memcachetest.Options{TLS: true})
				o := opts(servers, "agent", "agent-pw")
				o.Memcache.TLS = memcache.TLSOptions{Enabled: true, CAFile: servers[0].CAFile}
				return o
			},
			want: []want{
				{"memcached.connect", LevelOK, "over TLS"},
				{"strategy", LevelWarn, "no token entries"},
			},
		},
		{
			name: "memcached with TLS and an agent without",
			setup: func(t *testing.T) AgentOptions {
				return opts(memcachetest.StartWith(t, 1, memcachetest.Options{TLS: true}), "agent", "agent-pw")
			},
			blocking: true,
			want:     []want{{"memcached.connect", LevelFail, "--memcached-tls and --memcached-tls-ca"}},
		},
		{
			name: "an agent with TLS and memcached without",
			setup: func(t *testing.T) AgentOptions {
				o := opts(memcachetest.Start(t, 1), "agent", "agent-pw")
				o.Memcache.TLS = memcache.TLSOptions{Enabled: true, CAFile: memcachetest.StartWith(t, 1, memcachetest.Options{TLS: true})[0].CAFile}
				return o
			},
			blocking: true,
			want:     []want{{"memcached.connect", LevelFail, "The server does not speak TLS"}},
		},
		{
			name: "NATS user that may only read",
			setup: func(t *testing.T) AgentOptions {
				return opts(memcachetest.Start(t, 1), "ro", "ro-pw")
			},
			blocking: true,
			want: []want{
				{"nats.permissions", LevelFail, "denied: create consumer regionTwo, pull events"},
				{"nats.permissions", LevelFail, "$JS.API.CONSUMER.CREATE.KEYSTONE.regionTwo"},
				{"nats.permissions", LevelFail, "$JS.API.DIRECT.GET.KV_keystone-fanout-agents.>"},
			},
		},
		{
			name: "no stream",
			setup: func(t *testing.T) AgentOptions {
				o := opts(memcachetest.Start(t, 1), "admin", "admin-pw")
				o.NATS.URL = bare
				return o
			},
			blocking: true,
			want:     []want{{"nats.stream", LevelFail, "start the bridge against this NATS first"}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.setup(t)
			msgs, consumers, kv := streamState(t, natsURL)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			rep := Agent(ctx, o)
			var text strings.Builder
			_ = rep.WriteText(&text)
			t.Log("\n" + text.String())
			for _, w := range tc.want {
				w.in(t, rep)
			}
			if (rep.Blocking > 0) != tc.blocking {
				var b strings.Builder
				_ = rep.WriteText(&b)
				t.Errorf("blocking %d, want blocking %v:\n%s", rep.Blocking, tc.blocking, b.String())
			}
			if m, c, k := streamState(t, natsURL); m != msgs || len(c) != len(consumers) || k != kv {
				t.Errorf("the checks changed NATS: %d messages (was %d), consumers %v (were %v), %d checkpoints (were %d)", m, msgs, c, consumers, k, kv)
			}
		})
	}
}
