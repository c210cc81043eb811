package event

import (
	"testing"

	"github.com/keystone-fanout/keystone-fanout/internal/fixtures"
)

// TestResolvedByRevocations checks which captured Keystone 22 notifications an
// agent may resolve through the revocation poller: the group membership
// changes that do not name the user, and nothing else.
func TestResolvedByRevocations(t *testing.T) {
	all, err := fixtures.All()
	if err != nil {
		t.Fatal(err)
	}
	resolvable := map[string]int{}
	for _, f := range all {
		e, err := Decode(f.Body)
		if err != nil {
			t.Fatalf("%s: %v", f.Name, err)
		}
		want := f.Format == "cadf" && e.Type == "identity.group.updated"
		if got := e.ResolvedByRevocations(); got != want {
			t.Errorf("%s/%s (%s): ResolvedByRevocations = %v, want %v", f.Format, f.Name, e.Type, got, want)
		}
		if e.ResolvedByRevocations() {
			resolvable[f.Format]++
		}
	}
	if resolvable["cadf"] == 0 {
		t.Fatal("no CADF group membership fixture was resolvable")
	}
	for _, tt := range []struct {
		name string
		e    Event
		want bool
	}{
		{"widened", Event{Version: 1, Kind: KindNotification, Type: "identity.group.updated", Widen: "x"}, false},
		{"newer schema", Event{Version: SchemaVersion + 1, Kind: KindNotification, Type: "identity.group.updated"}, false},
		{"user named", Event{Version: 1, Kind: KindNotification, Type: "identity.group.updated", Actor: &Actor{ID: "u", Type: "user"}}, false},
		{"group deleted", Event{Version: 1, Kind: KindNotification, Type: "identity.group.deleted", GroupID: "g"}, false},
		{"revocation", Event{Version: 1, Kind: KindRevocation, Type: "identity.group.updated"}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.e.ResolvedByRevocations(); got != tt.want {
				t.Fatalf("ResolvedByRevocations = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestPolledIsBounded: a poller's proof of progress changes no cache entry,
// unless it lacks its content.
func TestPolledIsBounded(t *testing.T) {
	e := Event{Version: SchemaVersion, Kind: KindPolled, Type: PolledType, Polled: &Polled{Through: 7}}
	if e.Unbounded() {
		t.Fatal("a polled event is unbounded")
	}
	e.Polled = nil
	if !e.Unbounded() {
		t.Fatal("a polled event without its sequence is bounded")
	}
}
