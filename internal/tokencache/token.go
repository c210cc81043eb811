package tokencache

import (
	"bytes"
	"compress/zlib"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
	"unicode/utf8"
)

// Token is what keystone-fanout reads from one cached token validation: the
// fields of Keystone's GET /v3/auth/tokens body that decide whether a change
// in Keystone makes the validation stale. Field names follow Keystone's
// render_token_response_from_model (keystone/common/render_token.py).
type Token struct {
	// UserID and UserDomainID: token.user.id and token.user.domain.id. For a
	// trust token with impersonation, the user is the trustor.
	UserID, UserDomainID string
	// ProjectID and ProjectDomainID: token.project (project and trust
	// scope). IsDomain is token.is_domain (the project acts as a domain).
	ProjectID, ProjectDomainID string
	IsDomain                   bool
	// DomainID is the domain scope: token.domain.id.
	DomainID string
	// System is set for a system-scoped token (token.system.all).
	System bool
	// RoleIDs and RoleNames: token.roles, in order.
	RoleIDs, RoleNames []string
	// AuditIDs is token.audit_ids: [0] is the token's own audit id, [1] (when
	// present) the audit id of the token it was obtained from (Keystone's
	// parent_audit_id, the chain).
	AuditIDs []string
	// IssuedAt and ExpiresAt: token.issued_at and token.expires_at; zero
	// when missing or unreadable.
	IssuedAt, ExpiresAt time.Time
	// TrustID, TrustorUserID, TrusteeUserID, Impersonation:
	// token["OS-TRUST:trust"].
	TrustID, TrustorUserID, TrusteeUserID string
	Impersonation                         bool
	// AppCredID is token.application_credential.id.
	AppCredID string
	// OAuthConsumerID and OAuthAccessTokenID: token["OS-OAUTH1"].
	OAuthConsumerID, OAuthAccessTokenID string
	// FederatedGroupIDs and IdentityProviderID:
	// token.user["OS-FEDERATION"].
	FederatedGroupIDs  []string
	IdentityProviderID string
	// Methods is token.methods.
	Methods []string
}

// AuditID is the token's own audit id (audit_ids[0]), or "".
func (t *Token) AuditID() string {
	if len(t.AuditIDs) == 0 {
		return ""
	}
	return t.AuditIDs[0]
}

// AuditChainID is the audit id of the first token of the chain this token
// belongs to: audit_ids[-1] (the token's own id when it was not obtained
// from another token).
func (t *Token) AuditChainID() string {
	if len(t.AuditIDs) == 0 {
		return ""
	}
	return t.AuditIDs[len(t.AuditIDs)-1]
}

// InvolvesUser reports whether id is the token's user, trustor or trustee.
func (t *Token) InvolvesUser(id string) bool {
	return id != "" && (t.UserID == id || t.TrustorUserID == id || t.TrusteeUserID == id)
}

// HasRole reports whether the token carries role id.
func (t *Token) HasRole(id string) bool {
	for _, r := range t.RoleIDs {
		if r == id {
			return true
		}
	}
	return false
}

// ErrUnreadable is wrapped by ParseValue errors for values keystone-fanout
// cannot read: ENCRYPT values (they need the token to decrypt), corrupt or
// foreign values. Such entries are removed for every event.
var ErrUnreadable = errors.New("unreadable token cache value")

// ErrEncrypted wraps ErrUnreadable for values of memcache_security_strategy
// ENCRYPT.
var ErrEncrypted = fmt.Errorf("%w: encrypted (memcache_security_strategy ENCRYPT)", ErrUnreadable)

// Item flags of the middleware's memcached clients. python-memcache (the
// default) and python-binary-memcached (used by newer keystonemiddleware
// releases when memcache_tls_enabled or memcache_sasl_enabled is set) share
// the bit layout: 1 pickled, 2 int, 4 long, 8 compressed with zlib, 16 text
// (python-memcache) or bytes (python-binary-memcached). The middleware
// stores bytes: flags 0 with python-memcache, 16 with
// python-binary-memcached, which also compresses every value longer than
// 128 bytes that zlib makes smaller (flags 24).
const (
	flagPickle     = 1 << 0
	flagInt        = 1 << 1
	flagLong       = 1 << 2
	flagCompressed = 1 << 3
	flagText       = 1 << 4
	macB64Length   = 64 // base64 of an HMAC-SHA384 digest
	// maxInflated bounds a decompressed value (a token with a large
	// catalog is tens of kilobytes).
	maxInflated = 16 << 20
)

// ParseValue reads a cached validation written under a key of kind kind
// (see KindOf) with item flags flags (0 or 16; with 8 the value is first
// inflated with zlib, as python-binary-memcached compresses it):
//
//   - KeyNone: UTF-8 JSON {"token": {...}}, the middleware's json.dumps of the
//     validation (the token body plus "version" and "auth_token").
//   - KeySecure: 64 characters of base64 MAC, then base64 of that JSON (MAC:
//     readable without the secret, the MAC is not checked) or of IV + AES
//     ciphertext (ENCRYPT: unreadable, ErrEncrypted).
//
// The error wraps ErrUnreadable when the value cannot be read, including a
// body without a user id and a pickled or numeric value.
func ParseValue(kind KeyKind, flags uint32, value []byte) (Token, error) {
	var p valueParser
	return p.parse(kind, flags, value)
}

// valueParser keeps buffers across values (one per server).
type valueParser struct {
	dec, small []byte
	inflated   bytes.Buffer
	zr         io.ReadCloser
}

func (p *valueParser) parse(kind KeyKind, flags uint32, value []byte) (Token, error) {
	if flags&^(flagCompressed|flagText) != 0 {
		return Token{}, fmt.Errorf("%w: item flags %d (pickled or numeric)", ErrUnreadable, flags)
	}
	if flags&flagCompressed != 0 {
		v, err := p.inflate(value)
		if err != nil {
			return Token{}, fmt.Errorf("%w: item flags %d but not zlib data: %v", ErrUnreadable, flags, err)
		}
		value = v
	}
	data := value
	switch kind {
	case KeyNone:
	case KeySecure:
		if len(value) <= macB64Length {
			return Token{}, fmt.Errorf("%w: %d bytes is too short for a MAC and data", ErrUnreadable, len(value))
		}
		enc := value[macB64Length:]
		if n := base64.StdEncoding.DecodedLen(len(enc)); cap(p.dec) < n {
			p.dec = make([]byte, n)
		}
		n, err := base64.StdEncoding.Decode(p.dec[:cap(p.dec)], enc)
		if err != nil {
			return Token{}, fmt.Errorf("%w: data after the MAC is not base64", ErrUnreadable)
		}
		data = p.dec[:n]
		if !looksLikeJSONObject(data) {
			return Token{}, ErrEncrypted
		}
		// An ENCRYPT value starts with a random IV, which begins with '{' or
		// '[' about once in 128 values: ciphertext is not UTF-8, JSON is.
		t, err := p.parseJSON(data)
		if err != nil && !utf8.Valid(data) {
			return Token{}, ErrEncrypted
		}
		return t, err
	default:
		return Token{}, fmt.Errorf("%w: not a token key", ErrUnreadable)
	}
	return p.parseJSON(data)
}

// inflate decompresses a zlib value (python's zlib.compress) into a buffer
// reused for the next value.
func (p *valueParser) inflate(value []byte) ([]byte, error) {
	var err error
	if p.zr == nil {
		p.zr, err = zlib.NewReader(bytes.NewReader(value))
	} else {
		err = p.zr.(zlib.Resetter).Reset(bytes.NewReader(value), nil)
	}
	if err != nil {
		return nil, err
	}
	p.inflated.Reset()
	n, err := p.inflated.ReadFrom(io.LimitReader(p.zr, maxInflated+1))
	if err != nil {
		return nil, err
	}
	if n > maxInflated {
		return nil, fmt.Errorf("more than %d bytes", maxInflated)
	}
	return p.inflated.Bytes(), nil
}

func looksLikeJSONObject(b []byte) bool {
	b = bytes.TrimLeft(b, " \t\r\n")
	return len(b) > 0 && (b[0] == '{' || b[0] == '[')
}

type idRef struct {
	ID string `json:"id"`
}

// wire is the part of the cached JSON that Token needs. The catalog and
// other fields are skipped by the decoder.
type wire struct {
	Token struct {
		Methods []string `json:"methods"`
		User    struct {
			ID         string `json:"id"`
			Domain     idRef  `json:"domain"`
			Federation *struct {
				Groups           []idRef `json:"groups"`
				IdentityProvider idRef   `json:"identity_provider"`
			} `json:"OS-FEDERATION"`
		} `json:"user"`
		AuditIDs  []string `json:"audit_ids"`
		ExpiresAt string   `json:"expires_at"`
		IssuedAt  string   `json:"issued_at"`
		Project   *struct {
			ID     string `json:"id"`
			Domain idRef  `json:"domain"`
		} `json:"project"`
		IsDomain bool   `json:"is_domain"`
		Domain   *idRef `json:"domain"`
		System   *struct {
			All bool `json:"all"`
		} `json:"system"`
		Roles []struct {
			ID   string `json:"id"`
			Name string `json:"name"`
		} `json:"roles"`
		Trust *struct {
			ID            string `json:"id"`
			TrustorUser   idRef  `json:"trustor_user"`
			TrusteeUser   idRef  `json:"trustee_user"`
			Impersonation bool   `json:"impersonation"`
		} `json:"OS-TRUST:trust"`
		AppCred *idRef `json:"application_credential"`
		OAuth1  *struct {
			AccessTokenID string `json:"access_token_id"`
			ConsumerID    string `json:"consumer_id"`
		} `json:"OS-OAUTH1"`
	} `json:"token"`
}

func (p *valueParser) parseJSON(data []byte) (Token, error) {
	data = bytes.TrimLeft(data, " \t\r\n")
	if len(data) > 0 && data[0] == '[' {
		// Values of keystonemiddleware before 4.x: [data, expires]. The
		// middleware still reads them; so do we.
		var tuple []json.RawMessage
		if err := json.Unmarshal(data, &tuple); err != nil || len(tuple) != 2 {
			return Token{}, fmt.Errorf("%w: JSON array is not a (data, expires) pair", ErrUnreadable)
		}
		data = tuple[0]
	}
	var w wire
	small, ok := withoutCatalog(data, p.small)
	if ok {
		p.small = small
	}
	if !ok || json.Unmarshal(small, &w) != nil {
		w = wire{}
		if err := json.Unmarshal(data, &w); err != nil {
			return Token{}, fmt.Errorf("%w: %v", ErrUnreadable, err)
		}
	}
	src := &w.Token
	if src.User.ID == "" {
		return Token{}, fmt.Errorf("%w: no token.user.id", ErrUnreadable)
	}
	t := Token{
		UserID:       src.User.ID,
		UserDomainID: src.User.Domain.ID,
		IsDomain:     src.IsDomain,
		AuditIDs:     src.AuditIDs,
		Methods:      src.Methods,
		IssuedAt:     parseTime(src.IssuedAt),
		ExpiresAt:    parseTime(src.ExpiresAt),
	}
	if src.Project != nil {
		t.ProjectID, t.ProjectDomainID = src.Project.ID, src.Project.Domain.ID
	}
	if src.Domain != nil {
		t.DomainID = src.Domain.ID
	}
	if src.System != nil {
		t.System = true
	}
	for _, r := range src.Roles {
		t.RoleIDs = append(t.RoleIDs, r.ID)
		t.RoleNames = append(t.RoleNames, r.Name)
	}
	if src.Trust != nil {
		t.TrustID = src.Trust.ID
		t.TrustorUserID, t.TrusteeUserID = src.Trust.TrustorUser.ID, src.Trust.TrusteeUser.ID
		t.Impersonation = src.Trust.Impersonation
	}
	if src.AppCred != nil {
		t.AppCredID = src.AppCred.ID
	}
	if src.OAuth1 != nil {
		t.OAuthConsumerID, t.OAuthAccessTokenID = src.OAuth1.ConsumerID, src.OAuth1.AccessTokenID
	}
	if f := src.User.Federation; f != nil {
		t.IdentityProviderID = f.IdentityProvider.ID
		for _, g := range f.Groups {
			t.FederatedGroupIDs = append(t.FederatedGroupIDs, g.ID)
		}
	}
	return t, nil
}

// parseTime reads Keystone's ISO 8601 times ("2026-11-22T13:12:04.000000Z",
// also without fraction or with an offset). Unreadable times are zero, which
// the matching rules treat as "could be anything".
func parseTime(s string) time.Time {
	if s == "" {
		return time.Time{}
	}
	for _, layout := range []string{"2006-01-02T15:04:05.999999Z07:00", "2006-01-02T15:04:05.999999", "2006-01-02T15:04:05Z07:00"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t.UTC()
		}
	}
	return time.Time{}
}
