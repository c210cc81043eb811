package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keystone-fanout/keystone-fanout/internal/config"
)

// writeNATSContext writes a nats CLI context under home and selects it.
func writeNATSContext(t *testing.T, home, name, body string) {
	t.Helper()
	dir := filepath.Join(home, ".config", "nats")
	if err := os.MkdirAll(filepath.Join(dir, "context"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "context", name+".json"), []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "context.txt"), []byte(name), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestNATSConnectionPrecedence: status (and sweep, which uses the same
// helper) take each NATS setting from the flag, else its KEYSTONE_FANOUT_*
// variable, else NATS_URL and the nats CLI's selected context, else the
// default.
func TestNATSConnectionPrecedence(t *testing.T) {
	withCtx := t.TempDir()
	writeNATSContext(t, withCtx, "central", `{"url": "nats://ctx:4222", "user": "operator", "password": "ctx-pw",
		"ca": "/ctx/ca.pem", "inbox_prefix": "_INBOX_operator", "jetstream_domain": "central"}`)
	empty := t.TempDir()
	tests := []struct {
		name       string
		home       string
		args       []string
		env        map[string]string
		wantURL    string
		wantDomain string
		wantUser   string
		wantCA     string
		wantInbox  string
	}{
		{name: "defaults", home: empty, wantURL: "nats://127.0.0.1:4222"},
		{name: "NATS_URL over the default", home: empty, env: map[string]string{"NATS_URL": "nats://env:4222"}, wantURL: "nats://env:4222"},
		{name: "the context over the default", home: withCtx, wantURL: "nats://ctx:4222", wantDomain: "central", wantUser: "operator",
			wantCA: "/ctx/ca.pem", wantInbox: "_INBOX_operator"},
		{name: "NATS_URL over the context's URL, the rest from the context", home: withCtx, env: map[string]string{"NATS_URL": "nats://env:4222"},
			wantURL: "nats://env:4222", wantDomain: "central", wantUser: "operator", wantCA: "/ctx/ca.pem", wantInbox: "_INBOX_operator"},
		{name: "KEYSTONE_FANOUT_NATS_URL over NATS_URL", home: withCtx,
			env:     map[string]string{"NATS_URL": "nats://env:4222", "KEYSTONE_FANOUT_NATS_URL": "nats://ksf:4222"},
			wantURL: "nats://ksf:4222", wantDomain: "central", wantUser: "operator", wantCA: "/ctx/ca.pem", wantInbox: "_INBOX_operator"},
		{name: "the flag over everything", home: withCtx, args: []string{"--nats-url", "nats://flag:4222", "--js-domain", "regionTwo"},
			env:     map[string]string{"NATS_URL": "nats://env:4222", "KEYSTONE_FANOUT_NATS_URL": "nats://ksf:4222"},
			wantURL: "nats://flag:4222", wantDomain: "regionTwo", wantUser: "operator", wantCA: "/ctx/ca.pem", wantInbox: "_INBOX_operator"},
		{name: "KEYSTONE_FANOUT_JS_DOMAIN over the context's", home: withCtx, env: map[string]string{"KEYSTONE_FANOUT_JS_DOMAIN": "regionThree"},
			wantURL: "nats://ctx:4222", wantDomain: "regionThree", wantUser: "operator", wantCA: "/ctx/ca.pem", wantInbox: "_INBOX_operator"},
		{name: "own credentials keep the context's out", home: withCtx, args: []string{"--nats-creds-file", "/etc/op.creds"},
			wantURL: "nats://ctx:4222", wantDomain: "central", wantCA: "/ctx/ca.pem", wantInbox: "_INBOX_operator"},
		{name: "own TLS keeps the context's out", home: withCtx, env: map[string]string{"KEYSTONE_FANOUT_NATS_TLS_CERT": "/etc/c.pem"},
			wantURL: "nats://ctx:4222", wantDomain: "central", wantUser: "operator", wantInbox: "_INBOX_operator"},
		{name: "no context selected", home: empty, env: map[string]string{"NATS_URL": "nats://env:4222"},
			wantURL: "nats://env:4222"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := map[string]string{"HOME": tt.home}
			for k, v := range tt.env {
				env[k] = v
			}
			getenv := func(k string) string { return env[k] }
			var f statusFlags
			s := config.New("status", statusUsage, io.Discard)
			f.register(s)
			if err := s.Parse(tt.args, getenv); err != nil {
				t.Fatal(err)
			}
			if _, err := natsCLIDefaults(s, getenv); err != nil {
				t.Fatal(err)
			}
			n := f.o.NATS
			got := []string{n.URL, f.o.JetStreamDomain, n.User, n.CAFile, n.InboxPrefix}
			want := []string{tt.wantURL, tt.wantDomain, tt.wantUser, tt.wantCA, tt.wantInbox}
			for i, field := range []string{"URL", "JetStream domain", "user", "CA", "inbox prefix"} {
				if got[i] != want[i] {
					t.Errorf("%s %q, want %q", field, got[i], want[i])
				}
			}
			if tt.wantUser != "" && n.Password != "ctx-pw" {
				t.Errorf("password %q, want the context's", n.Password)
			}
			if tt.wantUser == "" && n.Password != "" {
				t.Errorf("password %q taken from the context beside other credentials", n.Password)
			}
		})
	}
}

// TestStatusAndSweepFromNATSEnvironment: status and sweep reach the server
// that NATS_URL or the selected nats CLI context names, with no --nats-url.
func TestStatusAndSweepFromNATSEnvironment(t *testing.T) {
	w := newStatusWorld(t)
	w.publish(1)
	withCtx := t.TempDir()
	writeNATSContext(t, withCtx, "here", `{"url": "`+w.url+`"}`)
	tests := []struct {
		name string
		args []string
		env  map[string]string
	}{
		{"status with NATS_URL", []string{"status"}, map[string]string{"NATS_URL": w.url, "HOME": t.TempDir()}},
		{"status with the context", []string{"status"}, map[string]string{"HOME": withCtx}},
		{"sweep with NATS_URL", []string{"sweep", "--reason", "test"}, map[string]string{"NATS_URL": w.url, "HOME": t.TempDir()}},
		{"sweep with the context", []string{"sweep", "--reason", "test"}, map[string]string{"HOME": withCtx}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			if code := run(tt.args, &out, &errOut, func(k string) string { return tt.env[k] }); code != 0 {
				t.Fatalf("exit status %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errOut.String())
			}
			if !strings.Contains(out.String(), "KEYSTONE") && !strings.Contains(out.String(), "sweep") {
				t.Fatalf("unexpected output:\n%s", out.String())
			}
		})
	}
}
