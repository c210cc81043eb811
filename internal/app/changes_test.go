package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	gomemcache "github.com/bradfitz/gomemcache/memcache"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/keystone-fanout/keystone-fanout/bridge"
	"github.com/keystone-fanout/keystone-fanout/internal/keystonetest"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/natsserver"
	"github.com/keystone-fanout/keystone-fanout/internal/revoke"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
	"github.com/keystone-fanout/keystone-fanout/regionagent"
)

// TestKeystoneChangesInARegion runs a real Keystone publishing its
// notifications in each format, and the whole daemon with the revocation
// poller on, in its defaults. Each token-affecting change is made through
// Keystone's API to a token that keystonemiddleware's own code cached in the
// region; the entry must go, and a bystander's entry (another user, another
// project) must stay: nothing is swept. The time from Keystone's answer to the
// entry gone is logged per change (docs/BENCHMARKS.md).
func TestKeystoneChangesInARegion(t *testing.T) {
	for _, format := range []string{"basic", "cadf"} {
		t.Run(format, func(t *testing.T) { testChanges(t, format) })
	}
}

// changeRig is one format's Keystone, region cache and daemon.
type changeRig struct {
	t      *testing.T
	ks     *keystonetest.Keystone
	cache  *kmwtest.Cache
	reg    *prometheus.Registry
	member string // role id
	// Where Keystone publishes its notifications, and the daemon's stream.
	exchange, routingKey string
	js                   jetstream.JetStream
}

const (
	// changeRegion is the rig's one region.
	changeRegion = "regionTwo"
	// A loaded machine can stall a poll or a lease renewal past the
	// defaults (2 s each), and the agent would then sweep where the test
	// wants precision; the times measured do not depend on these.
	changeResolveWait = 5 * time.Second
	changeLeaseTTL    = 6 * time.Second
)

// cached writes the tokens' validations through the middleware and returns
// where each went.
func (r *changeRig) cached(ctx context.Context, tokens ...string) []kmwtest.Written {
	r.t.Helper()
	var entries []kmwtest.Entry
	for _, tok := range tokens {
		body, err := r.ks.TokenBody(ctx, tok)
		if err != nil {
			r.t.Fatal(err)
		}
		entries = append(entries, kmwtest.Entry{TokenID: tok, Body: json.RawMessage(body)})
	}
	ws := r.cache.Write(entries)
	for _, w := range ws {
		if !w.Stored {
			r.t.Fatalf("the middleware did not store a token")
		}
	}
	return ws
}

// settled waits until the agent has acknowledged every event the setup
// caused (creating a role assignment removes the user's entries), both passes
// done, so that entries cached from now on are only removed by the change
// under test. Keystone has sent the setup's notifications when its API
// answered, so a marker notification published now (about a user nobody
// caches) follows them through the queue and the stream: once the region's
// consumer has acknowledged the marker, it has acknowledged them.
func (r *changeRig) settled() {
	r.t.Helper()
	marker := publishKeystoneTo(r.t, r.exchange, r.routingKey, "identity.user.updated", "settled-"+testutil.NameSuffix())
	ctx := context.Background()
	testutil.Eventually(r.t, 30*time.Second, "the region to acknowledge the marker "+marker, func() (bool, string) {
		s, err := r.js.Stream(ctx, stream.Default().Name)
		if err != nil {
			return false, err.Error()
		}
		last := s.CachedInfo().State.LastSeq
		var seq uint64
		for q := last; q > 0 && q+64 > last && seq == 0; q-- {
			if m, err := s.GetMsg(ctx, q); err == nil && m.Header.Get(nats.MsgIdHdr) == marker {
				seq = q
			}
		}
		if seq == 0 {
			return false, fmt.Sprintf("not among the stream's last messages (last sequence %d)", last)
		}
		c, err := s.Consumer(ctx, stream.ConsumerName(changeRegion))
		if err != nil {
			return false, err.Error()
		}
		ci := c.CachedInfo()
		return ci.AckFloor.Stream >= seq && ci.NumAckPending == 0,
			fmt.Sprintf("marker at %d, ack floor %d, %d awaiting acknowledgement", seq, ci.AckFloor.Stream, ci.NumAckPending)
	})
}

// present reports whether memcached still holds the entry.
func present(w kmwtest.Written) (bool, error) {
	_, err := gomemcache.New(w.Server).Get(w.Key)
	if errors.Is(err, gomemcache.ErrCacheMiss) {
		return false, nil
	}
	return err == nil, err
}

func (r *changeRig) admin(ctx context.Context, method, path string, in, out any) {
	r.t.Helper()
	if err := r.ks.Admin(ctx, method, path, in, out); err != nil {
		r.t.Fatal(err)
	}
}

// project creates a project in domain ("default" when empty).
func (r *changeRig) project(ctx context.Context, domain string) string {
	if domain == "" {
		domain = "default"
	}
	var out struct{ Project struct{ ID string } }
	r.admin(ctx, http.MethodPost, "/projects", map[string]any{"project": map[string]any{
		"name": keystonetest.UniqueName("p"), "domain_id": domain, "enabled": true}}, &out)
	return out.Project.ID
}

// user creates a user in domain ("default" when empty) with a password, and
// gives it the member role on project (unless empty).
func (r *changeRig) user(ctx context.Context, domain, project string) (id, password string) {
	if domain == "" {
		domain = "default"
	}
	password = "pw-" + keystonetest.UniqueName("x")
	var out struct{ User struct{ ID string } }
	r.admin(ctx, http.MethodPost, "/users", map[string]any{"user": map[string]any{
		"name": keystonetest.UniqueName("u"), "domain_id": domain, "enabled": true, "password": password}}, &out)
	if project != "" {
		r.admin(ctx, http.MethodPut, fmt.Sprintf("/projects/%s/users/%s/roles/%s", project, out.User.ID, r.member), nil, nil)
	}
	return out.User.ID, password
}

// group creates a group with the member role on project.
func (r *changeRig) group(ctx context.Context, project string) string {
	var out struct{ Group struct{ ID string } }
	r.admin(ctx, http.MethodPost, "/groups", map[string]any{"group": map[string]any{
		"name": keystonetest.UniqueName("g"), "domain_id": "default"}}, &out)
	r.admin(ctx, http.MethodPut, fmt.Sprintf("/projects/%s/groups/%s/roles/%s", project, out.Group.ID, r.member), nil, nil)
	return out.Group.ID
}

func (r *changeRig) token(ctx context.Context, user, password, project string) string {
	r.t.Helper()
	tok, _, err := r.ks.IssueToken(ctx, user, password, project)
	if err != nil {
		r.t.Fatal(err)
	}
	return tok
}

// change is one token-affecting change: prepare makes the token whose cached
// validation it concerns and returns the change itself.
type change struct {
	name    string
	prepare func(ctx context.Context, r *changeRig) (token string, do func() error)
	// staysIn names the format in which the change revokes nothing that
	// Keystone records (the entry must stay).
	staysIn string
}

var changes = []change{
	{name: "user disabled", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		u, pw := r.user(ctx, "", p)
		return r.token(ctx, u, pw, p), func() error {
			return r.ks.Admin(ctx, http.MethodPatch, "/users/"+u, map[string]any{"user": map[string]any{"enabled": false}}, nil)
		}
	}},
	{name: "password reset by an admin", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		u, pw := r.user(ctx, "", p)
		return r.token(ctx, u, pw, p), func() error {
			return r.ks.Admin(ctx, http.MethodPatch, "/users/"+u, map[string]any{"user": map[string]any{"password": pw + "-new"}}, nil)
		}
	}},
	{name: "password changed by the user", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		u, pw := r.user(ctx, "", p)
		tok := r.token(ctx, u, pw, p)
		return tok, func() error {
			_, err := r.ks.Request(ctx, http.MethodPost, "/users/"+u+"/password", tok, nil,
				map[string]any{"user": map[string]any{"password": pw + "-new", "original_password": pw}}, nil)
			return err
		}
	}},
	{name: "user deleted", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		u, pw := r.user(ctx, "", p)
		return r.token(ctx, u, pw, p), func() error { return r.ks.Admin(ctx, http.MethodDelete, "/users/"+u, nil, nil) }
	}},
	{name: "role removed from a user", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		u, pw := r.user(ctx, "", p)
		return r.token(ctx, u, pw, p), func() error {
			return r.ks.Admin(ctx, http.MethodDelete, fmt.Sprintf("/projects/%s/users/%s/roles/%s", p, u, r.member), nil, nil)
		}
	}},
	{name: "role removed from a group", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		g := r.group(ctx, p)
		u, pw := r.user(ctx, "", "")
		r.admin(ctx, http.MethodPut, fmt.Sprintf("/groups/%s/users/%s", g, u), nil, nil)
		return r.token(ctx, u, pw, p), func() error {
			return r.ks.Admin(ctx, http.MethodDelete, fmt.Sprintf("/projects/%s/groups/%s/roles/%s", p, g, r.member), nil, nil)
		}
	}},
	{name: "user removed from a group", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		g := r.group(ctx, p)
		u, pw := r.user(ctx, "", "")
		r.admin(ctx, http.MethodPut, fmt.Sprintf("/groups/%s/users/%s", g, u), nil, nil)
		return r.token(ctx, u, pw, p), func() error {
			return r.ks.Admin(ctx, http.MethodDelete, fmt.Sprintf("/groups/%s/users/%s", g, u), nil, nil)
		}
	}},
	// In the basic format the notification names the user, whose entries go
	// (a cached validation lists the roles of when it was cached); in CADF it
	// does not, and Keystone records no revocation event for an addition.
	{name: "user added to a group", staysIn: "cadf", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		g := r.group(ctx, r.project(ctx, ""))
		u, pw := r.user(ctx, "", p)
		return r.token(ctx, u, pw, p), func() error {
			return r.ks.Admin(ctx, http.MethodPut, fmt.Sprintf("/groups/%s/users/%s", g, u), nil, nil)
		}
	}},
	{name: "project disabled", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		u, pw := r.user(ctx, "", p)
		return r.token(ctx, u, pw, p), func() error {
			return r.ks.Admin(ctx, http.MethodPatch, "/projects/"+p, map[string]any{"project": map[string]any{"enabled": false}}, nil)
		}
	}},
	{name: "project deleted", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		u, pw := r.user(ctx, "", p)
		return r.token(ctx, u, pw, p), func() error { return r.ks.Admin(ctx, http.MethodDelete, "/projects/"+p, nil, nil) }
	}},
	{name: "domain disabled", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		var out struct{ Domain struct{ ID string } }
		r.admin(ctx, http.MethodPost, "/domains", map[string]any{"domain": map[string]any{
			"name": keystonetest.UniqueName("d"), "enabled": true}}, &out)
		d := out.Domain.ID
		p := r.project(ctx, d)
		u, pw := r.user(ctx, d, p)
		return r.token(ctx, u, pw, p), func() error {
			return r.ks.Admin(ctx, http.MethodPatch, "/domains/"+d, map[string]any{"domain": map[string]any{"enabled": false}}, nil)
		}
	}},
	{name: "trust deleted", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		trustor, trustorPW := r.user(ctx, "", p)
		trustee, trusteePW := r.user(ctx, "", "")
		trustorTok := r.token(ctx, trustor, trustorPW, p)
		var out struct{ Trust struct{ ID string } }
		if _, err := r.ks.Request(ctx, http.MethodPost, "/OS-TRUST/trusts", trustorTok, nil, map[string]any{"trust": map[string]any{
			"trustor_user_id": trustor, "trustee_user_id": trustee, "project_id": p, "impersonation": false,
			"roles": []map[string]string{{"id": r.member}}}}, &out); err != nil {
			r.t.Fatal(err)
		}
		tok, _, err := r.ks.Authenticate(ctx, map[string]any{
			"identity": map[string]any{"methods": []string{"password"},
				"password": map[string]any{"user": map[string]any{"id": trustee, "password": trusteePW}}},
			"scope": map[string]any{"OS-TRUST:trust": map[string]any{"id": out.Trust.ID}},
		})
		if err != nil {
			r.t.Fatal(err)
		}
		return tok, func() error {
			_, err := r.ks.Request(ctx, http.MethodDelete, "/OS-TRUST/trusts/"+out.Trust.ID, trustorTok, nil, nil, nil)
			return err
		}
	}},
	{name: "application credential deleted", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		u, pw := r.user(ctx, "", p)
		id, secret, err := r.ks.CreateApplicationCredential(ctx, u, r.token(ctx, u, pw, p), keystonetest.UniqueName("ac"))
		if err != nil {
			r.t.Fatal(err)
		}
		tok, _, err := r.ks.Authenticate(ctx, map[string]any{"identity": map[string]any{
			"methods": []string{"application_credential"}, "application_credential": map[string]any{"id": id, "secret": secret}}})
		if err != nil {
			r.t.Fatal(err)
		}
		return tok, func() error {
			return r.ks.Admin(ctx, http.MethodDelete, "/users/"+u+"/application_credentials/"+id, nil, nil)
		}
	}},
	{name: "token revoked", prepare: func(ctx context.Context, r *changeRig) (string, func() error) {
		p := r.project(ctx, "")
		u, pw := r.user(ctx, "", p)
		tok := r.token(ctx, u, pw, p)
		return tok, func() error { return r.ks.RevokeToken(ctx, tok) }
	}},
}

func testChanges(t *testing.T, format string) {
	ctx := context.Background()
	s := testutil.NameSuffix()
	exchange, topic, queue := "app-ch-x-"+s, "app-ch-n-"+s, "app-ch-q-"+s
	t.Cleanup(func() {
		conn, err := amqp.Dial(testutil.AMQPURL())
		if err != nil {
			return
		}
		defer conn.Close()
		if ch, err := conn.Channel(); err == nil {
			_, _ = ch.QueueDelete(topic+".info", false, false, false) // oslo.messaging's own
			_, _ = ch.QueueDelete(queue, false, false, false)
			_ = ch.ExchangeDelete(exchange, false, false)
		}
	})
	ks := keystonetest.StartTest(t, keystonetest.Options{Notifications: &keystonetest.Notifications{
		TransportURL: "rabbit://" + strings.TrimPrefix(testutil.AMQPURL(), "amqp://"), ControlExchange: exchange,
		Format: format, Topics: topic,
	}})
	member, err := ks.EnsureRole(ctx, "member")
	if err != nil {
		t.Fatal(err)
	}
	servers := memcachetest.Start(t, 2)
	r := &changeRig{t: t, ks: ks, cache: kmwtest.Start(t, memcachetest.Addrs(servers), kmwtest.MAC, "region-secret", 0),
		reg: prometheus.NewRegistry(), member: member, exchange: exchange, routingKey: topic + ".info"}

	removals := make(chan tokencache.Removal, 1024)
	// whyRemoved says which event removed the entry under key, if one did.
	seen := map[string]tokencache.Removal{}
	whyRemoved := func(key string) string {
		for {
			select {
			case rm := <-removals:
				seen[rm.Key] = rm
				continue
			default:
			}
			break
		}
		rm, ok := seen[key]
		if !ok {
			return "no removal reported"
		}
		return fmt.Sprintf("removed for %s (event %s)", rm.Reason, rm.EventID)
	}
	natsURL := make(chan string, 1)
	pw := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pw, []byte(ks.AdminPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	o := AllInOneOptions{
		Bridge: BridgeOptions{
			Bridge: bridge.Options{AMQPURLs: []string{testutil.AMQPURL()}, Exchange: exchange, Queue: queue,
				QueueType: bridge.QueueClassic, RoutingKeys: []string{topic + ".info"}},
			Embedded: natsserver.Options{Listen: "127.0.0.1:-1", DataDir: t.TempDir()},
			Revoke: &revoke.Options{URL: ks.URL, Username: ks.AdminUser, PasswordFile: pw, Project: ks.AdminProject,
				MaxBackoff: time.Second, LeaseTTL: changeLeaseTTL},
			Registry: r.reg, ShutdownTimeout: 20 * time.Second,
			OnNATS: func(u string) { natsURL <- u },
		},
		Agent: AgentOptions{
			// A short second pass, so that settled() is quick; the first
			// pass, which the times below measure, does not depend on it.
			Agent: regionagent.Options{Region: changeRegion, SecondPassDelay: 300 * time.Millisecond,
				ResolveWait: changeResolveWait},
			Memcache: memcache.Options{Servers: memcachetest.List(servers)},
			// A short late write-back window: the rig caches the tokens it
			// sets up right after the role assignments that make them
			// usable, and within the default window the token cache would
			// remove those validations as late write-backs of the
			// assignments (tokens issued in the same second as a change
			// count as issued before it). settled() outlasts this window.
			Invalidation: tokencache.Options{Strategy: tokencache.Targeted, LateWriteBackWindow: 100 * time.Millisecond,
				OnRemove: func(rm tokencache.Removal) { removals <- rm }},
		},
	}
	runAllInOne(t, o)
	nc, err := nats.Connect(<-natsURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	if r.js, err = jetstream.New(nc); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 60*time.Second, "the poller holding its lease, the agent consuming and seeing the poller", func() (bool, string) {
		held := testutil.Metric(r.reg, "keystone_fanout_revoke_lease_held")
		bound := testutil.Metric(r.reg, "keystone_fanout_agent_consumer_bound")
		live := testutil.Metric(r.reg, "keystone_fanout_agent_revocation_poller_live")
		return held == 1 && bound == 1 && live == 1, fmt.Sprintf("lease held %v, consumer bound %v, poller live %v", held, bound, live)
	})

	// A bystander: another user on another project, whose entry must stay.
	bp := r.project(ctx, "")
	bu, bpw := r.user(ctx, "", bp)
	bystanderToken := r.token(ctx, bu, bpw, bp)
	r.settled()
	bystander := r.cached(ctx, bystanderToken)[0]

	var report []string
	for _, c := range changes {
		t.Run(c.name, func(t *testing.T) {
			r.t = t
			tok, do := c.prepare(ctx, r)
			r.settled() // the setup's own notifications (role assignments) are done
			entry := r.cached(ctx, tok)[0]
			if err := do(); err != nil {
				t.Fatalf("making the change: %v", err)
			}
			answered := time.Now()
			if c.staysIn == format {
				// Nothing to revoke: the poller's proof lets the notification go
				// without a sweep. Wait longer than --resolve-wait.
				time.Sleep(changeResolveWait + 500*time.Millisecond)
				if ok, err := present(entry); !ok {
					t.Fatalf("the entry of a change that revokes nothing was removed (%v, %s)", err, whyRemoved(entry.Key))
				}
				report = append(report, fmt.Sprintf("%s: entry kept", c.name))
			} else {
				var took time.Duration
				testutil.EventuallyEvery(t, time.Millisecond, 30*time.Second, "the entry gone from the region", func() (bool, string) {
					ok, err := present(entry)
					if !ok && err == nil {
						took = time.Since(answered)
						return true, ""
					}
					return false, fmt.Sprintf("present %v, err %v", ok, err)
				})
				report = append(report, fmt.Sprintf("%s: %s", c.name, took.Round(100*time.Microsecond)))
			}
			if ok, err := present(bystander); !ok {
				t.Errorf("the bystander's entry was removed (%v, %s): the change was not precise", err, whyRemoved(bystander.Key))
				r.settled()
				bystander = r.cached(ctx, bystanderToken)[0]
			}
		})
	}
	r.t = t
	// A sweep for a change waiting on the poller would come after --resolve-wait.
	time.Sleep(changeResolveWait + 500*time.Millisecond)
	if ok, err := present(bystander); !ok {
		t.Errorf("the bystander's entry was removed at the end (%v)", err)
	}
	for _, res := range []string{"source_off", "timeout"} {
		if n := testutil.Metric(r.reg, "keystone_fanout_agent_resolutions_total", "result", res); n != 0 {
			t.Errorf("resolutions_total{result=%q} = %v, want 0", res, n)
		}
	}
	if n := testutil.Metric(r.reg, "keystone_fanout_agent_sweeps_total"); n != 0 {
		t.Errorf("sweeps_total = %v, want 0", n)
	}
	t.Logf("%s format, Keystone's answer to the entry gone in the region:\n  %s", format, strings.Join(report, "\n  "))
	if format == "cadf" {
		if n := testutil.Metric(r.reg, "keystone_fanout_agent_resolutions_total", "result", "resolved"); n < 2 {
			t.Errorf("resolutions_total{result=resolved} = %v, want at least 2 (a removal from and an addition to a group)", n)
		}
	}
}
