package event

import (
	"encoding/json"
	"errors"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/keystone-fanout/keystone-fanout/internal/fixtures"
)

// sameDecode fails t unless Decode and decodeReference agree on body: the same
// Event, or a rejection with the same reason and message id.
func sameDecode(t *testing.T, body []byte) {
	t.Helper()
	got, gotErr := Decode(body)
	want, wantErr := decodeReference(body)
	if (gotErr == nil) != (wantErr == nil) {
		t.Fatalf("body %q:\nDecode    = %+v, %v\nreference = %+v, %v", body, got, gotErr, want, wantErr)
	}
	if gotErr != nil {
		g, ok1 := IsReject(gotErr)
		w, ok2 := IsReject(wantErr)
		if !ok1 || !ok2 {
			t.Fatalf("body %q: errors are not RejectErrors: %v / %v", body, gotErr, wantErr)
		}
		if g.Reason != w.Reason || g.MessageID != w.MessageID {
			t.Fatalf("body %q:\nDecode    rejects %s/%q (%v)\nreference rejects %s/%q (%v)",
				body, g.Reason, g.MessageID, gotErr, w.Reason, w.MessageID, wantErr)
		}
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("body %q:\nDecode    = %+v (actor %+v)\nreference = %+v (actor %+v)", body, got, got.Actor, want, want.Actor)
	}
}

// decodeSeeds are the bodies both implementations must agree on: every
// fixture, the cases of oslo_test.go, and JSON that only an exact reading of
// encoding/json gets right.
func decodeSeeds(tb testing.TB) [][]byte {
	all, err := fixtures.All()
	if err != nil {
		tb.Fatal(err)
	}
	var seeds [][]byte
	for _, f := range all {
		seeds = append(seeds, f.Body)
	}
	good := `{"message_id":"m1","event_type":"identity.user.deleted","payload":{"resource_info":"u1"},"timestamp":"2026-11-22 13:11:11.374444"}`
	for _, s := range []string{
		// oslo_test.go
		"hello", string(envelope(good)[:40]), `[1,2]`, `null`, "{\"a\":\"\xff\"}",
		`{"oslo.version":"3.0","oslo.message":"{}"}`, `{"oslo.version":2.0,"oslo.message":"{}"}`,
		`{"oslo.version":"2.0","oslo.message":{"event_type":"x"}}`, string(envelope("nope")),
		`{"oslo.version":"2.0"}`, `{"oslo.message":"{}"}`,
		string(envelope(`{"message_id":"m2","payload":{}}`)), string(envelope(`{"message_id":"m3","event_type":7}`)),
		string(envelope(`{"message_id":"m","event_type":"identity.identity_provider.deleted","payload":{"resource_info":"idp"}}`)),
		string(envelope(`{"message_id":"m","event_type":"identity.user.updated","payload":{}}`)),
		string(envelope(`{"message_id":"m","event_type":"identity.user.updated","payload":{"resource_info":42}}`)),
		string(envelope(`{"message_id":"m","event_type":"identity.project.deleted","payload":"p1"}`)),
		string(envelope(`{"message_id":"m","event_type":"identity.role_assignment.deleted","payload":{"project":"p","role":"r"}}`)),
		string(envelope(`{"message_id":"m","event_type":"identity.user.deleted","payload":{"resource_info":"` + strings.Repeat("a", 300) + `"}}`)),
		`{"message_id":"m","event_type":"identity.user.deleted","payload":{"resource_info":"u1"}}`,
		string(envelope(`{"message_id":"m","event_type":"identity.user.deleted","extra":[1],"payload":{"resource_info":"u1","more":{"x":1}}}`)),
		string(envelope(`{"event_type":"identity.user.deleted","payload":{"resource_info":"u1"}}`)),
		string(envelope(`{"message_id":"m","event_type":"identity.user.deleted","timestamp":"yesterday","payload":{"resource_info":"u1"}}`)),
		`{"oslo.version":"2.0","oslo.message":"{\"event_type\":\"identity.user.updated\",\"payload\":{\"resource_info\":[]}}"}`,

		// white space, null and what is not JSON
		"", " ", " null ", "\tnull\r\n", "null x", "nul", "\u00a0null", "\fnull", "{}", " {} ", "{} x", "{}}", "{",
		`{"a":1,}`, `{"a" 1}`, `{,}`, `{"a":[1,]}`, `{"a":01}`, `{"a":-}`, `{"a":1.}`, `{"a":1e}`, `{"a":.1}`,
		`{"a":+1}`, `{"a":tru}`, `{"a":nulll}`, `{"a":"\x"}`, `{"a":"\u12"}`, `{"a":"\u12g4"}`, "{\"a\":\"\x01\"}",
		"{\"a\":\"\t\"}", `{"a":"\'"}`, `{'a':1}`, `{"a":1}` + "\x00", "\ufeff{}", `{"a":[]}`, `{"a":[[],{}]}`,
		`{"a":-0.0e+0}`, `{"a":1E-5}`, `{"a":"\/\b\f\n\r\t\\\""}`,

		// duplicate keys: the last wins
		`{"event_type":"identity.user.deleted","event_type":null,"message_id":"m"}`,
		`{"event_type":7,"event_type":"identity.user.deleted","message_id":"m","payload":{"resource_info":"u"}}`,
		`{"message_id":"a","message_id":"b","event_type":"x"}`,
		`{"oslo.version":"2.0","oslo.version":null,"event_type":"identity.user.deleted","message_id":"v1"}`,
		`{"oslo.version":"3.0","oslo.version":"2.0","oslo.message":"{\"event_type\":\"e\",\"message_id\":\"i\"}"}`,
		`{"oslo.version":"2.0","oslo.message":"{\"event_type\":\"e\"}","oslo.message":null}`,
		`{"oslo.version":"2.0","oslo.message":null,"oslo.message":"{\"event_type\":\"e\"}"}`,
		`{"oslo.version":null,"oslo.message":"{}"}`, `{"oslo.version":"2.0","oslo.message":7}`,
		`{"oslo.version":{"a":1e999},"oslo.message":"{}"}`, `{"oslo.version":"2\u002e0","oslo.message":"{\"event_type\":\"e\"}"}`,
		`{"oslo.version":"2.0","oslo.message":"null"}`, `{"oslo.version":"2.0","oslo.message":" {} "}`,
		`{"oslo.version":"2.0","oslo.message":"{} x"}`, `{"oslo.version":"2.0","oslo.message":"\u007b}"}`,
		`{"oslo.version":"2.0","oslo.message":"{\"event_type\":\"identity.user.deleted\",\"payload\":{\"resource_info\":\"u\"},\"payload\":null}"}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"a"},"payload":{"resource_info":"b"}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"a","resource_info":7}}`,
		`{"event_type":"identity.user.deleted","payload":{"typeURI":"http://schemas.dmtf.org/cloud/audit/1.0/event","target":{"id":"t"},"target":{"typeURI":"x"}}}`,
		`{"event_type":"identity.user.deleted","payload":{"typeURI":"http://schemas.dmtf.org/cloud/audit/1.0/event","target":{"id":"t"},"target":null}}`,
		`{"event_type":"identity.user.deleted","payload":{"typeURI":"http://schemas.dmtf.org/cloud/audit/1.0/event","target":{"id":"t"},"target":{"id":null}}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","target":"t"}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","target":[1]}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","target":{"typeURI":1e999}}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","target":{"other":1e999}}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","other":1e999}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","user":[1e999]}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","user":1e-999}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","user":-1.7976931348623159e308}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","user":1.7976931348623157e308}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","user":` + strings.Repeat("9", 309) + `}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","user":` + strings.Repeat("9", 308) + `}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","user":` + strings.Repeat("9", 309) + `.5}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","user":` + strings.Repeat("9", 308) + `.5}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u","user":0.` + strings.Repeat("9", 400) + `}}`,
		`{"event_type":"identity.user.deleted","message_id":{"x":[1e400]}}`,
		`{"event_type":"identity.user.deleted","other":1e400,"payload":{"resource_info":"u"}}`,
		`{"oslo.version":"2.0","oslo.message":"{\"event_type\":\"e\"}","timestamp":1e400}`,
		`{"oslo.version":"2.0","oslo.message":"{\"event_type\":\"e\",\"publisher_id\":1e400}"}`,
		`{"oslo.version":"2.0","oslo.message":"{\"event_type\":\"e\"}","payload":{"user":1e400,"target":"x"}}`,

		// keys matched as encoding/json does: exactly, else case-insensitively
		// with Unicode simple folding (ſ folds to S, K, the Kelvin sign, to K)
		`{"EVENT_TYPE":"identity.user.deleted","Message_Id":"m","PAYLOAD":{"Resource_Info":"u"}}`,
		`{"Oslo.Version":"2.0","OSLO.MESSAGE":"{\"event_type\":\"e\"}"}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"u"},"paylo\u0061d":{"resource_info":"v"}}`,
		`{"event_type":"identity.user.deleted","payload":{"reſource_info":"ſ"}}`,
		`{"event_type":"identity.role_assignment.created","payload":{"uſer":"u","inherited_to_projects":true,"inherited_to_projects":"true"}}`,
		`{"event_type":"identity.role_assignment.created","payload":{"user":"u","inherited_to_projects":true}}`,
		`{"event_type":"identity.role_assignment.created","payload":{"user":"u","inherited_to_projects":false,"group":"g","project":"p","domain":"d","role":"r"}}`,
		`{"event_type":"identity.user.deleted","payload":{"typeURI":"http://schemas.dmtf.org/cloud/audit/1.0/event","tar\u0067et":{"ID":"t"}}}`,
		`{"event_type":"identity.group.updated","payload":{"resource_info":"g","actor_id":"u","actor_type":"user","actor_operation":"added"}}`,
		`{"event_type":"identity.group.updated","payload":{"resource_info":"g","actor_id":"u","actor_type":7,"actor_operation":null}}`,
		"{\"event_type\":\"identity.user.deleted\",\"payload\":{\"resource_info\":\"u\"},\"timeſtamp\":\"2026-11-22 13:11:11.374444\"}",
		"{\"event_type\":\"identity.user.deleted\",\"payload\":{\"resource_info\":\"u\"},\"\u212aey\":1}",
		"{\"\u212a\":1,\"event_type\":\"x\"}",

		// escapes and surrogates in values
		`{"event_type":"identity.user.deleted","message_id":"\ud83d\ude00","payload":{"resource_info":"\u0075"}}`,
		`{"event_type":"identity.user.deleted","message_id":"\ud83d","payload":{"resource_info":"\ude00x"}}`,
		`{"event_type":"identity.user.deleted","message_id":"\ud83d\u0041","payload":{"resource_info":"\ud83d\ud83d\ude00"}}`,
		`{"event_type":"identity.user.deleted","message_id":"\u0000","publisher_id":"p\"q","payload":{"resource_info":"a\\b"}}`,
		`{"event_type":"","message_id":"m"}`, `{"event_type":"\u0000","message_id":"m"}`,
		`{"event_type":"identity.user.deleted","message_id":"","payload":{"resource_info":""}}`,
		`{"event_type":"identity.user.deleted","message_id":"` + strings.Repeat("m", 256) + `"}`,
		`{"event_type":"identity.user.deleted","message_id":"` + strings.Repeat("m", 255) + `"}`,
		`{"message_id":"` + strings.Repeat("m", 256) + `"}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"` + strings.Repeat(`\u00e9`, 128) + `"}}`,
		`{"event_type":"identity.user.deleted","payload":{"resource_info":"` + strings.Repeat(`\u00e9`, 127) + `"}}`,
		`{"event_type":"identity.user.deleted","payload":{"typeURI":"http:\/\/schemas.dmtf.org\/cloud\/audit\/1.0\/event","target":{"id":"t"}}}`,
		`{"event_type":"identity.user.\u0064eleted","payload":{"resource_info":"u"}}`,

		// timestamps
		`{"event_type":"identity.user.deleted","timestamp":"2026-11-22 13:11:11","payload":{"resource_info":"u"}}`,
		`{"event_type":"identity.user.deleted","timestamp":"2026-02-30 13:11:11.1","payload":{"resource_info":"u"}}`,
		`{"event_type":"identity.user.deleted","timestamp":"2026-11-22 13:11:11.1234567891","payload":{"resource_info":"u"}}`,
		`{"event_type":"identity.user.deleted","timestamp":7,"payload":{"resource_info":"u"}}`,
	} {
		seeds = append(seeds, []byte(s))
	}
	return seeds
}

func TestDecodeMatchesReference(t *testing.T) {
	seeds := decodeSeeds(t)
	// encoding/json's nesting limit: 10000 levels are JSON, 10001 are not.
	// (Not fuzz seeds: inputs this large slow the fuzzer down.)
	for _, depth := range []int{maxNestingDepth - 1, maxNestingDepth, maxNestingDepth + 1} {
		nested := `{"event_type":"identity.user.deleted","x":` + strings.Repeat("[", depth-1) + strings.Repeat("]", depth-1) + `}`
		seeds = append(seeds, []byte(nested), envelope(nested),
			[]byte(`{"event_type":"identity.user.deleted","payload":{"user":`+strings.Repeat("[", depth-2)+strings.Repeat("]", depth-2)+`}}`))
	}
	for _, body := range seeds {
		sameDecode(t, body)
	}
}

// The nesting limit is reached where encoding/json reaches it.
func TestDecodeNestingLimit(t *testing.T) {
	for _, tt := range []struct {
		depth int
		ok    bool
	}{{maxNestingDepth, true}, {maxNestingDepth + 1, false}} {
		body := []byte(`{"event_type":"identity.user.deleted","x":` + strings.Repeat("[", tt.depth-1) + strings.Repeat("]", tt.depth-1) + `}`)
		_, err := Decode(body)
		if (err == nil) != tt.ok {
			t.Errorf("depth %d: err = %v, want ok %v", tt.depth, err, tt.ok)
		}
	}
}

// FuzzDecodeMatchesReference checks that Decode returns what the
// encoding/json-based reference returns, for any body.
func FuzzDecodeMatchesReference(f *testing.F) {
	for _, s := range decodeSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body []byte) { sameDecode(t, body) })
}

// FuzzDecodeEnvelopedMatchesReference is FuzzDecodeMatchesReference with the
// fuzzed bytes as the oslo.message document of a valid envelope, where
// mutations of the notification are not hidden by broken escapes.
func FuzzDecodeEnvelopedMatchesReference(f *testing.F) {
	for _, s := range decodeSeeds(f) {
		var env map[string]string
		if json.Unmarshal(s, &env) == nil && env["oslo.message"] != "" {
			f.Add([]byte(env["oslo.message"]))
		} else {
			f.Add(s)
		}
	}
	f.Fuzz(func(t *testing.T, inner []byte) {
		sameDecode(t, envelope(string(inner)))
	})
}

func TestRejectErrorUnwraps(t *testing.T) {
	_, err := Decode([]byte(`{"a":`))
	var se *syntaxError
	if !errors.As(err, new(*RejectError)) || errors.As(err, &se) {
		// The syntax error is formatted into the message, not wrapped.
		t.Logf("%v", err)
	}
	if err == nil || !strings.Contains(err.Error(), "not a JSON object") {
		t.Fatalf("err = %v", err)
	}
}

func TestOverflowsFloat64(t *testing.T) {
	nums := []string{"0", "-0", "1", "1.5", "1e308", "1e309", "-1e309", "1.7976931348623157e308",
		"1.7976931348623158e308", "1.7976931348623159e308", "179769313486231580793728971405303415079934132710037826936173778980444968292764750946649017977587207096330286416692887910946555547851940402630657488671505820681908902000708383676273854845817711531450338369613632312811138345050240.0",
		"1e-400", "0.0000000000000000000000001", "-1E+400", "10e307", "0.1e310", "0.1e309"}
	for _, n := range []int{300, 308, 309, 310, 400} {
		nums = append(nums, strings.Repeat("9", n), strings.Repeat("9", n)+".9", "-"+strings.Repeat("1", n)+".0", "1"+strings.Repeat("0", n-1))
	}
	for _, num := range nums {
		_, err := strconv.ParseFloat(num, 64)
		if got := overflowsFloat64([]byte(num)); got != (err != nil) {
			t.Errorf("overflowsFloat64(%s) = %v, strconv error %v", num, got, err)
		}
	}
}
