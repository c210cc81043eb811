package osloconfig

import (
	"crypto/fips140"
	"fmt"
	"net/url"
	"slices"
	"strings"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

// Sections of keystone.conf the bridge reads.
const (
	sectionNotifications = "oslo_messaging_notifications"
	sectionRabbit        = "oslo_messaging_rabbit"
)

// publishingDrivers are the oslo.messaging notification drivers that publish
// to the message bus: messagingv2 (the envelope) and messaging (the older
// form without it). Both are decoded by the bridge.
var publishingDrivers = []string{"messagingv2", "messaging"}

// Bridge maps Keystone's keystone.conf onto the bridge's flags:
//
//	--amqp-url     [oslo_messaging_notifications] transport_url, else [DEFAULT] transport_url;
//	               TLS on when [oslo_messaging_rabbit] ssl (or the URL's ?ssl=) is true
//	--amqp-tls-ca, --amqp-tls-cert, --amqp-tls-key
//	               [oslo_messaging_rabbit] ssl_ca_file, ssl_cert_file, ssl_key_file (with ssl)
//	--exchange     [DEFAULT] control_exchange
//	--routing-key  <topic>.info for each of [oslo_messaging_notifications] topics
//
// It fails when Keystone sends no notifications to RabbitMQ
// ([oslo_messaging_notifications] driver), sends them over another transport,
// opts out of a type that makes cached tokens stale
// ([DEFAULT] notification_opt_out), or asks for what the bridge cannot do.
// Query parameters of transport_url override [oslo_messaging_rabbit], as in
// oslo.messaging.
func Bridge(s *Stack) Settings {
	var out Settings
	checkDrivers(s, &out)
	checkOptOut(s, &out)
	transportURL(s, &out)

	if v, ok, err := s.Get("DEFAULT", "control_exchange"); err != nil {
		out.fail("exchange", err)
	} else if ok {
		if strings.TrimSpace(v.Text) == "" {
			out.fail("exchange", &Error{Where: v.Where, Problem: "empty", Fix: "give Keystone's exchange name (default keystone)"})
		} else {
			out.set("exchange", v.Where, strings.TrimSpace(v.Text))
		}
	}

	if v, ok, err := s.Get(sectionNotifications, "topics", "rpc_notifier2/topics", "DEFAULT/notification_topics"); err != nil {
		out.fail("routing-key", err)
	} else if ok {
		topics := listValue(v)
		if len(topics) == 0 {
			out.fail("routing-key", &Error{Where: v.Where, Problem: "no topic", Fix: "give the topics Keystone publishes to (default notifications)"})
		} else {
			keys := make([]string, len(topics))
			for i, t := range topics {
				// Keystone sends every notification at priority info.
				keys[i] = t + ".info"
			}
			out.set("routing-key", v.Where, keys...)
		}
	}
	return out
}

// checkDrivers fails unless a driver publishes to the message bus.
func checkDrivers(s *Stack, out *Settings) {
	drivers, err := s.All(sectionNotifications, "driver", "DEFAULT/notification_driver")
	if err != nil {
		out.err(err)
		return
	}
	for _, d := range drivers {
		for _, name := range listValue(d) {
			if slices.Contains(publishingDrivers, name) {
				return
			}
		}
	}
	fix := "set driver = messagingv2 in [oslo_messaging_notifications] of Keystone's configuration and restart Keystone"
	if len(drivers) == 0 {
		out.err(&Error{Where: Where{File: s.joinFiles(), Section: sectionNotifications, Option: "driver"},
			Problem: "not set: oslo.messaging then sends no notifications, so Keystone tells the bridge nothing", Fix: fix})
		return
	}
	last := drivers[len(drivers)-1]
	var vals []string
	for _, d := range drivers {
		vals = append(vals, d.Text)
	}
	out.err(&Error{Where: last.Where, Value: strings.Join(vals, ", "),
		Problem: "no driver publishes to RabbitMQ (noop, log, test and routing do not), so Keystone tells the bridge nothing", Fix: fix})
}

// checkOptOut fails when Keystone is told not to send a type that makes
// cached tokens stale.
func checkOptOut(s *Stack, out *Settings) {
	optOut, err := s.All("DEFAULT", "notification_opt_out")
	if err != nil {
		out.err(err)
		return
	}
	known := event.KnownTypes()
	for _, v := range optOut {
		for _, t := range listValue(v) {
			if slices.Contains(known, t) {
				out.err(&Error{Where: v.Where, Value: t,
					Problem: "Keystone does not send this notification, and cached tokens it makes stale would stay valid in every region",
					Fix:     "remove this line from Keystone's configuration"})
			}
		}
	}
}

// rabbitOption is one [oslo_messaging_rabbit] option, from the URL's query
// when it has it, else from the files.
type rabbitOption struct {
	Value
	set bool
}

// transportURL maps the transport URL and the RabbitMQ TLS options.
func transportURL(s *Stack, out *Settings) {
	tu, ok, err := s.Get(sectionNotifications, "transport_url", "DEFAULT/notification_transport_url")
	if err == nil && !ok {
		tu, ok, err = s.Get("DEFAULT", "transport_url")
	}
	if err != nil {
		out.fail("amqp-url", err)
		return
	}
	if !ok || strings.TrimSpace(tu.Text) == "" {
		// oslo.messaging's default, rabbit://, is guest on localhost: the
		// bridge's own default. TLS options may still apply to it.
		tu = Value{Text: "rabbit://guest:guest@localhost:5672/", Where: Where{File: s.joinFiles(), Section: "DEFAULT", Option: "transport_url"}}
	}
	raw := strings.TrimSpace(tu.Text)
	bad := func(problem, fix string) {
		out.fail("amqp-url", &Error{Where: tu.Where, Value: redact(raw), Problem: problem, Fix: fix})
	}
	scheme, rest, found := strings.Cut(raw, "://")
	if !found {
		bad("not a URL", "write it as rabbit://user:password@host:5672/vhost")
		return
	}
	switch strings.ToLower(scheme) {
	case "rabbit", "kombu":
	case "amqp":
		bad("amqp:// is oslo.messaging's AMQP 1.0 driver (a message router, not RabbitMQ's exchanges and queues), which the bridge does not read",
			"publish Keystone's notifications to RabbitMQ with a rabbit:// transport_url in [oslo_messaging_notifications]")
		return
	default:
		bad(fmt.Sprintf("the %s transport is not RabbitMQ, which is what the bridge reads", scheme),
			"publish Keystone's notifications to RabbitMQ with a rabbit:// transport_url in [oslo_messaging_notifications]")
		return
	}
	netloc, tail := rest, ""
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		netloc, tail = rest[:i], rest[i:]
	}
	path, rawQuery, _ := strings.Cut(tail, "?")
	query, qerr := url.ParseQuery(rawQuery)
	if qerr != nil {
		bad("its query does not parse: "+qerr.Error(), "percent-encode reserved characters")
		return
	}
	// Every query parameter is an [oslo_messaging_rabbit] option that
	// overrides the file's (oslo.messaging's ConfigOptsProxy).
	opt := func(option string, deprecated ...string) (rabbitOption, error) {
		if vs, ok := query[option]; ok && len(vs) > 0 {
			return rabbitOption{Value: Value{Text: vs[len(vs)-1],
				Where: Where{File: tu.Where.File, Section: tu.Where.Section, Option: tu.Where.Option + " (query " + option + ")"}}, set: true}, nil
		}
		v, ok, err := s.Get(sectionRabbit, option, deprecated...)
		return rabbitOption{Value: v, set: ok}, err
	}
	var params []string
	sslOpt, err := opt("ssl", "rabbit_use_ssl")
	if err != nil {
		out.fail("amqp-url", err)
		return
	}
	tlsOn := false
	if sslOpt.set {
		if tlsOn, err = boolValue(sslOpt.Value); err != nil {
			out.fail("amqp-url", err)
			return
		}
	}
	if tlsOn {
		params = append(params, "ssl=1")
		if !rabbitTLS(opt, out) {
			return
		}
	}
	login, err := opt("rabbit_login_method")
	if err != nil {
		out.fail("amqp-url", err)
		return
	}
	if login.set {
		switch strings.ToUpper(strings.TrimSpace(login.Text)) {
		case "AMQPLAIN", "PLAIN":
			// The bridge logs in with PLAIN, which RabbitMQ accepts for the
			// same users as AMQPLAIN.
		case "EXTERNAL":
			params = append(params, "auth_mechanism=external")
		default:
			out.fail("amqp-url", &Error{Where: login.Where, Value: login.Text,
				Problem: "the bridge logs in with PLAIN, AMQPLAIN or EXTERNAL only",
				Fix:     "give the bridge its own --amqp-url with a user that logs in with a password"})
			return
		}
	}
	u := "rabbit://" + netloc + path
	if len(params) > 0 {
		u += "?" + strings.Join(params, "&")
	}
	out.set("amqp-url", tu.Where, u)
}

// rabbitTLS maps the TLS options of an ssl connection; false when one is
// an error (recorded in out).
func rabbitTLS(opt func(string, ...string) (rabbitOption, error), out *Settings) bool {
	files := []struct{ option, deprecated, flag string }{
		{"ssl_ca_file", "kombu_ssl_ca_certs", "amqp-tls-ca"},
		{"ssl_cert_file", "kombu_ssl_certfile", "amqp-tls-cert"},
		{"ssl_key_file", "kombu_ssl_keyfile", "amqp-tls-key"},
	}
	got := map[string]rabbitOption{}
	for _, f := range files {
		v, err := opt(f.option, f.deprecated)
		if err != nil {
			out.fail(f.flag, err)
			return false
		}
		if v.set && strings.TrimSpace(v.Text) != "" {
			v.Text = strings.TrimSpace(v.Text)
			got[f.option] = v
			out.set(f.flag, v.Where, v.Text)
		}
	}
	// Python's ssl takes the key from the certificate file when no key file
	// is given.
	if c, ok := got["ssl_cert_file"]; ok {
		if _, ok := got["ssl_key_file"]; !ok {
			out.set("amqp-tls-key", c.Where, c.Text)
		}
	}
	if ca, ok := got["ssl_ca_file"]; ok {
		hv, err := opt("ssl_enforce_hostname_verification")
		if err != nil {
			out.fail("amqp-tls-ca", err)
			return false
		}
		enforce := false
		if hv.set {
			if enforce, err = boolValue(hv.Value); err != nil {
				out.fail("amqp-tls-ca", err)
				return false
			}
		}
		if !enforce {
			out.note(ca.Where, "oslo.messaging checks the broker's certificate chain but not its host name; the bridge checks both: "+
				"if the certificate does not name the host of the transport URL, give --amqp-tls-server-name")
		}
	} else if ssl, err := opt("ssl"); err == nil {
		out.note(ssl.Where, "without ssl_ca_file oslo.messaging does not check the broker's certificate; the bridge checks it against the system's CAs: "+
			"give --amqp-tls-ca if the broker's CA is not among them")
	}
	if v, err := opt("ssl_version", "kombu_ssl_version"); err == nil && v.set {
		switch strings.ToLower(strings.TrimSpace(v.Text)) {
		case "tlsv1", "tlsv1_1", "sslv2", "sslv3":
			out.note(v.Where, fmt.Sprintf("the bridge speaks TLS 1.2 or 1.3 whatever ssl_version (%s) asks of Keystone's connection", v.Text))
		}
	}
	fips, err := opt("ssl_enforce_fips_mode")
	if err != nil {
		out.fail("amqp-url", err)
		return false
	}
	if fips.set {
		on, err := boolValue(fips.Value)
		if err != nil {
			out.fail("amqp-url", err)
			return false
		}
		if on && !fips140.Enabled() {
			out.err(&Error{Where: fips.Where, Value: fips.Text,
				Problem: "Go's FIPS 140-3 mode is off in this process",
				Fix:     "start keystone-fanout with GODEBUG=fips140=on in its environment"})
		}
	}
	return true
}

// redact hides the passwords of a transport URL with several hosts.
func redact(raw string) string {
	scheme, rest, found := strings.Cut(raw, "://")
	if !found {
		return raw
	}
	netloc, tail := rest, ""
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		netloc, tail = rest[:i], rest[i:]
	}
	hosts := strings.Split(netloc, ",")
	for i, h := range hosts {
		at := strings.LastIndex(h, "@")
		if at < 0 {
			continue
		}
		if user, _, ok := strings.Cut(h[:at], ":"); ok {
			hosts[i] = user + ":xxxxx" + h[at:]
		}
	}
	return scheme + "://" + strings.Join(hosts, ",") + tail
}
