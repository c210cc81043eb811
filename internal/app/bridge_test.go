package app

import (
	"testing"

	"github.com/keystone-fanout/keystone-fanout/bridge"
	"github.com/keystone-fanout/keystone-fanout/internal/revoke"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

// TestRevokeOptionsFollowTheStream: the poller publishes under the bridge's
// stream and prefix, and its bucket (lease and position) has the stream's
// replicas unless set, so that it survives a node as the stream does.
func TestRevokeOptionsFollowTheStream(t *testing.T) {
	tests := []struct {
		name           string
		streamReplicas int
		bucketReplicas int
		want           int
	}{
		{name: "stream replicas unset", want: 1},
		{name: "a 3-node cluster", streamReplicas: 3, want: 3},
		{name: "bucket replicas set", streamReplicas: 3, bucketReplicas: 1, want: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := BridgeOptions{
				Bridge: bridge.Options{Stream: stream.Config{Name: "KS", SubjectPrefix: "ks", Replicas: tt.streamReplicas}},
				Revoke: &revoke.Options{BucketReplicas: tt.bucketReplicas},
			}
			r := o.revokeOptions()
			if r.BucketReplicas != tt.want || r.Stream != "KS" || r.SubjectPrefix != "ks" {
				t.Errorf("revokeOptions() = replicas %d, stream %q, prefix %q; want %d, KS, ks", r.BucketReplicas, r.Stream, r.SubjectPrefix, tt.want)
			}
			if o.Revoke.BucketReplicas != tt.bucketReplicas {
				t.Errorf("revokeOptions changed its input")
			}
		})
	}
	if (&BridgeOptions{}).revokeOptions() != nil {
		t.Error("revokeOptions() without a poller is not nil")
	}
}
