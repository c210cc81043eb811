package testutil

import (
	"net"
	"sync/atomic"
	"testing"
)

// CountingListener listens on a loopback port the kernel picks, for the
// whole test, and closes every connection made to it at once, counting them.
// It returns its address and the count: a live address that speaks no
// protocol, to show that nothing connected.
func CountingListener(t testing.TB) (string, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var n atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			c.Close()
		}
	}()
	return ln.Addr().String(), &n
}
