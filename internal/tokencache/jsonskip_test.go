package tokencache

import (
	"encoding/json"
	"reflect"
	"testing"

	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

// fullDecode is parseJSON without the catalog shortcut.
func fullDecode(data []byte) (wire, error) {
	var w wire
	err := json.Unmarshal(data, &w)
	return w, err
}

func TestWithoutCatalog(t *testing.T) {
	g := kmwtest.NewGen(21)
	body := string(kmwtest.NoneValue("tok", g.Body(kmwtest.Spec{UserID: "u", UserDomainID: "d", ProjectID: "p", ProjectDomainID: "d",
		Roles: []kmwtest.Role{{ID: "r", Name: "x"}}})))
	cases := []struct {
		name string
		in   string
		ok   bool
	}{
		{"generated body", body, true},
		{"catalog with tricky strings", `{"token": {"catalog": [{"url": "a\"}]{[", "x": "\\"}], "user": {"id": "u\\\"1"}, "audit_ids": ["a"]}}`, true},
		{"catalog last", `{"token":{"user":{"id":"u"},"catalog":[[[{}]]]}}`, true},
		{"no catalog", `{"token":{"user":{"id":"u"},"is_domain":false,"n":12.5e3,"z":null}}`, true},
		{"empty token", `{"token":{}}`, true},
		{"other members around token", `{"a":[1,{"b":"}"}],"token":{"user":{"id":"u"}},"z":true}`, true},
		{"no token", `{"x":{}}`, false},
		{"token not an object", `{"token":"x"}`, false},
		{"truncated", `{"token":{"user":{"id":"u"},"catalog":[{"a":"b"`, false},
		{"unterminated string", `{"token":{"user":{"id":"u`, false},
		{"not an object", `["token"]`, false},
		{"missing colon", `{"token" {"user":1}}`, false},
		{"garbage after member", `{"token":{"user":{"id":"u"} x}}`, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, ok := withoutCatalog([]byte(tc.in), nil)
			if ok != tc.ok {
				t.Fatalf("ok = %v, want %v (out %s)", ok, tc.ok, out)
			}
			if !ok {
				return
			}
			want, err := fullDecode([]byte(tc.in))
			if err != nil {
				t.Fatalf("reference decode: %v", err)
			}
			got, err := fullDecode(out)
			if err != nil {
				t.Fatalf("decoding %s: %v", out, err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("without catalog %+v\nfull            %+v", got, want)
			}
		})
	}
}

// FuzzWithoutCatalog checks that whenever the shortcut applies and the input
// is valid JSON, it decodes to what the full decode gives.
func FuzzWithoutCatalog(f *testing.F) {
	g := kmwtest.NewGen(22)
	f.Add(kmwtest.NoneValue("t", g.Body(kmwtest.Spec{UserID: "u", UserDomainID: "d", TrustID: "t", TrustorID: "a", TrusteeID: "u", ProjectID: "p", ProjectDomainID: "d"})))
	f.Add([]byte(`{"token": {"catalog": [{"url": "a\"}]"}], "user": {"id": "u"}}}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		want, err := fullDecode(in)
		if err != nil {
			return
		}
		out, ok := withoutCatalog(in, nil)
		if !ok {
			return
		}
		got, err := fullDecode(out)
		if err != nil {
			t.Fatalf("shortcut produced invalid JSON %q from %q: %v", out, in, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("shortcut %+v, full %+v for %q", got, want, in)
		}
	})
}
