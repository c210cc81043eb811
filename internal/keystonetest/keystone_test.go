package keystonetest

import (
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestHarness starts a real Keystone over TLS and drives every helper against
// it: the revocation events they are documented to cause must be listed.
func TestHarness(t *testing.T) {
	ctx := t.Context()
	k := StartTest(t, Options{TLS: true})
	// A fresh machine has no /etc/keystone/fernet-keys (nor anything else a
	// packaged Keystone sets up there): the harness must not depend on it.
	if !k.Isolated {
		t.Fatalf("Keystone ran with %s visible: run the tests as root with unshare(1) (util-linux) so that they prove it needs nothing from there", EtcKeystone)
	}
	if !strings.HasPrefix(k.URL, "https://127.0.0.1:") || k.CAFile == "" {
		t.Fatalf("URL %q, CAFile %q: want https on 127.0.0.1 and a CA file", k.URL, k.CAFile)
	}

	project, err := k.CreateProject(ctx, UniqueName("p"))
	if err != nil {
		t.Fatal(err)
	}
	member, err := k.RoleID(ctx, "member")
	if err != nil {
		t.Fatal(err)
	}
	user, err := k.CreateUser(ctx, UniqueName("u"), "pw-1", project)
	if err != nil {
		t.Fatal(err)
	}
	if err := k.AssignProjectRole(ctx, user, project, member); err != nil {
		t.Fatal(err)
	}
	tok, body, err := k.IssueToken(ctx, user, "pw-1", project)
	if err != nil {
		t.Fatal(err)
	}
	var issued struct {
		Token struct {
			AuditIDs []string `json:"audit_ids"`
			User     struct{ ID string }
			Project  struct{ ID string }
		}
	}
	if err := json.Unmarshal(body, &issued); err != nil {
		t.Fatal(err)
	}
	if issued.Token.User.ID != user || issued.Token.Project.ID != project || len(issued.Token.AuditIDs) != 1 {
		t.Fatalf("issued token body %s: want user %s, project %s and one audit id", body, user, project)
	}
	got, err := k.TokenBody(ctx, tok)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(got), issued.Token.AuditIDs[0]) {
		t.Fatalf("GET /auth/tokens body %s: want audit id %s", got, issued.Token.AuditIDs[0])
	}

	if err := k.RevokeToken(ctx, tok); err != nil {
		t.Fatal(err)
	}
	var se *StatusError
	if _, err := k.TokenBody(ctx, tok); !errors.As(err, &se) || se.Status != http.StatusNotFound {
		t.Fatalf("validating a revoked token: got %v, want HTTP 404", err)
	}

	group, err := k.CreateGroup(ctx, UniqueName("g"))
	if err != nil {
		t.Fatal(err)
	}
	if err := k.AddUserToGroup(ctx, group, user); err != nil {
		t.Fatal(err)
	}
	if err := k.RemoveUserFromGroup(ctx, group, user); err != nil {
		t.Fatal(err)
	}
	user2, err := k.CreateUser(ctx, UniqueName("u"), "pw-2", "")
	if err != nil {
		t.Fatal(err)
	}
	if err := k.DisableUser(ctx, user2); err != nil {
		t.Fatal(err)
	}

	events, err := k.RevocationEvents(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var audit, userEvents, user2Events int
	for _, e := range events {
		switch {
		case e["audit_id"] == issued.Token.AuditIDs[0]:
			audit++
		case e["user_id"] == user:
			userEvents++
		case e["user_id"] == user2:
			user2Events++
		}
	}
	if audit != 1 || userEvents != 1 || user2Events != 1 {
		t.Fatalf("revocation events %v: want one for audit id %s, one for user %s (group removal), one for user %s (disabled); got %d, %d, %d",
			events, issued.Token.AuditIDs[0], user, user2, audit, userEvents, user2Events)
	}

	if n, err := k.CountRequests("DELETE", "/v3/auth/tokens"); err != nil || n != 1 {
		t.Errorf("CountRequests(DELETE /v3/auth/tokens) = %d, %v; want 1", n, err)
	}
	if cpu, err := k.CPUTime(); err != nil || cpu <= 0 {
		t.Errorf("CPUTime() = %v, %v; want the CPU time Keystone used so far", cpu, err)
	}

	// Stopping and starting the server keeps the data.
	if err := k.StopServer(); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Request(ctx, http.MethodGet, "", "", nil, nil, nil); err == nil {
		t.Fatal("GET /v3 answered after StopServer")
	}
	if err := k.StartServer(ctx); err != nil {
		t.Fatal(err)
	}
	if _, _, err := k.IssueToken(ctx, user, "pw-1", project); err != nil {
		t.Fatalf("issuing a token after a restart: %v", err)
	}
}

// TestIsolationHidesEtcKeystone checks the mechanism behind Keystone.Isolated:
// a program run the way the harness runs keystone-manage and uwsgi sees an
// empty /etc/keystone.
func TestIsolationHidesEtcKeystone(t *testing.T) {
	isolated, hide := isolation()
	if !isolated {
		t.Fatalf("cannot hide %s: run the tests as root with unshare(1) (util-linux)", EtcKeystone)
	}
	if !hide {
		return // no /etc/keystone on this machine: nothing to hide
	}
	k := &Keystone{hideEtc: true}
	argv := k.argv("/bin/ls", "-A", EtcKeystone)
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", argv, err, out)
	}
	if len(out) != 0 {
		t.Fatalf("%s seen by Keystone's programs holds %q: want it empty", EtcKeystone, out)
	}
	if entries, _ := os.ReadDir(EtcKeystone); len(entries) == 0 {
		t.Logf("%s is empty outside the namespace too", EtcKeystone)
	}
}
