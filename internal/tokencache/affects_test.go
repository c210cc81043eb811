package tokencache

import (
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

var t0 = time.Date(2026, 11, 22, 13, 0, 0, 500000, time.UTC)

// ruleTokens are the tokens every rule case is checked against: each case
// lists exactly the ones it must affect.
func ruleTokens() map[string]Token {
	return map[string]Token{
		// u1 (domain d1) on p1 (domain d1)
		"u1-p1": {UserID: "u1", UserDomainID: "d1", ProjectID: "p1", ProjectDomainID: "d1",
			RoleIDs: []string{"r-member", "r-cap"}, AuditIDs: []string{"aud-u1p1"}, IssuedAt: t0, ExpiresAt: t0.Add(time.Hour)},
		// u1 rescoped from u1-p1 to p2 (domain d1)
		"u1-p2-rescoped": {UserID: "u1", UserDomainID: "d1", ProjectID: "p2", ProjectDomainID: "d1",
			RoleIDs: []string{"r-member"}, AuditIDs: []string{"aud-u1p2", "aud-u1p1"}, IssuedAt: t0.Add(time.Minute), ExpiresAt: t0.Add(time.Hour)},
		// u1 scoped to domain d1
		"u1-domain-d1": {UserID: "u1", UserDomainID: "d1", DomainID: "d1",
			RoleIDs: []string{"r-admin"}, AuditIDs: []string{"aud-u1d1"}, IssuedAt: t0, ExpiresAt: t0.Add(time.Hour)},
		// u1 application credential on p1
		"u1-appcred": {UserID: "u1", UserDomainID: "d1", ProjectID: "p1", ProjectDomainID: "d1", AppCredID: "ac1",
			RoleIDs: []string{"r-member"}, AuditIDs: []string{"aud-ac"}, IssuedAt: t0, ExpiresAt: t0.Add(time.Hour)},
		// trust t1: u1 (trustor) -> u2 (trustee, domain d2) on p1
		"u2-trust-t1": {UserID: "u2", UserDomainID: "d2", ProjectID: "p1", ProjectDomainID: "d1", TrustID: "t1",
			TrustorUserID: "u1", TrusteeUserID: "u2", RoleIDs: []string{"r-member"}, AuditIDs: []string{"aud-trust"}, IssuedAt: t0, ExpiresAt: t0.Add(time.Hour)},
		// u3 (domain d3) on p3 (domain d3), unrelated to everything above
		"u3-p3": {UserID: "u3", UserDomainID: "d3", ProjectID: "p3", ProjectDomainID: "d3",
			RoleIDs: []string{"r-reader"}, AuditIDs: []string{"aud-u3"}, IssuedAt: t0, ExpiresAt: t0.Add(2 * time.Hour)},
		// u4 (domain d3) on the project acting as domain d4
		"u4-is-domain-d4": {UserID: "u4", UserDomainID: "d3", ProjectID: "d4", IsDomain: true,
			RoleIDs: []string{"r-reader"}, AuditIDs: []string{"aud-u4"}, IssuedAt: t0, ExpiresAt: t0.Add(time.Hour)},
		// u5 (domain d3), system scope
		"u5-system": {UserID: "u5", UserDomainID: "d3", System: true,
			RoleIDs: []string{"r-admin"}, AuditIDs: []string{"aud-u5"}, IssuedAt: t0, ExpiresAt: t0.Add(time.Hour)},
		// u6 (domain d3) through OAuth1 consumer c1 on p3
		"u6-oauth-c1": {UserID: "u6", UserDomainID: "d3", ProjectID: "p3", ProjectDomainID: "d3",
			OAuthConsumerID: "c1", OAuthAccessTokenID: "at1", RoleIDs: []string{"r-reader"}, AuditIDs: []string{"aud-u6"}, IssuedAt: t0, ExpiresAt: t0.Add(time.Hour)},
		// u7 (domain d3), unscoped
		"u7-unscoped": {UserID: "u7", UserDomainID: "d3", AuditIDs: []string{"aud-u7"}, IssuedAt: t0.Add(2 * time.Hour), ExpiresAt: t0.Add(3 * time.Hour)},
	}
}

func allTokens() []string {
	var out []string
	for n := range ruleTokens() {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func notif(typ string, mod func(*event.Event)) event.Event {
	e := event.Event{Version: event.SchemaVersion, Kind: event.KindNotification, ID: "id-" + typ, Type: typ}
	if mod != nil {
		mod(&e)
	}
	return e
}

func revocation(r event.Revocation) event.Event {
	return event.Event{Version: event.SchemaVersion, Kind: event.KindRevocation, ID: "rev", Type: "revocation", Revocation: &r}
}

type ruleCase struct {
	name  string
	event event.Event
	want  []string // tokens affected; "ALL" for every token
}

// ruleCases is the rule table of docs/INVALIDATION.md: every row is a named
// case here.
func ruleCases() []ruleCase {
	return []ruleCase{
		{"user updated: the user's tokens and trusts where the user is trustor or trustee",
			notif("identity.user.updated", func(e *event.Event) { e.UserID = "u1" }),
			[]string{"u1-p1", "u1-p2-rescoped", "u1-domain-d1", "u1-appcred", "u2-trust-t1"}},
		{"user deleted: trustee",
			notif("identity.user.deleted", func(e *event.Event) { e.UserID = "u2" }),
			[]string{"u2-trust-t1"}},
		{"user updated: user without cached tokens",
			notif("identity.user.updated", func(e *event.Event) { e.UserID = "nobody" }), nil},
		{"project updated: tokens scoped to it",
			notif("identity.project.updated", func(e *event.Event) { e.ProjectID = "p1" }),
			[]string{"u1-p1", "u1-appcred", "u2-trust-t1"}},
		{"project deleted: tokens scoped to it",
			notif("identity.project.deleted", func(e *event.Event) { e.ProjectID = "p3" }),
			[]string{"u3-p3", "u6-oauth-c1"}},
		{"project updated with a domain id (domain disabled): tokens of its projects, users and scope",
			notif("identity.project.updated", func(e *event.Event) { e.ProjectID = "d1" }),
			[]string{"u1-p1", "u1-p2-rescoped", "u1-domain-d1", "u1-appcred", "u2-trust-t1"}},
		{"project updated: project acting as a domain",
			notif("identity.project.updated", func(e *event.Event) { e.ProjectID = "d4" }),
			[]string{"u4-is-domain-d4"}},
		{"domain updated: user domain, project domain, domain scope, and every trust token",
			notif("identity.domain.updated", func(e *event.Event) { e.DomainID = "d3" }),
			[]string{"u3-p3", "u4-is-domain-d4", "u5-system", "u6-oauth-c1", "u7-unscoped", "u2-trust-t1"}},
		{"domain deleted: is_domain project id",
			notif("identity.domain.deleted", func(e *event.Event) { e.DomainID = "d4" }),
			[]string{"u4-is-domain-d4", "u2-trust-t1"}},
		{"role assignment for a user: the user's tokens",
			notif("identity.role_assignment.deleted", func(e *event.Event) { e.UserID, e.ProjectID, e.RoleID = "u1", "p1", "r-cap" }),
			[]string{"u1-p1", "u1-p2-rescoped", "u1-domain-d1", "u1-appcred", "u2-trust-t1"}},
		{"role assignment created for a user on a domain, inherited: the user's tokens",
			notif("identity.role_assignment.created", func(e *event.Event) {
				e.UserID, e.DomainID, e.RoleID, e.InheritedToProjects = "u3", "d3", "r-cap", true
			}),
			[]string{"u3-p3"}},
		{"role assignment for a group on a project: tokens scoped to the project",
			notif("identity.role_assignment.deleted", func(e *event.Event) { e.GroupID, e.ProjectID, e.RoleID = "g1", "p1", "r-cap" }),
			[]string{"u1-p1", "u1-appcred", "u2-trust-t1"}},
		{"role assignment for a group on a project, inherited: every project-scoped token",
			notif("identity.role_assignment.created", func(e *event.Event) {
				e.GroupID, e.ProjectID, e.RoleID, e.InheritedToProjects = "g1", "p3", "r-cap", true
			}),
			[]string{"u1-p1", "u1-p2-rescoped", "u1-appcred", "u2-trust-t1", "u3-p3", "u4-is-domain-d4", "u6-oauth-c1"}},
		{"role assignment for a group on a domain: domain-scoped tokens of it",
			notif("identity.role_assignment.deleted", func(e *event.Event) { e.GroupID, e.DomainID, e.RoleID = "g1", "d1", "r-cap" }),
			[]string{"u1-domain-d1"}},
		{"role assignment for a group on a domain: project acting as the domain",
			notif("identity.role_assignment.deleted", func(e *event.Event) { e.GroupID, e.DomainID, e.RoleID = "g1", "d4", "r-cap" }),
			[]string{"u4-is-domain-d4"}},
		{"role assignment for a group on a domain, inherited: every project token in the domain and its domain scope",
			notif("identity.role_assignment.deleted", func(e *event.Event) {
				e.GroupID, e.DomainID, e.RoleID, e.InheritedToProjects = "g1", "d1", "r-cap", true
			}),
			[]string{"u1-p1", "u1-p2-rescoped", "u1-domain-d1", "u1-appcred", "u2-trust-t1"}},
		{"role assignment for a group without target: every token",
			notif("identity.role_assignment.created", func(e *event.Event) { e.GroupID, e.RoleID = "g1", "r-cap" }), []string{"ALL"}},
		{"role assignment without user or group: every token",
			notif("identity.role_assignment.created", func(e *event.Event) { e.ProjectID = "p1" }), []string{"ALL"}},
		{"group membership with the user named (basic): that user's tokens",
			notif("identity.group.updated", func(e *event.Event) {
				e.GroupID, e.Actor = "g1", &event.Actor{ID: "u1", Type: "user", Operation: "removed"}
			}),
			[]string{"u1-p1", "u1-p2-rescoped", "u1-domain-d1", "u1-appcred", "u2-trust-t1"}},
		{"group updated without a user (CADF membership, rename): every token",
			notif("identity.group.updated", func(e *event.Event) { e.GroupID = "g1" }), []string{"ALL"}},
		{"group updated with a non-user actor: every token",
			notif("identity.group.updated", func(e *event.Event) { e.GroupID, e.Actor = "g1", &event.Actor{ID: "x", Type: "group"} }), []string{"ALL"}},
		{"group deleted: every token",
			notif("identity.group.deleted", func(e *event.Event) { e.GroupID = "g1" }), []string{"ALL"}},
		{"role updated: tokens carrying the role",
			notif("identity.role.updated", func(e *event.Event) { e.RoleID = "r-admin" }),
			[]string{"u1-domain-d1", "u5-system"}},
		{"role deleted: every token (domain-specific roles imply roles without appearing)",
			notif("identity.role.deleted", func(e *event.Event) { e.RoleID = "r-admin" }), []string{"ALL"}},
		{"trust deleted: tokens of the trust",
			notif("identity.OS-TRUST:trust.deleted", func(e *event.Event) { e.TrustID = "t1" }), []string{"u2-trust-t1"}},
		{"application credential deleted: its tokens",
			notif("identity.application_credential.deleted", func(e *event.Event) { e.AppCredID = "ac1" }), []string{"u1-appcred"}},
		{"unknown event type (unbounded): every token",
			notif("identity.something.new", func(e *event.Event) { e.Widen = event.WidenUnknownType }), []string{"ALL"}},
		{"known type without its id (Widen missing_ids): every token",
			notif("identity.user.updated", func(e *event.Event) { e.Widen = event.WidenMissingIDs }), []string{"ALL"}},
		{"known type with an empty id and no Widen: every token",
			notif("identity.user.updated", nil), []string{"ALL"}},
		{"newer schema version: every token",
			notif("identity.user.updated", func(e *event.Event) { e.UserID = "u1"; e.Version = event.SchemaVersion + 1 }), []string{"ALL"}},
		{"unknown kind: every token",
			event.Event{Version: 1, Kind: "future", Type: "x"}, []string{"ALL"}},
		{"revocation without revocation body: every token",
			event.Event{Version: 1, Kind: event.KindRevocation, Type: "revocation"}, []string{"ALL"}},
		{"poller progress: no token",
			event.Event{Version: 1, Kind: event.KindPolled, Type: event.PolledType, Polled: &event.Polled{Through: 3}}, nil},
		{"poller progress without its body: every token",
			event.Event{Version: 1, Kind: event.KindPolled, Type: event.PolledType}, []string{"ALL"}},

		// Revocation events: Keystone's revoke model.
		{"revocation user_id: user, trustor, trustee issued before",
			revocation(event.Revocation{UserID: "u1", IssuedBefore: t0.Add(30 * time.Second)}),
			[]string{"u1-p1", "u1-domain-d1", "u1-appcred", "u2-trust-t1"}}, // u1-p2-rescoped was issued later
		{"revocation issued_before equal to issued_at revokes",
			revocation(event.Revocation{UserID: "u3", IssuedBefore: t0}), []string{"u3-p3"}},
		{"revocation issued_before before issued_at does not revoke",
			revocation(event.Revocation{UserID: "u3", IssuedBefore: t0.Add(-time.Microsecond)}), nil},
		{"revocation project_id",
			revocation(event.Revocation{ProjectID: "p1", IssuedBefore: t0.Add(time.Hour)}),
			[]string{"u1-p1", "u1-appcred", "u2-trust-t1"}},
		{"revocation audit_id: the token itself, not its rescoped children",
			revocation(event.Revocation{AuditID: "aud-u1p1", IssuedBefore: t0.Add(time.Hour)}), []string{"u1-p1"}},
		{"revocation audit_chain_id: the whole chain",
			revocation(event.Revocation{AuditChainID: "aud-u1p1", IssuedBefore: t0.Add(time.Hour)}), []string{"u1-p1", "u1-p2-rescoped"}},
		{"revocation domain_id: user domain, project domain, domain scope",
			revocation(event.Revocation{DomainID: "d1", IssuedBefore: t0.Add(time.Hour)}),
			[]string{"u1-p1", "u1-p2-rescoped", "u1-domain-d1", "u1-appcred", "u2-trust-t1"}},
		{"revocation domain_id with expires_at: domain-scoped token with that expiry",
			revocation(event.Revocation{DomainID: "d1", ExpiresAt: ptr(t0.Add(time.Hour).Truncate(time.Second)), IssuedBefore: t0.Add(time.Hour)}),
			[]string{"u1-p1", "u1-p2-rescoped", "u1-domain-d1", "u1-appcred", "u2-trust-t1"}},
		{"revocation expires_at compares to the second",
			revocation(event.Revocation{ExpiresAt: ptr(t0.Add(2 * time.Hour).Truncate(time.Second)), IssuedBefore: t0.Add(time.Hour)}),
			[]string{"u3-p3"}},
		{"revocation trust_id",
			revocation(event.Revocation{TrustID: "t1", IssuedBefore: t0.Add(time.Hour)}), []string{"u2-trust-t1"}},
		{"revocation consumer_id",
			revocation(event.Revocation{ConsumerID: "c1", IssuedBefore: t0.Add(time.Hour)}), []string{"u6-oauth-c1"}},
		{"revocation access_token_id alone is not compared (as in Keystone)",
			revocation(event.Revocation{AccessTokenID: "other", ConsumerID: "c1", IssuedBefore: t0.Add(time.Hour)}), []string{"u6-oauth-c1"}},
		{"revocation role_id",
			revocation(event.Revocation{RoleID: "r-reader", IssuedBefore: t0.Add(time.Hour)}), []string{"u3-p3", "u4-is-domain-d4", "u6-oauth-c1"}},
		{"revocation every set field must match",
			revocation(event.Revocation{UserID: "u1", ProjectID: "p3", IssuedBefore: t0.Add(time.Hour)}), nil},
		{"revocation with only issued_before: every token issued before",
			revocation(event.Revocation{IssuedBefore: t0.Add(time.Hour)}),
			[]string{"u1-p1", "u1-p2-rescoped", "u1-domain-d1", "u1-appcred", "u2-trust-t1", "u3-p3", "u4-is-domain-d4", "u5-system", "u6-oauth-c1"}},
	}
}

func TestAffectsRules(t *testing.T) {
	toks := ruleTokens()
	for _, tc := range ruleCases() {
		t.Run(tc.name, func(t *testing.T) {
			want := tc.want
			if slices.Equal(want, []string{"ALL"}) {
				want = allTokens()
			}
			var got []string
			for _, n := range allTokens() {
				tok := toks[n]
				if Affects(&tc.event, &tok) {
					got = append(got, n)
				}
			}
			w := slices.Clone(want)
			sort.Strings(w)
			if !slices.Equal(got, w) {
				t.Errorf("affected %v\nwant     %v", got, w)
			}
		})
	}
}

func TestRevocationUnknownTokenTimesMatch(t *testing.T) {
	tok := Token{UserID: "u1"}
	e := revocation(event.Revocation{UserID: "u1", IssuedBefore: t0, ExpiresAt: ptr(t0)})
	if !Affects(&e, &tok) {
		t.Fatal("a token whose times could not be read must count as revoked")
	}
}

func ptr[T any](v T) *T { return &v }
