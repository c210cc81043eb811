package kmwtest

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"strconv"
	"time"
)

// Role is a role in a token.
type Role struct{ ID, Name string }

// Spec describes a token to generate. Empty ids are left out of the body
// (a spec with neither project, domain nor system is unscoped).
type Spec struct {
	UserID, UserName, UserDomainID string
	// ProjectID scopes the token to a project (also set for trust tokens).
	ProjectID, ProjectDomainID string
	IsDomain                   bool
	// DomainID scopes the token to a domain.
	DomainID string
	// System scopes the token to the system.
	System bool
	Roles  []Role
	// AuditIDs default to one fresh audit id.
	AuditIDs []string
	// IssuedAt defaults to Gen.Now; Lifetime to one hour.
	IssuedAt time.Time
	Lifetime time.Duration
	// Trust makes a trust-scoped token (with ProjectID).
	TrustID, TrustorID, TrusteeID string
	Impersonation                 bool
	// AppCredID marks an application credential token.
	AppCredID string
	// ConsumerID and AccessTokenID mark an OAuth1 token.
	ConsumerID, AccessTokenID string
	// FederatedGroupIDs and IdentityProviderID mark a federated user.
	FederatedGroupIDs  []string
	IdentityProviderID string
}

// Gen makes realistic Keystone v3 token bodies, in the key order and
// formatting Keystone and the middleware produce. Not safe for concurrent use.
type Gen struct {
	rnd *rand.Rand
	// Now is the issue time of tokens whose Spec has none.
	Now time.Time
	// KeystoneServiceID is the identity service's id in every catalog: the
	// id that CADF notifications carry as observer.id.
	KeystoneServiceID string
	// Region is the catalog's region.
	Region string
	// NoCatalog leaves the catalog out of scoped tokens, as Keystone answers
	// a middleware with include_service_catalog = False (about 1.2 KB a
	// value instead of 4.6 KB).
	NoCatalog bool
	services  []service
}

type service struct{ id, typ, name, port string }

// NewGen returns a generator seeded with seed (same seed, same output).
func NewGen(seed uint64) *Gen {
	g := &Gen{rnd: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), Now: time.Now().UTC().Truncate(time.Second), Region: "RegionTwo"}
	g.KeystoneServiceID = g.ID()
	for _, s := range []struct{ typ, name, port string }{
		{"compute", "nova", "8774/v2.1"}, {"image", "glance", "9292"}, {"network", "neutron", "9696"},
		{"volumev3", "cinderv3", "8776/v3/%(project_id)s"}, {"placement", "placement", "8778"},
		{"object-store", "swift", "8080/v1/AUTH_%(project_id)s"}, {"orchestration", "heat", "8004/v1/%(project_id)s"},
	} {
		g.services = append(g.services, service{g.ID(), s.typ, s.name, s.port})
	}
	return g
}

// ID returns a Keystone-style id: 32 lowercase hex characters.
func (g *Gen) ID() string {
	var b [16]byte
	g.fill(b[:])
	return hex.EncodeToString(b[:])
}

// AuditID returns a Keystone-style audit id: 22 characters of URL-safe
// base64 of 16 random bytes.
func (g *Gen) AuditID() string {
	var b [16]byte
	g.fill(b[:])
	return base64.RawURLEncoding.EncodeToString(b[:])
}

// TokenID returns a Fernet-like token string (183 URL-safe characters).
func (g *Gen) TokenID() string {
	b := make([]byte, 136)
	g.fill(b)
	b[0] = 0x80
	return base64.URLEncoding.EncodeToString(b)[:183]
}

func (g *Gen) fill(b []byte) {
	for i := 0; i < len(b); i += 8 {
		v := g.rnd.Uint64()
		for j := 0; j < 8 && i+j < len(b); j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
}

// Entry returns a new token id with the body for spec.
func (g *Gen) Entry(spec Spec) Entry {
	return Entry{TokenID: g.TokenID(), Body: g.Body(spec)}
}

// keystoneTime is keystone.common.utils.isotime(subsecond=True).
func keystoneTime(t time.Time) string {
	return t.UTC().Format("2006-01-02T15:04:05.000000Z")
}

// Body renders {"token": {...}} as Keystone's render_token_response_from_model
// orders it.
func (g *Gen) Body(s Spec) []byte {
	issued := s.IssuedAt
	if issued.IsZero() {
		issued = g.Now
	}
	life := s.Lifetime
	if life == 0 {
		life = time.Hour
	}
	audit := s.AuditIDs
	if audit == nil {
		audit = []string{g.AuditID()}
	}
	methods := []any{"password"}
	switch {
	case s.AppCredID != "":
		methods = []any{"application_credential"}
	case s.TrustID != "":
		methods = []any{"token"}
	case s.AccessTokenID != "":
		methods = []any{"oauth1"}
	case s.IdentityProviderID != "":
		methods = []any{"mapped"}
	}
	userName := s.UserName
	if userName == "" {
		userName = "user-" + short(s.UserID)
	}
	user := obj{
		{"domain", obj{{"id", s.UserDomainID}, {"name", "domain-" + short(s.UserDomainID)}}},
		{"id", s.UserID},
		{"name", userName},
		{"password_expires_at", nil},
	}
	tok := obj{
		{"methods", methods},
		{"user", user},
		{"audit_ids", strs(audit)},
		{"expires_at", keystoneTime(issued.Add(life))},
		{"issued_at", keystoneTime(issued)},
	}
	roles := make([]any, len(s.Roles))
	for i, r := range s.Roles {
		roles[i] = obj{{"id", r.ID}, {"name", r.Name}}
	}
	project := obj{
		{"domain", obj{{"id", s.ProjectDomainID}, {"name", "domain-" + short(s.ProjectDomainID)}}},
		{"id", s.ProjectID},
		{"name", "project-" + short(s.ProjectID)},
	}
	scoped := true
	switch {
	case s.System:
		tok = append(tok, kv{"roles", roles}, kv{"system", obj{{"all", true}}})
	case s.DomainID != "":
		tok = append(tok, kv{"domain", obj{{"id", s.DomainID}, {"name", "domain-" + short(s.DomainID)}}}, kv{"roles", roles})
	case s.TrustID != "":
		tok = append(tok, kv{"OS-TRUST:trust", obj{
			{"id", s.TrustID},
			{"trustor_user", obj{{"id", s.TrustorID}}},
			{"trustee_user", obj{{"id", s.TrusteeID}}},
			{"impersonation", s.Impersonation},
		}}, kv{"project", project}, kv{"roles", roles})
	case s.ProjectID != "":
		tok = append(tok, kv{"project", project}, kv{"is_domain", s.IsDomain}, kv{"roles", roles})
	default:
		scoped = false
	}
	if scoped && !g.NoCatalog {
		tok = append(tok, kv{"catalog", g.catalog()})
	}
	if s.IdentityProviderID != "" {
		groups := make([]any, len(s.FederatedGroupIDs))
		for i, id := range s.FederatedGroupIDs {
			groups[i] = obj{{"id", id}}
		}
		user = append(user[:3], kv{"OS-FEDERATION", obj{
			{"groups", groups},
			{"identity_provider", obj{{"id", s.IdentityProviderID}}},
			{"protocol", obj{{"id", "saml2"}}},
		}})
		tok[1] = kv{"user", user}
	}
	if s.AccessTokenID != "" {
		tok = append(tok, kv{"OS-OAUTH1", obj{{"access_token_id", s.AccessTokenID}, {"consumer_id", s.ConsumerID}}})
	}
	if s.AppCredID != "" {
		tok = append(tok, kv{"application_credential", obj{{"id", s.AppCredID}, {"name", "appcred-" + short(s.AppCredID)}, {"restricted", true}}})
	}
	var buf bytes.Buffer
	writeJSON(&buf, obj{{"token", tok}})
	return buf.Bytes()
}

func (g *Gen) catalog() []any {
	var out []any
	svcs := append([]service{{g.KeystoneServiceID, "identity", "keystone", "5000/v3"}}, g.services...)
	for _, s := range svcs {
		var eps []any
		for i, iface := range []string{"public", "internal", "admin"} {
			host := fmt.Sprintf("%s.%s.example.net", s.name, []string{"api", "internal", "admin"}[i])
			eps = append(eps, obj{
				{"id", endpointID(s.id, i)},
				{"interface", iface},
				{"region_id", g.Region},
				{"url", "https://" + host + ":" + s.port},
				{"region", g.Region},
			})
		}
		out = append(out, obj{{"endpoints", eps}, {"id", s.id}, {"type", s.typ}, {"name", s.name}})
	}
	return out
}

func endpointID(serviceID string, i int) string {
	return serviceID[:30] + "e" + strconv.Itoa(i)
}

func short(id string) string {
	if len(id) > 6 {
		return id[:6]
	}
	return id
}

func strs(s []string) []any {
	out := make([]any, len(s))
	for i, v := range s {
		out[i] = v
	}
	return out
}

// obj is a JSON object with ordered keys.
type obj []kv
type kv struct {
	k string
	v any
}

// writeJSON writes v as Python's json.dumps does by default (separators
// ", " and ": ", ASCII only), so that bodies survive the middleware's
// round trip byte for byte.
func writeJSON(buf *bytes.Buffer, v any) {
	switch v := v.(type) {
	case nil:
		buf.WriteString("null")
	case bool:
		buf.WriteString(strconv.FormatBool(v))
	case int:
		buf.WriteString(strconv.Itoa(v))
	case string:
		writeString(buf, v)
	case []any:
		buf.WriteByte('[')
		for i, e := range v {
			if i > 0 {
				buf.WriteString(", ")
			}
			writeJSON(buf, e)
		}
		buf.WriteByte(']')
	case obj:
		buf.WriteByte('{')
		for i, e := range v {
			if i > 0 {
				buf.WriteString(", ")
			}
			writeString(buf, e.k)
			buf.WriteString(": ")
			writeJSON(buf, e.v)
		}
		buf.WriteByte('}')
	default:
		panic(fmt.Sprintf("kmwtest: cannot encode %T", v))
	}
}

func writeString(buf *bytes.Buffer, s string) {
	buf.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"':
			buf.WriteString(`\"`)
		case r == '\\':
			buf.WriteString(`\\`)
		case r == '\n':
			buf.WriteString(`\n`)
		case r < 0x20 || r > 0x7e:
			if r > 0xffff {
				r -= 0x10000
				fmt.Fprintf(buf, `\u%04x\u%04x`, 0xd800+(r>>10), 0xdc00+(r&0x3ff))
			} else {
				fmt.Fprintf(buf, `\u%04x`, r)
			}
		default:
			buf.WriteRune(r)
		}
	}
	buf.WriteByte('"')
}
