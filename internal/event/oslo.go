package event

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"slices"
	"time"
	"unicode/utf8"
)

// Reason says why a notification body was rejected. Reasons are metric label
// values: a fixed, small set.
type Reason string

const (
	ReasonTooLarge           Reason = "too_large"
	ReasonInvalidUTF8        Reason = "invalid_utf8"
	ReasonNotJSON            Reason = "not_json"
	ReasonBadEnvelope        Reason = "bad_envelope"
	ReasonUnsupportedVersion Reason = "unsupported_envelope_version"
	ReasonMissingEventType   Reason = "missing_event_type"
)

// Reasons lists every Reason, for metrics that should show zero counts.
var Reasons = []Reason{ReasonTooLarge, ReasonInvalidUTF8, ReasonNotJSON, ReasonBadEnvelope,
	ReasonUnsupportedVersion, ReasonMissingEventType}

// Widen reasons: why a decodable notification could not be bounded.
const (
	WidenUnknownType = "unknown_event_type"
	WidenMissingIDs  = "missing_ids"
)

// RejectError is returned for a body that is not a Keystone notification at all.
type RejectError struct {
	Reason    Reason
	MessageID string // the oslo message_id, when it could be read
	Err       error
}

func (e *RejectError) Error() string {
	if e.MessageID != "" {
		return fmt.Sprintf("rejected notification %s (%s): %v", e.MessageID, e.Reason, e.Err)
	}
	return fmt.Sprintf("rejected notification (%s): %v", e.Reason, e.Err)
}

func (e *RejectError) Unwrap() error { return e.Err }

func reject(r Reason, id string, format string, args ...any) error {
	return &RejectError{Reason: r, MessageID: id, Err: fmt.Errorf(format, args...)}
}

// The event types that Keystone 22 emits for a change that can make a cached
// token invalid (../docs/EVENTS.md). They are never filtered.
var knownTypes = []string{
	"identity.user.updated",
	"identity.user.deleted",
	"identity.project.updated",
	"identity.project.deleted",
	"identity.domain.updated",
	"identity.domain.deleted",
	"identity.role_assignment.created",
	"identity.role_assignment.deleted",
	"identity.group.updated",
	"identity.group.deleted",
	"identity.role.updated",
	"identity.role.deleted",
	"identity.OS-TRUST:trust.deleted",
	"identity.application_credential.deleted",
}

// KnownTypes returns the token-affecting event types this version understands.
func KnownTypes() []string { return slices.Clone(knownTypes) }

// DefaultFilter is the default list of event type patterns that cannot affect a
// cached token validation: the bridge acknowledges and counts them without
// publishing. Patterns use path.Match syntax ('*' matches any run of characters).
var DefaultFilter = []string{
	"identity.authenticate",
	"identity.*.created",
	"identity.region.*",
	"identity.endpoint.*",
	"identity.endpoint_group.*",
	"identity.service.*",
	"identity.policy.*",
	"identity.limit.*",
	"identity.registered_limit.*",
}

// Filter decides which event types are dropped as harmless. A type that this
// package knows to be token-affecting is never filtered, whatever the patterns
// say: removing too much is safe, keeping a stale entry is not.
type Filter struct{ patterns []string }

// NewFilter checks the patterns and returns a Filter. An error names the
// malformed pattern.
func NewFilter(patterns []string) (*Filter, error) {
	for _, p := range patterns {
		if _, err := path.Match(p, ""); err != nil {
			return nil, fmt.Errorf("filter pattern %q: %w", p, err)
		}
	}
	return &Filter{patterns: slices.Clone(patterns)}, nil
}

// Filtered reports whether eventType cannot affect a cached token.
func (f *Filter) Filtered(eventType string) bool {
	if slices.Contains(knownTypes, eventType) {
		return false
	}
	for _, p := range f.patterns {
		if ok, _ := path.Match(p, eventType); ok {
			return true
		}
	}
	return false
}

const cadfTypeURI = "http://schemas.dmtf.org/cloud/audit/1.0/event"

// osloTimeLayout is oslo.utils' timeutils.utcnow() as oslo.messaging prints it.
const osloTimeLayout = "2006-01-02 15:04:05.999999"

// maxIDLen bounds an id taken from a payload; Keystone ids are at most 64
// characters (UUID hex, or a hash for federated users).
const maxIDLen = 255

// Decode turns the body of one AMQP message from Keystone's exchange into an
// Event. It accepts the messagingv2 envelope ({"oslo.version": "2.0",
// "oslo.message": "<json>"}) and the un-enveloped v1 form, in the basic and the
// cadf payload formats.
//
// A body that is not a notification yields a *RejectError. A notification
// whose type is unknown, or that lacks the ids its type should carry, yields an
// Event with Widen set: it is published, and agents remove every token entry.
// A missing message_id is replaced by a digest of the body, and a missing or
// unreadable timestamp leaves Time zero for the caller to fill.
func Decode(body []byte) (Event, error) {
	if !utf8.Valid(body) {
		return Event{}, reject(ReasonInvalidUTF8, "", "body is not valid UTF-8")
	}
	// One pass over the outer object: the envelope's two keys, or the v1
	// document's fields.
	var outer struct {
		Version *json.RawMessage `json:"oslo.version"`
		Message *json.RawMessage `json:"oslo.message"`
		notification
	}
	if !isObject(body) && string(bytes.TrimSpace(body)) != "null" {
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
	msg := outer.notification
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
		msg = notification{}
		if !isObject([]byte(s)) || json.Unmarshal([]byte(s), &msg) != nil {
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
	normalise(&e, msg.Payload)
	return e, nil
}

type notification struct {
	MessageID any             `json:"message_id"`
	EventType any             `json:"event_type"`
	Publisher any             `json:"publisher_id"`
	Timestamp any             `json:"timestamp"`
	Payload   json.RawMessage `json:"payload"`
}

func isObject(b []byte) bool {
	b = bytes.TrimLeft(b, " \t\r\n")
	return len(b) > 0 && b[0] == '{'
}

// payload is what normalise reads of a notification payload, in both formats.
// Fields are decoded as any so that a value of the wrong type reads as absent.
type payload struct {
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

func normalise(e *Event, raw json.RawMessage) {
	var p payload
	if len(raw) == 0 || json.Unmarshal(raw, &p) != nil {
		p = payload{}
	}
	e.Format = "basic"
	if s, _ := p.TypeURI.(string); s == cadfTypeURI {
		e.Format = "cadf"
	}
	if !slices.Contains(knownTypes, e.Type) {
		e.Widen = WidenUnknownType
		return
	}

	if e.Type == "identity.role_assignment.created" || e.Type == "identity.role_assignment.deleted" {
		e.UserID, e.GroupID = idOf(p.User), idOf(p.Group)
		e.ProjectID, e.DomainID = idOf(p.Project), idOf(p.Domain)
		e.RoleID = idOf(p.Role)
		e.InheritedToProjects, _ = p.Inherited.(bool)
		if e.UserID == "" && e.GroupID == "" {
			e.Widen = WidenMissingIDs
		}
		return
	}

	// Every other known type names one object: resource_info in both formats,
	// and target.id in CADF (for these types the two are the same id).
	id := idOf(p.ResourceInfo)
	if id == "" && e.Format == "cadf" {
		id = idOf(p.Target.ID)
	}
	if id == "" {
		e.Widen = WidenMissingIDs
		return
	}
	switch e.Type {
	case "identity.user.updated", "identity.user.deleted":
		e.UserID = id
	case "identity.project.updated", "identity.project.deleted":
		e.ProjectID = id
	case "identity.domain.updated", "identity.domain.deleted":
		e.DomainID = id
	case "identity.group.updated", "identity.group.deleted":
		e.GroupID = id
		if actor := idOf(p.ActorID); actor != "" {
			typ, _ := p.ActorType.(string)
			op, _ := p.ActorOperation.(string)
			e.Actor = &Actor{ID: actor, Type: typ, Operation: op}
		}
	case "identity.role.updated", "identity.role.deleted":
		e.RoleID = id
	case "identity.OS-TRUST:trust.deleted":
		e.TrustID = id
	case "identity.application_credential.deleted":
		e.AppCredID = id
	default:
		// A type added to knownTypes without a rule here: never skip it.
		e.Widen = WidenUnknownType
	}
}

// idOf returns v when it is a plausible Keystone id: a non-empty string of at
// most maxIDLen characters.
func idOf(v any) string {
	s, ok := v.(string)
	if !ok || s == "" || len(s) > maxIDLen {
		return ""
	}
	return s
}

func truncate(b []byte) string {
	if len(b) > 32 {
		return string(b[:32]) + "..."
	}
	return string(b)
}

// IsReject reports whether err is a *RejectError and returns it.
func IsReject(err error) (*RejectError, bool) {
	var r *RejectError
	ok := errors.As(err, &r)
	return r, ok
}
