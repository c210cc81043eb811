package e2e

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

// TestWorkloadNotifications checks the harness itself: every notification the
// tests render from the captures decodes (with the product's contract,
// internal/event) to an event of the capture's type that names the victim's
// ids, keeps Keystone's envelope and AMQP properties, and is a new message.
func TestWorkloadNotifications(t *testing.T) {
	w := newWorkload(t, 1)
	victims := w.victims(2*len(w.bounded), 1)
	seen := map[string]bool{}
	for _, v := range victims {
		m, o := v.notification(time.Now())
		if seen[o.msgID] {
			t.Fatalf("%s: message id %s rendered twice", v.tpl.fx.Name, o.msgID)
		}
		seen[o.msgID] = true
		var outer map[string]json.RawMessage
		if err := json.Unmarshal(m.body, &outer); err != nil || len(outer) != 2 || outer["oslo.version"] == nil {
			t.Fatalf("%s: expected the messagingv2 envelope; got %.120s (%v)", v.tpl.fx.Name, m.body, err)
		}
		if m.props.ContentType != "application/json" || m.props.ContentEncoding != "utf-8" || m.props.DeliveryMode != 2 || m.routingKey != "notifications.info" {
			t.Fatalf("%s: expected Keystone's AMQP properties; got %+v routing key %q", v.tpl.fx.Name, m.props, m.routingKey)
		}
		ev, err := event.Decode(m.body)
		if err != nil {
			t.Fatalf("%s: rendered notification does not decode: %v", v.tpl.fx.Name, err)
		}
		if ev.ID != o.msgID || ev.Type != v.tpl.eventType || ev.Widen != "" || ev.Unbounded() {
			t.Fatalf("%s: decoded to id %q type %q widen %q; want id %q type %q, bounded", v.tpl.fx.Name, ev.ID, ev.Type, ev.Widen, o.msgID, v.tpl.eventType)
		}
		if time.Since(ev.Time) > time.Minute || time.Since(ev.Time) < -time.Minute {
			t.Fatalf("%s: event time %s, want about now", v.tpl.fx.Name, ev.Time)
		}
		named := map[string]bool{ev.UserID: true, ev.ProjectID: true, ev.DomainID: true, ev.GroupID: true, ev.TrustID: true, ev.AppCredID: true}
		if ev.Actor != nil {
			named[ev.Actor.ID] = true
		}
		for _, k := range v.tpl.slotKinds() {
			if !named[v.ids[k]] {
				t.Fatalf("%s: decoded event %+v does not name the victim's %s %s", v.tpl.fx.Name, ev, k, v.ids[k])
			}
		}
	}
	for range len(w.filter) {
		m, o := w.harmless(time.Now())
		ev, err := event.Decode(m.body)
		if err != nil || !o.filtered {
			t.Fatalf("harmless notification: %v", err)
		}
		f, _ := event.NewFilter(event.DefaultFilter)
		if !f.Filtered(ev.Type) {
			t.Fatalf("harmless notification of type %s is not filtered by the default filter", ev.Type)
		}
	}
}
