package osloconfig

import (
	"slices"
	"strings"
	"testing"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
)

const (
	kollaNova = "testdata/kolla-ansible/nova.conf"
	helmNova  = "testdata/openstack-helm/nova.conf"
	helmNovaD = "testdata/openstack-helm/nova.conf.d"
)

func TestAgent(t *testing.T) {
	for _, tc := range []struct {
		name     string
		paths    []string
		flags    map[string][]string
		strategy string
		notes    []string
	}{
		{
			name:  "kolla-ansible nova.conf: three servers, ENCRYPT",
			paths: []string{kollaNova},
			flags: map[string][]string{
				"memcached":        {"192.0.2.11:11211,192.0.2.12:11211,192.0.2.13:11211"},
				"token-cache-time": nil,
				"memcached-tls":    nil,
			},
			strategy: "ENCRYPT",
			notes:    []string{"nova.conf [keystone_authtoken] memcache_security_strategy: an ENCRYPT entry cannot be read without its token"},
		},
		{
			name:  "openstack-helm nova.conf: token_cache_time",
			paths: []string{helmNova},
			flags: map[string][]string{
				"memcached":        {"memcached.openstack.svc.cluster.local:11211"},
				"token-cache-time": {"600"},
			},
			strategy: "ENCRYPT",
		},
		{
			name:  "openstack-helm nova.conf.d overrides: TLS, multi-line server list, mac",
			paths: []string{helmNova, helmNovaD},
			flags: map[string][]string{
				"memcached":          {"memcached-0.memcached.openstack.svc.cluster.local:11211,memcached-1.memcached.openstack.svc.cluster.local:11211"},
				"token-cache-time":   {"600"},
				"memcached-tls":      {"true"},
				"memcached-tls-ca":   {"/etc/memcached/certs/ca.crt"},
				"memcached-tls-cert": {"/etc/memcached/certs/tls.crt"},
				"memcached-tls-key":  {"/etc/memcached/certs/tls.key"},
			},
			strategy: "MAC",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Load(tc.paths)
			if err != nil {
				t.Fatal(err)
			}
			got := Agent(s)
			if len(got.Errs) > 0 {
				t.Fatalf("errors: %v", got.Errs)
			}
			for flag, want := range tc.flags {
				st, ok := got.Flags[flag]
				if want == nil {
					if ok {
						t.Errorf("--%s = %q from %s, want it unset", flag, st.Values, st.From)
					}
					continue
				}
				if st.Err != nil || !slices.Equal(st.Values, want) {
					t.Errorf("--%s = %q (err %v), want %q", flag, st.Values, st.Err, want)
				}
			}
			if _, err := memcache.ParseServers(got.Flags["memcached"].Values[0]); err != nil {
				t.Errorf("--memcached does not parse: %v", err)
			}
			if got.SecurityStrategy != tc.strategy {
				t.Errorf("strategy %q, want %q", got.SecurityStrategy, tc.strategy)
			}
			for _, n := range tc.notes {
				if !slices.ContainsFunc(got.Notes, func(x Note) bool { return strings.Contains(x.String(), n) }) {
					t.Errorf("notes %v lack %q", got.Notes, n)
				}
			}
		})
	}
}

func TestAgentErrors(t *testing.T) {
	const servers = "memcached_servers = 192.0.2.11:11211,192.0.2.12:11211,192.0.2.13:11211"
	for _, tc := range []struct {
		name    string
		replace []string // on the kolla-ansible nova.conf
		flag    string   // the flag the error belongs to; empty: whatever the flags
		want    string
	}{
		{"no memcached_servers, only [cache]", []string{servers + "\n", ""}, "memcached",
			"nova.conf [keystone_authtoken] memcached_servers: not set: the middleware then caches tokens inside each service process"},
		{"WSGI environment cache", []string{servers, servers + "\ncache = swift.cache"}, "",
			"nova.conf [keystone_authtoken] cache = swift.cache: the middleware caches tokens in the WSGI environment's cache"},
		{"caching off", []string{servers, servers + "\ntoken_cache_time = -1"}, "",
			"nova.conf [keystone_authtoken] token_cache_time = -1: the middleware caches no token"},
		{"entries that never expire", []string{servers, servers + "\ntoken_cache_time = 0"}, "token-cache-time",
			"nova.conf [keystone_authtoken] token_cache_time = 0: memcached then keeps each entry until the token itself expires: give --token-cache-time"},
		{"token_cache_time not a number", []string{servers, servers + "\ntoken_cache_time = 5m"}, "token-cache-time",
			"nova.conf [keystone_authtoken] token_cache_time = 5m: not a whole number of seconds"},
		{"unknown strategy", []string{"memcache_security_strategy = ENCRYPT", "memcache_security_strategy = AES"}, "",
			"nova.conf [keystone_authtoken] memcache_security_strategy = AES: not a strategy keystonemiddleware knows: write None, MAC or ENCRYPT"},
		{"SASL", []string{servers, servers + "\nmemcache_sasl_enabled = true\nmemcache_username = nova\nmemcache_password = pw"}, "",
			"nova.conf [keystone_authtoken] memcache_sasl_enabled = true: memcached with SASL speaks only its binary protocol"},
		{"memcache_tls_enabled not a boolean", []string{servers, servers + "\nmemcache_tls_enabled = maybe"}, "memcached-tls",
			"nova.conf [keystone_authtoken] memcache_tls_enabled = maybe: not a boolean"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Load([]string{fixture(t, kollaNova, "nova.conf", tc.replace...)})
			if err != nil {
				t.Fatal(err)
			}
			got := Agent(s)
			var msg string
			if tc.flag == "" {
				for _, e := range got.Errs {
					msg += e.Error() + "\n"
				}
			} else if st := got.Flags[tc.flag]; st.Err != nil {
				msg = st.Err.Error()
			}
			if !strings.Contains(msg, tc.want) {
				t.Fatalf("errors %q, want %q", msg, tc.want)
			}
		})
	}
}

// TestAgentNotes: what the middleware asks that the agent does differently
// is said, not an error.
func TestAgentNotes(t *testing.T) {
	s, err := Load([]string{helmNova, stackFile(t, "60-ciphers.conf",
		"[keystone_authtoken]\nmemcache_tls_enabled = true\nmemcache_tls_certfile = /etc/mc/both.pem\nmemcache_tls_allowed_ciphers = ECDHE+AESGCM\n")})
	if err != nil {
		t.Fatal(err)
	}
	got := Agent(s)
	if len(got.Errs) > 0 {
		t.Fatal(got.Errs)
	}
	if k := got.Flags["memcached-tls-key"].Values; !slices.Equal(k, []string{"/etc/mc/both.pem"}) {
		t.Errorf("--memcached-tls-key %q, want the certificate file (Python reads the key from it)", k)
	}
	if !slices.ContainsFunc(got.Notes, func(n Note) bool {
		return strings.Contains(n.String(), "60-ciphers.conf [keystone_authtoken] memcache_tls_allowed_ciphers: the agent uses Go's TLS 1.2 and 1.3 cipher suites")
	}) {
		t.Errorf("notes %v lack the cipher list", got.Notes)
	}
}
