package revoke

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/keystonetest"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
)

// TestKeystoneEventsMatchCachedTokens: the token bodies Keystone returns for
// GET /v3/auth/tokens (what keystonemiddleware caches) are matched by
// tokencache.Affects with the revocation events the poller published exactly
// when Keystone itself rejects the token afterwards: a revoked token by the
// event of its own revocation and by no other, a user's tokens by the event of
// the user's group removal, and a token issued after that event by nothing.
func TestKeystoneEventsMatchCachedTokens(t *testing.T) {
	ctx := context.Background()
	js := startJetStream(t, 2*time.Minute)
	p, _ := newKeystonePoller(t, keystoneOptions(t), js)
	runPoller(t, p)

	project, err := ks.CreateProject(ctx, keystonetest.UniqueName("p"))
	if err != nil {
		t.Fatal(err)
	}
	member, err := ks.RoleID(ctx, "member")
	if err != nil {
		t.Fatal(err)
	}
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
	type cached struct {
		name  string
		token string
		body  tokencache.Token
	}
	issue := func(name, user string) cached {
		tok, _, err := ks.IssueToken(ctx, user, "pw", project)
		if err != nil {
			t.Fatal(err)
		}
		body, err := ks.TokenBody(ctx, tok)
		if err != nil {
			t.Fatal(err)
		}
		parsed, err := tokencache.ParseValue(tokencache.KeyNone, 0, body)
		if err != nil {
			t.Fatalf("tokencache.ParseValue(%s): %v", body, err)
		}
		return cached{name, tok, parsed}
	}

	alice, bob := newUser(), newUser()
	group, err := ks.CreateGroup(ctx, keystonetest.UniqueName("g"))
	if err != nil {
		t.Fatal(err)
	}
	if err := ks.AddUserToGroup(ctx, group, bob); err != nil {
		t.Fatal(err)
	}
	revoked := issue("alice's revoked token", alice)
	other := issue("alice's other token", alice)
	bobs := issue("bob's token", bob)

	if err := ks.RevokeToken(ctx, revoked.token); err != nil {
		t.Fatal(err)
	}
	if err := ks.RemoveUserFromGroup(ctx, group, bob); err != nil {
		t.Fatal(err)
	}

	var tokenEvent, groupEvent event.Event
	testutil.Eventually(t, 20*time.Second, "the two revocation events", func() (bool, string) {
		var nt, ng int
		for _, m := range streamMessages(t, js) {
			switch r := m.Event.Revocation; {
			case r == nil:
			case r.AuditID == revoked.body.AuditID():
				tokenEvent, nt = m.Event, nt+1
			case r.UserID == bob:
				groupEvent, ng = m.Event, ng+1
			}
		}
		return nt == 1 && ng == 1, fmt.Sprintf("%d for audit id %s, %d for user %s", nt, revoked.body.AuditID(), ng, bob)
	})

	// A token bob gets once the second of the group removal has passed
	// (Keystone compares issued_at and issued_before to the second).
	testutil.Eventually(t, 5*time.Second, "the clock past the group removal's second", func() (bool, string) {
		now := time.Now().UTC().Truncate(time.Second)
		return now.After(groupEvent.Revocation.IssuedBefore), now.String()
	})
	bobsNew := issue("bob's token issued after the removal", bob)

	cases := []struct {
		token cached
		e     event.Event
		want  bool
	}{
		{revoked, tokenEvent, true},
		{other, tokenEvent, false},
		{bobs, tokenEvent, false},
		{bobsNew, tokenEvent, false},
		{bobs, groupEvent, true},
		{bobsNew, groupEvent, false},
		{revoked, groupEvent, false},
		{other, groupEvent, false},
	}
	for _, c := range cases {
		if got := tokencache.Affects(&c.e, &c.token.body); got != c.want {
			t.Errorf("Affects(event %+v, %s) = %v, want %v", *c.e.Revocation, c.token.name, got, c.want)
		}
	}

	// Keystone's own verdict: whatever it rejects now, an event matches.
	for _, c := range []cached{revoked, other, bobs, bobsNew} {
		_, err := ks.TokenBody(ctx, c.token)
		var se *keystonetest.StatusError
		rejected := errors.As(err, &se) && se.Status == http.StatusNotFound
		if err != nil && !rejected {
			t.Fatal(err)
		}
		matched := tokencache.Affects(&tokenEvent, &c.body) || tokencache.Affects(&groupEvent, &c.body)
		if rejected != matched {
			t.Errorf("%s: Keystone rejects it: %v; matched by the published events: %v", c.name, rejected, matched)
		}
	}
}
