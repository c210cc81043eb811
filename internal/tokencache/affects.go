package tokencache

import (
	"slices"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

// The matching rules are data: an event compiles to a predicate made of
// clauses over token fields, and the same predicate is evaluated on a parsed
// Token (strings, Affects) and on a remembered index entry (32-bit hashes of
// the same fields, see index.go). A hash collision can only make an entry
// match when it should not: removing too much, never too little.

// field names a token field a clause can test.
type field uint8

const (
	fUser field = iota
	fUserDomain
	fProject
	fProjectDomain
	fDomain // domain scope
	fTrust
	fTrustor
	fTrustee
	fAppCred
	fConsumer
	fRole     // membership in the token's roles
	fAudit    // the token's own audit id (audit_ids[0])
	fAuditAny // any of the token's audit ids
	nFields
)

// nIDFields is the number of single-valued id fields (fUser to fConsumer),
// stored per index entry.
const nIDFields = fRole

// fieldSet is a set of fields.
type fieldSet uint16

func fields(fs ...field) fieldSet {
	var s fieldSet
	for _, f := range fs {
		s |= 1 << f
	}
	return s
}

func (s fieldSet) has(f field) bool { return s&(1<<f) != 0 }

// clause is true when one of its fields equals id (is a member, for fRole
// and fAuditAny), or, for a presence clause (id ""), when one of them is
// not empty.
type clause struct {
	fields fieldSet
	id     string
}

// predicate is what an event removes.
type predicate struct {
	// all: every token.
	all bool
	// or: a notification rule, true when any clause is.
	or []clause
	// and: a revocation event, true when every clause is and the times
	// match.
	revocation   bool
	and          []clause
	issuedBefore time.Time  // zero: any
	expiresAt    *time.Time // nil: any; compared to the second
}

var (
	userFields   = fields(fUser, fTrustor, fTrustee)
	scopeFields  = fields(fProject, fProjectDomain, fDomain, fUserDomain)
	domainFields = fields(fUserDomain, fProjectDomain, fDomain, fProject)
)

// compile turns an event into its predicate: the rule table of
// docs/INVALIDATION.md.
func compile(e *event.Event) predicate {
	all := predicate{all: true}
	if e.Unbounded() {
		return all
	}
	if e.Kind == event.KindRevocation {
		return compileRevocation(e.Revocation)
	}
	if e.Kind == event.KindPolled {
		return predicate{} // the poller's progress: no token
	}
	any := func(id string, cs ...clause) predicate {
		if id == "" { // a known type without its id: widen
			return all
		}
		return predicate{or: cs}
	}
	switch e.Type {
	case "identity.user.updated", "identity.user.deleted":
		return any(e.UserID, clause{userFields, e.UserID})
	case "identity.project.updated", "identity.project.deleted":
		// Also sent with the domain id when a domain is disabled.
		return any(e.ProjectID, clause{scopeFields, e.ProjectID})
	case "identity.domain.updated", "identity.domain.deleted":
		// The trustor's domain is not in a trust token's body.
		return any(e.DomainID, clause{domainFields, e.DomainID}, clause{fields(fTrust), ""})
	case "identity.role_assignment.created", "identity.role_assignment.deleted":
		return compileRoleAssignment(e)
	case "identity.group.updated":
		if a := e.Actor; a != nil && a.ID != "" && (a.Type == "user" || a.Type == "") {
			return predicate{or: []clause{{userFields, a.ID}}}
		}
		return all // CADF does not name the user; a rename looks the same
	case "identity.group.deleted":
		return all // members unknown
	case "identity.role.updated":
		return any(e.RoleID, clause{fields(fRole), e.RoleID})
	case "identity.role.deleted":
		// A deleted domain-specific role takes away the roles it implies,
		// and domain-specific roles never appear in tokens.
		return all
	case "identity.OS-TRUST:trust.deleted":
		return any(e.TrustID, clause{fields(fTrust), e.TrustID})
	case "identity.application_credential.deleted":
		return any(e.AppCredID, clause{fields(fAppCred), e.AppCredID})
	}
	return all // a type event.Unbounded knows but this switch does not: never skip
}

func compileRoleAssignment(e *event.Event) predicate {
	if e.UserID == "" && e.GroupID == "" {
		return predicate{all: true}
	}
	var cs []clause
	if e.UserID != "" {
		cs = append(cs, clause{userFields, e.UserID})
	}
	if e.GroupID != "" {
		// The group's members are unknown: every token a member could hold
		// on the target.
		switch {
		case e.ProjectID != "" && e.InheritedToProjects:
			// Inherited by the project's subtree, whose ids are unknown.
			cs = append(cs, clause{fields(fProject), ""})
		case e.ProjectID != "":
			cs = append(cs, clause{fields(fProject, fDomain), e.ProjectID})
		case e.DomainID != "" && e.InheritedToProjects:
			cs = append(cs, clause{fields(fProjectDomain, fDomain, fProject), e.DomainID})
		case e.DomainID != "":
			cs = append(cs, clause{fields(fDomain, fProject), e.DomainID})
		default:
			return predicate{all: true} // a system or unknown target
		}
	}
	return predicate{or: cs}
}

func compileRevocation(r *event.Revocation) predicate {
	if r == nil {
		return predicate{all: true}
	}
	p := predicate{revocation: true, issuedBefore: r.IssuedBefore}
	add := func(fs fieldSet, id string) {
		if id != "" {
			p.and = append(p.and, clause{fs, id})
		}
	}
	add(fields(fAudit), r.AuditID)
	add(fields(fTrust), r.TrustID)
	add(userFields, r.UserID)
	add(fields(fProject), r.ProjectID)
	add(fields(fConsumer), r.ConsumerID)
	add(fields(fAuditAny), r.AuditChainID)
	add(fields(fUserDomain, fProjectDomain, fDomain), r.DomainID)
	add(fields(fRole), r.RoleID)
	if r.ExpiresAt != nil {
		t := r.ExpiresAt.Truncate(time.Second)
		p.expiresAt = &t
	}
	return p
}

// Affects reports whether the change e can make the cached validation of t
// stale, so that its cache entry must be removed. The rules, derived from what
// Keystone checks when it validates a token, are the table in
// docs/INVALIDATION.md. Removing too much is safe; keeping a stale entry is
// not, so every doubt widens:
//
//   - e.Unbounded() (unknown type or kind, newer schema, Widen set) affects
//     every token, as does a known type without the ids it should carry.
//   - A user change affects tokens where the user is the token's user, the
//     trustor or the trustee.
//   - A project change (also sent with the domain id when a domain is
//     disabled) affects tokens whose project, project domain, domain scope
//     or user domain is that id.
//   - A domain change affects tokens whose user domain, project domain,
//     domain scope or project (a project acting as the domain) is the domain,
//     and every trust token (the trustor's domain is not in the body).
//   - A role assignment for a user affects that user's tokens; for a group,
//     the tokens any member could hold on the target (members are unknown):
//     tokens scoped to the project; for a domain, domain-scoped tokens of it
//     and, when inherited, every project token in it; for an inherited
//     project assignment every project-scoped token; with no target, every
//     token.
//   - A group membership change naming the user (basic format) affects that
//     user's tokens; without a user (CADF, or a group rename) and group
//     deletion affect every token.
//   - A role update affects tokens carrying the role; a role deletion every
//     token (a deleted domain-specific role removes the roles it implies, and
//     domain-specific roles never appear in tokens).
//   - A trust or application credential deletion affects the tokens that
//     carry its id.
//   - A revocation event matches as Keystone's revoke model does (see
//     RevocationMatches).
func Affects(e *event.Event, t *Token) bool {
	p := compile(e)
	return p.matchToken(t)
}

// RevocationMatches reports whether Keystone's revocation event r revokes t,
// as keystone.models.revoke_model.matches together with the SQL pre-filter of
// keystone.revoke.backends.sql decide it: the token was issued at or before
// r.IssuedBefore, and every field set in r matches:
//
//   - UserID: the token's user, trustor or trustee;
//   - ProjectID: the token's project;
//   - AuditID: the token's own audit id (audit_ids[0]);
//   - AuditChainID: any of the token's audit ids (Keystone compares the
//     parent audit id only; matching the token's own id as well also removes
//     the first token of the chain);
//   - DomainID: the user's domain, the project's domain or the domain scope
//     (Keystone, with ExpiresAt set, only the domain scope);
//   - ExpiresAt: the token's expiry, to the second;
//   - TrustID, ConsumerID: the token's trust, OAuth1 consumer;
//   - RoleID: one of the token's roles.
//
// AccessTokenID is not compared, as Keystone does not compare it. Token times
// that could not be read count as matching. A nil r matches every token.
func RevocationMatches(r *event.Revocation, t *Token) bool {
	p := compileRevocation(r)
	return p.matchToken(t)
}

func (p *predicate) matchToken(t *Token) bool {
	switch {
	case p.all:
		return true
	case p.revocation:
		if !p.issuedBefore.IsZero() && !t.IssuedAt.IsZero() && t.IssuedAt.After(p.issuedBefore) {
			return false
		}
		if p.expiresAt != nil && !t.ExpiresAt.IsZero() && !t.ExpiresAt.Truncate(time.Second).Equal(*p.expiresAt) {
			return false
		}
		for i := range p.and {
			if !p.and[i].matchToken(t) {
				return false
			}
		}
		return true
	}
	for i := range p.or {
		if p.or[i].matchToken(t) {
			return true
		}
	}
	return false
}

// tokenField returns the value of a single-valued field.
func tokenField(t *Token, f field) string {
	switch f {
	case fUser:
		return t.UserID
	case fUserDomain:
		return t.UserDomainID
	case fProject:
		return t.ProjectID
	case fProjectDomain:
		return t.ProjectDomainID
	case fDomain:
		return t.DomainID
	case fTrust:
		return t.TrustID
	case fTrustor:
		return t.TrustorUserID
	case fTrustee:
		return t.TrusteeUserID
	case fAppCred:
		return t.AppCredID
	case fConsumer:
		return t.OAuthConsumerID
	case fAudit:
		return t.AuditID()
	}
	return ""
}

func (c *clause) matchToken(t *Token) bool {
	for f := field(0); f < nFields; f++ {
		if !c.fields.has(f) {
			continue
		}
		switch f {
		case fRole:
			if c.id == "" && len(t.RoleIDs) > 0 || c.id != "" && t.HasRole(c.id) {
				return true
			}
		case fAuditAny:
			if c.id == "" && len(t.AuditIDs) > 0 || c.id != "" && slices.Contains(t.AuditIDs, c.id) {
				return true
			}
		default:
			v := tokenField(t, f)
			if c.id == "" && v != "" || c.id != "" && v == c.id {
				return true
			}
		}
	}
	return false
}
