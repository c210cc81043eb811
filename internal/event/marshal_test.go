package event

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/fixtures"
)

// sameMarshal fails t unless Marshal writes exactly what encoding/json
// writes for e (or both fail), and what it writes reads back as e.
func sameMarshal(t *testing.T, e *Event) {
	t.Helper()
	got, gotErr := e.Marshal()
	want, wantErr := json.Marshal(e)
	if (gotErr == nil) != (wantErr == nil) {
		t.Fatalf("%+v: Marshal error %v, encoding/json error %v", e, gotErr, wantErr)
	}
	if gotErr != nil {
		return
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%+v:\nMarshal       %s\nencoding/json %s", e, got, want)
	}
	// AppendJSON appends to what is there.
	prefixed, err := e.AppendJSON([]byte("xyz"))
	if err != nil || string(prefixed) != "xyz"+string(want) {
		t.Fatalf("AppendJSON = %s, %v", prefixed, err)
	}
	back, err := Unmarshal(got)
	if err != nil {
		t.Fatalf("Unmarshal(%s): %v", got, err)
	}
	var viaJSON Event
	if err := json.Unmarshal(want, &viaJSON); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(back, viaJSON) {
		t.Fatalf("round trip: %+v, want %+v", back, viaJSON)
	}
}

func TestMarshalEveryFixture(t *testing.T) {
	all, err := fixtures.All()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range all {
		e, err := Decode(f.Body)
		if err != nil {
			t.Fatalf("%s: %v", f.Name, err)
		}
		sameMarshal(t, &e)
		back, err := Unmarshal(mustMarshal(t, &e))
		if err != nil || !reflect.DeepEqual(back, e) {
			t.Fatalf("%s: round trip %+v, want %+v (%v)", f.Name, back, e, err)
		}
	}
}

func mustMarshal(t *testing.T, e *Event) []byte {
	t.Helper()
	b, err := e.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestMarshalMatchesEncodingJSON(t *testing.T) {
	at := time.Date(2026, 11, 22, 13, 11, 11, 374444000, time.UTC)
	exp := at.Add(time.Hour).In(time.FixedZone("x", -(3*3600 + 30*60)))
	tests := []struct {
		name string
		e    Event
	}{
		{"zero", Event{}},
		{"notification", Event{Version: 1, Kind: KindNotification, ID: "m", Type: "identity.user.deleted", Time: at,
			Publisher: "identity.host", Format: "cadf", UserID: "u"}},
		{"every field", Event{Version: 7, Kind: "future", ID: "i", Type: "t", Time: at, Publisher: "p", Format: "f", Widen: "w",
			UserID: "u", ProjectID: "p", DomainID: "d", GroupID: "g", RoleID: "r", TrustID: "t", AppCredID: "a",
			InheritedToProjects: true, Actor: &Actor{ID: "a", Type: "user", Operation: "added"}}},
		{"empty actor", Event{Actor: &Actor{}}},
		{"revocation", Event{Kind: KindRevocation, Revocation: &Revocation{AuditID: "a", IssuedBefore: at, RevokedAt: at}}},
		{"empty revocation", Event{Revocation: &Revocation{}}},
		{"full revocation", Event{Revocation: &Revocation{UserID: "u", ProjectID: "p", DomainID: "d", RoleID: "r", TrustID: "t",
			ConsumerID: "c", AccessTokenID: "x", AuditID: "a", AuditChainID: "ac", ExpiresAt: &exp, IssuedBefore: exp, RevokedAt: at}}},
		{"escapes", Event{ID: "\"\\/\b\f\n\r\t\x00\x1f\x7f<>&'\u2028\u2029\u00e9\U0001F600", Type: "\xff\xfe a \xc3"}},
		{"negative version", Event{Version: -3}},
		{"zone offset", Event{Time: at.In(time.FixedZone("y", 5*3600+45*60+30))}},
		{"year 10000", Event{Time: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)}},
		{"year -1", Event{Time: time.Date(-1, 1, 1, 0, 0, 0, 0, time.UTC)}},
		{"zone 24h", Event{Time: at.In(time.FixedZone("z", 24*3600))}},
		{"zone -100h", Event{Time: at.In(time.FixedZone("z", -100*3600))}},
		{"bad expires_at", Event{Revocation: &Revocation{ExpiresAt: new(time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC))}}},
		{"bad revoked_at", Event{Revocation: &Revocation{RevokedAt: time.Date(-5, 1, 1, 0, 0, 0, 0, time.UTC)}}},
		{"polled", Event{Version: 1, Kind: KindPolled, ID: "polled-x-9", Type: PolledType, Time: at, Polled: &Polled{Through: 18446744073709551615}}},
		{"empty polled", Event{Polled: &Polled{}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { sameMarshal(t, &tt.e) })
	}
}

// FuzzMarshalMatchesEncodingJSON checks Marshal against encoding/json for
// events made of arbitrary strings, times and zones.
func FuzzMarshalMatchesEncodingJSON(f *testing.F) {
	f.Add("m", "identity.user.deleted", "u", "\u2028<&>\"\\\x01\xff", int64(1795000000123456789), 0, true, uint8(0))
	f.Add("", "", "", "", int64(-62135596800), 3600, false, uint8(7))
	f.Add("a", "b", "c", "d", int64(253402300800), -86400, true, uint8(255))
	f.Fuzz(func(t *testing.T, id, typ, s1, s2 string, unix int64, offset int, flag bool, fields uint8) {
		tm := time.Unix(0, 0).Add(time.Duration(unix)).In(time.FixedZone("f", offset%(200*3600)))
		if fields&1 != 0 {
			tm = time.Unix(unix, 0).UTC()
		}
		e := Event{Version: int(unix % 5), Kind: Kind(s2), ID: id, Type: typ, Time: tm, InheritedToProjects: flag}
		set := func(bit uint8, p *string, v string) {
			if fields&bit != 0 {
				*p = v
			}
		}
		set(2, &e.Publisher, s1)
		set(4, &e.UserID, s2)
		set(8, &e.Widen, s1+s2)
		set(16, &e.GroupID, id)
		if fields&32 != 0 {
			e.Actor = &Actor{ID: s1, Type: s2, Operation: typ}
		}
		if fields&64 != 0 {
			e.Revocation = &Revocation{UserID: s1, AuditID: s2, IssuedBefore: tm, RevokedAt: tm.UTC()}
			if fields&128 != 0 {
				e.Revocation.ExpiresAt = &tm
			}
		}
		sameMarshal(t, &e)
	})
}
