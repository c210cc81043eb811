package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/fixtures"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// badItem is one message of the bad-input corpus.
type badItem struct {
	name string
	msg  amqpMessage
	out  outcome
}

// innerDoc is an oslo.messaging inner document, built by hand for the
// corpus.
func innerDoc(msgID, eventType string, payload any) map[string]any {
	d := map[string]any{
		"publisher_id": "identity.e2e",
		"priority":     "INFO",
		"payload":      payload,
		"timestamp":    time.Now().UTC().Format("2006-01-02 15:04:05.000000"),
		"_unique_id":   strings.ReplaceAll(newUUID(), "-", ""),
	}
	if msgID != "" {
		d["message_id"] = msgID
	}
	if eventType != "" {
		d["event_type"] = eventType
	}
	return d
}

func envelope(inner any) []byte {
	b, _ := json.Marshal(inner)
	out, _ := json.Marshal(map[string]any{"oslo.version": "2.0", "oslo.message": string(b)})
	return out
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// rejectedCorpus is malformed input the bridge must reject (count by reason,
// acknowledge, not publish), one of each kind; meta gives Keystone's AMQP
// properties.
func rejectedCorpus(meta fixtures.Meta, good []byte, userID string) []badItem {
	id := func() string { return newUUID() }
	userPayload := map[string]any{"resource_info": userID}
	var items []badItem
	add := func(name string, body []byte, reason event.Reason, msgID string) {
		items = append(items, badItem{name: name, msg: keystoneMessage(meta, body),
			out: outcome{reject: reason, msgID: msgID}})
	}
	add("not JSON", []byte("this is not JSON at all"), event.ReasonNotJSON, "")
	add("empty body", nil, event.ReasonNotJSON, "")
	add("a JSON array", []byte(`[1, 2, 3]`), event.ReasonNotJSON, "")
	add("truncated", good[:len(good)/2], event.ReasonNotJSON, "")
	m1 := id()
	add("envelope version 1.0", mustJSON(map[string]any{"oslo.version": "1.0", "oslo.message": string(mustJSON(innerDoc(m1, "identity.user.updated", userPayload)))}),
		event.ReasonUnsupportedVersion, m1)
	m2 := id()
	add("envelope version a number", mustJSON(map[string]any{"oslo.version": 2.0, "oslo.message": string(mustJSON(innerDoc(m2, "identity.user.updated", userPayload)))}),
		event.ReasonUnsupportedVersion, m2)
	m3 := id()
	add("oslo.message an object", mustJSON(map[string]any{"oslo.version": "2.0", "oslo.message": innerDoc(m3, "identity.user.updated", userPayload)}),
		event.ReasonBadEnvelope, m3)
	add("oslo.message not JSON", mustJSON(map[string]any{"oslo.version": "2.0", "oslo.message": "{not json"}), event.ReasonBadEnvelope, "")
	add("envelope without oslo.message", []byte(`{"oslo.version": "2.0"}`), event.ReasonBadEnvelope, "")
	m4 := id()
	add("missing event_type", envelope(innerDoc(m4, "", userPayload)), event.ReasonMissingEventType, m4)
	m5 := id()
	d := innerDoc(m5, "", userPayload)
	d["event_type"] = 42
	add("event_type a number", envelope(d), event.ReasonMissingEventType, m5)
	bad := bytes.Replace(good, []byte(userID), append([]byte(userID[:8]), 0xff, 0xfe, 0xc3), 1)
	add("invalid UTF-8", bad, event.ReasonInvalidUTF8, "")
	// 16 MiB: RabbitMQ takes it (default max message size 128 MiB); the
	// bridge's --max-body-size (1 MiB) does not.
	m6 := id()
	big := innerDoc(m6, "identity.user.updated", map[string]any{"resource_info": userID, "padding": strings.Repeat("x", 16<<20)})
	add("16 MiB body", envelope(big), event.ReasonTooLarge, m6)
	return items
}

// TestBadInput interleaves malformed notifications with good ones: every
// good one takes effect in every region, every bad one is counted by its
// reason on the bridge's /metrics (rejected_total, widened_total) and no
// process exits.
//
// Phase 1 is input the bridge rejects: with it, the agents still remove only
// what the good notifications concern (targeted). Phase 2 is input the bridge
// cannot bound (an unknown event type, missing ids, ids of the wrong type):
// it is published widened and every region removes every token entry.
func TestBadInput(t *testing.T) {
	e := newEnv(t, envOptions{})
	w := e.work
	var userTpl *template
	for _, tpl := range w.bounded {
		if tpl.fx.Format == "cadf" && tpl.eventType == "identity.user.updated" {
			userTpl = tpl
			break
		}
	}
	meta := userTpl.fx.Meta

	// Phase 1: rejected input between good notifications.
	victims := w.victims(60, 1)
	unrelated, _ := w.unrelated(30)
	e.writeEntries(append(allEntries(victims), unrelated...))
	sample := victims[0]
	goodBody, _ := sample.notification(time.Now())
	corpus := rejectedCorpus(meta, goodBody.body, sample.ids[kUser])
	corpus = append(corpus, rejectedCorpus(meta, goodBody.body, sample.ids[kUser])...) // each kind twice
	want := map[string]int{}
	for _, it := range corpus {
		want[string(it.out.reject)]++
	}
	var msgs []amqpMessage
	var outs []outcome
	for i, v := range victims {
		var m amqpMessage
		var o outcome
		switch i % 6 {
		case 1: // a valid notification with fields Keystone does not send
			m, o = v.notification(time.Now())
			m.body = addExtraFields(t, m.body)
		case 2: // the older un-enveloped form
			m, o = v.notification(time.Now())
			var outer struct {
				Msg string `json:"oslo.message"`
			}
			if err := json.Unmarshal(m.body, &outer); err != nil {
				t.Fatal(err)
			}
			m.body = []byte(outer.Msg)
		case 3: // no message_id: the bridge names it by a digest of the body
			m, o = v.notification(time.Now())
			m.body = removeMessageID(t, m.body)
			sum := sha256.Sum256(m.body)
			o.msgID = "sha256-" + hex.EncodeToString(sum[:16])
		default:
			m, o = v.notification(time.Now())
		}
		msgs, outs = append(msgs, m), append(outs, o)
		if len(corpus) > 0 && i%2 == 0 {
			msgs, outs = append(msgs, corpus[0].msg), append(outs, corpus[0].out)
			corpus = corpus[1:]
		}
	}
	for _, it := range corpus {
		msgs, outs = append(msgs, it.msg), append(outs, it.out)
	}
	e.publishNow(msgs, outs)
	e.verify(expect{gone: victimTokens(victims), kept: entryTokens(unrelated)})
	e.waitBridgeCounts("keystone_fanout_bridge_rejected_total", "reason", want)
	e.waitBridgeCounts("keystone_fanout_bridge_widened_total", "reason", map[string]int{})

	// Phase 2: input that cannot be bounded, widened, between good ones.
	victims2 := w.victims(20, 1)
	e.writeEntries(allEntries(victims2))
	msgs, outs = nil, nil
	widen := map[string]int{}
	for i, v := range victims2 {
		m, o := v.notification(time.Now())
		msgs, outs = append(msgs, m), append(outs, o)
		if i%4 != 0 {
			continue
		}
		var body []byte
		id := newUUID()
		var reason string
		switch (i / 4) % 3 {
		case 0:
			body, reason = envelope(innerDoc(id, "identity.user.frobnicated", map[string]any{"resource_info": v.ids[kUser]})), event.WidenUnknownType
		case 1:
			body, reason = envelope(innerDoc(id, "identity.user.updated", map[string]any{"request_id": "req-" + newUUID()})), event.WidenMissingIDs
		case 2:
			body, reason = envelope(innerDoc(id, "identity.project.deleted", map[string]any{"resource_info": 12345,
				"target": map[string]any{"id": []string{v.ids[kProject]}, "typeURI": "data/security/project"}})), event.WidenMissingIDs
		}
		widen[reason]++
		msgs = append(msgs, keystoneMessage(meta, body))
		outs = append(outs, outcome{published: true, msgID: id, widen: reason})
	}
	e.publishNow(msgs, outs)
	// Widened events remove every token entry: the unrelated ones too.
	e.verify(expect{gone: append(append(victimTokens(victims), victimTokens(victims2)...), entryTokens(unrelated)...)})
	e.waitBridgeCounts("keystone_fanout_bridge_widened_total", "reason", widen)
	e.waitBridgeCounts("keystone_fanout_bridge_rejected_total", "reason", want)
	for _, p := range e.allProcs() {
		if !p.running() {
			t.Fatalf("expected every process to survive the bad input; %s is not running", p.name)
		}
	}
}

// waitBridgeCounts waits until the bridges' metric name, by label, has
// exactly the wanted non-zero values (every other label value zero).
func (e *env) waitBridgeCounts(name, label string, want map[string]int) {
	e.t.Helper()
	testutil.Eventually(e.t, 30*time.Second, fmt.Sprintf("%s by %s to be %v", name, label, want), func() (bool, string) {
		got := map[string]float64{}
		for _, b := range e.bridges {
			m, err := b.metrics()
			if err != nil {
				return false, err.Error()
			}
			for k, v := range m.byLabel(name, label) {
				got[k] += v
			}
		}
		ok := true
		var parts []string
		for k, v := range got {
			if v != 0 {
				parts = append(parts, fmt.Sprintf("%s=%v", k, v))
			}
			if int(v) != want[k] {
				ok = false
			}
		}
		for k, n := range want {
			if _, seen := got[k]; !seen && n != 0 {
				ok = false
			}
		}
		sort.Strings(parts)
		return ok, "{" + strings.Join(parts, " ") + "}"
	})
}

// addExtraFields adds fields Keystone does not send to the inner document
// and to the payload.
func addExtraFields(t testing.TB, body []byte) []byte {
	t.Helper()
	return editInner(t, body, func(d map[string]any) {
		d["x_extra"] = map[string]any{"nested": []any{1, "two", nil}}
		if p, ok := d["payload"].(map[string]any); ok {
			p["x_unknown_field"] = "ignored"
		}
	})
}

func removeMessageID(t testing.TB, body []byte) []byte {
	t.Helper()
	return editInner(t, body, func(d map[string]any) { delete(d, "message_id") })
}

func editInner(t testing.TB, body []byte, edit func(map[string]any)) []byte {
	t.Helper()
	var outer map[string]any
	if err := json.Unmarshal(body, &outer); err != nil {
		t.Fatal(err)
	}
	var inner map[string]any
	if err := json.Unmarshal([]byte(outer["oslo.message"].(string)), &inner); err != nil {
		t.Fatal(err)
	}
	edit(inner)
	outer["oslo.message"] = string(mustJSON(inner))
	return mustJSON(outer)
}
