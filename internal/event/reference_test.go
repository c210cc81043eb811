package event

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"
	"unicode/utf8"
)

// decodeReference is the encoding/json-based Decode that the hand-written
// scanner replaced (commit 139d253), kept as the specification of what Decode
// must return: FuzzDecodeMatchesReference feeds both the same bodies. Only
// its last step is shared: the rules that bound an event (normalise), which
// it feeds with what encoding/json decoded.
func decodeReference(body []byte) (Event, error) {
	if !utf8.Valid(body) {
		return Event{}, reject(ReasonInvalidUTF8, "", "body is not valid UTF-8")
	}
	// One pass over the outer object: the envelope's two keys, or the v1
	// document's fields.
	var outer struct {
		Version *json.RawMessage `json:"oslo.version"`
		Message *json.RawMessage `json:"oslo.message"`
		refNotification
	}
	if !refIsObject(body) && string(bytes.TrimSpace(body)) != "null" {
		var x map[string]json.RawMessage
		err := json.Unmarshal(body, &x)
		if err == nil {
			err = fmt.Errorf("not an object")
		}
		return Event{}, reject(ReasonNotJSON, "", "body is not a JSON object: %v", err)
	}
	if err := json.Unmarshal(body, &outer); err != nil {
		return Event{}, reject(ReasonNotJSON, "", "body is not a JSON object: %v", err)
	}
	msg := outer.refNotification
	switch {
	case outer.Version != nil:
		var v string
		if err := json.Unmarshal(*outer.Version, &v); err != nil || v != "2.0" {
			return Event{}, reject(ReasonUnsupportedVersion, "", "oslo.version is %s, want \"2.0\"", truncate(*outer.Version))
		}
		if outer.Message == nil {
			return Event{}, reject(ReasonBadEnvelope, "", "envelope has no oslo.message")
		}
		var s string
		if err := json.Unmarshal(*outer.Message, &s); err != nil {
			return Event{}, reject(ReasonBadEnvelope, "", "oslo.message is not a JSON string")
		}
		msg = refNotification{}
		if !refIsObject([]byte(s)) || json.Unmarshal([]byte(s), &msg) != nil {
			return Event{}, reject(ReasonBadEnvelope, "", "oslo.message does not hold a JSON object")
		}
	case outer.Message != nil:
		return Event{}, reject(ReasonBadEnvelope, "", "oslo.message without oslo.version")
	}

	id, _ := msg.MessageID.(string)
	eventType, _ := msg.EventType.(string)
	if eventType == "" {
		return Event{}, reject(ReasonMissingEventType, id, "notification has no event_type")
	}
	if id == "" || len(id) > maxIDLen {
		sum := sha256.Sum256(body)
		id = "sha256-" + hex.EncodeToString(sum[:16])
	}
	e := Event{Version: SchemaVersion, Kind: KindNotification, ID: id, Type: eventType}
	e.Publisher, _ = msg.Publisher.(string)
	if ts, ok := msg.Timestamp.(string); ok {
		if t, err := time.ParseInLocation(osloTimeLayout, ts, time.UTC); err == nil {
			e.Time = t
		}
	}
	refNormalise(&e, msg.Payload)
	return e, nil
}

type refNotification struct {
	MessageID any             `json:"message_id"`
	EventType any             `json:"event_type"`
	Publisher any             `json:"publisher_id"`
	Timestamp any             `json:"timestamp"`
	Payload   json.RawMessage `json:"payload"`
}

func refIsObject(b []byte) bool {
	b = bytes.TrimLeft(b, " \t\r\n")
	return len(b) > 0 && b[0] == '{'
}

// refPayload is what normalise reads of a notification payload, in both
// formats. Fields are decoded as any so that a value of the wrong type reads
// as absent.
type refPayload struct {
	TypeURI      any `json:"typeURI"`
	ResourceInfo any `json:"resource_info"`
	Target       struct {
		ID      any `json:"id"`
		TypeURI any `json:"typeURI"`
	} `json:"target"`
	// identity.group.updated, basic format
	ActorID        any `json:"actor_id"`
	ActorType      any `json:"actor_type"`
	ActorOperation any `json:"actor_operation"`
	// identity.role_assignment.*, always CADF
	User      any `json:"user"`
	Group     any `json:"group"`
	Project   any `json:"project"`
	Domain    any `json:"domain"`
	Role      any `json:"role"`
	Inherited any `json:"inherited_to_projects"`
}

// refNormalise decodes the payload with encoding/json and applies the shared
// rules to what it found.
func refNormalise(e *Event, raw json.RawMessage) {
	var p refPayload
	if len(raw) == 0 || json.Unmarshal(raw, &p) != nil {
		p = refPayload{}
	}
	str := func(v any) jstr {
		s, ok := v.(string)
		return jstr{raw: []byte(s), set: ok}
	}
	f := payloadFields{
		typeURI:        str(p.TypeURI),
		resourceInfo:   str(p.ResourceInfo),
		targetID:       str(p.Target.ID),
		actorID:        str(p.ActorID),
		actorType:      str(p.ActorType),
		actorOperation: str(p.ActorOperation),
		user:           str(p.User),
		group:          str(p.Group),
		project:        str(p.Project),
		domain:         str(p.Domain),
		role:           str(p.Role),
	}
	f.inherited, _ = p.Inherited.(bool)
	normalise(e, &f)
}
