package app

import (
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// TestStatusWithoutTheStreamNamesTheURL: status against a NATS server
// without the stream says which server it asked (without credentials) and
// which flag points it elsewhere.
func TestStatusWithoutTheStreamNamesTheURL(t *testing.T) {
	srv := testutil.StartNATS(t)
	addr := srv.Addr()
	tests := []struct {
		name string
		url  string
		want string // the URL as the error must show it
	}{
		{"plain URL", "nats://" + addr, "nats://" + addr},
		{"user and password", "nats://keystone:s3cret@" + addr, "nats://***@" + addr},
		{"token", "nats://s3cret@" + addr, "nats://***@" + addr},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			err := RunStatus(ctx, StatusOptions{NATS: natsconn.Options{URL: tt.url}, Stream: stream.DefaultName}, io.Discard, testutil.Logger(t))
			if err == nil {
				t.Fatal("RunStatus: nil error, want one saying the stream does not exist")
			}
			for _, w := range []string{`stream "KEYSTONE" does not exist`, tt.want, "--nats-url", "--stream"} {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\nwant it to contain %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "s3cret") {
				t.Errorf("error %q shows the credentials", err)
			}
		})
	}
}
