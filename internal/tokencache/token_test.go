package tokencache

import (
	"crypto/rand"
	"maps"
	"slices"

	"encoding/base64"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

func TestIsTokenKey(t *testing.T) {
	hex64 := strings.Repeat("0123456789abcdef", 4)
	cases := []struct {
		name string
		key  string
		want KeyKind
	}{
		{"none strategy", "tokens/" + hex64, KeyNone},
		{"mac/encrypt strategy", "tokens/b'JsGjdnh4i3JEQ0jIu45y5g=='", KeySecure},
		{"mac key with + and /", "tokens/b'+/Gjdnh4i3JEQ0jIu45y5g=='", KeySecure},
		{"uppercase hex is not hexdigest()", "tokens/" + strings.ToUpper(hex64), 0},
		{"short hex", "tokens/" + hex64[:63], 0},
		{"long hex", "tokens/" + hex64 + "0", 0},
		{"other prefix", "token/" + hex64 + "0", 0},
		{"double quotes", `tokens/b"JsGjdnh4i3JEQ0jIu45y5g=="`, 0},
		{"missing closing quote", "tokens/b'JsGjdnh4i3JEQ0jIu45y5g==x", 0},
		{"non-canonical base64 padding bits", "tokens/b'JsGjdnh4i3JEQ0jIu45y5h=='", 0},
		{"base64 of 17 bytes", "tokens/b'JsGjdnh4i3JEQ0jIu45y5g0='", 0},
		{"url-safe alphabet", "tokens/b'-_Gjdnh4i3JEQ0jIu45y5g=='", 0},
		{"oslo.cache key", "e2c1c3e1c1f9d8b7a6", 0},
		{"empty", "", 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := KindOf(tc.key); got != tc.want {
				t.Fatalf("KindOf(%q) = %d, want %d", tc.key, got, tc.want)
			}
			if IsTokenKey(tc.key) != (tc.want != 0) {
				t.Fatalf("IsTokenKey(%q) = %v", tc.key, !(tc.want != 0))
			}
			if tc.want != 0 {
				k, _ := parseKey([]byte(tc.key))
				if k.String() != tc.key {
					t.Fatalf("round trip of %q gave %q", tc.key, k.String())
				}
			}
		})
	}
}

func secureValue(data []byte) []byte {
	mac := base64.StdEncoding.EncodeToString(make([]byte, 48)) // 64 characters
	return []byte(mac + base64.StdEncoding.EncodeToString(data))
}

func TestParseValue(t *testing.T) {
	g := kmwtest.NewGen(7)
	body := g.Body(kmwtest.Spec{UserID: "u1", UserDomainID: "d1", ProjectID: "p1", ProjectDomainID: "d1",
		Roles: []kmwtest.Role{{ID: "r1", Name: "member"}, {ID: "r2", Name: "reader"}}, AuditIDs: []string{"a", "b"},
		IssuedAt: time.Date(2026, 1, 2, 3, 4, 5, 123456000, time.UTC)})
	cached := kmwtest.NoneValue("tok", body)
	want := Token{UserID: "u1", UserDomainID: "d1", ProjectID: "p1", ProjectDomainID: "d1",
		RoleIDs: []string{"r1", "r2"}, RoleNames: []string{"member", "reader"}, AuditIDs: []string{"a", "b"},
		IssuedAt: time.Date(2026, 1, 2, 3, 4, 5, 123456000, time.UTC), ExpiresAt: time.Date(2026, 1, 2, 4, 4, 5, 123456000, time.UTC),
		Methods: []string{"password"}}
	random := make([]byte, 64)
	rand.Read(random)
	random[0] = 0x42 // not '{' or '['
	braced := append([]byte("{"), random[1:]...)
	braced[1] = 0xff // never in UTF-8

	cases := []struct {
		name    string
		kind    KeyKind
		flags   uint32
		value   []byte
		want    *Token
		wantErr error
	}{
		{"none strategy JSON", KeyNone, 0, cached, &want, nil},
		{"text flag", KeyNone, 16, cached, &want, nil},
		{"mac strategy", KeySecure, 0, secureValue(cached), &want, nil},
		{"legacy (data, expires) pair", KeyNone, 0, []byte(`[` + string(cached) + `, 12345]`), &want, nil},
		{"encrypt strategy", KeySecure, 0, secureValue(random), nil, ErrEncrypted},
		{"encrypt strategy, IV starting with a brace", KeySecure, 0, secureValue(braced), nil, ErrEncrypted},
		{"mac strategy, broken JSON", KeySecure, 0, secureValue(cached[:len(cached)/2]), nil, ErrUnreadable},
		{"pickled", KeyNone, 1, cached, nil, ErrUnreadable},
		{"compressed", KeyNone, 8, cached, nil, ErrUnreadable},
		{"not JSON", KeyNone, 0, []byte("garbage"), nil, ErrUnreadable},
		{"no user id", KeyNone, 0, []byte(`{"token": {"project": {"id": "p1"}}}`), nil, ErrUnreadable},
		{"secure value too short", KeySecure, 0, []byte("abc"), nil, ErrUnreadable},
		{"secure value not base64", KeySecure, 0, append(secureValue(nil), '!', '!'), nil, ErrUnreadable},
		{"truncated JSON", KeyNone, 0, cached[:len(cached)/2], nil, ErrUnreadable},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseValue(tc.kind, tc.flags, tc.value)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("ParseValue = %+v, %v; want %v", got, err, tc.wantErr)
				}
				if tc.wantErr == ErrUnreadable && errors.Is(err, ErrEncrypted) {
					t.Fatalf("ParseValue = %v; readable JSON mistaken for ENCRYPT", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, *tc.want) {
				t.Fatalf("ParseValue = %+v\nwant         %+v", got, *tc.want)
			}
		})
	}
}

func TestParseValueFields(t *testing.T) {
	g := kmwtest.NewGen(8)
	cases := []struct {
		name string
		spec kmwtest.Spec
		want Token
	}{
		{"domain scope", kmwtest.Spec{UserID: "u", UserDomainID: "ud", DomainID: "d", Roles: []kmwtest.Role{{ID: "r", Name: "admin"}}, AuditIDs: []string{"a"}},
			Token{UserID: "u", UserDomainID: "ud", DomainID: "d", RoleIDs: []string{"r"}, RoleNames: []string{"admin"}, AuditIDs: []string{"a"}}},
		{"system scope", kmwtest.Spec{UserID: "u", UserDomainID: "ud", System: true, AuditIDs: []string{"a"}},
			Token{UserID: "u", UserDomainID: "ud", System: true, AuditIDs: []string{"a"}}},
		{"project acting as domain", kmwtest.Spec{UserID: "u", UserDomainID: "ud", ProjectID: "p", IsDomain: true, AuditIDs: []string{"a"}},
			Token{UserID: "u", UserDomainID: "ud", ProjectID: "p", IsDomain: true, AuditIDs: []string{"a"}}},
		{"trust with impersonation", kmwtest.Spec{UserID: "tor", UserDomainID: "ud", ProjectID: "p", ProjectDomainID: "pd",
			TrustID: "t", TrustorID: "tor", TrusteeID: "tee", Impersonation: true, AuditIDs: []string{"a"}},
			Token{UserID: "tor", UserDomainID: "ud", ProjectID: "p", ProjectDomainID: "pd", TrustID: "t", TrustorUserID: "tor",
				TrusteeUserID: "tee", Impersonation: true, AuditIDs: []string{"a"}, Methods: []string{"token"}}},
		{"application credential", kmwtest.Spec{UserID: "u", UserDomainID: "ud", ProjectID: "p", ProjectDomainID: "pd", AppCredID: "ac", AuditIDs: []string{"a"}},
			Token{UserID: "u", UserDomainID: "ud", ProjectID: "p", ProjectDomainID: "pd", AppCredID: "ac", AuditIDs: []string{"a"}, Methods: []string{"application_credential"}}},
		{"oauth1", kmwtest.Spec{UserID: "u", UserDomainID: "ud", ProjectID: "p", ProjectDomainID: "pd", ConsumerID: "c", AccessTokenID: "at", AuditIDs: []string{"a"}},
			Token{UserID: "u", UserDomainID: "ud", ProjectID: "p", ProjectDomainID: "pd", OAuthConsumerID: "c", OAuthAccessTokenID: "at", AuditIDs: []string{"a"}, Methods: []string{"oauth1"}}},
		{"federated", kmwtest.Spec{UserID: "u", UserDomainID: "ud", ProjectID: "p", ProjectDomainID: "pd", IdentityProviderID: "idp", FederatedGroupIDs: []string{"g1", "g2"}, AuditIDs: []string{"a"}},
			Token{UserID: "u", UserDomainID: "ud", ProjectID: "p", ProjectDomainID: "pd", IdentityProviderID: "idp", FederatedGroupIDs: []string{"g1", "g2"}, AuditIDs: []string{"a"}, Methods: []string{"mapped"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.spec.IssuedAt = t0
			got, err := ParseValue(KeyNone, 0, kmwtest.NoneValue("x", g.Body(tc.spec)))
			if err != nil {
				t.Fatal(err)
			}
			want := tc.want
			want.IssuedAt, want.ExpiresAt = t0, t0.Add(time.Hour)
			if want.Methods == nil {
				want.Methods = []string{"password"}
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("got  %+v\nwant %+v", got, want)
			}
		})
	}
}

// TestMatcherAgreesWithAffects checks that the index path (hashed entries,
// batch matcher) decides as Affects on parsed tokens, for every rule case
// alone and for all of them in one batch. The index keeps times to the second
// and at most two audit ids, so for a token with a sub-second issued_at or
// more audit ids it may match more (never less).
func TestMatcherAgreesWithAffects(t *testing.T) {
	toks := ruleTokens()
	toks["many-audit-ids"] = Token{UserID: "u8", AuditIDs: []string{"x", "y", "z"}, IssuedAt: t0.Truncate(time.Second)}
	ix := newServerIndex(-1)
	entries := map[string]entry{}
	for name, tok := range toks {
		entries[name] = ix.makeEntry(1, 0, &tok, stateReadable)
	}
	exact := func(tok Token) bool {
		return tok.IssuedAt.Equal(tok.IssuedAt.Truncate(time.Second)) && len(tok.AuditIDs) <= 2
	}
	cases := ruleCases()
	var bounded []event.Event
	var buf []uint64
	for _, tc := range cases {
		if !compile(&tc.event).all {
			bounded = append(bounded, tc.event)
		}
		m := newMatcher([]event.Event{tc.event}, false)
		for name, tok := range toks {
			e := entries[name]
			var got int32
			got, buf = m.match(ix, &e, buf)
			want := Affects(&tc.event, &tok)
			if want && got < 0 || !want && got >= 0 && exact(tok) {
				t.Errorf("%s / %s: matcher %v, Affects %v", tc.name, name, got >= 0, want)
			}
		}
	}
	m := newMatcher(bounded, false)
	for name, tok := range toks {
		if !exact(tok) {
			continue
		}
		want := int32(-1)
		for i := range bounded {
			if Affects(&bounded[i], &tok) {
				want = int32(i)
				break
			}
		}
		e := entries[name]
		if got, _ := m.match(ix, &e, nil); got != want {
			t.Errorf("batch of every bounded case / %s: first matching event %d, want %d", name, got, want)
		}
	}
	widened := newMatcher(append(bounded, event.Event{Version: 1, Kind: event.KindNotification, Type: "identity.group.deleted", GroupID: "g"}), false)
	for name := range toks {
		e := entries[name]
		if got, _ := widened.match(ix, &e, nil); got != int32(len(bounded)) {
			t.Errorf("a batch with an event that widens must attribute every entry to it: %s got %d", name, got)
		}
	}
}

func TestUnknownRolesAndAuditsMatch(t *testing.T) {
	ix := newServerIndex(-1)
	e := entry{meta: stateReadable | auditUnknown, roles: roleSetUnknown}
	for _, ev := range []event.Event{
		{Version: 1, Kind: event.KindNotification, ID: "r", Type: "identity.role.updated", RoleID: "r1"},
		{Version: 1, Kind: event.KindRevocation, ID: "a", Type: "revocation", Revocation: &event.Revocation{AuditID: "a1"}},
		{Version: 1, Kind: event.KindRevocation, ID: "c", Type: "revocation", Revocation: &event.Revocation{AuditChainID: "a1"}},
		{Version: 1, Kind: event.KindRevocation, ID: "r2", Type: "revocation", Revocation: &event.Revocation{RoleID: "r1"}},
	} {
		if i, _ := newMatcher([]event.Event{ev}, false).match(ix, &e, nil); i != 0 {
			t.Errorf("event %s does not match an entry whose roles and audit ids are unknown", ev.ID)
		}
	}
}

func TestIndexLimit(t *testing.T) {
	ix := newServerIndex(2)
	var k1, k2, k3 binKey
	k1[1], k2[1], k3[1] = 1, 2, 3
	if !ix.put(k1, entry{cas: 1}) || !ix.put(k2, entry{cas: 1}) {
		t.Fatal("index refused entries below its limit")
	}
	if ix.put(k3, entry{cas: 1}) {
		t.Fatal("index took an entry beyond its limit")
	}
	if !ix.put(k1, entry{cas: 2}) {
		t.Fatal("index refused to update a known entry when full")
	}
	ix.remove(k2)
	if !ix.put(k3, entry{cas: 1}) || ix.len() != 2 {
		t.Fatal("index did not reuse the slot of a removed entry")
	}
}

func TestRoleSets(t *testing.T) {
	var rs roleSets
	a := rs.id([]string{"r1", "r2"})
	b := rs.id([]string{"r2", "r1", "r2"})
	if a == 0 || a != b || len(rs.sets) != 1 {
		t.Fatalf("the same set of roles got ids %d and %d (%d sets stored)", a, b, len(rs.sets))
	}
	if rs.id(nil) != 0 {
		t.Fatal("no roles should be set 0")
	}
}

// TestCandidatesAgreeWithMatch checks the live path's search through the
// index's columns: for every rule case, and for all of them in one batch,
// the entries found through matcher.candidates and then matched are exactly
// those that matching every entry finds. Entries removed from the index are
// never found again.
func TestCandidatesAgreeWithMatch(t *testing.T) {
	toks := ruleTokens()
	toks["many-audit-ids"] = Token{UserID: "u8", AuditIDs: []string{"x", "y", "z"}, IssuedAt: t0.Truncate(time.Second)}
	ix := newServerIndex(-1)
	names := map[uint32]string{}
	i := 0
	for name, tok := range toks {
		var k binKey
		k[0], k[1], k[2] = byte(KeyNone), byte(i), byte(i>>8)
		i++
		ix.put(k, ix.makeEntry(uint64(i), 0, &tok, stateReadable))
		slot, _ := ix.lookup(k)
		names[slot] = name
	}
	// A removed entry that matched every rule it could.
	var gone binKey
	gone[0], gone[1] = byte(KeyNone), 0xff
	tok := toks[slices.Sorted(maps.Keys(toks))[0]]
	ix.put(gone, ix.makeEntry(99, 0, &tok, stateReadable))
	ix.remove(gone)
	check := func(name string, m *matcher) {
		t.Helper()
		var want, got []string
		ix.each(func(slot uint32) {
			e := ix.entry(slot)
			if i, _ := m.match(ix, &e, nil); i >= 0 {
				want = append(want, names[slot])
			}
		})
		set, all := m.candidates(ix, nil)
		visit := func(slot uint32) {
			e := ix.entry(slot)
			if i, _ := m.match(ix, &e, nil); i >= 0 {
				got = append(got, names[slot])
			}
		}
		if all {
			ix.each(visit)
		} else {
			set.each(visit)
		}
		slices.Sort(want)
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("%s: through the columns %v, matching every entry %v", name, got, want)
		}
	}
	var bounded []event.Event
	for _, tc := range ruleCases() {
		check(tc.name, newMatcher([]event.Event{tc.event}, false))
		if !compile(&tc.event).all {
			bounded = append(bounded, tc.event)
		}
	}
	check("every bounded case in one batch", newMatcher(bounded, false))
}

// TestLateMatcherOnlyTokensIssuedBefore checks the matcher of the recent
// window: a notification concerns the tokens it names that were issued
// before its time (plus issuedSkew), because a token issued after the change
// is validated after it; a revocation event keeps its own issued_before; an
// event without a time concerns every token it names.
func TestLateMatcherOnlyTokensIssuedBefore(t *testing.T) {
	changed := time.Date(2026, 11, 22, 13, 0, 0, 0, time.UTC)
	user := event.Event{Version: 1, Kind: event.KindNotification, ID: "u", Type: "identity.user.updated", UserID: "u1", Time: changed}
	untimed := user
	untimed.ID, untimed.Time = "u-untimed", time.Time{}
	unbounded := event.Event{Version: 1, Kind: event.KindNotification, ID: "g", Type: "identity.group.deleted", GroupID: "g1", Time: changed}
	revocation := event.Event{Version: 1, Kind: event.KindRevocation, ID: "r", Type: "revocation", Time: changed.Add(time.Hour),
		Revocation: &event.Revocation{UserID: "u2", IssuedBefore: changed}}
	ix := newServerIndex(-1)
	tok := func(user string, issued time.Time) entry {
		tk := Token{UserID: user, IssuedAt: issued}
		return ix.makeEntry(1, 0, &tk, stateReadable)
	}
	cases := []struct {
		name  string
		ev    event.Event
		entry entry
		want  bool
	}{
		{"notification: the user's token issued before", user, tok("u1", changed.Add(-time.Minute)), true},
		{"notification: issued in the same second", user, tok("u1", changed), true},
		{"notification: issued within the clock skew after", user, tok("u1", changed.Add(issuedSkew)), true},
		{"notification: issued after", user, tok("u1", changed.Add(issuedSkew+time.Second)), false},
		{"notification: issued at an unknown time", user, tok("u1", time.Time{}), true},
		{"notification: another user's token issued before", user, tok("u9", changed.Add(-time.Minute)), false},
		{"notification without a time: the user's token issued after", untimed, tok("u1", changed.Add(time.Hour)), true},
		{"unbounded: any token issued before", unbounded, tok("u9", changed.Add(-time.Minute)), true},
		{"unbounded: a token issued after", unbounded, tok("u9", changed.Add(time.Minute)), false},
		{"revocation: issued before issued_before", revocation, tok("u2", changed.Add(-time.Second)), true},
		{"revocation: issued after issued_before", revocation, tok("u2", changed.Add(time.Second)), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := tc.entry
			if i, _ := newLateMatcher([]event.Event{tc.ev}, false).match(ix, &e, nil); (i >= 0) != tc.want {
				t.Fatalf("late matcher: matched %v, want %v", i >= 0, tc.want)
			}
		})
	}
	// Two events for the same user: the later one concerns the tokens
	// issued between them.
	later := user
	later.ID, later.Time = "u-later", changed.Add(time.Hour)
	e := tok("u1", changed.Add(time.Minute))
	if i, _ := newLateMatcher([]event.Event{user, later}, false).match(ix, &e, nil); i != 1 {
		t.Fatalf("late matcher of two events: matched event %d, want 1 (the later one)", i)
	}
}
