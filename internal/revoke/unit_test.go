package revoke

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

func TestOptionsValidate(t *testing.T) {
	pw := writeFile(t, "pw", "secret\n")
	empty := writeFile(t, "empty", "\n")
	ca := writeFile(t, "ca.pem", string(testutil.NewCA(t, "test CA").PEM))
	notCA := writeFile(t, "not-ca.pem", "hello")
	good := Options{URL: "http://keystone:5000/v3", Username: "svc", PasswordFile: pw, Project: "service"}
	with := func(f func(o *Options)) Options { o := good; f(&o); return o }

	cases := []struct {
		name string
		o    Options
		want []string // substrings of the error; none: valid
	}{
		{"password", good, nil},
		{"password given directly", with(func(o *Options) { o.PasswordFile = ""; o.Password = "x" }), nil},
		{"application credential", Options{URL: "https://k/identity/v3/", AppCredID: "id", AppCredSecretFile: pw, CAFile: ca}, nil},
		{"no url", with(func(o *Options) { o.URL = "" }), []string{"--keystone-url is required"}},
		{"not v3", with(func(o *Options) { o.URL = "http://keystone:5000" }), []string{"--keystone-url", "/v3"}},
		{"bad scheme", with(func(o *Options) { o.URL = "ftp://keystone/v3" }), []string{"--keystone-url", "http or https"}},
		{"no credentials", Options{URL: "http://k/v3"}, []string{"--keystone-username", "--keystone-app-cred-id"}},
		{"both credentials", with(func(o *Options) { o.AppCredID = "x"; o.AppCredSecret = "y" }), []string{"choose password or application credential"}},
		{"no password", with(func(o *Options) { o.PasswordFile = "" }), []string{"--keystone-password-file is required"}},
		{"password twice", with(func(o *Options) { o.Password = "x" }), []string{"given twice"}},
		{"password file missing", with(func(o *Options) { o.PasswordFile = "/nonexistent/pw" }), []string{"--keystone-password-file", "no such file"}},
		{"password file empty", with(func(o *Options) { o.PasswordFile = empty }), []string{"--keystone-password-file", "empty"}},
		{"no project", with(func(o *Options) { o.Project = "" }), []string{"--keystone-project is required"}},
		{"app cred without secret", Options{URL: "http://k/v3", AppCredID: "id"}, []string{"--keystone-app-cred-secret-file is required"}},
		{"app cred with project", Options{URL: "http://k/v3", AppCredID: "id", AppCredSecret: "s", Project: "p"}, []string{"--keystone-project is not used"}},
		{"ca with http", with(func(o *Options) { o.CAFile = ca }), []string{"--keystone-ca-file", "http"}},
		{"ca not pem", with(func(o *Options) { o.URL = "https://k/v3"; o.CAFile = notCA }), []string{"--keystone-ca-file", "no PEM certificate"}},
		{"interval too short", with(func(o *Options) { o.PollInterval = time.Millisecond }), []string{"--revocation-poll-interval"}},
		{"overlap too short", with(func(o *Options) { o.Overlap = time.Millisecond }), []string{"overlap"}},
		{"bad prefix", with(func(o *Options) { o.SubjectPrefix = "a.>" }), []string{"--subject-prefix"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.o.Validate()
			if len(c.want) == 0 {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate() = nil, want an error mentioning %q", c.want)
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate() = %q, want it to mention %q", err, w)
				}
			}
		})
	}
}

func TestParseTime(t *testing.T) {
	want := time.Date(2026, 11, 22, 13, 11, 52, 0, time.UTC)
	cases := []struct {
		name, in string
		want     time.Time
	}{
		{"revoked_at", "2026-11-22T13:11:52.000000Z", want},
		{"expires_at", "2026-11-22T13:11:52Z", want},
		{"offset", "2026-11-22T14:11:52.000000+01:00", want},
		{"no zone", "2026-11-22T13:11:52.000000", want},
		{"space", "2026-11-22 13:11:52", want},
		{"microseconds", "2026-11-22T13:11:52.123456Z", want.Add(123456 * time.Microsecond)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := parseTime(c.in)
			if err != nil || !got.Equal(c.want) || got.Location() != time.UTC {
				t.Fatalf("parseTime(%q) = %v (%v), %v; want %v in UTC", c.in, got, got.Location(), err, c.want)
			}
		})
	}
	for _, bad := range []string{"", "yesterday", "2026-11-22", "1700000000"} {
		if _, err := parseTime(bad); err == nil {
			t.Errorf("parseTime(%q) succeeded, want an error", bad)
		}
	}
	if got := formatTime(want); got != "2026-11-22T13:11:52.000000Z" {
		t.Errorf("formatTime = %q", got)
	}
}

func rawEvent(t *testing.T, s string) map[string]json.RawMessage {
	t.Helper()
	var m map[string]json.RawMessage
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestConvert(t *testing.T) {
	at := time.Date(2026, 11, 22, 13, 11, 52, 0, time.UTC)
	exp := time.Date(2026, 11, 22, 14, 0, 0, 0, time.UTC)
	cases := []struct {
		name   string
		raw    string
		want   event.Revocation
		widen  string // substring of Widen; empty: not widened
		wantOK bool
	}{
		{"token revoked", `{"audit_id": "KhS3C6QxQz6NLxD_RI0a1Q", "issued_before": "2026-11-22T13:11:52.000000Z", "revoked_at": "2026-11-22T13:11:52.000000Z"}`,
			event.Revocation{AuditID: "KhS3C6QxQz6NLxD_RI0a1Q", IssuedBefore: at, RevokedAt: at}, "", true},
		{"user", `{"user_id": "u1", "issued_before": "2026-11-22T13:11:52.000000Z", "revoked_at": "2026-11-22T13:11:52.000000Z"}`,
			event.Revocation{UserID: "u1", IssuedBefore: at, RevokedAt: at}, "", true},
		{"keystone names", `{"OS-TRUST:trust_id": "t", "OS-OAUTH1:consumer_id": "c", "OS-OAUTH1:access_token_id": "a", "project_id": "p", "role_id": "r", "audit_chain_id": "ac", "issued_before": "2026-11-22T13:11:52.000000Z", "revoked_at": "2026-11-22T13:11:52.000000Z"}`,
			event.Revocation{TrustID: "t", ConsumerID: "c", AccessTokenID: "a", ProjectID: "p", RoleID: "r", AuditChainID: "ac", IssuedBefore: at, RevokedAt: at}, "", true},
		{"domain scope", `{"domain_scope_id": "d", "expires_at": "2026-11-22T14:00:00Z", "issued_before": "2026-11-22T13:11:52.000000Z", "revoked_at": "2026-11-22T13:11:52.000000Z"}`,
			event.Revocation{DomainID: "d", ExpiresAt: &exp, IssuedBefore: at, RevokedAt: at}, "", true},
		{"null fields", `{"user_id": "u1", "project_id": null, "issued_before": "2026-11-22T13:11:52.000000Z", "revoked_at": "2026-11-22T13:11:52.000000Z"}`,
			event.Revocation{UserID: "u1", IssuedBefore: at, RevokedAt: at}, "", true},
		{"unknown field", `{"user_id": "u1", "idp_id": "x", "issued_before": "2026-11-22T13:11:52.000000Z", "revoked_at": "2026-11-22T13:11:52.000000Z"}`,
			event.Revocation{UserID: "u1", IssuedBefore: at, RevokedAt: at}, "unknown fields idp_id", true},
		{"no issued_before", `{"user_id": "u1", "revoked_at": "2026-11-22T13:11:52.000000Z"}`,
			event.Revocation{UserID: "u1", RevokedAt: at}, "issued_before is missing", true},
		{"wrong type", `{"user_id": 7, "issued_before": "2026-11-22T13:11:52.000000Z", "revoked_at": "2026-11-22T13:11:52.000000Z"}`,
			event.Revocation{IssuedBefore: at, RevokedAt: at}, "user_id is not a string", true},
		{"unreadable revoked_at", `{"user_id": "u1", "issued_before": "2026-11-22T13:11:52.000000Z", "revoked_at": "soon"}`,
			event.Revocation{UserID: "u1", IssuedBefore: at}, "revoked_at", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e, ok := Convert(rawEvent(t, c.raw))
			if ok != c.wantOK {
				t.Errorf("ok = %v, want %v", ok, c.wantOK)
			}
			if e.Version != event.SchemaVersion || e.Kind != event.KindRevocation || e.Type != "revocation" || e.Revocation == nil {
				t.Fatalf("event %+v: want version %d, kind revocation, type revocation and a Revocation", e, event.SchemaVersion)
			}
			got, _ := json.Marshal(e.Revocation)
			want, _ := json.Marshal(c.want)
			if string(got) != string(want) {
				t.Errorf("Revocation = %s, want %s", got, want)
			}
			if c.widen == "" {
				if e.Widen != "" || e.ID != c.want.Digest() || !e.Time.Equal(c.want.RevokedAt) || e.Unbounded() {
					t.Errorf("event %+v: want not widened, ID %s, Time %v", e, c.want.Digest(), c.want.RevokedAt)
				}
			} else {
				if !strings.Contains(e.Widen, c.widen) || !e.Unbounded() {
					t.Errorf("Widen = %q, want it to mention %q and the event unbounded", e.Widen, c.widen)
				}
				if e.ID == c.want.Digest() || !strings.HasPrefix(e.ID, "revoke-") {
					t.Errorf("ID of a widened event = %q: want a revoke- digest of its raw fields, not of the representable ones", e.ID)
				}
			}
		})
	}
	// Field order and spacing do not change the id.
	a, _ := Convert(rawEvent(t, `{"user_id":"u1","issued_before":"2026-11-22T13:11:52.000000Z","revoked_at":"2026-11-22T13:11:52.000000Z"}`))
	b, _ := Convert(rawEvent(t, `{"revoked_at": "2026-11-22T13:11:52Z", "user_id": "u1", "issued_before": "2026-11-22T13:11:52.000000Z"}`))
	if a.ID != b.ID {
		t.Errorf("the same event written two ways got ids %s and %s", a.ID, b.ID)
	}
}

// fakeOptions are options for a poller of f with a fast poll.
func fakeOptions(f *fakeKeystone) Options {
	return Options{URL: f.URL(), Username: "svc", Password: "pw", Project: "service",
		PollInterval: 100 * time.Millisecond, MaxBackoff: 300 * time.Millisecond, RequestTimeout: 5 * time.Second}
}

// TestFakeEqualTimestamps: an event that becomes visible after others with the
// same revoked_at (Keystone stores seconds) is still published, and the
// re-listed ones are not published again.
func TestFakeEqualTimestamps(t *testing.T) {
	f := newFakeKeystone(false)
	defer f.Close()
	js := startJetStream(t, 2*time.Minute)
	reg := prometheus.NewRegistry()
	p, err := New(fakeOptions(f), js, reg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	at := time.Now()
	f.add(map[string]any{"audit_id": "a1"}, at)
	runPoller(t, p)
	testutil.Eventually(t, 10*time.Second, "event a1 in the stream", func() (bool, string) {
		m := streamMessages(t, js)
		return len(m) == 1, fmt.Sprintf("%d messages", len(m))
	})
	_, lists := f.counts()
	f.add(map[string]any{"audit_id": "a2"}, at) // same second, committed later
	testutil.Eventually(t, 10*time.Second, "event a2 in the stream", func() (bool, string) {
		m := streamMessages(t, js)
		return len(m) == 2, fmt.Sprintf("%d messages", len(m))
	})
	// Several more polls list both again; nothing more is published.
	testutil.Eventually(t, 10*time.Second, "three more polls", func() (bool, string) {
		_, l := f.counts()
		return l >= lists+4, fmt.Sprintf("%d polls", l-lists)
	})
	msgs := streamMessages(t, js)
	checkOnce(t, msgs)
	if len(msgs) != 2 {
		t.Fatalf("%d messages, want 2", len(msgs))
	}
	if got := metricValue(t, reg, "keystone_fanout_revoke_events_published_total"); got != 2 {
		t.Errorf("events_published_total = %v, want 2", got)
	}
	if got := metricValue(t, reg, "keystone_fanout_revoke_duplicates_total"); got != 0 {
		t.Errorf("duplicates_total = %v, want 0 (re-listed events are recognised before publishing)", got)
	}
	f.mu.Lock()
	since := f.lastSince
	f.mu.Unlock()
	// The position minus the overlap, less a few microseconds that make each
	// poll's "since" its own (Keystone caches its answer by it).
	want := at.UTC().Truncate(time.Second).Add(-DefaultOverlap)
	if got, err := parseTime(since); err != nil || got.After(want) || got.Before(want.Add(-time.Millisecond)) {
		t.Errorf("since = %q, want at most 1 ms before %s (the position minus the overlap)", since, formatTime(want))
	}
}

// TestFakeRestartBeyondDuplicateWindow: with JetStream's duplicate window out
// of play, a restarted poller publishes nothing twice, and what it missed
// while down once.
func TestFakeRestartBeyondDuplicateWindow(t *testing.T) {
	f := newFakeKeystone(false)
	defer f.Close()
	js := startJetStream(t, 100*time.Millisecond)
	now := time.Now()
	for i := range 5 {
		f.add(map[string]any{"user_id": fmt.Sprintf("u%d", i)}, now.Add(time.Duration(i-4)*time.Second))
	}
	p1, err := New(fakeOptions(f), js, prometheus.NewRegistry(), testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	stop := runPoller(t, p1)
	testutil.Eventually(t, 10*time.Second, "5 events", func() (bool, string) {
		m := streamMessages(t, js)
		return len(m) == 5, fmt.Sprintf("%d messages", len(m))
	})
	stop()
	f.add(map[string]any{"user_id": "while-down"}, time.Now())

	reg := prometheus.NewRegistry()
	p2, err := New(fakeOptions(f), js, reg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	runPoller(t, p2)
	testutil.Eventually(t, 10*time.Second, "the event revoked while down", func() (bool, string) {
		m := streamMessages(t, js)
		return len(m) == 6, fmt.Sprintf("%d messages", len(m))
	})
	testutil.Eventually(t, 10*time.Second, "five polls of the restarted poller", func() (bool, string) {
		n := metricValue(t, reg, "keystone_fanout_revoke_polls_total")
		return n >= 5, fmt.Sprintf("%v polls", n)
	})
	msgs := streamMessages(t, js)
	checkOnce(t, msgs)
	if len(msgs) != 6 {
		t.Fatalf("%d messages, want 6", len(msgs))
	}
	if got := metricValue(t, reg, "keystone_fanout_revoke_events_published_total"); got != 1 {
		t.Errorf("restarted poller published %v events, want 1", got)
	}
}

// TestFakeReauth: the token is renewed before it expires (by the injected
// clock) and when Keystone answers 401.
func TestFakeReauth(t *testing.T) {
	f := newFakeKeystone(false)
	defer f.Close()
	f.lifetime = time.Hour
	js := startJetStream(t, 2*time.Minute)
	var offset atomic.Int64
	o := fakeOptions(f)
	o.Now = func() time.Time { return time.Now().Add(time.Duration(offset.Load())) }
	reg := prometheus.NewRegistry()
	p, err := New(o, js, reg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	runPoller(t, p)
	waitPolls := func(n float64) {
		t.Helper()
		start := metricValue(t, reg, "keystone_fanout_revoke_polls_total")
		testutil.Eventually(t, 10*time.Second, "polls", func() (bool, string) {
			got := metricValue(t, reg, "keystone_fanout_revoke_polls_total")
			return got >= start+n, fmt.Sprintf("%v polls", got-start)
		})
	}
	waitPolls(3)
	if a, _ := f.counts(); a != 1 {
		t.Fatalf("%d authentications after 3 polls, want 1", a)
	}
	offset.Store(int64(54 * time.Minute)) // not yet: 5 min before expiry is 55 min
	waitPolls(3)
	if a, _ := f.counts(); a != 1 {
		t.Fatalf("%d authentications at 54 min, want 1", a)
	}
	offset.Store(int64(56 * time.Minute))
	waitPolls(3)
	if a, _ := f.counts(); a != 2 {
		t.Fatalf("%d authentications at 56 min, want 2", a)
	}
	f.revokeTokens()
	waitPolls(3)
	if a, _ := f.counts(); a != 3 {
		t.Fatalf("%d authentications after a 401, want 3", a)
	}
	if got := metricValue(t, reg, "keystone_fanout_revoke_poll_errors_total", "stage", "list"); got != 0 {
		t.Errorf("poll_errors_total{stage=list} = %v: a 401 should be retried with a new token in the same poll", got)
	}
	if got := metricValue(t, reg, "keystone_fanout_revoke_auth_total", "result", "success"); got != 3 {
		t.Errorf("auth_total{result=success} = %v, want 3", got)
	}
	// The password request names the user, its domain and the project scope.
	f.mu.Lock()
	auth, _ := json.Marshal(f.lastAuth)
	f.mu.Unlock()
	for _, w := range []string{`"methods":["password"]`, `"name":"svc"`, `"password":"pw"`, `"project":{"domain":{"name":"Default"},"name":"service"}`} {
		if !strings.Contains(string(auth), w) {
			t.Errorf("auth request %s: want %s", auth, w)
		}
	}
}

// TestFakeErrorsShowInReady: Keystone refusing, forbidding or being away
// shows in Ready and the metrics, and the poller recovers.
func TestFakeErrorsShowInReady(t *testing.T) {
	f := newFakeKeystone(false)
	js := startJetStream(t, 2*time.Minute)
	reg := prometheus.NewRegistry()
	p, err := New(fakeOptions(f), js, reg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Ready(); err == nil {
		t.Fatal("Ready() = nil before the first poll")
	}
	runPoller(t, p)
	ready := func() (bool, string) { err := p.Ready(); return err == nil, fmt.Sprint(err) }
	notReady := func(want string) func() (bool, string) {
		return func() (bool, string) {
			err := p.Ready()
			return err != nil && strings.Contains(err.Error(), want), fmt.Sprint(err)
		}
	}
	testutil.Eventually(t, 10*time.Second, "ready", ready)

	f.mu.Lock()
	f.listCode = 403
	f.mu.Unlock()
	testutil.Eventually(t, 10*time.Second, "a 403 in Ready", notReady("identity:list_revoke_events"))
	f.mu.Lock()
	f.listCode = 0
	f.mu.Unlock()
	testutil.Eventually(t, 10*time.Second, "ready again", ready)

	f.revokeTokens()
	f.mu.Lock()
	f.authCode = 401
	f.mu.Unlock()
	testutil.Eventually(t, 10*time.Second, "an authentication failure in Ready", notReady("auth"))
	if got := metricValue(t, reg, "keystone_fanout_revoke_auth_total", "result", "failure"); got < 1 {
		t.Errorf("auth_total{result=failure} = %v, want at least 1", got)
	}
	f.mu.Lock()
	f.authCode = 0
	f.mu.Unlock()
	testutil.Eventually(t, 10*time.Second, "ready again", ready)

	f.Close() // Keystone away
	testutil.Eventually(t, 10*time.Second, "connection errors in Ready", notReady("connect"))
	if got := metricValue(t, reg, "keystone_fanout_revoke_poll_errors_total", "stage", "list"); got < 2 {
		t.Errorf("poll_errors_total{stage=list} = %v, want at least 2", got)
	}
	if got := metricValue(t, reg, "keystone_fanout_revoke_last_success_timestamp_seconds"); got <= 0 {
		t.Errorf("last_success_timestamp = %v, want the time of the last success", got)
	}
}

// TestFakePublishFailure: while the stream is missing nothing is acknowledged,
// so the position does not move; once the stream exists every event arrives.
func TestFakePublishFailure(t *testing.T) {
	f := newFakeKeystone(false)
	defer f.Close()
	js := startJetStream(t, 2*time.Minute)
	if err := js.DeleteStream(context.Background(), testStream); err != nil {
		t.Fatal(err)
	}
	f.add(map[string]any{"user_id": "u1"}, time.Now().Add(-time.Second))
	f.add(map[string]any{"user_id": "u2"}, time.Now())
	reg := prometheus.NewRegistry()
	p, err := New(fakeOptions(f), js, reg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	runPoller(t, p)
	testutil.Eventually(t, 10*time.Second, "a publish error in Ready", func() (bool, string) {
		err := p.Ready()
		return err != nil && strings.Contains(err.Error(), "publish"), fmt.Sprint(err)
	})
	kv, err := js.KeyValue(context.Background(), DefaultBucket)
	if err != nil {
		t.Fatal(err)
	}
	if e, err := kv.Get(context.Background(), DefaultKey); err == nil {
		t.Fatalf("position stored while nothing was acknowledged: %s", e.Value())
	}
	createStream(t, js, 2*time.Minute)
	testutil.Eventually(t, 10*time.Second, "both events", func() (bool, string) {
		m := streamMessages(t, js)
		return len(m) == 2, fmt.Sprintf("%d messages", len(m))
	})
	testutil.Eventually(t, 10*time.Second, "the position", func() (bool, string) {
		e, err := kv.Get(context.Background(), DefaultKey)
		if err != nil {
			return false, err.Error()
		}
		var pos position
		_ = json.Unmarshal(e.Value(), &pos)
		return len(pos.Recent) == 2, string(e.Value())
	})
	if got := metricValue(t, reg, "keystone_fanout_revoke_poll_errors_total", "stage", "publish"); got < 1 {
		t.Errorf("poll_errors_total{stage=publish} = %v, want at least 1", got)
	}
}

// TestFakeTLS: --keystone-ca-file is used to check Keystone's certificate, and
// without it the system roots reject a private CA.
func TestFakeTLS(t *testing.T) {
	f := newFakeKeystone(true)
	defer f.Close()
	js := startJetStream(t, 2*time.Minute)
	ca := writeFile(t, "ca.pem", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: f.srv.Certificate().Raw})))

	o := fakeOptions(f)
	o.CAFile = ca
	p, err := New(o, js, prometheus.NewRegistry(), testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	runPoller(t, p)
	testutil.Eventually(t, 10*time.Second, "ready over TLS", func() (bool, string) { err := p.Ready(); return err == nil, fmt.Sprint(err) })

	o.CAFile = ""
	o.Bucket = "other"
	p2, err := New(o, js, prometheus.NewRegistry(), testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	runPoller(t, p2)
	testutil.Eventually(t, 10*time.Second, "a certificate error", func() (bool, string) {
		err := p2.Ready()
		return err != nil && strings.Contains(err.Error(), "certificate"), fmt.Sprint(err)
	})
}

func TestNewRejectsInvalidOptions(t *testing.T) {
	js := startJetStream(t, 2*time.Minute)
	if _, err := New(Options{}, js, nil, nil); err == nil || !strings.Contains(err.Error(), "--keystone-url") {
		t.Fatalf("New with empty options: %v, want an error naming --keystone-url", err)
	}
	f := newFakeKeystone(false)
	defer f.Close()
	reg := prometheus.NewRegistry()
	if _, err := New(fakeOptions(f), js, reg, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := New(fakeOptions(f), js, reg, nil); err == nil {
		t.Fatal("registering the metrics twice in one registry succeeded")
	}
}
