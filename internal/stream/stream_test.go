package stream

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

func TestValidate(t *testing.T) {
	tests := []struct {
		name   string
		config Config
		want   []string // in the error; none: valid
	}{
		{"defaults", Config{}, nil},
		{"name with a dot", Config{Name: "a.b"}, []string{"--stream"}},
		{"prefix with a wildcard", Config{SubjectPrefix: "keystone.*"}, []string{"--subject-prefix"}},
		{"prefix with an empty token", Config{SubjectPrefix: "a..b"}, []string{"--subject-prefix"}},
		{"max age", Config{MaxAge: time.Second}, []string{"--stream-max-age"}},
		{"replicas", Config{Replicas: 7}, []string{"--stream-replicas"}},
		{"duplicate window above max age", Config{MaxAge: time.Minute, DuplicateWindow: time.Hour}, []string{"--stream-duplicate-window"}},
		{"every error at once", Config{Name: "a b", SubjectPrefix: "x.>", Replicas: 9},
			[]string{"--stream ", "--subject-prefix", "--stream-replicas"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := tt.config
			err := c.Validate()
			if len(tt.want) == 0 {
				if err != nil || c != Default() {
					t.Fatalf("Validate = %v, config %+v; want nil and the defaults", err, c)
				}
				return
			}
			for _, w := range tt.want {
				if err == nil || !strings.Contains(err.Error(), w) {
					t.Errorf("Validate = %v, want an error naming %s", err, w)
				}
			}
		})
	}
}

func TestSubject(t *testing.T) {
	tests := []struct {
		name string
		e    event.Event
		want string
	}{
		{"notification", event.Event{Kind: event.KindNotification, Type: "identity.OS-TRUST:trust.deleted"},
			"keystone.notification.identity.OS-TRUST:trust.deleted"},
		{"revocation", event.Event{Kind: event.KindRevocation, Revocation: &event.Revocation{AuditID: "a"}}, "keystone.revocation"},
		{"white space and wildcards", event.Event{Kind: event.KindNotification, Type: "a b.*.>"}, "keystone.notification.a_b._._"},
		{"empty type", event.Event{Kind: event.KindNotification}, "keystone.notification.unknown"},
		{"leading dot", event.Event{Kind: event.KindNotification, Type: ".lead"}, "keystone.notification.unknown"},
		{"trailing dot", event.Event{Kind: event.KindNotification, Type: "trail."}, "keystone.notification.unknown"},
		{"two dots", event.Event{Kind: event.KindNotification, Type: "two..dots"}, "keystone.notification.unknown"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Subject("keystone", &tt.e); got != tt.want {
				t.Fatalf("Subject = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestEnsure(t *testing.T) {
	srv := testutil.StartNATS(t)
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	c := Config{Name: "ENSURE_" + testutil.NameSuffix(), SubjectPrefix: "ensure"}
	if err := Ensure(ctx, js, c); err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(ctx, c.Name)
	if err != nil {
		t.Fatal(err)
	}
	cfg := s.CachedInfo().Config
	if cfg.Storage != jetstream.FileStorage || cfg.MaxAge != DefaultMaxAge || cfg.Replicas != 1 ||
		cfg.Duplicates != DefaultDuplicateWindow || cfg.Discard != jetstream.DiscardOld || !slices.Equal(cfg.Subjects, []string{"ensure.>"}) {
		t.Fatalf("created stream config %+v, want file storage, 24h, 1 replica, 2m, discard old, ensure.>", cfg)
	}
	// An operator's own setting survives; ours are updated.
	cfg.MaxMsgs = 12345
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	c.MaxAge = 48 * time.Hour
	if err := Ensure(ctx, js, c); err != nil {
		t.Fatal(err)
	}
	s, _ = js.Stream(ctx, c.Name)
	if got := s.CachedInfo().Config; got.MaxAge != 48*time.Hour || got.MaxMsgs != 12345 {
		t.Fatalf("after update: max age %s, max msgs %d; want 48h and 12345", got.MaxAge, got.MaxMsgs)
	}
	// Idempotent, and never lowers: a bridge with a shorter max age leaves
	// the longer one.
	c.MaxAge = time.Hour
	if err := Ensure(ctx, js, c); err != nil {
		t.Fatal(err)
	}
	s, _ = js.Stream(ctx, c.Name)
	if got := s.CachedInfo().Config; got.MaxAge != 48*time.Hour {
		t.Fatalf("after Ensure with a shorter max age: %s, want 48h kept", got.MaxAge)
	}
	// Another prefix is added to the subjects.
	c.SubjectPrefix = "ensure2"
	if err := Ensure(ctx, js, c); err != nil {
		t.Fatal(err)
	}
	s, _ = js.Stream(ctx, c.Name)
	if got := s.CachedInfo().Config.Subjects; !slices.Equal(got, []string{"ensure.>", "ensure2.>"}) {
		t.Fatalf("subjects %q, want both prefixes", got)
	}
	// A memory stream cannot carry events across restarts.
	mem := Config{Name: "MEM_" + testutil.NameSuffix(), SubjectPrefix: "mem"}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: mem.Name, Subjects: []string{"mem.>"}, Storage: jetstream.MemoryStorage}); err != nil {
		t.Fatal(err)
	}
	if err := Ensure(ctx, js, mem); err == nil || !strings.Contains(strings.ToLower(err.Error()), "memory") {
		t.Fatalf("Ensure on a memory stream = %v, want an error naming the storage", err)
	}
	// Replicas 3 on a single server fails with the server's reason.
	r3 := Config{Name: "R3_" + testutil.NameSuffix(), SubjectPrefix: "r3", Replicas: 3}
	if err := Ensure(ctx, js, r3); err == nil {
		t.Fatal("Ensure with 3 replicas on one server = nil, want an error")
	}
}
