package event

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"path"
	"slices"
	"sync"
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
//
// Decode reads JSON as encoding/json would decode the body into structs of
// the fields it uses (keys matched case-insensitively, the last of duplicate
// keys winning, values of another type reading as absent) and rejects what
// encoding/json rejects, but it reads only those fields, skipping the rest
// without allocating. Decode is safe for concurrent use.
func Decode(body []byte) (Event, error) {
	if !utf8.Valid(body) {
		return Event{}, reject(ReasonInvalidUTF8, "", "body is not valid UTF-8")
	}
	s := scanner{data: body}
	s.skipWS()
	switch s.peek() {
	case '{':
	case 'n':
		if s.literal("null") && s.atEnd() {
			// JSON null decodes to no fields at all.
			return Event{}, reject(ReasonMissingEventType, "", "notification has no event_type")
		}
		return Event{}, reject(ReasonNotJSON, "", "body is not a JSON object: %v", s.err)
	default:
		s.failChar("looking for beginning of value")
		return Event{}, reject(ReasonNotJSON, "", "body is not a JSON object: %v", s.err)
	}
	// One pass over the outer object: the envelope's two keys, or the v1
	// document's fields. The oslo.message string is unescaped into doc.
	var outer, inner notificationFields
	doc := getBuffer()
	defer putBuffer(doc)
	outer.doc = doc
	if !s.notification(&outer, true) || !s.atEnd() {
		return Event{}, reject(ReasonNotJSON, "", "body is not a JSON object: %v", s.err)
	}
	if outer.bad {
		return Event{}, reject(ReasonNotJSON, "", "body is not a JSON object: a number in a notification field does not fit a float64")
	}
	msg := &outer
	switch {
	case outer.version.present:
		if !outer.version.str.set || !outer.version.str.equal("2.0") {
			return Event{}, reject(ReasonUnsupportedVersion, "", "oslo.version is %s, want \"2.0\"", truncate(outer.version.raw))
		}
		if !outer.message.present {
			return Event{}, reject(ReasonBadEnvelope, "", "envelope has no oslo.message")
		}
		if !outer.message.str.set {
			return Event{}, reject(ReasonBadEnvelope, "", "oslo.message is not a JSON string")
		}
		in := scanner{data: outer.message.str.raw} // unescaped while scanning
		in.skipWS()
		if in.peek() != '{' || !in.notification(&inner, false) || !in.atEnd() || inner.bad {
			return Event{}, reject(ReasonBadEnvelope, "", "oslo.message does not hold a JSON object")
		}
		msg = &inner
	case outer.message.present:
		return Event{}, reject(ReasonBadEnvelope, "", "oslo.message without oslo.version")
	}

	var id string
	if msg.messageID.set {
		id = msg.messageID.String()
	}
	if !msg.eventType.set || len(msg.eventType.raw) == 0 {
		return Event{}, reject(ReasonMissingEventType, id, "notification has no event_type")
	}
	if id == "" || len(id) > maxIDLen {
		sum := sha256.Sum256(body)
		id = "sha256-" + hex.EncodeToString(sum[:16])
	}
	e := Event{Version: SchemaVersion, Kind: KindNotification, ID: id, Type: internType(msg.eventType)}
	e.Publisher = msg.publisher.String()
	if msg.timestamp.set {
		if t, err := time.ParseInLocation(osloTimeLayout, msg.timestamp.String(), time.UTC); err == nil {
			e.Time = t
		}
	}
	normalise(&e, &msg.payload)
	return e, nil
}

// knownTypeNames interns the event types Keystone emits most, so that
// decoding them does not allocate.
var knownTypeNames = func() map[string]string {
	m := map[string]string{"identity.authenticate": "identity.authenticate"}
	for _, t := range knownTypes {
		m[t] = t
	}
	return m
}()

func internType(j jstr) string {
	if !j.esc {
		if t, ok := knownTypeNames[string(j.raw)]; ok {
			return t
		}
	}
	return j.String()
}

// buffers hold unescaped oslo.message documents.
var buffers = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

func getBuffer() *[]byte { return buffers.Get().(*[]byte) }

func putBuffer(b *[]byte) {
	if cap(*b) <= 64<<10 {
		buffers.Put(b)
	}
}

// envelopeField is oslo.version or oslo.message: present unless absent or
// null (encoding/json leaves a *json.RawMessage nil for null).
type envelopeField struct {
	present bool
	raw     []byte // the JSON value
	str     jstr   // set when the value is a string
}

// notificationFields are the fields of a notification (and, in the outer
// object, of the envelope) that Decode reads.
type notificationFields struct {
	version, message                           envelopeField
	messageID, eventType, publisher, timestamp jstr
	payload                                    payloadFields
	// doc, in the outer object, receives the value of an oslo.message
	// string: message.str.raw is then *doc, unescaped.
	doc *[]byte
	// bad is set when encoding/json would fail to decode the object: a
	// number too large for a float64 in a field it decodes into interface{}.
	bad bool
}

// Keys of notificationFields, in notificationKeys order.
const (
	keyMessageID = iota
	keyEventType
	keyPublisher
	keyTimestamp
	keyPayload
	keyOsloVersion
	keyOsloMessage
)

var notificationKeys = []string{"message_id", "event_type", "publisher_id", "timestamp", "payload", "oslo.version", "oslo.message"}

// matchKey returns the index of the name in names that key matches, or -1.
func matchKey(key jstr, names []string) int {
	if !key.esc && isASCII(key.raw) {
		// Folding keeps an ASCII key's length: only a name of that length
		// can match, equal up to the case of its letters.
		for i, name := range names {
			if len(name) == len(key.raw) && equalFoldASCII(key.raw, name) {
				return i
			}
		}
		return -1
	}
	for i, name := range names {
		if !key.esc && len(key.raw) > 0 && key.raw[0] < utf8.RuneSelf && upperASCII(key.raw[0]) != upperASCII(name[0]) {
			continue // cannot match, exactly or folded
		}
		if keyIs(key, name) {
			return i
		}
	}
	return -1
}

func isASCII(b []byte) bool {
	for _, c := range b {
		if c >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

// equalFoldASCII reports whether the ASCII key and name are equal up to the
// case of their letters a-z.
func equalFoldASCII(key []byte, name string) bool {
	for i := range len(key) {
		if upperASCII(key[i]) != upperASCII(name[i]) {
			return false
		}
	}
	return true
}

// notification reads the object at s.pos into n. In the outer object
// (envelope true) the oslo.version and oslo.message keys are fields too.
func (s *scanner) notification(n *notificationFields, envelope bool) bool {
	names := notificationKeys[:keyOsloVersion]
	if envelope {
		names = notificationKeys
	}
	return s.object(func(key jstr) bool {
		var ok bool
		switch matchKey(key, names) {
		case keyMessageID:
			n.messageID, ok = s.anyString(&n.bad)
		case keyEventType:
			n.eventType, ok = s.anyString(&n.bad)
		case keyPublisher:
			n.publisher, ok = s.anyString(&n.bad)
		case keyTimestamp:
			n.timestamp, ok = s.anyString(&n.bad)
		case keyPayload:
			ok = s.payload(&n.payload)
		case keyOsloVersion:
			ok = s.envelopeField(&n.version)
		case keyOsloMessage:
			if s.peek() == '"' {
				start := s.pos
				*n.doc, ok = s.scanStringInto((*n.doc)[:0])
				n.message = envelopeField{present: true, raw: s.data[start:s.pos],
					str: jstr{raw: *n.doc, set: true}}
			} else {
				ok = s.envelopeField(&n.message)
			}
		default:
			ok = s.skipValue(false)
		}
		return ok
	})
}

func (s *scanner) envelopeField(f *envelopeField) bool {
	start := s.pos
	*f = envelopeField{}
	var ok bool
	switch s.peek() {
	case '"':
		f.str, ok = s.scanString()
	case 'n':
		return s.literal("null") // absent
	default:
		ok = s.skipValue(false)
	}
	f.present, f.raw = true, s.data[start:s.pos]
	return ok
}

// payloadFields is what normalise reads of a notification payload, in both
// formats: each field is set only when it holds a string (a bool for
// inherited).
type payloadFields struct {
	typeURI, resourceInfo, targetID    jstr
	actorID, actorType, actorOperation jstr
	user, group, project, domain, role jstr
	inherited                          bool
	// bad is set when encoding/json would fail to decode the payload into
	// its struct (target not an object, or a number too large for a
	// float64): the reference then reads no field at all.
	bad bool
}

var payloadKeys = []string{"typeURI", "resource_info", "target", "actor_id", "actor_type", "actor_operation",
	"user", "group", "project", "domain", "role", "inherited_to_projects"}

var targetKeys = []string{"id", "typeURI"}

// payload reads the payload value at s.pos into p (the last payload key
// wins, as with encoding/json). A payload that is not an object reads as
// empty.
func (s *scanner) payload(p *payloadFields) bool {
	*p = payloadFields{}
	switch s.peek() {
	case '{':
	case 'n':
		return s.literal("null")
	default:
		return s.skipValue(false)
	}
	return s.object(func(key jstr) bool {
		var ok bool
		switch matchKey(key, payloadKeys) {
		case 0:
			p.typeURI, ok = s.anyString(&p.bad)
		case 1:
			p.resourceInfo, ok = s.anyString(&p.bad)
		case 2:
			ok = s.target(p)
		case 3:
			p.actorID, ok = s.anyString(&p.bad)
		case 4:
			p.actorType, ok = s.anyString(&p.bad)
		case 5:
			p.actorOperation, ok = s.anyString(&p.bad)
		case 6:
			p.user, ok = s.anyString(&p.bad)
		case 7:
			p.group, ok = s.anyString(&p.bad)
		case 8:
			p.project, ok = s.anyString(&p.bad)
		case 9:
			p.domain, ok = s.anyString(&p.bad)
		case 10:
			p.role, ok = s.anyString(&p.bad)
		case 11:
			switch s.peek() {
			case 't':
				p.inherited, ok = true, s.literal("true")
			case 'f':
				p.inherited, ok = false, s.literal("false")
			default:
				p.inherited = false
				_, ok = s.anyString(&p.bad)
			}
		default:
			ok = s.skipValue(false)
		}
		return ok
	})
}

// target reads the payload's target value: an object is merged into what an
// earlier target key set, null changes nothing, anything else makes the
// payload unreadable (encoding/json cannot decode it into a struct).
func (s *scanner) target(p *payloadFields) bool {
	switch s.peek() {
	case '{':
	case 'n':
		return s.literal("null")
	default:
		p.bad = true
		return s.skipValue(false)
	}
	return s.object(func(key jstr) bool {
		var ok bool
		switch matchKey(key, targetKeys) {
		case 0:
			p.targetID, ok = s.anyString(&p.bad)
		case 1:
			_, ok = s.anyString(&p.bad) // not used, but decoded
		default:
			ok = s.skipValue(false)
		}
		return ok
	})
}

// normalise sets e's format, ids and Widen from the payload.
func normalise(e *Event, p *payloadFields) {
	if p.bad {
		p = &payloadFields{}
	}
	e.Format = "basic"
	if p.typeURI.set && p.typeURI.equal(cadfTypeURI) {
		e.Format = "cadf"
	}
	if !slices.Contains(knownTypes, e.Type) {
		e.Widen = WidenUnknownType
		return
	}

	if e.Type == "identity.role_assignment.created" || e.Type == "identity.role_assignment.deleted" {
		e.UserID, e.GroupID = idOf(p.user), idOf(p.group)
		e.ProjectID, e.DomainID = idOf(p.project), idOf(p.domain)
		e.RoleID = idOf(p.role)
		e.InheritedToProjects = p.inherited
		if e.UserID == "" && e.GroupID == "" {
			e.Widen = WidenMissingIDs
		}
		return
	}

	// Every other known type names one object: resource_info in both formats,
	// and target.id in CADF (for these types the two are the same id).
	id := idOf(p.resourceInfo)
	if id == "" && e.Format == "cadf" {
		id = idOf(p.targetID)
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
		if actor := idOf(p.actorID); actor != "" {
			e.Actor = &Actor{ID: actor, Type: p.actorType.String(), Operation: p.actorOperation.String()}
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

// idOf returns the string when it is a plausible Keystone id: non-empty and
// at most maxIDLen bytes.
func idOf(j jstr) string {
	if !j.set || len(j.raw) == 0 || (!j.esc && len(j.raw) > maxIDLen) {
		return ""
	}
	s := j.String()
	if len(s) > maxIDLen {
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
