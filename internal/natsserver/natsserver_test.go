package natsserver

import (
	"strings"
	"testing"
)

// TestValidateLoopbackOnly: the embedded server has no TLS or authentication,
// so no option may expose it beyond loopback.
func TestValidateLoopbackOnly(t *testing.T) {
	tests := []struct {
		name string
		o    Options
		want string // "" valid
	}{
		{"IPv4 loopback", Options{Listen: "127.0.0.1:4222", DataDir: "d"}, ""},
		{"other loopback address", Options{Listen: "127.0.0.53:-1", DataDir: "d"}, ""},
		{"IPv6 loopback", Options{Listen: "[::1]:0", DataDir: "d"}, ""},
		{"localhost", Options{Listen: "localhost:4222", DataDir: "d"}, ""},
		{"default", Options{DataDir: "d"}, ""},
		{"every interface", Options{Listen: "0.0.0.0:4222", DataDir: "d"}, "loopback only"},
		{"empty host", Options{Listen: ":4222", DataDir: "d"}, "loopback only"},
		{"IPv6 any", Options{Listen: "[::]:4222", DataDir: "d"}, "loopback only"},
		{"a host's address", Options{Listen: "10.0.0.5:4222", DataDir: "d"}, "--nats-url"},
		{"a host name", Options{Listen: "nats.example:4222", DataDir: "d"}, "loopback only"},
		{"cluster on every interface", Options{Listen: "127.0.0.1:4222", DataDir: "d", Cluster: "0.0.0.0:6222"}, "routes are not authenticated"},
		{"cluster on loopback", Options{Listen: "127.0.0.1:4222", DataDir: "d", Cluster: "127.0.0.1:-1"}, ""},
		{"no data dir", Options{Listen: "127.0.0.1:4222"}, "--data-dir"},
		{"leaf nodes on loopback", Options{DataDir: "d", LeafListen: "127.0.0.1:-1", JetStreamDomain: "central"}, ""},
		{"leaf nodes on every interface", Options{DataDir: "d", LeafListen: "0.0.0.0:7422"}, "leaf nodes are not authenticated"},
		{"a domain with a dot", Options{DataDir: "d", JetStreamDomain: "central.one"}, "JetStream domain"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.o.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("Validate = %v, want nil", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("Validate = %v, want an error containing %q", err, tt.want)
			}
		})
	}
}
