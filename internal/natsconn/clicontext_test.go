package natsconn

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadCLIContext(t *testing.T) {
	home := t.TempDir()
	write := func(rel, body string) string {
		p := filepath.Join(home, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	write(".config/nats/context/central.json", `{"description": "x", "url": "tls://central:4222", "creds": "~/central.creds",
		"inbox_prefix": "_INBOX_operator", "jetstream_domain": "central", "color_scheme": "dark"}`)
	write(".config/nats/context/leaf.json", `{"url": "nats://leaf:4222", "user": "agent", "password": "pw", "ca": "/etc/ca.pem"}`)
	write("xdg/nats/context/other.json", `{"url": "nats://other:4222", "token": "t"}`)
	write("xdg/nats/context.txt", "other\n")
	broken := write("broken.json", `{"url": `)
	byPath := write("ctx/path.json", `{"url": "nats://path:4222", "nkey": "~/seed.nk", "cert": "c.pem", "key": "k.pem"}`)

	tests := []struct {
		name     string
		env      map[string]string
		selected string // content of ~/.config/nats/context.txt; "" none
		want     *CLIContext
		wantErr  string
	}{
		{name: "nothing selected", want: nil},
		{name: "no home", env: map[string]string{"HOME": ""}, want: nil},
		{name: "selected in context.txt", selected: "central\n",
			want: &CLIContext{Name: "central", URL: "tls://central:4222", Creds: filepath.Join(home, "central.creds"), InboxPrefix: "_INBOX_operator", JetStreamDomain: "central"}},
		{name: "NATS_CONTEXT wins over context.txt", selected: "central", env: map[string]string{"NATS_CONTEXT": "leaf"},
			want: &CLIContext{Name: "leaf", URL: "nats://leaf:4222", User: "agent", Password: "pw", CA: "/etc/ca.pem"}},
		{name: "XDG_CONFIG_HOME", env: map[string]string{"XDG_CONFIG_HOME": filepath.Join(home, "xdg")},
			want: &CLIContext{Name: "other", URL: "nats://other:4222", Token: "t"}},
		{name: "a path to a json file", env: map[string]string{"NATS_CONTEXT": byPath},
			want: &CLIContext{Name: byPath, URL: "nats://path:4222", NKey: filepath.Join(home, "seed.nk"), Cert: "c.pem", Key: "k.pem"}},
		{name: "selected context missing", env: map[string]string{"NATS_CONTEXT": "nope"}, wantErr: `nats context "nope" (from NATS_CONTEXT)`},
		{name: "a name with a separator", env: map[string]string{"NATS_CONTEXT": "../central"}, wantErr: "no path separator"},
		{name: "broken json", env: map[string]string{"NATS_CONTEXT": broken}, wantErr: "broken.json"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			txt := filepath.Join(home, ".config/nats/context.txt")
			_ = os.Remove(txt)
			if tt.selected != "" {
				write(".config/nats/context.txt", tt.selected)
			}
			env := map[string]string{"HOME": home}
			for k, v := range tt.env {
				env[k] = v
			}
			got, err := LoadCLIContext(func(k string) string { return env[k] })
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if (got == nil) != (tt.want == nil) || (got != nil && *got != *tt.want) {
				t.Fatalf("got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}
