package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/bridge"
	"github.com/keystone-fanout/keystone-fanout/internal/config"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

const (
	kollaKeystone = "../../internal/osloconfig/testdata/kolla-ansible/keystone.conf"
	kollaNova     = "../../internal/osloconfig/testdata/kolla-ansible/nova.conf"
	helmNova      = "../../internal/osloconfig/testdata/openstack-helm/nova.conf"
)

func writeConf(t *testing.T, name, conf string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestOsloConfigPrecedence: a setting comes from its flag, else its
// variable, else --oslo-config, else its default.
func TestOsloConfigPrecedence(t *testing.T) {
	keystone := writeConf(t, "keystone.conf", `[DEFAULT]
control_exchange = file-exchange
transport_url = rabbit://ks:pw@10.0.0.1:5672,ks:pw@10.0.0.2:5672/ks
[oslo_messaging_notifications]
driver = messagingv2
topics = notifications,audit
`)
	bridgeCases := []struct {
		name     string
		args     []string
		env      map[string]string
		exchange string
		urls     []string
		keys     []string
	}{
		{name: "defaults", exchange: "keystone", urls: []string{"amqp://guest:guest@127.0.0.1:5672/"}, keys: []string{"notifications.info"}},
		{name: "file over default", args: []string{"--oslo-config", keystone}, exchange: "file-exchange",
			urls: []string{"amqp://ks:pw@10.0.0.1:5672/ks", "amqp://ks:pw@10.0.0.2:5672/ks"}, keys: []string{"notifications.info", "audit.info"}},
		{name: "--oslo-config from the environment", env: map[string]string{"KEYSTONE_FANOUT_OSLO_CONFIG": keystone}, exchange: "file-exchange",
			urls: []string{"amqp://ks:pw@10.0.0.1:5672/ks", "amqp://ks:pw@10.0.0.2:5672/ks"}, keys: []string{"notifications.info", "audit.info"}},
		{name: "environment over file", args: []string{"--oslo-config", keystone},
			env:      map[string]string{"KEYSTONE_FANOUT_EXCHANGE": "env-exchange", "KEYSTONE_FANOUT_ROUTING_KEY": "env.info"},
			exchange: "env-exchange", urls: []string{"amqp://ks:pw@10.0.0.1:5672/ks", "amqp://ks:pw@10.0.0.2:5672/ks"}, keys: []string{"env.info"}},
		{name: "flag over environment and file", args: []string{"--oslo-config", keystone, "--exchange", "flag-exchange", "--amqp-url", "amqp://flag:pw@10.9.9.9:5672/"},
			env:      map[string]string{"KEYSTONE_FANOUT_EXCHANGE": "env-exchange"},
			exchange: "flag-exchange", urls: []string{"amqp://flag:pw@10.9.9.9:5672/"}, keys: []string{"notifications.info", "audit.info"}},
	}
	for _, tc := range bridgeCases {
		t.Run("bridge/"+tc.name, func(t *testing.T) {
			var f bridgeFlags
			s := config.New("bridge", bridgeUsage, io.Discard)
			f.register(s)
			if err := s.Parse(append(tc.args, "--data-dir", t.TempDir()), func(k string) string { return tc.env[k] }); err != nil {
				t.Fatal(err)
			}
			if err := f.finish(); err != nil {
				t.Fatal(err)
			}
			if err := f.b.Validate(); err != nil {
				t.Fatal(err)
			}
			urls, err := bridge.ParseAMQPURLs(f.b.AMQPURLs) // as the bridge reads them
			if err != nil {
				t.Fatal(err)
			}
			if f.b.Exchange != tc.exchange || !slices.Equal(urls, tc.urls) || !slices.Equal(f.b.RoutingKeys, tc.keys) {
				t.Fatalf("exchange %q urls %q keys %q, want %q %q %q", f.b.Exchange, urls, f.b.RoutingKeys, tc.exchange, tc.urls, tc.keys)
			}
		})
	}

	agentCases := []struct {
		name      string
		args      []string
		env       map[string]string
		memcached string
		cacheTime time.Duration
	}{
		{name: "file over default", args: []string{"--oslo-config", helmNova},
			memcached: "memcached.openstack.svc.cluster.local:11211", cacheTime: 600 * time.Second},
		{name: "environment over file", args: []string{"--oslo-config", helmNova},
			env:       map[string]string{"KEYSTONE_FANOUT_TOKEN_CACHE_TIME": "120"},
			memcached: "memcached.openstack.svc.cluster.local:11211", cacheTime: 120 * time.Second},
		{name: "flag over file", args: []string{"--oslo-config", helmNova, "--memcached", "10.1.1.1:11211"},
			memcached: "10.1.1.1:11211", cacheTime: 600 * time.Second},
		{name: "default when the file does not say", args: []string{"--oslo-config", kollaNova},
			memcached: "192.0.2.11:11211,192.0.2.12:11211,192.0.2.13:11211", cacheTime: 300 * time.Second},
	}
	for _, tc := range agentCases {
		t.Run("agent/"+tc.name, func(t *testing.T) {
			var f agentFlags
			s := config.New("agent", agentUsage, io.Discard)
			f.common.register(s, "")
			f.registerAgent(s)
			if err := s.Parse(append(tc.args, "--region", "regionTwo"), func(k string) string { return tc.env[k] }); err != nil {
				t.Fatal(err)
			}
			if err := f.finish(); err != nil {
				t.Fatal(err)
			}
			if f.o.Memcache.Servers != tc.memcached || f.o.Agent.TokenCacheTime != tc.cacheTime {
				t.Fatalf("memcached %q token-cache-time %s, want %q %s", f.o.Memcache.Servers, f.o.Agent.TokenCacheTime, tc.memcached, tc.cacheTime)
			}
		})
	}
}

// TestOsloConfigErrorsExitTwo: a value that cannot be honoured stops the
// command before it connects, with status 2 and a message naming the file,
// the section and the option.
func TestOsloConfigErrorsExitTwo(t *testing.T) {
	live, accepted := testutil.CountingListener(t)
	noop := writeConf(t, "keystone.conf", "[DEFAULT]\ntransport_url = rabbit://ks:pw@"+live+"/\n[oslo_messaging_notifications]\ndriver = noop\n")
	missingCA := writeConf(t, "keystone.conf", "[DEFAULT]\ntransport_url = rabbit://ks:pw@"+live+"/\n[oslo_messaging_notifications]\ndriver = messagingv2\n"+
		"[oslo_messaging_rabbit]\nssl = true\nssl_ca_file = /nonexistent/ca.pem\n")
	sasl := writeConf(t, "nova.conf", "[keystone_authtoken]\nmemcached_servers = "+live+"\nmemcache_sasl_enabled = true\n")
	noServers := writeConf(t, "nova.conf", "[keystone_authtoken]\nauth_type = password\n[cache]\nmemcache_servers = "+live+"\n")
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"bridge: Keystone sends nothing", []string{"bridge", "--oslo-config", noop, "--nats-url", "nats://" + live},
			[]string{noop + " [oslo_messaging_notifications] driver = noop: no driver publishes to RabbitMQ"}},
		{"all-in-one: Keystone sends nothing", []string{"all-in-one", "--oslo-config", noop, "--memcached", live, "--nats-url", "nats://" + live},
			[]string{noop + " [oslo_messaging_notifications] driver = noop"}},
		{"bridge: a CA file from keystone.conf that does not exist", []string{"bridge", "--oslo-config", missingCA, "--nats-url", "nats://" + live},
			[]string{"--amqp-tls-ca", "(from --oslo-config: --amqp-tls-ca is " + missingCA + " [oslo_messaging_rabbit] ssl_ca_file)"}},
		{"agent: memcached with SASL", []string{"agent", "--oslo-config", sasl, "--region", "r2", "--nats-url", "nats://" + live},
			[]string{sasl + " [keystone_authtoken] memcache_sasl_enabled = true: memcached with SASL speaks only its binary protocol"}},
		{"agent: no memcached_servers", []string{"agent", "--oslo-config", noServers, "--region", "r2", "--nats-url", "nats://" + live},
			[]string{noServers + " [keystone_authtoken] memcached_servers: not set"}},
		{"missing file", []string{"agent", "--oslo-config", "/nonexistent/nova.conf", "--region", "r2", "--nats-url", "nats://" + live},
			[]string{"--oslo-config: stat /nonexistent/nova.conf: no such file or directory"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			args := append(tc.args, "--http-addr", "")
			if tc.args[0] != "agent" {
				args = append(args, "--data-dir", t.TempDir())
			}
			code := run(args, &out, &errOut, func(string) string { return "" })
			all := out.String() + errOut.String()
			if code != 2 {
				t.Fatalf("exit code %d, want 2:\n%s", code, all)
			}
			for _, w := range tc.want {
				if !strings.Contains(all, w) {
					t.Errorf("output lacks %q:\n%s", w, all)
				}
			}
			if strings.Contains(all, "ks:pw@") {
				t.Errorf("output shows a password:\n%s", all)
			}
			if n := accepted.Load(); n != 0 {
				t.Fatalf("%d connection(s) made before the error", n)
			}
		})
	}
}

// TestOsloConfigNotesAreLogged: what keystone.conf asks that the bridge does
// differently is logged at start.
func TestOsloConfigNotesAreLogged(t *testing.T) {
	var f bridgeFlags
	s := config.New("bridge", bridgeUsage, io.Discard)
	f.register(s)
	if err := s.Parse([]string{"--oslo-config", kollaKeystone}, func(string) string { return "" }); err != nil {
		t.Fatal(err)
	}
	if err := f.finish(); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if _, err := f.logger(&buf); err != nil {
		t.Fatal(err)
	}
	if want := `"option":"` + kollaKeystone + ` [oslo_messaging_rabbit] ssl_ca_file"`; !strings.Contains(buf.String(), want) {
		t.Fatalf("log lacks %s:\n%s", want, buf.String())
	}
}
