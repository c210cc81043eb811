package memcache_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/hashicorp/go-multierror"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
)

// TestEachErrorOnOneLine: the error of several failed servers is one line
// (it ends up in a log record's "err"), still a *multierror.Error naming
// every server.
func TestEachErrorOnOneLine(t *testing.T) {
	tests := []struct {
		name    string
		servers string
		fail    int // how many servers fail, the first ones
		want    string
	}{
		{"one of two fails", "127.0.0.1:1,127.0.0.1:2", 1, "memcached 127.0.0.1:1: each: boom"},
		{"two of three fail", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", 2,
			"2 errors: memcached 127.0.0.1:1: each: boom; memcached 127.0.0.1:2: each: boom"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := memcache.New(memcache.Options{Servers: tt.servers})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			failing := map[string]bool{}
			for _, s := range strings.Split(tt.servers, ",")[:tt.fail] {
				failing[s] = true
			}
			err = c.Each(context.Background(), func(_ context.Context, s *memcache.Server) error {
				if failing[s.String()] {
					return errors.New("boom")
				}
				return nil
			})
			var merr *multierror.Error
			if !errors.As(err, &merr) || len(merr.Errors) != tt.fail {
				t.Fatalf("Each = %v, want a *multierror.Error of %d", err, tt.fail)
			}
			if err.Error() != tt.want {
				t.Fatalf("Each error %q, want %q", err.Error(), tt.want)
			}
		})
	}
}
