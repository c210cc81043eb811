package revoke

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/keystonetest"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// ks is the real Keystone (Debian's keystone 22 under uwsgi, over TLS) shared
// by the tests of this package; TestMain starts it. Tests that use it do not
// run in parallel: TestKeystoneOutage stops it for a while.
var ks *keystonetest.Keystone

func TestMain(m *testing.M) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	k, err := keystonetest.Start(ctx, keystonetest.Options{TLS: true})
	cancel()
	if err != nil {
		// A required service: fail, never skip.
		fmt.Fprintf(os.Stderr, "FAIL: starting Keystone for internal/revoke tests: %v\n", err)
		os.Exit(1)
	}
	ks = k
	code := m.Run()
	if err := k.Close(); err != nil {
		fmt.Fprintf(os.Stderr, "removing the test Keystone: %v\n", err)
	}
	os.Exit(code)
}

// keystoneOptions are options for a poller of the test Keystone as its admin,
// with a fast poll.
func keystoneOptions(t testing.TB) Options { return keystoneOptionsFor(t, ks) }

func keystoneOptionsFor(t testing.TB, k *keystonetest.Keystone) Options {
	return Options{
		URL:          k.URL,
		CAFile:       k.CAFile,
		Username:     k.AdminUser,
		PasswordFile: writeFile(t, "password", k.AdminPassword+"\n"),
		Project:      k.AdminProject,
		PollInterval: 200 * time.Millisecond,
		MaxBackoff:   time.Second,
	}
}

func newKeystonePoller(t testing.TB, o Options, js jetstream.JetStream) (*Poller, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	p, err := New(o, js, reg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	return p, reg
}

// scenario makes the changes that record revocation events in Keystone and
// returns what each event must match.
type scenario struct {
	auditID       string // of the revoked token
	disabledUser  string
	removedMember string
	token         string // the revoked token
}

func runScenario(t testing.TB) scenario {
	t.Helper()
	ctx := context.Background()
	project, err := ks.CreateProject(ctx, keystonetest.UniqueName("p"))
	if err != nil {
		t.Fatal(err)
	}
	member, err := ks.RoleID(ctx, "member")
	if err != nil {
		t.Fatal(err)
	}
	var s scenario
	newUser := func() string {
		u, err := ks.CreateUser(ctx, keystonetest.UniqueName("u"), "pw", project)
		if err != nil {
			t.Fatal(err)
		}
		if err := ks.AssignProjectRole(ctx, u, project, member); err != nil {
			t.Fatal(err)
		}
		return u
	}

	// One token revoked: no notification at all, only a revocation event.
	u1 := newUser()
	tok, body, err := ks.IssueToken(ctx, u1, "pw", project)
	if err != nil {
		t.Fatal(err)
	}
	var issued struct {
		Token struct {
			AuditIDs []string `json:"audit_ids"`
		} `json:"token"`
	}
	if err := json.Unmarshal(body, &issued); err != nil || len(issued.Token.AuditIDs) == 0 {
		t.Fatalf("token body %s: no audit id (%v)", body, err)
	}
	s.auditID, s.token = issued.Token.AuditIDs[0], tok
	if err := ks.RevokeToken(ctx, tok); err != nil {
		t.Fatal(err)
	}

	// A user disabled.
	s.disabledUser = newUser()
	if err := ks.DisableUser(ctx, s.disabledUser); err != nil {
		t.Fatal(err)
	}

	// A user removed from a group: the CADF notification does not name it.
	s.removedMember = newUser()
	group, err := ks.CreateGroup(ctx, keystonetest.UniqueName("g"))
	if err != nil {
		t.Fatal(err)
	}
	if err := ks.AddUserToGroup(ctx, group, s.removedMember); err != nil {
		t.Fatal(err)
	}
	if err := ks.RemoveUserFromGroup(ctx, group, s.removedMember); err != nil {
		t.Fatal(err)
	}
	return s
}

// find returns the messages whose revocation satisfies match.
func find(msgs []streamMsg, match func(r *event.Revocation) bool) []streamMsg {
	var out []streamMsg
	for _, m := range msgs {
		if m.Event.Revocation != nil && match(m.Event.Revocation) {
			out = append(out, m)
		}
	}
	return out
}

// waitScenario waits until the scenario's three events are in the stream.
func waitScenario(t testing.TB, js jetstream.JetStream, s scenario) []streamMsg {
	t.Helper()
	var msgs []streamMsg
	testutil.Eventually(t, 20*time.Second, "the revocation events of the revoked token, the disabled user and the removed group member", func() (bool, string) {
		msgs = streamMessages(t, js)
		a := find(msgs, func(r *event.Revocation) bool { return r.AuditID == s.auditID })
		d := find(msgs, func(r *event.Revocation) bool { return r.UserID == s.disabledUser })
		g := find(msgs, func(r *event.Revocation) bool { return r.UserID == s.removedMember })
		return len(a) >= 1 && len(d) >= 1 && len(g) >= 1,
			fmt.Sprintf("%d messages: %d for audit id %s, %d for user %s, %d for user %s",
				len(msgs), len(a), s.auditID, len(d), s.disabledUser, len(g), s.removedMember)
	})
	return msgs
}

// checkMatchesKeystone fails unless the stream holds every event Keystone
// lists, once, exactly as Convert makes it.
func checkMatchesKeystone(t testing.TB, msgs []streamMsg) {
	t.Helper()
	checkOnce(t, msgs)
	byID := map[string]streamMsg{}
	for _, m := range msgs {
		byID[m.MsgID] = m
	}
	raw, err := ks.RevocationEvents(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range raw {
		b, _ := json.Marshal(r)
		var fields map[string]json.RawMessage
		_ = json.Unmarshal(b, &fields)
		want, ok := Convert(fields)
		if !ok || want.Widen != "" {
			t.Errorf("Keystone's event %s converted widened (%q) or without revoked_at", b, want.Widen)
		}
		got, found := byID[want.ID]
		if !found {
			t.Errorf("Keystone's event %s (id %s) is not in the stream", b, want.ID)
			continue
		}
		gotJSON, _ := json.Marshal(got.Event)
		wantJSON, _ := json.Marshal(want)
		if string(gotJSON) != string(wantJSON) {
			t.Errorf("stream message %s, want %s", gotJSON, wantJSON)
		}
		if got.Subject != "keystone.revocation" || got.Event.ID != want.Revocation.Digest() {
			t.Errorf("message on %q with id %q: want subject keystone.revocation and id = Revocation.Digest() %q",
				got.Subject, got.Event.ID, want.Revocation.Digest())
		}
	}
	if len(msgs) != len(raw) {
		t.Errorf("stream holds %d messages, Keystone lists %d events", len(msgs), len(raw))
	}
}

// TestKeystoneRevocationsPublishedOnce: a revoked token, a disabled user and a
// group member removed arrive in the stream once, as Keystone lists them; a
// restarted poller publishes none of them again, even with JetStream's
// duplicate window out of play.
func TestKeystoneRevocationsPublishedOnce(t *testing.T) {
	js := startJetStream(t, 100*time.Millisecond) // restarts must not rely on the window
	p, reg := newKeystonePoller(t, keystoneOptions(t), js)
	stop := runPoller(t, p)
	s := runScenario(t)
	msgs := waitScenario(t, js, s)

	for _, m := range find(msgs, func(r *event.Revocation) bool { return r.AuditID == s.auditID }) {
		r := m.Event.Revocation
		if r.UserID != "" || r.ProjectID != "" || r.IssuedBefore.IsZero() || !m.Event.Time.Equal(r.RevokedAt) {
			t.Errorf("token revocation %+v: want only audit_id, issued_before and revoked_at, and Time = revoked_at", r)
		}
	}
	checkMatchesKeystone(t, msgs)
	published := metricValue(t, reg, "keystone_fanout_revoke_events_published_total")
	if int(published) != len(msgs) {
		t.Errorf("events_published_total = %v, stream holds %d", published, len(msgs))
	}
	stop()

	// Restart: a new poller with the stored position publishes nothing.
	p2, reg2 := newKeystonePoller(t, keystoneOptions(t), js)
	runPoller(t, p2)
	testutil.Eventually(t, 20*time.Second, "five polls of the restarted poller", func() (bool, string) {
		n := metricValue(t, reg2, "keystone_fanout_revoke_polls_total")
		return n >= 5 && p2.Ready() == nil, fmt.Sprintf("%v polls, ready: %v", n, p2.Ready())
	})
	after := streamMessages(t, js)
	if len(after) != len(msgs) {
		t.Fatalf("after a restart the stream holds %d messages, before %d", len(after), len(msgs))
	}
	if got := metricValue(t, reg2, "keystone_fanout_revoke_events_published_total"); got != 0 {
		t.Errorf("restarted poller published %v events, want 0", got)
	}

	// It still publishes what happens next.
	s2 := runScenario(t)
	checkMatchesKeystone(t, waitScenario(t, js, s2))
}

// TestKeystoneTwoPollers: of two replicas one polls, and the stream holds
// every event Keystone lists, once. When the polling replica dies (its NATS
// connection gone: no renewal, no hand-over), the other takes over after the
// lease's ttl and publishes what Keystone records next.
func TestKeystoneTwoPollers(t *testing.T) {
	srv := testutil.StartNATS(t)
	js := jetStreamOf(t, srv.ClientURL())
	createStream(t, js, 2*time.Minute)
	rs := []*replica{startReplica(t, srv.ClientURL(), keystoneOptions(t), "a"), startReplica(t, srv.ClientURL(), keystoneOptions(t), "b")}
	s := runScenario(t)
	waitScenario(t, js, s)
	var holder int
	testutil.Eventually(t, 20*time.Second, "one poller holding the lease", func() (bool, string) {
		h := holders(t, rs...)
		if len(h) == 1 {
			holder = h[0]
		}
		return len(h) == 1, fmt.Sprint(h)
	})
	standby := rs[1-holder]
	start := metricValue(t, rs[holder].reg, "keystone_fanout_revoke_polls_total")
	testutil.Eventually(t, 20*time.Second, "two more polls of the holder", func() (bool, string) {
		n := metricValue(t, rs[holder].reg, "keystone_fanout_revoke_polls_total")
		return n >= start+2, fmt.Sprintf("%v polls", n-start)
	})
	if n := metricValue(t, standby.reg, "keystone_fanout_revoke_polls_total"); n != 0 {
		t.Errorf("the standby replica polled %v times, want 0", n)
	}
	checkMatchesKeystone(t, streamMessages(t, js))

	killed := time.Now()
	rs[holder].nc.Close()
	testutil.Eventually(t, 20*time.Second, "the standby holding the lease", func() (bool, string) {
		return standby.holds(t), "not yet"
	})
	t.Logf("lease taken over %s after the holder died (ttl %s)", time.Since(killed).Round(time.Millisecond), DefaultLeaseTTL)
	s2 := runScenario(t)
	checkMatchesKeystone(t, waitScenario(t, js, s2))
}

// TestKeystoneOutage: Keystone stopped shows in Ready and the metrics; once it
// is back the poller recovers and publishes what happened meanwhile.
func TestKeystoneOutage(t *testing.T) {
	js := startJetStream(t, 2*time.Minute)
	p, reg := newKeystonePoller(t, keystoneOptions(t), js)
	runPoller(t, p)
	testutil.Eventually(t, 20*time.Second, "ready", func() (bool, string) { err := p.Ready(); return err == nil, fmt.Sprint(err) })

	if err := ks.StopServer(); err != nil {
		t.Fatal(err)
	}
	restarted := false
	t.Cleanup(func() {
		if !restarted {
			_ = ks.StartServer(context.Background())
		}
	})
	testutil.Eventually(t, 20*time.Second, "Keystone's absence in Ready", func() (bool, string) {
		err := p.Ready()
		return err != nil && strings.Contains(err.Error(), "connection refused"), fmt.Sprint(err)
	})
	if got := metricValue(t, reg, "keystone_fanout_revoke_poll_errors_total", "stage", "list"); got < 1 {
		t.Errorf("poll_errors_total{stage=list} = %v, want at least 1", got)
	}
	if err := ks.StartServer(context.Background()); err != nil {
		t.Fatal(err)
	}
	restarted = true
	s := runScenario(t)
	waitScenario(t, js, s)
	testutil.Eventually(t, 20*time.Second, "ready again", func() (bool, string) { err := p.Ready(); return err == nil, fmt.Sprint(err) })
	checkMatchesKeystone(t, streamMessages(t, js))
}

// TestKeystonePolicy: the service role is enough to list revocation events
// under Keystone's default policy; member is not, and says so in Ready. A
// poller whose own token Keystone revokes authenticates again.
func TestKeystonePolicy(t *testing.T) {
	ctx := context.Background()
	projectName := keystonetest.UniqueName("svc")
	project, err := ks.CreateProject(ctx, projectName)
	if err != nil {
		t.Fatal(err)
	}
	service, err := ks.EnsureRole(ctx, "service")
	if err != nil {
		t.Fatal(err)
	}
	member, err := ks.RoleID(ctx, "member")
	if err != nil {
		t.Fatal(err)
	}
	js := startJetStream(t, 2*time.Minute)
	newUserPoller := func(role, bucket string) (*Poller, *prometheus.Registry, string) {
		name := keystonetest.UniqueName(role)
		u, err := ks.CreateUser(ctx, name, "pw-"+name, project)
		if err != nil {
			t.Fatal(err)
		}
		if err := ks.AssignProjectRole(ctx, u, project, role); err != nil {
			t.Fatal(err)
		}
		o := keystoneOptions(t)
		o.Username, o.Project, o.Bucket = name, projectName, bucket
		o.PasswordFile = writeFile(t, "pw-"+name, "pw-"+name)
		p, reg := newKeystonePoller(t, o, js)
		runPoller(t, p)
		return p, reg, u
	}
	svc, svcReg, svcUser := newUserPoller(service, "svc")
	mem, _, _ := newUserPoller(member, "member")

	testutil.Eventually(t, 20*time.Second, "the service-role poller ready", func() (bool, string) {
		err := svc.Ready()
		return err == nil, fmt.Sprint(err)
	})
	testutil.Eventually(t, 20*time.Second, "the member-role poller refused with the policy named", func() (bool, string) {
		err := mem.Ready()
		return err != nil && strings.Contains(err.Error(), "403") && strings.Contains(err.Error(), "identity:list_revoke_events"), fmt.Sprint(err)
	})

	// Disabling and enabling the service user revokes its token: the poller
	// gets a 401 and authenticates again.
	if err := ks.DisableUser(ctx, svcUser); err != nil {
		t.Fatal(err)
	}
	enable := func() {
		if err := ks.Admin(ctx, "PATCH", "/users/"+svcUser,
			map[string]any{"user": map[string]any{"enabled": true}}, nil); err != nil {
			t.Fatal(err)
		}
	}
	enable()
	// Its new token may be refused too while it was issued in the second of
	// the revocation (Keystone compares seconds): the poller keeps trying.
	//
	// Keystone caches users (get_user_by_name, which password authentication
	// checks for enabled). A poller's authentication that read the disabled
	// user just before the update stores it in the cache just after the
	// update's invalidation, and every authentication is then refused for the
	// cache's lifetime (600 s). Enabling again invalidates that entry; it
	// changes nothing else (no revocation event, the user is enabled).
	lastEnable := time.Now()
	testutil.Eventually(t, 30*time.Second, "a new authentication and the service user's revocation in the stream", func() (bool, string) {
		if err := svc.Ready(); err != nil && strings.Contains(err.Error(), "401") && time.Since(lastEnable) > 2*time.Second {
			enable()
			lastEnable = time.Now()
		}
		n := metricValue(t, svcReg, "keystone_fanout_revoke_auth_total", "result", "success")
		got := find(streamMessages(t, js), func(r *event.Revocation) bool { return r.UserID == svcUser })
		return n >= 2 && len(got) == 1, fmt.Sprintf("%v authentications, %d messages for user %s, ready: %v", n, len(got), svcUser, svc.Ready())
	})
	testutil.Eventually(t, 30*time.Second, "the service-role poller ready again", func() (bool, string) {
		err := svc.Ready()
		return err == nil, fmt.Sprint(err)
	})
	checkOnce(t, streamMessages(t, js))
}

// TestKeystoneApplicationCredential: the poller authenticates with an
// application credential whose secret is read from a file.
func TestKeystoneApplicationCredential(t *testing.T) {
	ctx := context.Background()
	project, err := ks.CreateProject(ctx, keystonetest.UniqueName("ac"))
	if err != nil {
		t.Fatal(err)
	}
	admin, err := ks.RoleID(ctx, "admin")
	if err != nil {
		t.Fatal(err)
	}
	name := keystonetest.UniqueName("ac")
	u, err := ks.CreateUser(ctx, name, "pw", project)
	if err != nil {
		t.Fatal(err)
	}
	if err := ks.AssignProjectRole(ctx, u, project, admin); err != nil {
		t.Fatal(err)
	}
	tok, _, err := ks.IssueToken(ctx, u, "pw", project)
	if err != nil {
		t.Fatal(err)
	}
	id, secret, err := ks.CreateApplicationCredential(ctx, u, tok, "keystone-fanout")
	if err != nil {
		t.Fatal(err)
	}
	js := startJetStream(t, 2*time.Minute)
	o := Options{URL: ks.URL, CAFile: ks.CAFile, AppCredID: id, AppCredSecretFile: writeFile(t, "secret", secret+"\n"),
		PollInterval: 200 * time.Millisecond, MaxBackoff: time.Second}
	p, _ := newKeystonePoller(t, o, js)
	runPoller(t, p)
	s := runScenario(t)
	waitScenario(t, js, s)
	checkMatchesKeystone(t, streamMessages(t, js))
}

func mustAdminToken(t testing.TB) string {
	t.Helper()
	tok, err := ks.AdminToken(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return tok
}
