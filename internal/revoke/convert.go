package revoke

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

// Convert turns one revocation event as GET /v3/OS-REVOKE/events lists it
// into the Event published to JetStream:
//
//	Event{Version: event.SchemaVersion, Kind: event.KindRevocation,
//	      ID: rev.Digest(), Type: "revocation", Time: revoked_at, Revocation: &rev}
//
// Keystone's names are mapped to event.Revocation's ("OS-TRUST:trust_id" to
// TrustID, "OS-OAUTH1:consumer_id" to ConsumerID, ...). "domain_scope_id",
// which Keystone lists for an event recorded with both domain_id and
// expires_at, becomes DomainID: a domain_id matches a token by its user's or
// its scope's domain, a superset of what domain_scope_id matches, so nothing
// that Keystone rejects is left in a cache.
//
// An event that cannot be represented exactly (a field this version does not
// know, a value of the wrong type, a missing or unreadable issued_before) is
// still converted, with Widen set to the reason: a region agent then removes
// every token entry. Its ID then also covers the raw fields, so that it is not
// taken for a duplicate of a representable event. ok is false when revoked_at
// is missing or unreadable: such an event is published (widened) but must not
// move the poller's position.
func Convert(raw map[string]json.RawMessage) (e event.Event, ok bool) {
	var rev event.Revocation
	var problems []string
	str := func(name string, dst *string) {
		v, present := raw[name]
		if !present || string(v) == "null" {
			return
		}
		if err := json.Unmarshal(v, dst); err != nil {
			problems = append(problems, fmt.Sprintf("field %s is not a string", name))
		}
	}
	tm := func(name string) (time.Time, bool) {
		v, present := raw[name]
		if !present || string(v) == "null" {
			return time.Time{}, false
		}
		var s string
		if err := json.Unmarshal(v, &s); err != nil {
			problems = append(problems, fmt.Sprintf("field %s is not a string", name))
			return time.Time{}, false
		}
		t, err := parseTime(s)
		if err != nil {
			problems = append(problems, fmt.Sprintf("field %s: %v", name, err))
			return time.Time{}, false
		}
		return t, true
	}

	str("user_id", &rev.UserID)
	str("project_id", &rev.ProjectID)
	str("domain_id", &rev.DomainID)
	str("role_id", &rev.RoleID)
	str("OS-TRUST:trust_id", &rev.TrustID)
	str("OS-OAUTH1:consumer_id", &rev.ConsumerID)
	str("OS-OAUTH1:access_token_id", &rev.AccessTokenID)
	str("audit_id", &rev.AuditID)
	str("audit_chain_id", &rev.AuditChainID)
	var scope string
	str("domain_scope_id", &scope)
	if scope != "" {
		if rev.DomainID != "" && rev.DomainID != scope {
			problems = append(problems, "both domain_id and domain_scope_id are set")
		} else {
			rev.DomainID = scope
		}
	}
	if t, present := tm("expires_at"); present {
		rev.ExpiresAt = &t
	}
	revokedAt, ok := tm("revoked_at")
	if !ok {
		if _, present := raw["revoked_at"]; !present {
			problems = append(problems, "field revoked_at is missing")
		}
	}
	rev.RevokedAt = revokedAt
	issuedBefore, hasIssued := tm("issued_before")
	if !hasIssued {
		if _, present := raw["issued_before"]; !present {
			problems = append(problems, "field issued_before is missing")
		}
	}
	rev.IssuedBefore = issuedBefore

	var unknown []string
	for name, v := range raw {
		if !slices.Contains(knownFields, name) && string(v) != "null" {
			unknown = append(unknown, name)
		}
	}
	if len(unknown) > 0 {
		slices.Sort(unknown)
		problems = append(problems, "unknown fields "+strings.Join(unknown, ", "))
	}
	slices.Sort(problems)

	when := revokedAt
	if when.IsZero() {
		when = issuedBefore
	}
	e = event.Event{
		Version:    event.SchemaVersion,
		Kind:       event.KindRevocation,
		ID:         rev.Digest(),
		Type:       "revocation",
		Time:       when,
		Revocation: &rev,
	}
	if len(problems) > 0 {
		e.Widen = "revocation event not understood: " + strings.Join(problems, "; ")
		e.ID = rawDigest(raw)
	}
	return e, ok
}

// knownFields are the fields Keystone 22 lists (RevokeEvent.to_dict).
var knownFields = []string{
	"user_id", "project_id", "domain_id", "domain_scope_id", "role_id",
	"OS-TRUST:trust_id", "OS-OAUTH1:consumer_id", "OS-OAUTH1:access_token_id",
	"audit_id", "audit_chain_id", "expires_at", "issued_before", "revoked_at",
}

// rawDigest identifies an event by all of its fields as Keystone sent them,
// in a stable order, formatted like Revocation.Digest.
func rawDigest(raw map[string]json.RawMessage) string {
	names := make([]string, 0, len(raw))
	for n := range raw {
		names = append(names, n)
	}
	slices.Sort(names)
	h := sha256.New()
	for _, n := range names {
		fmt.Fprintf(h, "%q:%s\n", n, compactJSON(raw[n]))
	}
	sum := h.Sum(nil)
	return "revoke-" + hex.EncodeToString(sum[:16])
}

func compactJSON(v json.RawMessage) []byte {
	var tmp any
	if json.Unmarshal(v, &tmp) == nil {
		if out, err := json.Marshal(tmp); err == nil { // map keys sorted
			return out
		}
	}
	return v
}
