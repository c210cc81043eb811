package config

import (
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
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

func TestNegativeDurationsRejected(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		wantErr string // "" means accepted
	}{
		{name: "duration zero", args: []string{"--linger=0"}},
		{name: "duration positive", args: []string{"--linger=2ms"}},
		{name: "duration negative", args: []string{"--linger=-1s"}, wantErr: "-linger"},
		{name: "duration negative from the environment", env: map[string]string{"KEYSTONE_FANOUT_LINGER": "-1s"}, wantErr: "KEYSTONE_FANOUT_LINGER"},
		{name: "duration not a duration", args: []string{"--linger=soon"}, wantErr: "-linger"},
		{name: "seconds as a number", args: []string{"--delay=2"}},
		{name: "seconds as a duration", args: []string{"--delay=2s"}},
		{name: "seconds negative number", args: []string{"--delay=-1"}, wantErr: "-delay"},
		{name: "seconds negative duration", args: []string{"--delay=-1s"}, wantErr: "-delay"},
		{name: "seconds negative from the environment", env: map[string]string{"KEYSTONE_FANOUT_DELAY": "-1s"}, wantErr: "KEYSTONE_FANOUT_DELAY"},
		{name: "durations positive", args: []string{"--backoff=1s,30s"}},
		{name: "durations one negative", args: []string{"--backoff=1s,-30s"}, wantErr: "-backoff"},
		{name: "durations negative from the environment", env: map[string]string{"KEYSTONE_FANOUT_BACKOFF": "-1s"}, wantErr: "KEYSTONE_FANOUT_BACKOFF"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var linger, delay time.Duration
			var backoff []time.Duration
			s := New("test", "usage", io.Discard)
			s.Duration(&linger, "linger", time.Millisecond, "linger")
			s.Seconds(&delay, "delay", time.Second, "delay")
			s.Durations(&backoff, "backoff", []time.Duration{time.Second}, "backoff")
			err := s.Parse(tt.args, func(k string) string { return tt.env[k] })
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("Parse: %v, want nil", err)
			case tt.wantErr != "" && err == nil:
				t.Fatalf("Parse: nil (linger %s, delay %s, backoff %v), want an error naming %q", linger, delay, backoff, tt.wantErr)
			case tt.wantErr != "" && !strings.Contains(err.Error(), tt.wantErr):
				t.Fatalf("Parse: %v, want an error naming %q", err, tt.wantErr)
			}
			if linger < 0 || delay < 0 || slices.ContainsFunc(backoff, func(d time.Duration) bool { return d < 0 }) {
				t.Fatalf("a negative value was stored: linger %s, delay %s, backoff %v", linger, delay, backoff)
			}
		})
	}
}

func TestUsageExampleNamesAFlagOfTheCommand(t *testing.T) {
	tests := []struct {
		name    string
		flags   []string // in registration order
		want    string
		notWant string
	}{
		{"a daemon's first flag", []string{"http-addr", "amqp-url"}, "for example KEYSTONE_FANOUT_HTTP_ADDR", ""},
		{"a command without --http-addr", []string{"nats-url", "json", "stream"}, "for example KEYSTONE_FANOUT_NATS_URL", "HTTP_ADDR"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out strings.Builder
			s := New("test", "usage", &out)
			for _, f := range tt.flags {
				s.String(new(string), f, "", f)
			}
			var d time.Duration
			s.Duration(&d, "some-timeout", time.Second, "a timeout")
			if err := s.Parse([]string{"--help"}, func(string) string { return "" }); !errors.Is(err, flag.ErrHelp) {
				t.Fatalf("Parse(--help) = %v, want flag.ErrHelp", err)
			}
			if !strings.Contains(out.String(), tt.want) {
				t.Errorf("help lacks %q:\n%s", tt.want, out.String())
			}
			if tt.notWant != "" && strings.Contains(out.String(), tt.notWant) {
				t.Errorf("help mentions %q, which the command does not have:\n%s", tt.notWant, out.String())
			}
			if !strings.Contains(out.String(), "--some-timeout duration") {
				t.Errorf("help does not give the duration flag's type:\n%s", out.String())
			}
		})
	}
}

// TestFillLayer: a flag is taken from its flag, else its variable, else the
// file layer, else its default.
func TestFillLayer(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(secret, []byte("from-secret-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	file := map[string][]string{
		"exchange":       {"file-exchange"},
		"amqp-url":       {"rabbit://u:p@h1:5672,u:p@h2:5672/vh?ssl=1"},
		"publish-window": {"7"},
		"nats-password":  {"file-password"},
	}
	def := settings{URLs: []string{"amqp://localhost"}, Exchange: "keystone", Window: 256, Age: 24 * time.Hour}
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
		fill map[string][]string
		want settings
	}{
		{name: "default", want: def},
		{name: "file over default", fill: file,
			want: settings{URLs: []string{"rabbit://u:p@h1:5672,u:p@h2:5672/vh?ssl=1"}, Exchange: "file-exchange", Window: 7, Age: 24 * time.Hour, Password: "file-password"}},
		{name: "environment over file", fill: file,
			env:  map[string]string{"KEYSTONE_FANOUT_EXCHANGE": "env-exchange", "KEYSTONE_FANOUT_AMQP_URL": "amqp://env"},
			want: settings{URLs: []string{"amqp://env"}, Exchange: "env-exchange", Window: 7, Age: 24 * time.Hour, Password: "file-password"}},
		{name: "flag over environment and file", fill: file,
			args: []string{"--exchange=flag-exchange", "--publish-window=9"},
			env:  map[string]string{"KEYSTONE_FANOUT_EXCHANGE": "env-exchange"},
			want: settings{URLs: []string{"rabbit://u:p@h1:5672,u:p@h2:5672/vh?ssl=1"}, Exchange: "flag-exchange", Window: 9, Age: 24 * time.Hour, Password: "file-password"}},
		{name: "secret file flag over file", fill: file, args: []string{"--nats-password-file=" + secret},
			want: settings{URLs: []string{"rabbit://u:p@h1:5672,u:p@h2:5672/vh?ssl=1"}, Exchange: "file-exchange", Window: 7, Age: 24 * time.Hour, Password: "from-secret-file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got settings
			s := newSet(&got)
			if err := s.Parse(tc.args, func(k string) string { return tc.env[k] }); err != nil {
				t.Fatal(err)
			}
			for name, vals := range tc.fill {
				if err := s.Fill(name, "keystone.conf", vals...); err != nil {
					t.Fatal(err)
				}
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
	var st settings
	s := newSet(&st)
	if err := s.Parse(nil, func(string) string { return "" }); err != nil {
		t.Fatal(err)
	}
	err := s.Fill("publish-window", "nova.conf [x] y", "many")
	if err == nil || !strings.Contains(err.Error(), "--publish-window from nova.conf [x] y: ") {
		t.Fatalf("error %v, want one naming the flag and the origin", err)
	}
}

func TestHelpNamesTheFileLayer(t *testing.T) {
	var out strings.Builder
	var files []string
	s := New("bridge", "Usage: keystone-fanout bridge", &out)
	s.String(new(string), "amqp-url", "", "broker")
	s.Files(&files, "oslo-config", "oslo.config files")
	if err := s.Parse([]string{"--help"}, func(string) string { return "" }); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("err %v", err)
	}
	want := "Each setting comes from, in order of precedence: its flag; its environment variable\n" +
		"KEYSTONE_FANOUT_<FLAG> (for example KEYSTONE_FANOUT_AMQP_URL);\nthe files of --oslo-config; its default."
	if !strings.Contains(out.String(), want) {
		t.Fatalf("help:\n%s\nwant %q", out.String(), want)
	}
}
