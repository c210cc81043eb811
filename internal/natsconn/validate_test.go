package natsconn

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestOptionsValidate(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		o       Options
		want    []string // substrings of the error; none means valid
		notWant []string
	}{
		{name: "nats URL", o: Options{URL: "nats://127.0.0.1:4222"}},
		{name: "several URLs", o: Options{URL: "nats://a:4222, tls://b:4222"}},
		{name: "credentials in the URL", o: Options{URL: "nats://u:secret@a:4222"}},
		{name: "empty", o: Options{}, want: []string{"--nats-url is empty", "nats://127.0.0.1:4222"}},
		{name: "host:port without a scheme", o: Options{URL: "127.0.0.1:4222"},
			want: []string{"--nats-url", `"127.0.0.1:4222" has no scheme`, "nats://HOST:PORT", "nats://127.0.0.1:4222"}},
		{name: "scheme without its colon", o: Options{URL: "nats//host:4222"},
			want: []string{"--nats-url", "no scheme", "nats://host:4222"}},
		{name: "scheme with one slash", o: Options{URL: "nats:/host:4222"}, want: []string{"nats://host:4222"}},
		{name: "second URL without a scheme", o: Options{URL: "nats://a:4222,b:4222"}, want: []string{`"b:4222" has no scheme`}},
		{name: "no scheme, credentials not shown", o: Options{URL: "u:secret@host:4222"},
			want: []string{"no scheme", "nats://***@host:4222"}, notWant: []string{"secret"}},
		{name: "wrong scheme, credentials not shown", o: Options{URL: "http://u:secret@host:4222"},
			want: []string{"scheme must be nats:// or tls://", "nats://host:4222"}, notWant: []string{"secret"}},
		{name: "every error reported", o: Options{URL: "h1:4222,h2:4222", Token: "t", User: "u"},
			want: []string{`"h1:4222"`, `"h2:4222"`, "exclusive"}},
		{name: "missing CA file", o: Options{URL: "tls://h:4222", CAFile: filepath.Join(dir, "none.pem")}, want: []string{"--nats-tls-ca"}},
		{name: "CA file without a certificate", o: Options{URL: "tls://h:4222", CAFile: notPEM}, want: []string{"--nats-tls-ca"}},
		{name: "certificate without key", o: Options{URL: "tls://h:4222", CertFile: notPEM}, want: []string{"--nats-tls-cert and --nats-tls-key"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.o.Validate()
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("Validate: %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate: nil, want an error containing %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate: %v\nwant it to contain %q", err, w)
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(err.Error(), w) {
					t.Errorf("Validate: %v\nmust not contain %q", err, w)
				}
			}
		})
	}
}
