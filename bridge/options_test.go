package bridge

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

func TestParseAMQPURLs(t *testing.T) {
	tests := []struct {
		name string
		in   []string
		want []string
	}{
		{"amqp single", []string{"amqp://guest:guest@127.0.0.1:5672/"}, []string{"amqp://guest:guest@127.0.0.1:5672/"}},
		{"amqp without path", []string{"amqp://u:p@h"}, []string{"amqp://u:p@h"}},
		{"amqps kept", []string{"amqps://u:p@h:5671/vh"}, []string{"amqps://u:p@h:5671/vh"}},
		{"comma separated", []string{"amqp://a:5672/, amqps://b:5671/"}, []string{"amqp://a:5672/", "amqps://b:5671/"}},
		{"repeated flag", []string{"amqp://a/", "amqp://b/"}, []string{"amqp://a/", "amqp://b/"}},
		{"duplicates dropped", []string{"amqp://a/", "amqp://a/,amqp://b/"}, []string{"amqp://a/", "amqp://b/"}},
		{"empty values ignored", []string{"", " amqp://a/ ", ","}, []string{"amqp://a/"}},
		{"rabbit one host", []string{"rabbit://u:p@h1:5672/"}, []string{"amqp://u:p@h1:5672/"}},
		{"rabbit several hosts share vhost",
			[]string{"rabbit://u:p@host1:5672,u:p@host2:5672/vhost"},
			[]string{"amqp://u:p@host1:5672/vhost", "amqp://u:p@host2:5672/vhost"}},
		{"rabbit hosts with own credentials and default port",
			[]string{"rabbit://a:1@h1,b:2@h2:5673/"},
			[]string{"amqp://a:1@h1/", "amqp://b:2@h2:5673/"}},
		{"rabbit host without credentials gets none",
			[]string{"rabbit://a:1@h1,h2/"},
			[]string{"amqp://a:1@h1/", "amqp://h2/"}},
		{"rabbit ssl=1 means amqps",
			[]string{"rabbit://u:p@h1:5671,u:p@h2:5671/vh?ssl=1"},
			[]string{"amqps://u:p@h1:5671/vh", "amqps://u:p@h2:5671/vh"}},
		{"ssl=true on amqp", []string{"amqp://u:p@h/?ssl=true"}, []string{"amqps://u:p@h/"}},
		{"ssl=0 keeps amqp", []string{"rabbit://u:p@h/?ssl=0"}, []string{"amqp://u:p@h/"}},
		{"other query parameters kept",
			[]string{"rabbit://u:p@h1,u:p@h2/?ssl=yes&heartbeat=5"},
			[]string{"amqps://u:p@h1/?heartbeat=5", "amqps://u:p@h2/?heartbeat=5"}},
		{"encoded vhost slash", []string{"amqp://u:p@h/%2F"}, []string{"amqp://u:p@h/%2F"}},
		{"encoded password", []string{"rabbit://u:p%40ss%2Cword@h1,u:x@h2/"},
			[]string{"amqp://u:p%40ss%2Cword@h1/", "amqp://u:x@h2/"}},
		{"ipv6 hosts", []string{"rabbit://u:p@[::1]:5672,u:p@[fe80::2]:5672/"},
			[]string{"amqp://u:p@[::1]:5672/", "amqp://u:p@[fe80::2]:5672/"}},
		{"scheme case-insensitive", []string{"RABBIT://u:p@h/"}, []string{"amqp://u:p@h/"}},
		{"rabbit and amqp in one value", []string{"rabbit://u:p@h1,u:p@h2/v,amqp://h3/"},
			[]string{"amqp://u:p@h1/v", "amqp://u:p@h2/v", "amqp://h3/"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseAMQPURLs(tc.in)
			if err != nil {
				t.Fatalf("ParseAMQPURLs(%q): %v", tc.in, err)
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("ParseAMQPURLs(%q)\n got %q\nwant %q", tc.in, got, tc.want)
			}
		})
	}
}

func TestParseAMQPURLsErrors(t *testing.T) {
	tests := []struct {
		name    string
		in      []string
		wantErr string // substring
	}{
		{"nothing", nil, "--amqp-url: no broker URL"},
		{"only blanks", []string{" ", ","}, "--amqp-url: no broker URL"},
		{"wrong scheme", []string{"http://h/"}, `scheme "http" is not supported`},
		{"no scheme", []string{"h1:5672"}, "has no scheme"},
		{"empty host in list", []string{"rabbit://u:p@h1,,h2/"}, "empty host"},
		{"bad port", []string{"amqp://h:port/"}, "--amqp-url"},
		{"amqps with ssl=0", []string{"amqps://h/?ssl=0"}, "drop ssl=0"},
		{"ssl nonsense", []string{"rabbit://h/?ssl=maybe"}, `ssl="maybe"`},
		{"white space", []string{"amqp://h/v host"}, "white space"},
		{"fragment", []string{"amqp://u:p#x@h/"}, "fragment"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseAMQPURLs(tc.in)
			if err == nil {
				t.Fatalf("ParseAMQPURLs(%q) = %q, want an error containing %q", tc.in, got, tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("ParseAMQPURLs(%q) error %q, want it to contain %q", tc.in, err, tc.wantErr)
			}
		})
	}
}

func TestParseAMQPURLsHidesPasswords(t *testing.T) {
	for _, in := range []string{"rabbit://u:secret@h1,,h2/", "http://u:secret@h/", "u:secret@h"} {
		_, err := ParseAMQPURLs([]string{in})
		if err == nil || strings.Contains(err.Error(), "secret") {
			t.Errorf("ParseAMQPURLs(%q) error %v: want an error without the password", in, err)
		}
	}
}

func validOptions() Options {
	return Options{AMQPURLs: []string{"amqp://guest:guest@127.0.0.1:5672/"}}
}

func TestValidateDefaults(t *testing.T) {
	o := validOptions()
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"Exchange", o.Exchange, "keystone"},
		{"RoutingKeys", strings.Join(o.RoutingKeys, ","), "notifications.info"},
		{"Queue", o.Queue, "keystone-fanout"},
		{"QueueType", o.QueueType, "quorum"},
		{"Heartbeat", o.Heartbeat, 10 * time.Second},
		{"Prefetch", o.Prefetch, 256},
		{"PublishWindow", o.PublishWindow, 256},
		{"PubAckTimeout", o.PubAckTimeout, 5 * time.Second},
		{"MaxBodySize", o.MaxBodySize, 1 << 20},
		{"ShutdownTimeout", o.ShutdownTimeout, 10 * time.Second},
		{"Filter", strings.Join(o.Filter, ","), strings.Join(event.DefaultFilter, ",")},
		{"Stream.Name", o.Stream.Name, "KEYSTONE"},
		{"Stream.SubjectPrefix", o.Stream.SubjectPrefix, "keystone"},
		{"Stream.MaxAge", o.Stream.MaxAge, 24 * time.Hour},
		{"Stream.Replicas", o.Stream.Replicas, 1},
		{"Stream.DuplicateWindow", o.Stream.DuplicateWindow, 10 * time.Minute},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
}

func TestBrokerURLsNormalisedWithPassword(t *testing.T) {
	given := []string{"rabbit://u:old@h1,u:old@h2/vh?ssl=1"}
	o := Options{AMQPURLs: slices.Clone(given), AMQPPassword: "n:e,w@"}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(o.AMQPURLs, given) {
		t.Fatalf("Validate changed AMQPURLs to %q: it fills defaults only", o.AMQPURLs)
	}
	got, err := o.brokerURLs()
	want := []string{"amqps://u:n%3Ae%2Cw%40@h1/vh", "amqps://u:n%3Ae%2Cw%40@h2/vh"}
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("brokerURLs = %q, %v; want %q", got, err, want)
	}
}

func TestValidateErrors(t *testing.T) {
	tests := []struct {
		name    string
		mod     func(*Options)
		wantErr string
	}{
		{"no url", func(o *Options) { o.AMQPURLs = nil }, "--amqp-url"},
		{"tls options on plain amqp", func(o *Options) { o.TLS.CAFile = "/nonexistent" }, "--amqp-url"},
		{"tls ca missing", func(o *Options) { o.AMQPURLs = []string{"amqps://h/"}; o.TLS.CAFile = "/nonexistent" }, "--amqp-tls-ca"},
		{"tls cert without key", func(o *Options) { o.AMQPURLs = []string{"amqps://h/"}; o.TLS.CertFile = "/x" }, "--amqp-tls-cert and --amqp-tls-key"},
		{"reserved exchange", func(o *Options) { o.Exchange = "amq.topic" }, "--exchange"},
		{"empty routing key", func(o *Options) { o.RoutingKeys = []string{""} }, "--routing-key"},
		{"queue is oslo's", func(o *Options) { o.Queue = "notifications.info" }, "--queue"},
		{"reserved queue", func(o *Options) { o.Queue = "amq.gen-x" }, "--queue"},
		{"long queue", func(o *Options) { o.Queue = strings.Repeat("q", 256) }, "--queue"},
		{"queue type", func(o *Options) { o.QueueType = "stream" }, "--queue-type"},
		{"dlx is keystone", func(o *Options) { o.DeadLetterExchange = "keystone" }, "--dead-letter-exchange"},
		{"heartbeat too short", func(o *Options) { o.Heartbeat = time.Millisecond }, "--amqp-heartbeat"},
		{"negative prefetch", func(o *Options) { o.Prefetch = -1 }, "--prefetch"},
		{"huge window", func(o *Options) { o.PublishWindow = 1 << 20 }, "--publish-window"},
		{"negative puback timeout", func(o *Options) { o.PubAckTimeout = -time.Second }, "--puback-timeout"},
		{"tiny body size", func(o *Options) { o.MaxBodySize = 10 }, "--max-body-size"},
		{"bad filter", func(o *Options) { o.Filter = []string{"identity.["} }, "--filter"},
		{"reconnect max below min", func(o *Options) { o.ReconnectMin = time.Second; o.ReconnectMax = time.Millisecond }, "--amqp-reconnect-max"},
		{"stream name", func(o *Options) { o.Stream.Name = "a.b" }, "--stream"},
		{"subject prefix wildcard", func(o *Options) { o.Stream.SubjectPrefix = "keystone.*" }, "--subject-prefix"},
		{"subject prefix empty token", func(o *Options) { o.Stream.SubjectPrefix = "a..b" }, "--subject-prefix"},
		{"max age", func(o *Options) { o.Stream.MaxAge = time.Second }, "--stream-max-age"},
		{"replicas", func(o *Options) { o.Stream.Replicas = 7 }, "--stream-replicas"},
		{"duplicate window above max age", func(o *Options) { o.Stream.MaxAge = time.Minute; o.Stream.DuplicateWindow = time.Hour }, "--stream-duplicate-window"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := validOptions()
			tc.mod(&o)
			err := o.Validate()
			if err == nil {
				t.Fatalf("Validate() = nil, want an error naming %s", tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Validate() = %q, want it to name %s", err, tc.wantErr)
			}
		})
	}
}

func TestEmptyFilterFiltersNothing(t *testing.T) {
	o := validOptions()
	o.Filter = []string{}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(o.Filter) != 0 {
		t.Fatalf("Filter = %q, want it left empty", o.Filter)
	}
}

func TestMetricLabelsBounded(t *testing.T) {
	tests := []struct{ in, want string }{
		{"identity.authenticate", "identity.authenticate"},
		{"identity.user.created", "identity.user.created"},
		{"identity.OS-TRUST:trust.created", "identity.OS-TRUST:trust.created"},
		{"identity.random-garbage-" + strings.Repeat("x", 100), "other"},
		{"compute.instance.create", "other"},
	}
	for _, tc := range tests {
		if got := filteredLabel(tc.in); got != tc.want {
			t.Errorf("filteredLabel(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
	m, err := newMetrics(prometheus.NewRegistry(), func() float64 { return 0 })
	if err != nil {
		t.Fatal(err)
	}
	m.widenedCounter("something new").Inc()
	if got := promtest.ToFloat64(m.widened.WithLabelValues(widenOther)); got != 1 {
		t.Errorf("widened_total{reason=other} = %v after an unknown reason, want 1", got)
	}
}
