package memcache

import (
	"context"
	"crypto/tls"
	"net"
	"time"

	gomemcache "github.com/bradfitz/gomemcache/memcache"
)

// oneServer is the gomemcache ServerSelector of one Server: every key goes to
// that server (keystone-fanout never hashes keys to servers, see Cluster).
// The address is resolved when gomemcache dials, not when the Cluster is
// made, so that a name that does not resolve yet does not fail start-up.
type oneServer struct{ addr serverAddr }

type serverAddr struct{ network, addr string }

func (a serverAddr) Network() string { return a.network }
func (a serverAddr) String() string  { return a.addr }

func (o oneServer) PickServer(string) (net.Addr, error) { return o.addr, nil }
func (o oneServer) Each(fn func(net.Addr) error) error  { return fn(o.addr) }

// newKeyClient returns the gomemcache client of one server, with the same
// dial timeout, keep-alive and TLS as this package's own connections (TLS
// through gomemcache's DialContext).
func newKeyClient(a Address, tlsConfig func() *tls.Config, o Options) *gomemcache.Client {
	c := gomemcache.NewFromSelector(oneServer{serverAddr{a.Network, a.Addr}})
	c.Timeout = o.IOTimeout
	c.MaxIdleConns = max(o.MaxIdlePerServer, keyParallelism)
	d := &net.Dialer{Timeout: o.DialTimeout, KeepAlive: 30 * time.Second}
	if tlsConfig != nil {
		c.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			td := &tls.Dialer{NetDialer: d, Config: tlsConfig()} // the files on disk now
			return td.DialContext(ctx, network, addr)
		}
	} else {
		c.DialContext = d.DialContext
	}
	return c
}
