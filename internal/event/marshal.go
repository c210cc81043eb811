package event

import (
	"errors"
	"strconv"
	"time"
	"unicode/utf8"
)

// Marshal encodes e as the JSON message body published to JetStream. The
// bytes are those encoding/json's Marshal writes for e (field order, omitted
// empty fields, string escaping with HTML characters escaped, RFC 3339 times);
// it fails, as encoding/json does, only for a time whose year is outside
// 0-9999 or whose zone offset is 24 hours or more.
func (e *Event) Marshal() ([]byte, error) {
	return e.AppendJSON(make([]byte, 0, 384))
}

// AppendJSON appends Marshal's encoding of e to b and returns the extended
// buffer. On error b is returned unchanged.
func (e *Event) AppendJSON(b []byte) ([]byte, error) {
	n0 := len(b)
	var err error
	b = append(b, `{"version":`...)
	b = strconv.AppendInt(b, int64(e.Version), 10)
	b = append(b, `,"kind":`...)
	b = appendString(b, string(e.Kind))
	b = append(b, `,"id":`...)
	b = appendString(b, e.ID)
	b = append(b, `,"type":`...)
	b = appendString(b, e.Type)
	b = append(b, `,"time":`...)
	if b, err = appendTime(b, e.Time); err != nil {
		return b[:n0], err
	}
	b = appendOptional(b, `,"publisher":`, e.Publisher)
	b = appendOptional(b, `,"format":`, e.Format)
	b = appendOptional(b, `,"widen":`, e.Widen)
	b = appendOptional(b, `,"user_id":`, e.UserID)
	b = appendOptional(b, `,"project_id":`, e.ProjectID)
	b = appendOptional(b, `,"domain_id":`, e.DomainID)
	b = appendOptional(b, `,"group_id":`, e.GroupID)
	b = appendOptional(b, `,"role_id":`, e.RoleID)
	b = appendOptional(b, `,"trust_id":`, e.TrustID)
	b = appendOptional(b, `,"application_credential_id":`, e.AppCredID)
	if e.InheritedToProjects {
		b = append(b, `,"inherited_to_projects":true`...)
	}
	if a := e.Actor; a != nil {
		b = append(b, `,"actor":{"id":`...)
		b = appendString(b, a.ID)
		b = append(b, `,"type":`...)
		b = appendString(b, a.Type)
		b = append(b, `,"operation":`...)
		b = appendString(b, a.Operation)
		b = append(b, '}')
	}
	if r := e.Revocation; r != nil {
		b = append(b, `,"revocation":{`...)
		first := len(b)
		for _, f := range []struct{ name, value string }{
			{`"user_id":`, r.UserID}, {`"project_id":`, r.ProjectID}, {`"domain_id":`, r.DomainID},
			{`"role_id":`, r.RoleID}, {`"trust_id":`, r.TrustID}, {`"consumer_id":`, r.ConsumerID},
			{`"access_token_id":`, r.AccessTokenID}, {`"audit_id":`, r.AuditID}, {`"audit_chain_id":`, r.AuditChainID},
		} {
			if f.value != "" {
				if len(b) > first {
					b = append(b, ',')
				}
				b = append(b, f.name...)
				b = appendString(b, f.value)
			}
		}
		if len(b) > first {
			b = append(b, ',')
		}
		if r.ExpiresAt != nil {
			b = append(b, `"expires_at":`...)
			if b, err = appendTime(b, *r.ExpiresAt); err != nil {
				return b[:n0], err
			}
			b = append(b, ',')
		}
		b = append(b, `"issued_before":`...)
		if b, err = appendTime(b, r.IssuedBefore); err != nil {
			return b[:n0], err
		}
		b = append(b, `,"revoked_at":`...)
		if b, err = appendTime(b, r.RevokedAt); err != nil {
			return b[:n0], err
		}
		b = append(b, '}')
	}
	if p := e.Polled; p != nil {
		b = append(b, `,"polled":{"through":`...)
		b = strconv.AppendUint(b, p.Through, 10)
		b = append(b, '}')
	}
	return append(b, '}'), nil
}

// appendOptional appends a field with omitempty: nothing for "".
func appendOptional(b []byte, key, value string) []byte {
	if value == "" {
		return b
	}
	return appendString(append(b, key...), value)
}

// appendTime appends t as time.Time's MarshalJSON does, and fails where it
// fails.
func appendTime(b []byte, t time.Time) ([]byte, error) {
	n0 := len(b)
	b = append(b, '"')
	b = t.AppendFormat(b, time.RFC3339Nano)
	// Not every time is valid RFC 3339: the same checks as MarshalJSON.
	s := b[n0+1:]
	switch {
	case len(s) < 5 || s[4] != '-':
		return b[:n0], errors.New("json: error calling MarshalJSON for type time.Time: Time.MarshalJSON: year outside of range [0,9999]")
	case s[len(s)-1] != 'Z':
		c := s[len(s)-len("Z07:00")]
		if ('0' <= c && c <= '9') || 10*(s[len(s)-5]-'0')+(s[len(s)-4]-'0') >= 24 {
			return b[:n0], errors.New("json: error calling MarshalJSON for type time.Time: Time.MarshalJSON: timezone hour outside of range [0,23]")
		}
	}
	return append(b, '"'), nil
}

const hexDigits = "0123456789abcdef"

// htmlSafe marks the ASCII bytes encoding/json writes as they are (with its
// default HTML escaping): not control characters, '"', '\\', '<', '>' or '&'.
var htmlSafe = func() (t [utf8.RuneSelf]bool) {
	for c := 0x20; c < utf8.RuneSelf; c++ {
		t[c] = true
	}
	for _, c := range `"\<>&` {
		t[c] = false
	}
	return t
}()

// appendString appends s as a JSON string exactly as encoding/json writes it:
// '"' and '\\' escaped with a backslash, \b \f \n \r \t, other control
// characters and '<', '>', '&' as \u00XX, U+2028 and U+2029 as \u202X, and
// each byte of invalid UTF-8 as \ufffd.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if htmlSafe[c] {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '\\', '"':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xF])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
