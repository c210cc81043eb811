package doctor

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/keystone-fanout/keystone-fanout/internal/tlsconf"
)

// rabbitmq checks every broker, then, on the first that accepted the
// bridge's login, Keystone's exchange, the bridge's queue and the queues
// Keystone's notifier declares.
func rabbitmq(ctx context.Context, o *BridgeOptions, r *Report) {
	var tlsCfg *tls.Config
	if o.AMQPTLS != (tlsconf.Files{}) {
		var err error
		tlsCfg, err = tlsconf.Load(o.AMQPTLS, tlsconf.FlagNames{CA: "--amqp-tls-ca", Cert: "--amqp-tls-cert", Key: "--amqp-tls-key"})
		if err != nil {
			r.add(Finding{Check: "rabbitmq.connect", Level: LevelFail, Summary: err.Error(), Fix: "give readable PEM files"})
			return
		}
	}
	var conn *amqp.Connection
	var connURL string
	var failed []Finding
	for _, u := range o.AMQPURLs {
		c, f := dialAMQP(ctx, u, tlsCfg, o.timeout())
		if c == nil {
			failed = append(failed, f)
			continue
		}
		r.add(f)
		if conn == nil {
			conn, connURL = c, u
		} else {
			c.Close()
		}
	}
	for _, f := range failed {
		if conn != nil {
			// The bridge uses the brokers that answer meanwhile.
			f.Level = LevelWarn
			f.Detail = strings.TrimSpace(f.Detail + " The bridge uses the other brokers meanwhile, and this one when it is back.")
		}
		r.add(f)
	}
	if conn == nil {
		r.add(Finding{Check: "rabbitmq.notifications", Level: LevelInfo,
			Summary: "exchange, queue and notifications not checked: no broker accepted the bridge"})
		return
	}
	defer conn.Close()
	vhost := "/"
	if uri, err := amqp.ParseURI(connURL); err == nil {
		vhost = uri.Vhost
	}
	checkExchange(conn, o, vhost, r)
	checkBridgeQueue(conn, o, vhost, r)
	checkNotifierQueues(conn, o, vhost, r)
}

// dialAMQP connects to one broker: the connection and an ok finding, or nil
// and a finding that says why not.
func dialAMQP(ctx context.Context, u string, tlsCfg *tls.Config, timeout time.Duration) (*amqp.Connection, Finding) {
	target := redactAMQP(u)
	props := amqp.NewConnectionProperties()
	props["connection_name"] = "keystone-fanout-doctor"
	props["product"] = "keystone-fanout"
	cfg := amqp.Config{Dial: amqp.DefaultDial(timeout), Properties: props, Heartbeat: 10 * time.Second}
	if tlsCfg != nil {
		cfg.TLSClientConfig = tlsCfg.Clone()
	}
	type result struct {
		c   *amqp.Connection
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := amqp.DialConfig(u, cfg)
		done <- result{c, err}
	}()
	var res result
	select {
	case res = <-done:
	case <-ctx.Done():
		go func() {
			if res := <-done; res.c != nil {
				res.c.Close()
			}
		}()
		res.err = ctx.Err()
	}
	f := Finding{Check: "rabbitmq.connect", Target: target}
	if res.err != nil {
		f.Level = LevelFail
		f.Summary, f.Detail, f.Fix = explainAMQPError(u, res.err)
		return nil, f
	}
	user, vhost := "guest", "/"
	if uri, err := amqp.ParseURI(u); err == nil {
		user, vhost = uri.Username, uri.Vhost
	}
	version, _ := res.c.Properties["version"].(string)
	f.Level = LevelOK
	f.Summary = fmt.Sprintf("logged in as %q on vhost %q (RabbitMQ %s)", user, vhost, version)
	return res.c, f
}

// explainAMQPError turns a connection error into a summary, what it means
// and the fix.
func explainAMQPError(u string, err error) (summary, detail, fix string) {
	var ae *amqp.Error
	var unknownCA x509.UnknownAuthorityError
	var badName x509.HostnameError
	var recordErr tls.RecordHeaderError
	var opErr *net.OpError
	scheme, _, _ := strings.Cut(u, "://")
	tlsOn := scheme == "amqps"
	switch {
	case errors.As(err, &ae) && ae.Code == amqp.AccessRefused:
		return "RabbitMQ refused the login: " + ae.Reason,
			"The user does not exist or its password is wrong (RabbitMQ does not say which).",
			"check the user and password of the transport URL (--amqp-url, --amqp-password-file or keystone.conf's transport_url); " +
				"rabbitmqctl authenticate_user USER PASSWORD tells whether they are right"
	case errors.As(err, &ae) && ae.Code == amqp.NotAllowed:
		return "RabbitMQ refused the vhost: " + ae.Reason,
			"The user has no permissions on the virtual host of the URL.",
			"rabbitmqctl set_permissions -p VHOST USER '^keystone-fanout$' '^keystone-fanout$' '^(keystone-fanout|keystone)$' " +
				"(configure and write on the bridge's queue, read on it and on Keystone's exchange), or use Keystone's vhost in the URL"
	case errors.As(err, &unknownCA):
		return "the broker's certificate is signed by a CA this host does not trust: " + err.Error(),
			"",
			"give the CA with --amqp-tls-ca (keystone.conf [oslo_messaging_rabbit] ssl_ca_file)"
	case errors.As(err, &badName):
		return "the broker's certificate does not name the host dialled: " + err.Error(),
			"oslo.messaging does not check the host name unless ssl_enforce_hostname_verification is set; the bridge always does.",
			"give --amqp-tls-server-name with a name the certificate holds, or reach the broker by that name"
	case errors.As(err, &recordErr):
		return "the broker does not speak TLS on this port: " + err.Error(),
			"",
			"use amqp:// (or ssl = false), or the broker's TLS port (usually 5671)"
	case !tlsOn && (errors.Is(err, amqp.ErrSyntax) || errors.Is(err, amqp.ErrFrame) || isEOF(err)):
		return "the broker closed the connection during the AMQP handshake: " + err.Error(),
			"A broker that expects TLS on this port answers plain AMQP this way.",
			"if the port is RabbitMQ's TLS port (usually 5671), use amqps:// or ?ssl=1 (keystone.conf [oslo_messaging_rabbit] ssl = true)"
	case errors.As(err, &opErr) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled):
		return "cannot reach the broker: " + err.Error(),
			"",
			"check the host and port, and that firewalls let this host reach the broker"
	}
	return "connecting failed: " + err.Error(), "", ""
}

func isEOF(err error) bool {
	s := err.Error()
	return strings.Contains(s, "EOF") || strings.Contains(s, "connection reset")
}

// checkExchange checks that Keystone's exchange exists.
func checkExchange(conn *amqp.Connection, o *BridgeOptions, vhost string, r *Report) {
	f := Finding{Check: "rabbitmq.exchange", Target: fmt.Sprintf("exchange %q on vhost %q", o.Exchange, vhost)}
	err := passive(conn, func(ch *amqp.Channel) error {
		return ch.ExchangeDeclarePassive(o.Exchange, amqp.ExchangeTopic, false, false, false, false, nil)
	})
	var ae *amqp.Error
	switch {
	case err == nil:
		f.Level, f.Summary = LevelOK, "exists"
	case errors.As(err, &ae) && ae.Code == amqp.NotFound:
		f.Level = LevelFail
		f.Summary = "does not exist"
		f.Detail = "Keystone's notifier declares it with its first notification after RabbitMQ starts (and the bridge declares it too). " +
			"Either Keystone has not sent a notification since RabbitMQ started, or it sends them elsewhere: " +
			"to another exchange ([DEFAULT] control_exchange), another vhost (the transport URL's path) or nowhere ([oslo_messaging_notifications] driver)."
		f.Fix = "make a change in Keystone (for example openstack project set --description doctor PROJECT) and run doctor again; " +
			"if the exchange still does not exist, compare --exchange and the vhost of --amqp-url with Keystone's configuration, or pass it with --oslo-config"
	default:
		f.Level, f.Summary = LevelFail, "cannot be checked: "+err.Error()
	}
	r.add(f)
}

// checkBridgeQueue checks the bridge's own queue and what its message count says
// about notifications arriving.
func checkBridgeQueue(conn *amqp.Connection, o *BridgeOptions, vhost string, r *Report) {
	f := Finding{Check: "rabbitmq.queue", Target: fmt.Sprintf("queue %q on vhost %q", o.Queue, vhost)}
	var q amqp.Queue
	err := passive(conn, func(ch *amqp.Channel) (err error) {
		q, err = ch.QueueDeclarePassive(o.Queue, true, false, false, false, nil)
		return err
	})
	var ae *amqp.Error
	const bindings = "AMQP cannot list a queue's bindings: the bridge binds it with --routing-key (" // completed below
	keys := strings.Join(o.RoutingKeys, ", ")
	switch {
	case errors.As(err, &ae) && ae.Code == amqp.NotFound:
		f.Level = LevelInfo
		f.Summary = "does not exist yet"
		f.Detail = "The bridge creates it at its first start and binds it to the exchange with " + keys +
			". Notifications Keystone sends before then are not kept for the bridge."
	case err != nil:
		f.Level, f.Summary = LevelFail, "cannot be checked: "+err.Error()
	case q.Consumers > 0:
		f.Level = LevelOK
		f.Summary = fmt.Sprintf("%d consumer(s), %d message(s) waiting", q.Consumers, q.Messages)
		f.Detail = "A bridge consumes it, so its message count cannot tell whether notifications arrive; the bridge's metrics do " +
			"(keystone_fanout_bridge_* counters). " + bindings + keys + ") at every connection."
	case q.Messages > 0:
		f.Level = LevelOK
		f.Summary = fmt.Sprintf("%d notification(s) waiting, none consumed", q.Messages)
		f.Detail = fmt.Sprintf("Keystone's notifications reach this queue: it is bound with the keys Keystone uses, and each waiting message "+
			"arrived within the queue's message TTL (%s when the bridge created it).", o.QueueMessageTTL)
	default:
		f.Level = LevelWarn
		f.Summary = "empty and not consumed"
		f.Detail = fmt.Sprintf("No notification arrived within the queue's message TTL (%s when the bridge created it): "+
			"either nothing changed in Keystone in that time, or Keystone publishes with other routing keys than %s "+
			"([oslo_messaging_notifications] topics), or elsewhere. %s%s) at every connection.", o.QueueMessageTTL, keys, bindings, keys)
		f.Fix = "make a change in Keystone (for example openstack project set --description doctor PROJECT) and run doctor again within a minute"
	}
	r.add(f)
}

// checkNotifierQueues looks at the queues oslo.messaging's notifier declares for
// each topic ("<topic>.info"), which fill up when nothing reads them.
func checkNotifierQueues(conn *amqp.Connection, o *BridgeOptions, vhost string, r *Report) {
	for _, key := range o.RoutingKeys {
		if key == o.Queue {
			continue
		}
		var q amqp.Queue
		err := passive(conn, func(ch *amqp.Channel) (err error) {
			q, err = ch.QueueDeclarePassive(key, false, false, false, false, nil)
			return err
		})
		if err != nil {
			continue // absent: nothing to say
		}
		f := Finding{Check: "rabbitmq.notifier-queue", Target: fmt.Sprintf("queue %q on vhost %q", key, vhost)}
		if q.Consumers == 0 && q.Messages > 0 {
			f.Level = LevelWarn
			f.Summary = fmt.Sprintf("%d message(s) and no consumer", q.Messages)
			f.Detail = "oslo.messaging's notifier declares this queue and binds it to the exchange with its first notification; " +
				"nothing reads it, so it keeps a copy of every notification (the bridge reads its own queue, not this one)."
			f.Fix = fmt.Sprintf("if nothing else (ceilometer, a SIEM) is meant to read it, limit it with a policy, "+
				"for example rabbitmqctl set_policy -p %s --apply-to queues notifier-limit '^%s$' '{\"max-length\":10000}'",
				vhost, strings.ReplaceAll(key, ".", `\.`))
		} else {
			f.Level = LevelInfo
			f.Summary = fmt.Sprintf("%d message(s), %d consumer(s)", q.Messages, q.Consumers)
			f.Detail = "oslo.messaging's notifier declares this queue for other readers of the notifications; the bridge does not use it."
		}
		r.add(f)
	}
}

// passive runs one passive declaration on its own channel (a failed one
// closes the channel).
func passive(conn *amqp.Connection, fn func(*amqp.Channel) error) error {
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	err = fn(ch)
	if err == nil {
		ch.Close()
	}
	return err
}

// redactAMQP is a broker URL without its password.
func redactAMQP(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		return "(unparsable URL)"
	}
	return p.Redacted()
}
