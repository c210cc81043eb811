package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestRun(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		env      map[string]string
		wantCode int
		wantOut  []string // in stdout or stderr
	}{
		{"no command", nil, nil, 2, []string{"Commands:"}},
		{"help", []string{"--help"}, nil, 0, []string{"bridge", "agent", "status"}},
		{"unknown command", []string{"frobnicate"}, nil, 2, []string{`unknown command "frobnicate"`}},
		{"version", []string{"version"}, nil, 0, []string{"keystone-fanout"}},
		{"bridge help lists every issue flag with its variable", []string{"bridge", "--help"}, nil, 0, []string{
			"--amqp-url", "--exchange", "--routing-key", "--queue", "--nats-url", "--nats-listen", "--data-dir", "--stream",
			"--http-addr", "--keystone-url", "--keystone-password-file", "--revocation-poll-interval", "KEYSTONE_FANOUT_AMQP_URL"}},
		{"agent help lists every issue flag", []string{"agent", "--help"}, nil, 0, []string{
			"--region", "--nats-url", "--stream", "--memcached", "--strategy", "--token-cache-time", "--http-addr"}},
		{"agent without region", []string{"agent", "--memcached", "127.0.0.1:11211"}, nil, 2, []string{"--region is required"}},
		{"agent region from the environment, bad strategy", []string{"agent"},
			map[string]string{"KEYSTONE_FANOUT_REGION": "regionTwo", "KEYSTONE_FANOUT_MEMCACHED": "127.0.0.1:11211", "KEYSTONE_FANOUT_STRATEGY": "purge"},
			2, []string{"purge"}},
		{"bad environment value", []string{"agent"}, map[string]string{"KEYSTONE_FANOUT_TOKEN_CACHE_TIME": "forever"}, 2,
			[]string{"KEYSTONE_FANOUT_TOKEN_CACHE_TIME"}},
		{"bridge with a bad AMQP URL", []string{"bridge", "--amqp-url", "http://x/", "--data-dir", "/tmp/x"}, nil, 2, []string{"--amqp-url"}},
		{"bridge with a missing password file", []string{"bridge", "--amqp-password-file", "/nonexistent"}, nil, 2, []string{"--amqp-password-file"}},
		{"bridge with a user but no Keystone URL", []string{"bridge", "--keystone-username", "svc", "--data-dir", "/tmp/x"}, nil, 2, []string{"--keystone-url"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			code := run(tt.args, &out, &errOut, func(k string) string { return tt.env[k] })
			all := out.String() + errOut.String()
			if code != tt.wantCode {
				t.Fatalf("exit code %d, want %d; output:\n%s", code, tt.wantCode, all)
			}
			for _, w := range tt.wantOut {
				if !strings.Contains(all, w) {
					t.Errorf("output lacks %q:\n%s", w, all)
				}
			}
		})
	}
}
