package doctor

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/bridge"
	"github.com/keystone-fanout/keystone-fanout/internal/keystonetest"
	"github.com/keystone-fanout/keystone-fanout/internal/osloconfig"
	"github.com/keystone-fanout/keystone-fanout/internal/revoke"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// TestKeystone runs a real Keystone (over TLS, publishing its notifications
// to the test RabbitMQ). It checks the poller's access with the admin, with a
// wrong password, and with a user whose role the policy does not allow to
// list revocation events; and the bridge's RabbitMQ checks with the options
// --oslo-config takes from that Keystone's own keystone.conf, after a change
// in Keystone.
func TestKeystone(t *testing.T) {
	ctx := context.Background()
	r := newRabbit(t)
	ks := keystonetest.StartTest(t, keystonetest.Options{TLS: true, Notifications: &keystonetest.Notifications{
		TransportURL:    "rabbit://" + strings.TrimPrefix(testutil.AMQPURL(), "amqp://"),
		ControlExchange: r.exchange,
		Topics:          r.topic,
	}})
	t.Run("its own keystone.conf: notifications arrive", func(t *testing.T) {
		st, err := osloconfig.Load([]string{filepath.Join(ks.Dir, "keystone.conf")})
		if err != nil {
			t.Fatal(err)
		}
		set := osloconfig.Bridge(st)
		if len(set.Errs) > 0 {
			t.Fatal(set.Errs)
		}
		urls, err := bridge.ParseAMQPURLs(set.Flags["amqp-url"].Values)
		if err != nil {
			t.Fatal(err)
		}
		o := r.options("", "", "")
		o.AMQPURLs, o.Exchange, o.RoutingKeys = urls, set.Flags["exchange"].Values[0], set.Flags["routing-key"].Values
		o.DataDir = t.TempDir()
		r.bridgeQueue(t) // as the bridge would at its first start
		if _, err := ks.CreateProject(ctx, keystonetest.UniqueName("doctor")); err != nil {
			t.Fatal(err)
		}
		var rep *Report
		testutil.Eventually(t, 30*time.Second, "Keystone's notification in the bridge's queue", func() (bool, string) {
			rep = Bridge(ctx, o)
			q := find(rep, "rabbitmq.queue", "")
			return len(q) == 1 && q[0].Level == LevelOK, fmt.Sprint(q)
		})
		var text strings.Builder
		_ = rep.WriteText(&text)
		t.Log("\n" + text.String())
		for _, w := range []want{
			{"rabbitmq.exchange", LevelOK, "exists"},
			{"rabbitmq.queue", LevelOK, "notification(s) waiting, none consumed"},
			{"rabbitmq.notifier-queue", LevelWarn, "and no consumer"},
		} {
			w.in(t, rep)
		}
	})
	projectName := keystonetest.UniqueName("doctor")
	project, err := ks.CreateProject(ctx, projectName)
	if err != nil {
		t.Fatal(err)
	}
	member, err := ks.EnsureRole(ctx, "member")
	if err != nil {
		t.Fatal(err)
	}
	memberName := keystonetest.UniqueName("member")
	memberID, err := ks.CreateUser(ctx, memberName, "member-pw", project)
	if err != nil {
		t.Fatal(err)
	}
	if err := ks.AssignProjectRole(ctx, memberID, project, member); err != nil {
		t.Fatal(err)
	}
	password := func(pw string) string {
		f := filepath.Join(t.TempDir(), "password")
		if err := os.WriteFile(f, []byte(pw+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		return f
	}
	for _, tc := range []struct {
		name     string
		o        revoke.Options
		blocking bool
		want     []want
	}{
		{"the admin: allowed",
			revoke.Options{Username: ks.AdminUser, PasswordFile: password(ks.AdminPassword), Project: ks.AdminProject},
			false, []want{
				{"keystone.connect", LevelOK, "answers 200 OK"},
				{"keystone.access", LevelOK, "authenticated, and listed"},
				{"clock", LevelOK, "Keystone's clock (its token's issued_at) and this host's agree"},
			}},
		{"a wrong password",
			revoke.Options{Username: ks.AdminUser, PasswordFile: password("wrong"), Project: ks.AdminProject},
			true, []want{{"keystone.access", LevelFail, "Keystone refused the poller's credentials (HTTP 401)"}}},
		{"a member: the policy forbids listing",
			revoke.Options{Username: memberName, PasswordFile: password("member-pw"), Project: projectName},
			true, []want{
				{"keystone.access", LevelFail, "Keystone's policy forbids this user to list revocation events (HTTP 403)"},
				{"keystone.access", LevelFail, "service role"},
			}},
		{"no CA for Keystone's certificate",
			revoke.Options{Username: ks.AdminUser, PasswordFile: password(ks.AdminPassword), Project: ks.AdminProject},
			true, []want{{"keystone.connect", LevelFail, "--keystone-ca-file"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.o
			o.URL = ks.URL
			if !strings.Contains(tc.name, "no CA") {
				o.CAFile = ks.CAFile
			}
			r := &Report{Component: "bridge"}
			keystone(ctx, &o, 10*time.Second, r)
			var text strings.Builder
			_ = r.WriteText(&text)
			t.Log("\n" + text.String())
			for _, w := range tc.want {
				w.in(t, r)
			}
			if (r.Blocking > 0) != tc.blocking {
				t.Errorf("blocking %d, want blocking %v", r.Blocking, tc.blocking)
			}
		})
	}
}

// TestClockSkew: Keystone's Date header against this host's clock.
func TestClockSkew(t *testing.T) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name  string
		date  time.Time
		level Level
		text  string
	}{
		{"same second", now, LevelOK, "agree within"},
		{"five seconds ahead", now.Add(5 * time.Second), LevelWarn, "about 5s ahead of this host's"},
		{"a minute behind", now.Add(-time.Minute), LevelWarn, "about 1m0s behind this host's"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &Report{}
			clockKeystone("its HTTP Date", tc.date, now.Add(400*time.Millisecond), now.Add(600*time.Millisecond), r)
			want{"clock", tc.level, tc.text}.in(t, r)
		})
	}
}
