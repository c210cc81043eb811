package event

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/keystone-fanout/keystone-fanout/internal/fixtures"
)

// decodedFixture is what a fixture's .decoded.json says, for expectations.
type decodedFixture struct {
	Msg struct {
		MessageID string         `json:"message_id"`
		EventType string         `json:"event_type"`
		Publisher string         `json:"publisher_id"`
		Timestamp string         `json:"timestamp"`
		Payload   map[string]any `json:"payload"`
	} `json:"oslo.message"`
}

func TestDecodeEveryFixture(t *testing.T) {
	all, err := fixtures.All()
	if err != nil {
		t.Fatal(err)
	}
	if len(all) < 80 {
		t.Fatalf("found %d fixtures, want the 88 captured ones", len(all))
	}
	filter, _ := NewFilter(DefaultFilter)
	published := 0
	for _, f := range all {
		t.Run(f.Format+"/"+f.Name, func(t *testing.T) {
			raw, err := f.Decoded()
			if err != nil {
				t.Fatal(err)
			}
			var want decodedFixture
			if err := json.Unmarshal(raw, &want); err != nil {
				t.Fatal(err)
			}
			e, err := Decode(f.Body)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if e.ID != want.Msg.MessageID || e.Type != want.Msg.EventType || e.Type != f.Meta.EventType {
				t.Fatalf("id/type = %q/%q, want %q/%q", e.ID, e.Type, want.Msg.MessageID, want.Msg.EventType)
			}
			if e.Publisher != want.Msg.Publisher {
				t.Errorf("publisher = %q, want %q", e.Publisher, want.Msg.Publisher)
			}
			wantTime, _ := time.Parse("2006-01-02 15:04:05.000000", want.Msg.Timestamp)
			if e.Time.IsZero() || !e.Time.Equal(wantTime) {
				t.Errorf("time = %v, want %s", e.Time, want.Msg.Timestamp)
			}
			wantFiltered := e.Type == "identity.authenticate" ||
				(strings.HasSuffix(e.Type, ".created") && e.Type != "identity.role_assignment.created")
			if got := filter.Filtered(e.Type); got != wantFiltered {
				t.Fatalf("Filtered(%s) = %v, want %v", e.Type, got, wantFiltered)
			}
			if wantFiltered {
				return
			}
			published++
			if e.Widen != "" || e.Unbounded() {
				t.Fatalf("token-affecting fixture widened (%q): %+v", e.Widen, e)
			}
			p := want.Msg.Payload
			str := func(k string) string { s, _ := p[k].(string); return s }
			switch {
			case strings.HasPrefix(e.Type, "identity.role_assignment."):
				if e.Format != "cadf" {
					t.Errorf("role assignment format = %q, want cadf (always)", e.Format)
				}
				if e.UserID != str("user") || e.GroupID != str("group") || e.ProjectID != str("project") ||
					e.DomainID != str("domain") || e.RoleID != str("role") || e.InheritedToProjects != p["inherited_to_projects"] {
					t.Errorf("role assignment ids = %+v, payload %v", e, p)
				}
			default:
				id := str("resource_info")
				got := map[string]string{
					"identity.user.":                   e.UserID,
					"identity.project.":                e.ProjectID,
					"identity.domain.":                 e.DomainID,
					"identity.group.":                  e.GroupID,
					"identity.role.":                   e.RoleID,
					"identity.OS-TRUST:trust.":         e.TrustID,
					"identity.application_credential.": e.AppCredID,
				}
				matched := 0
				for prefix, v := range got {
					if strings.HasPrefix(e.Type, prefix) {
						matched++
						if v != id {
							t.Errorf("%s id = %q, want resource_info %q", prefix, v, id)
						}
					} else if v != "" {
						t.Errorf("unexpected %s id %q", prefix, v)
					}
				}
				if matched != 1 {
					t.Errorf("no id rule for %s", e.Type)
				}
			}
			if e.Type == "identity.group.updated" && f.Format == "basic" {
				if e.Actor == nil || e.Actor.ID != str("actor_id") || e.Actor.Type != "user" || e.Actor.Operation != str("actor_operation") {
					t.Errorf("actor = %+v, payload %v", e.Actor, p)
				}
			}
			if e.Type == "identity.group.updated" && f.Format == "cadf" && e.Actor != nil {
				t.Errorf("CADF group update names no user, got actor %+v", e.Actor)
			}
			if f.Format == "cadf" && e.Format != "cadf" {
				t.Errorf("format = %q, want cadf", e.Format)
			}
		})
	}
	if published == 0 {
		t.Fatal("no fixture was token-affecting")
	}
}

func envelope(inner string) []byte {
	b, _ := json.Marshal(map[string]string{"oslo.version": "2.0", "oslo.message": inner})
	return b
}

func TestDecodeRejects(t *testing.T) {
	good := `{"message_id":"m1","event_type":"identity.user.deleted","payload":{"resource_info":"u1"},"timestamp":"2026-11-22 13:11:11.374444"}`
	tests := []struct {
		name   string
		body   []byte
		reason Reason
		id     string
	}{
		{"not JSON", []byte("hello"), ReasonNotJSON, ""},
		{"truncated", envelope(good)[:40], ReasonNotJSON, ""},
		{"JSON array", []byte(`[1,2]`), ReasonNotJSON, ""},
		{"JSON null", []byte(`null`), ReasonMissingEventType, ""},
		{"invalid UTF-8", append([]byte(`{"a":"`), 0xff, '"', '}'), ReasonInvalidUTF8, ""},
		{"envelope version 3.0", []byte(`{"oslo.version":"3.0","oslo.message":"{}"}`), ReasonUnsupportedVersion, ""},
		{"envelope version a number", []byte(`{"oslo.version":2.0,"oslo.message":"{}"}`), ReasonUnsupportedVersion, ""},
		{"oslo.message not a string", []byte(`{"oslo.version":"2.0","oslo.message":{"event_type":"x"}}`), ReasonBadEnvelope, ""},
		{"oslo.message not JSON", envelope("nope"), ReasonBadEnvelope, ""},
		{"oslo.message missing", []byte(`{"oslo.version":"2.0"}`), ReasonBadEnvelope, ""},
		{"oslo.message without version", []byte(`{"oslo.message":"{}"}`), ReasonBadEnvelope, ""},
		{"missing event_type", envelope(`{"message_id":"m2","payload":{}}`), ReasonMissingEventType, "m2"},
		{"event_type a number", envelope(`{"message_id":"m3","event_type":7}`), ReasonMissingEventType, "m3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Decode(tt.body)
			r, ok := IsReject(err)
			if !ok {
				t.Fatalf("Decode error = %v, want a RejectError", err)
			}
			if r.Reason != tt.reason || r.MessageID != tt.id {
				t.Fatalf("reason/id = %s/%q, want %s/%q (%v)", r.Reason, r.MessageID, tt.reason, tt.id, err)
			}
		})
	}
}

func TestDecodeWidens(t *testing.T) {
	tests := []struct {
		name  string
		body  []byte
		widen string
		check func(t *testing.T, e Event)
	}{
		{"unknown event type", envelope(`{"message_id":"m","event_type":"identity.identity_provider.deleted","payload":{"resource_info":"idp"}}`), WidenUnknownType, nil},
		{"user update without id", envelope(`{"message_id":"m","event_type":"identity.user.updated","payload":{}}`), WidenMissingIDs, nil},
		{"user update with a numeric id", envelope(`{"message_id":"m","event_type":"identity.user.updated","payload":{"resource_info":42}}`), WidenMissingIDs, nil},
		{"payload not an object", envelope(`{"message_id":"m","event_type":"identity.project.deleted","payload":"p1"}`), WidenMissingIDs, nil},
		{"role assignment without user or group", envelope(`{"message_id":"m","event_type":"identity.role_assignment.deleted","payload":{"project":"p","role":"r"}}`), WidenMissingIDs, nil},
		{"id too long", envelope(`{"message_id":"m","event_type":"identity.user.deleted","payload":{"resource_info":"` + strings.Repeat("a", 300) + `"}}`), WidenMissingIDs, nil},
		{"v1 form without envelope", []byte(`{"message_id":"m","event_type":"identity.user.deleted","payload":{"resource_info":"u1"}}`), "", func(t *testing.T, e Event) {
			if e.UserID != "u1" {
				t.Errorf("user = %q, want u1", e.UserID)
			}
		}},
		{"extra fields are ignored", envelope(`{"message_id":"m","event_type":"identity.user.deleted","extra":[1],"payload":{"resource_info":"u1","more":{"x":1}}}`), "", func(t *testing.T, e Event) {
			if e.UserID != "u1" {
				t.Errorf("user = %q, want u1", e.UserID)
			}
		}},
		{"missing message_id gets a body digest", envelope(`{"event_type":"identity.user.deleted","payload":{"resource_info":"u1"}}`), "", func(t *testing.T, e Event) {
			if !strings.HasPrefix(e.ID, "sha256-") {
				t.Errorf("id = %q, want a sha256- digest", e.ID)
			}
		}},
		{"unreadable timestamp leaves Time zero", envelope(`{"message_id":"m","event_type":"identity.user.deleted","timestamp":"yesterday","payload":{"resource_info":"u1"}}`), "", func(t *testing.T, e Event) {
			if !e.Time.IsZero() {
				t.Errorf("time = %v, want zero", e.Time)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := Decode(tt.body)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if e.Widen != tt.widen {
				t.Fatalf("Widen = %q, want %q (%+v)", e.Widen, tt.widen, e)
			}
			if (tt.widen != "") != e.Unbounded() {
				t.Fatalf("Unbounded = %v with Widen %q", e.Unbounded(), e.Widen)
			}
			if tt.check != nil {
				tt.check(t, e)
			}
		})
	}
}

func TestFilter(t *testing.T) {
	f, err := NewFilter([]string{"identity.*.created", "identity.user.*"})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		eventType string
		filtered  bool
	}{
		{"identity.project.created", true},
		{"identity.OS-TRUST:trust.created", true},
		{"identity.role_assignment.created", false}, // known token-affecting: never filtered
		{"identity.user.deleted", false},            // likewise, even though a pattern matches
		{"identity.user.frobbed", true},
		{"identity.endpoint.deleted", false},
	}
	for _, tt := range tests {
		t.Run(tt.eventType, func(t *testing.T) {
			if got := f.Filtered(tt.eventType); got != tt.filtered {
				t.Fatalf("Filtered = %v, want %v", got, tt.filtered)
			}
		})
	}
	if _, err := NewFilter([]string{"identity.[.created"}); err == nil {
		t.Fatal("malformed pattern accepted")
	}
}

func TestRoundTrip(t *testing.T) {
	e := Event{Version: SchemaVersion, Kind: KindNotification, ID: "m", Type: "identity.OS-TRUST:trust.deleted",
		Time: time.Date(2026, 11, 22, 13, 0, 0, 0, time.UTC), TrustID: "t1"}
	b, err := e.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	back, err := Unmarshal(b)
	if err != nil || back.TrustID != "t1" || !back.Time.Equal(e.Time) {
		t.Fatalf("round trip = %+v, %v", back, err)
	}
	if (&Event{Version: SchemaVersion + 1, Kind: KindNotification, Type: "identity.user.deleted", UserID: "u"}).Unbounded() == false {
		t.Fatal("an event of a newer schema must be unbounded")
	}
	if (&Event{Version: 1, Kind: "future", Type: "identity.user.deleted"}).Unbounded() == false {
		t.Fatal("an event of an unknown kind must be unbounded")
	}
}

func TestRevocationDigestIsStable(t *testing.T) {
	at := time.Date(2026, 11, 22, 13, 0, 0, 0, time.UTC)
	a := Revocation{AuditID: "x", IssuedBefore: at, RevokedAt: at}
	b := Revocation{AuditID: "x", IssuedBefore: at, RevokedAt: at}
	c := Revocation{AuditID: "y", IssuedBefore: at, RevokedAt: at}
	if a.Digest() != b.Digest() || a.Digest() == c.Digest() {
		t.Fatalf("digests: %s %s %s", a.Digest(), b.Digest(), c.Digest())
	}
}

// FuzzDecode checks that no input crashes decoding, that every outcome is
// either a reject with a known reason or an Event that can be published and
// read back, and that a token-affecting event is never left unbounded without
// ids.
func FuzzDecode(f *testing.F) {
	all, err := fixtures.All()
	if err != nil {
		f.Fatal(err)
	}
	for _, n := range all {
		f.Add(n.Body)
	}
	f.Add([]byte(`{"oslo.version":"2.0","oslo.message":"{\"event_type\":\"identity.user.updated\",\"payload\":{\"resource_info\":[]}}"}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		e, err := Decode(body)
		if err != nil {
			r, ok := IsReject(err)
			if !ok {
				t.Fatalf("non-reject error %v", err)
			}
			known := false
			for _, k := range Reasons {
				known = known || k == r.Reason
			}
			if !known {
				t.Fatalf("unknown reason %q", r.Reason)
			}
			return
		}
		if e.ID == "" || e.Type == "" || e.Version != SchemaVersion || e.Kind != KindNotification {
			t.Fatalf("incomplete event %+v", e)
		}
		if !utf8.ValidString(e.ID) {
			t.Fatalf("id not UTF-8")
		}
		b, err := e.Marshal()
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		back, err := Unmarshal(b)
		if err != nil || back.ID != e.ID || back.Widen != e.Widen {
			t.Fatalf("round trip %+v -> %+v (%v)", e, back, err)
		}
		if !e.Unbounded() && e.UserID == "" && e.ProjectID == "" && e.DomainID == "" && e.GroupID == "" &&
			e.RoleID == "" && e.TrustID == "" && e.AppCredID == "" {
			t.Fatalf("bounded event with no id: %+v", e)
		}
	})
}
