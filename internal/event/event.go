// Package event defines the normalised event that keystone-fanout carries from
// Keystone to every region, and turns Keystone's oslo.messaging notifications
// into it.
//
// An Event is published to JetStream as its JSON encoding (schema version
// SchemaVersion). The schema only grows: new fields are optional, and a reader
// that meets an Event with a higher Version than it knows, or a Kind it does not
// know, must treat it as unbounded (remove every token entry) rather than skip it.
package event

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"time"
)

// SchemaVersion is the version of the Event JSON schema this package writes.
const SchemaVersion = 1

// Kind says where an Event came from.
type Kind string

const (
	// KindNotification is an oslo.messaging notification published by Keystone.
	KindNotification Kind = "notification"
	// KindRevocation is a revocation event listed by Keystone's
	// GET /v3/OS-REVOKE/events.
	KindRevocation Kind = "revocation"
	// KindPolled is the revocation poller's proof that it listed Keystone's
	// revocation events after the notifications up to a stream sequence were
	// in the stream (Polled), and published what it found before it. It
	// changes no cache entry; see docs/REVOCATION.md, "Resolving
	// notifications".
	KindPolled Kind = "polled"
)

// PolledType is the Type of a KindPolled event.
const PolledType = "revocation.polled"

// Event is one token-affecting change in Keystone, normalised.
//
// Which id fields are set depends on Type; see docs/EVENTS.md. When Keystone's
// notification did not say enough to bound the change (an unknown event type,
// a token-affecting type without the ids it should carry), Widen names the
// reason and a region agent must remove every token entry.
type Event struct {
	// Version is the schema version, SchemaVersion when written by this package.
	Version int `json:"version"`
	// Kind is where the event came from.
	Kind Kind `json:"kind"`
	// ID identifies the event across retries and replicas: the oslo message_id
	// of a notification, or a digest of a revocation event's content. It is the
	// JetStream Nats-Msg-Id.
	ID string `json:"id"`
	// Type is the oslo event_type, for example "identity.user.updated", or
	// "revocation" for a revocation event.
	Type string `json:"type"`
	// Time is when Keystone made the change (its notification timestamp, or the
	// revocation event's revoked_at), in UTC.
	Time time.Time `json:"time"`
	// Publisher is the oslo publisher_id, for example "identity.host1".
	Publisher string `json:"publisher,omitempty"`
	// Format is the notification payload format: "basic" or "cadf".
	Format string `json:"format,omitempty"`
	// Widen, when not empty, is why the event cannot be bounded: a region agent
	// removes every token entry for it.
	Widen string `json:"widen,omitempty"`

	UserID              string `json:"user_id,omitempty"`
	ProjectID           string `json:"project_id,omitempty"`
	DomainID            string `json:"domain_id,omitempty"`
	GroupID             string `json:"group_id,omitempty"`
	RoleID              string `json:"role_id,omitempty"`
	TrustID             string `json:"trust_id,omitempty"`
	AppCredID           string `json:"application_credential_id,omitempty"`
	InheritedToProjects bool   `json:"inherited_to_projects,omitempty"`

	// Actor is set for identity.group.updated in the basic format: the user
	// added to or removed from the group. CADF notifications do not name it.
	Actor *Actor `json:"actor,omitempty"`

	// Revocation is set for KindRevocation.
	Revocation *Revocation `json:"revocation,omitempty"`

	// Polled is set for KindPolled.
	Polled *Polled `json:"polled,omitempty"`
}

// Polled says that a poll of Keystone's revocation events started after every
// notification up to stream sequence Through was stored in the stream, and
// that every event that poll listed was stored before this one.
type Polled struct {
	Through uint64 `json:"through"`
}

// Actor is the subject of a group membership change.
type Actor struct {
	ID        string `json:"id"`
	Type      string `json:"type"`      // "user"
	Operation string `json:"operation"` // "added" or "removed"
}

// Revocation is one of Keystone's revocation events. A token is revoked by it
// when every field that is set matches the token and the token was issued at or
// before IssuedBefore, as Keystone's own revoke model decides.
type Revocation struct {
	UserID        string     `json:"user_id,omitempty"`
	ProjectID     string     `json:"project_id,omitempty"`
	DomainID      string     `json:"domain_id,omitempty"`
	RoleID        string     `json:"role_id,omitempty"`
	TrustID       string     `json:"trust_id,omitempty"`
	ConsumerID    string     `json:"consumer_id,omitempty"`
	AccessTokenID string     `json:"access_token_id,omitempty"`
	AuditID       string     `json:"audit_id,omitempty"`
	AuditChainID  string     `json:"audit_chain_id,omitempty"`
	ExpiresAt     *time.Time `json:"expires_at,omitempty"`
	IssuedBefore  time.Time  `json:"issued_before"`
	RevokedAt     time.Time  `json:"revoked_at"`
}

// Digest is a stable identifier of the revocation event's content, used as its
// Event.ID so that several pollers and restarts publish it once.
func (r *Revocation) Digest() string {
	b, _ := json.Marshal(r) // fixed field order, cannot fail
	sum := sha256.Sum256(b)
	return "revoke-" + hex.EncodeToString(sum[:16])
}

// Unbounded reports whether an agent must remove every token entry for e:
// the event says so, or it was written by a newer schema or is of a kind this
// version does not know.
func (e *Event) Unbounded() bool {
	if e.Widen != "" || e.Version > SchemaVersion {
		return true
	}
	switch e.Kind {
	case KindNotification:
		return !slices.Contains(knownTypes, e.Type)
	case KindRevocation:
		return e.Revocation == nil
	case KindPolled:
		return e.Polled == nil
	}
	return true
}

// ResolvedByRevocations reports whether e is a notification whose effect on
// tokens, if any, Keystone records as revocation events, while e itself cannot
// bound it: a group membership change that does not name the user (CADF; a
// rename looks the same). Keystone records a user_id revocation event for a
// removal, before it sends the notification, and none for an addition or a
// rename, which revoke nothing. An agent that knows the revocation poller has
// polled past e can rely on those events instead of removing every token.
func (e *Event) ResolvedByRevocations() bool {
	return e.Kind == KindNotification && e.Widen == "" && e.Version <= SchemaVersion &&
		e.Type == "identity.group.updated" && e.Actor == nil
}

// Unmarshal decodes a JetStream message body written by Marshal. An error means
// the body is not an Event at all; the caller should treat it as unbounded.
func Unmarshal(b []byte) (Event, error) {
	var e Event
	if err := json.Unmarshal(b, &e); err != nil {
		return Event{}, fmt.Errorf("event: decoding stream message: %w", err)
	}
	return e, nil
}
