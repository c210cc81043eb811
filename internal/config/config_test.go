package config

import (
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

type settings struct {
	URLs     []string
	Exchange string
	Window   int
	Age      time.Duration
	Debug    bool
	Password string
}

func newSet(st *settings) *Set {
	s := New("test", "usage", io.Discard)
	s.List(&st.URLs, "amqp-url", []string{"amqp://localhost"}, "broker")
	s.String(&st.Exchange, "exchange", "keystone", "exchange")
	s.Int(&st.Window, "publish-window", 256, "window")
	s.Duration(&st.Age, "max-age", 24*time.Hour, "age")
	s.Bool(&st.Debug, "debug", false, "debug")
	s.Secret(&st.Password, "nats-password", "password")
	return s
}

func TestParse(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(secret, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		want    settings
		wantErr string
	}{
		{name: "defaults", want: settings{URLs: []string{"amqp://localhost"}, Exchange: "keystone", Window: 256, Age: 24 * time.Hour}},
		{name: "flags", args: []string{"--exchange=x", "--publish-window", "9", "--debug", "--max-age=1h"},
			want: settings{URLs: []string{"amqp://localhost"}, Exchange: "x", Window: 9, Age: time.Hour, Debug: true}},
		{name: "environment", env: map[string]string{"KEYSTONE_FANOUT_EXCHANGE": "e", "KEYSTONE_FANOUT_AMQP_URL": "amqp://a, amqps://b", "KEYSTONE_FANOUT_DEBUG": "true"},
			want: settings{URLs: []string{"amqp://a", "amqps://b"}, Exchange: "e", Window: 256, Age: 24 * time.Hour, Debug: true}},
		{name: "flag wins over environment", args: []string{"--exchange=flag"}, env: map[string]string{"KEYSTONE_FANOUT_EXCHANGE": "env"},
			want: settings{URLs: []string{"amqp://localhost"}, Exchange: "flag", Window: 256, Age: 24 * time.Hour}},
		{name: "repeated list flag", args: []string{"--amqp-url=amqp://a", "--amqp-url=amqp://b,amqp://c"},
			want: settings{URLs: []string{"amqp://a", "amqp://b", "amqp://c"}, Exchange: "keystone", Window: 256, Age: 24 * time.Hour}},
		{name: "transport_url kept whole", args: []string{"--amqp-url=rabbit://u:p@h1:5672,u:p@h2:5672/vh"},
			want: settings{URLs: []string{"rabbit://u:p@h1:5672,u:p@h2:5672/vh"}, Exchange: "keystone", Window: 256, Age: 24 * time.Hour}},
		{name: "secret from file", args: []string{"--nats-password-file=" + secret},
			want: settings{URLs: []string{"amqp://localhost"}, Exchange: "keystone", Window: 256, Age: 24 * time.Hour, Password: "s3cret"}},
		{name: "secret file from environment", env: map[string]string{"KEYSTONE_FANOUT_NATS_PASSWORD_FILE": secret},
			want: settings{URLs: []string{"amqp://localhost"}, Exchange: "keystone", Window: 256, Age: 24 * time.Hour, Password: "s3cret"}},
		{name: "secret and its file", args: []string{"--nats-password=x", "--nats-password-file=" + secret}, wantErr: "both set"},
		{name: "missing secret file", args: []string{"--nats-password-file=/nonexistent"}, wantErr: "--nats-password-file"},
		{name: "bad environment value", env: map[string]string{"KEYSTONE_FANOUT_PUBLISH_WINDOW": "many"}, wantErr: "KEYSTONE_FANOUT_PUBLISH_WINDOW"},
		{name: "stray argument", args: []string{"extra"}, wantErr: "unexpected argument"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got settings
			s := newSet(&got)
			err := s.Parse(tt.args, func(k string) string { return tt.env[k] })
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}
