package osloconfig

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/keystone-fanout/keystone-fanout/bridge"
)

// fixture returns a testdata file's content with each old replaced by new
// (pairs), written as dir/name.
func fixture(t *testing.T, src, name string, replace ...string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for i := 0; i+1 < len(replace); i += 2 {
		if !strings.Contains(s, replace[i]) {
			t.Fatalf("%s has no %q", src, replace[i])
		}
		s = strings.ReplaceAll(s, replace[i], replace[i+1])
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

const (
	kollaKeystone = "testdata/kolla-ansible/keystone.conf"
	helmKeystone  = "testdata/openstack-helm/keystone.conf"
	kollaURL      = "rabbit://openstack:Rk7Qd2vX9mPz4LtW@192.0.2.11:5671,openstack:Rk7Qd2vX9mPz4LtW@192.0.2.12:5671,openstack:Rk7Qd2vX9mPz4LtW@192.0.2.13:5671//"
)

func TestBridge(t *testing.T) {
	for _, tc := range []struct {
		name  string
		paths func(t *testing.T) []string
		// flags: flag -> values wanted (nil: not set by the files)
		flags map[string][]string
		// brokers are the broker URLs the bridge gets from --amqp-url.
		brokers []string
		notes   []string // substrings of the notes
	}{
		{
			name:  "kolla-ansible: ssl=true without ?ssl=1 gives amqps to every host",
			paths: func(*testing.T) []string { return []string{kollaKeystone} },
			flags: map[string][]string{
				"amqp-url":    {kollaURL + "?ssl=1"},
				"amqp-tls-ca": {"/etc/ssl/certs/ca-certificates.crt"},
				"routing-key": {"notifications.info"},
			},
			brokers: []string{
				"amqps://openstack:Rk7Qd2vX9mPz4LtW@192.0.2.11:5671//",
				"amqps://openstack:Rk7Qd2vX9mPz4LtW@192.0.2.12:5671//",
				"amqps://openstack:Rk7Qd2vX9mPz4LtW@192.0.2.13:5671//",
			},
			notes: []string{"keystone.conf [oslo_messaging_rabbit] ssl_ca_file: oslo.messaging checks the broker's certificate chain but not its host name"},
		},
		{
			name:  "openstack-helm: [DEFAULT] transport_url, client certificate, vhost",
			paths: func(*testing.T) []string { return []string{helmKeystone} },
			flags: map[string][]string{
				"amqp-url": {"rabbit://keystone:5f2a9c1e7b3d4086@rabbitmq-rabbitmq-0.rabbitmq.openstack.svc.cluster.local:5672," +
					"keystone:5f2a9c1e7b3d4086@rabbitmq-rabbitmq-1.rabbitmq.openstack.svc.cluster.local:5672," +
					"keystone:5f2a9c1e7b3d4086@rabbitmq-rabbitmq-2.rabbitmq.openstack.svc.cluster.local:5672/keystone?ssl=1"},
				"amqp-tls-ca":   {"/etc/rabbitmq/certs/ca.crt"},
				"amqp-tls-cert": {"/etc/rabbitmq/certs/tls.crt"},
				"amqp-tls-key":  {"/etc/rabbitmq/certs/tls.key"},
			},
			brokers: []string{
				"amqps://keystone:5f2a9c1e7b3d4086@rabbitmq-rabbitmq-0.rabbitmq.openstack.svc.cluster.local:5672/keystone",
				"amqps://keystone:5f2a9c1e7b3d4086@rabbitmq-rabbitmq-1.rabbitmq.openstack.svc.cluster.local:5672/keystone",
				"amqps://keystone:5f2a9c1e7b3d4086@rabbitmq-rabbitmq-2.rabbitmq.openstack.svc.cluster.local:5672/keystone",
			},
		},
		{
			name: "the URL's ?ssl=0 overrides [oslo_messaging_rabbit] ssl",
			paths: func(t *testing.T) []string {
				return []string{fixture(t, kollaKeystone, "keystone.conf", kollaURL+"\ndriver", kollaURL+"?ssl=0\ndriver")}
			},
			flags:   map[string][]string{"amqp-url": {kollaURL}, "amqp-tls-ca": nil},
			brokers: []string{"amqp://openstack:Rk7Qd2vX9mPz4LtW@192.0.2.11:5671//", "amqp://openstack:Rk7Qd2vX9mPz4LtW@192.0.2.12:5671//", "amqp://openstack:Rk7Qd2vX9mPz4LtW@192.0.2.13:5671//"},
		},
		{
			name: "exchange, topics, EXTERNAL login, certificate holding its key",
			paths: func(t *testing.T) []string {
				return []string{fixture(t, helmKeystone, "keystone.conf",
					"[oslo_messaging_notifications]\ndriver = messagingv2", "[oslo_messaging_notifications]\ndriver = messagingv2\ntopics = notifications, audit",
					"[DEFAULT]\n", "[DEFAULT]\ncontrol_exchange = identity\n",
					"ssl_key_file = /etc/rabbitmq/certs/tls.key", "rabbit_login_method = EXTERNAL")}
			},
			flags: map[string][]string{
				"exchange":      {"identity"},
				"routing-key":   {"notifications.info", "audit.info"},
				"amqp-tls-cert": {"/etc/rabbitmq/certs/tls.crt"},
				"amqp-tls-key":  {"/etc/rabbitmq/certs/tls.crt"},
			},
			brokers: []string{
				"amqps://keystone:5f2a9c1e7b3d4086@rabbitmq-rabbitmq-0.rabbitmq.openstack.svc.cluster.local:5672/keystone?auth_mechanism=external",
				"amqps://keystone:5f2a9c1e7b3d4086@rabbitmq-rabbitmq-1.rabbitmq.openstack.svc.cluster.local:5672/keystone?auth_mechanism=external",
				"amqps://keystone:5f2a9c1e7b3d4086@rabbitmq-rabbitmq-2.rabbitmq.openstack.svc.cluster.local:5672/keystone?auth_mechanism=external",
			},
		},
		{
			name: "a later file overrides an earlier one",
			paths: func(t *testing.T) []string {
				return []string{kollaKeystone, stackFile(t, "override.conf", "[oslo_messaging_notifications]\ntransport_url = rabbit://ks:pw@10.1.0.5:5672/\n[oslo_messaging_rabbit]\nssl = false\n")}
			},
			flags:   map[string][]string{"amqp-url": {"rabbit://ks:pw@10.1.0.5:5672/"}, "amqp-tls-ca": nil},
			brokers: []string{"amqp://ks:pw@10.1.0.5:5672/"},
		},
		{
			name: "no transport_url: oslo.messaging's default",
			paths: func(t *testing.T) []string {
				return []string{stackFile(t, "keystone.conf", "[oslo_messaging_notifications]\ndriver = messagingv2\n")}
			},
			flags:   map[string][]string{"amqp-url": {"rabbit://guest:guest@localhost:5672/"}},
			brokers: []string{"amqp://guest:guest@localhost:5672/"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Load(tc.paths(t))
			if err != nil {
				t.Fatal(err)
			}
			got := Bridge(s)
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
			urls, err := bridge.ParseAMQPURLs(got.Flags["amqp-url"].Values)
			if err != nil || !slices.Equal(urls, tc.brokers) {
				t.Errorf("brokers %q (err %v), want %q", urls, err, tc.brokers)
			}
			for _, n := range tc.notes {
				if !slices.ContainsFunc(got.Notes, func(x Note) bool { return strings.Contains(x.String(), n) }) {
					t.Errorf("notes %v lack %q", got.Notes, n)
				}
			}
		})
	}
}

// stackFile writes one file and returns its path.
func stackFile(t *testing.T, name, conf string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestBridgeErrors: every value the bridge cannot honour is an error naming
// the file, the section and the option.
func TestBridgeErrors(t *testing.T) {
	for _, tc := range []struct {
		name    string
		replace []string // on the kolla-ansible keystone.conf
		flag    string   // the flag the error belongs to; empty: whatever the flags
		want    string
	}{
		{"driver noop", []string{"driver = messagingv2", "driver = noop"}, "",
			"keystone.conf [oslo_messaging_notifications] driver = noop: no driver publishes to RabbitMQ (noop, log, test and routing do not), so Keystone tells the bridge nothing: set driver = messagingv2"},
		{"no driver", []string{"driver = messagingv2\n", ""}, "",
			"keystone.conf [oslo_messaging_notifications] driver: not set: oslo.messaging then sends no notifications"},
		{"notification_opt_out of a token-affecting type", []string{"debug = False", "debug = False\nnotification_opt_out = identity.authenticate.success\nnotification_opt_out = identity.user.updated"}, "",
			"keystone.conf [DEFAULT] notification_opt_out = identity.user.updated: Keystone does not send this notification"},
		{"kafka transport", []string{kollaURL + "\ndriver", "kafka://192.0.2.20:9092/\ndriver"}, "amqp-url",
			"keystone.conf [oslo_messaging_notifications] transport_url = kafka://192.0.2.20:9092/: the kafka transport is not RabbitMQ"},
		{"AMQP 1.0 transport", []string{kollaURL + "\ndriver", "amqp://openstack:secret@192.0.2.20:5672/\ndriver"}, "amqp-url",
			"transport_url = amqp://openstack:xxxxx@192.0.2.20:5672/: amqp:// is oslo.messaging's AMQP 1.0 driver"},
		{"RABBIT-CR-DEMO login", []string{"ssl = true", "ssl = true\nrabbit_login_method = RABBIT-CR-DEMO"}, "amqp-url",
			"keystone.conf [oslo_messaging_rabbit] rabbit_login_method = RABBIT-CR-DEMO: the bridge logs in with PLAIN, AMQPLAIN or EXTERNAL only"},
		{"ssl not a boolean", []string{"ssl = true", "ssl = sometimes"}, "amqp-url",
			"keystone.conf [oslo_messaging_rabbit] ssl = sometimes: not a boolean: write true or false"},
		{"FIPS mode asked, Go's is off", []string{"ssl = true", "ssl = true\nssl_enforce_fips_mode = true"}, "",
			"keystone.conf [oslo_messaging_rabbit] ssl_enforce_fips_mode = true: Go's FIPS 140-3 mode is off in this process: start keystone-fanout with GODEBUG=fips140=on"},
		{"substitution of an unset option", []string{"ssl_ca_file = /etc/ssl/certs/ca-certificates.crt", "ssl_ca_file = $ca_dir/ca.pem"}, "amqp-tls-ca",
			"keystone.conf [oslo_messaging_rabbit] ssl_ca_file: refers to $ca_dir, which these files do not set"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Load([]string{fixture(t, kollaKeystone, "keystone.conf", tc.replace...)})
			if err != nil {
				t.Fatal(err)
			}
			got := Bridge(s)
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
			if !strings.Contains(msg, filepath.Join(filepath.Dir(s.Files()[0]), "keystone.conf")) {
				t.Fatalf("error %q does not name the file", msg)
			}
			if strings.Contains(msg, "Rk7Qd2vX9mPz4LtW") || strings.Contains(msg, ":secret@") {
				t.Fatalf("error %q shows a password", msg)
			}
		})
	}
}
