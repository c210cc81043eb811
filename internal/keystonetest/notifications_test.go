package keystonetest

import (
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// TestNotifications: with Options.Notifications, Keystone publishes its
// notifications to the given exchange of the shared RabbitMQ, under the given
// topic and format.
func TestNotifications(t *testing.T) {
	amqpURL := os.Getenv("KEYSTONE_FANOUT_TEST_AMQP_URL")
	if amqpURL == "" {
		amqpURL = "amqp://guest:guest@127.0.0.1:5672/"
	}
	if !strings.HasPrefix(amqpURL, "amqp://") {
		t.Fatalf("KEYSTONE_FANOUT_TEST_AMQP_URL %q: this test needs an amqp:// URL", amqpURL)
	}
	conn, err := amqp.Dial(amqpURL)
	if err != nil {
		t.Fatalf("RabbitMQ at %s (a required service): %v", amqpURL, err)
	}
	t.Cleanup(func() { _ = conn.Close() }) // after the cleanups below
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	exchange, topic := UniqueName("keystonetest-x"), UniqueName("keystonetest-n")
	// The flags oslo.messaging declares the exchange with.
	if err := ch.ExchangeDeclare(exchange, "topic", false, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// oslo.messaging also declares and binds a queue named after the
		// routing key.
		_, _ = ch.QueueDelete(topic+".info", false, false, false)
		_ = ch.ExchangeDelete(exchange, false, false)
	})
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(q.Name, topic+".info", exchange, false, nil); err != nil {
		t.Fatal(err)
	}
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}

	k := StartTest(t, Options{Notifications: &Notifications{
		TransportURL:    "rabbit://" + strings.TrimPrefix(amqpURL, "amqp://"),
		ControlExchange: exchange,
		Format:          "basic",
		Topics:          topic,
	}})
	user, err := k.CreateUser(context.Background(), UniqueName("u"), "pw", "")
	if err != nil {
		t.Fatal(err)
	}
	timeout := time.After(30 * time.Second)
	var seen []string
	for {
		select {
		case d := <-deliveries:
			inner, ok := decodeNotification(d.Body)
			if !ok {
				t.Fatalf("not a messagingv2 notification: %s", d.Body)
			}
			seen = append(seen, inner.EventType)
			if inner.EventType == "identity.user.created" && inner.Payload["resource_info"] == user {
				if d.RoutingKey != topic+".info" {
					t.Errorf("routing key %q, want %q", d.RoutingKey, topic+".info")
				}
				eventListedWhenNotified(t, k, deliveries, user)
				return
			}
		case <-timeout:
			t.Fatalf("no identity.user.created notification for user %s within 30 s on exchange %s; saw %v", user, exchange, seen)
		}
	}
}

// eventListedWhenNotified: when a user is removed from a group, Keystone
// records the user's revocation event before it sends the notification, so a
// list of revocation events made as soon as the notification arrives holds it.
// The revocation poller relies on this (docs/REVOCATION.md, "Resolving
// notifications").
func eventListedWhenNotified(t *testing.T, k *Keystone, deliveries <-chan amqp.Delivery, user string) {
	ctx := context.Background()
	group, err := k.CreateGroup(ctx, UniqueName("g"))
	if err != nil {
		t.Fatal(err)
	}
	if err := k.AddUserToGroup(ctx, group, user); err != nil {
		t.Fatal(err)
	}
	if err := k.RemoveUserFromGroup(ctx, group, user); err != nil {
		t.Fatal(err)
	}
	timeout := time.After(30 * time.Second)
	for {
		select {
		case d := <-deliveries:
			inner, ok := decodeNotification(d.Body)
			if !ok {
				continue
			}
			if inner.EventType != "identity.group.updated" || inner.Payload["actor_operation"] != "removed" {
				continue
			}
			start := time.Now()
			events, err := k.RevocationEvents(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range events {
				if e["user_id"] == user {
					t.Logf("the removed member's revocation event was listed by the first request after the notification (%s)",
						time.Since(start).Round(time.Millisecond))
					return
				}
			}
			t.Fatalf("the notification of the removal arrived before Keystone listed the user's revocation event: %v", events)
		case <-timeout:
			t.Fatal("no notification of the group membership removal within 30 s")
		}
	}
}

// notification is the part of a messagingv2 notification the tests read.
type notification struct {
	EventType string         `json:"event_type"`
	Payload   map[string]any `json:"payload"`
}

// decodeNotification reads a messagingv2 body: the envelope, then the
// notification inside it.
func decodeNotification(body []byte) (notification, bool) {
	var env struct {
		Msg string `json:"oslo.message"`
	}
	var n notification
	if json.Unmarshal(body, &env) != nil || json.Unmarshal([]byte(env.Msg), &n) != nil {
		return notification{}, false
	}
	return n, true
}
