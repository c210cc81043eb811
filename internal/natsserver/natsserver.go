// Package natsserver runs a NATS server with JetStream inside the keystone-fanout
// process: the default when no NATS URL is given, and the server every test uses.
package natsserver

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Options configures an embedded server.
//
// The embedded server has neither TLS nor authentication, so it listens on
// loopback only: Validate refuses any other client or cluster address. Other
// hosts reach NATS through a nats-server of its own, with TLS and accounts
// (see docs/OPERATIONS.md).
type Options struct {
	// Listen is the client address, "host:port", on a loopback address
	// (127.0.0.0/8, ::1 or localhost). Port -1 or 0 picks a free port.
	// Default "127.0.0.1:4222".
	Listen string
	// DataDir is where JetStream keeps its file storage. Required: an embedded
	// server without it would lose the stream on restart.
	DataDir string
	// ServerName names the server in logs and cluster membership. Default
	// "keystone-fanout".
	ServerName string
	// Cluster, when not empty, is this node's cluster listen address
	// ("host:port") and Routes lists the other nodes' cluster URLs
	// ("nats://host:port"). ClusterName defaults to "keystone-fanout".
	Cluster     string
	ClusterName string
	Routes      []string
	// LeafListen, when not empty, is a loopback address ("host:port", port -1
	// or 0 for a free one) where the server accepts leaf-node connections
	// (unauthenticated, like its clients). Default: none.
	LeafListen string
	// JetStreamDomain, when not empty, names the server's JetStream domain,
	// so that clients behind leaf nodes reach its streams as
	// $JS.<domain>.API (--js-domain). Default: none.
	JetStreamDomain string
	// ReadyTimeout bounds how long Start waits for the server to accept clients.
	// Default 10 s.
	ReadyTimeout time.Duration
	// TLS, when not nil, is the server side of TLS on client connections
	// (required); with ClientAuth tls.RequireAndVerifyClientCert clients need
	// a certificate its ClientCAs trust. Nil: no TLS. The loopback rule
	// stays (there is still no authentication); the end-to-end tests use it
	// to run every link over TLS.
	TLS *tls.Config
}

// Server is a running embedded server.
type Server struct {
	srv  *server.Server
	opts Options
}

func (o *Options) setDefaults() {
	if o.Listen == "" {
		o.Listen = "127.0.0.1:4222"
	}
	if o.ServerName == "" {
		o.ServerName = "keystone-fanout"
	}
	if o.ClusterName == "" {
		o.ClusterName = "keystone-fanout"
	}
	if o.ReadyTimeout <= 0 {
		o.ReadyTimeout = 10 * time.Second
	}
}

// Validate fills zero fields with their defaults and checks the options
// without starting anything.
func (o *Options) Validate() error {
	o.setDefaults()
	var errs []error
	if host, _, err := splitHostPort(o.Listen); err != nil {
		errs = append(errs, fmt.Errorf("--nats-listen %q: %w (want host:port, for example 127.0.0.1:4222)", o.Listen, err))
	} else if !loopback(host) {
		errs = append(errs, fmt.Errorf("--nats-listen %q: the embedded NATS server has no TLS or authentication, so it listens on loopback only "+
			"(127.0.0.1, ::1 or localhost); for agents on other hosts run a nats-server with TLS and accounts and give its address as --nats-url", o.Listen))
	}
	if o.DataDir == "" {
		errs = append(errs, errors.New("--data-dir is required for the embedded NATS server: JetStream keeps the stream there"))
	}
	if o.Cluster != "" {
		if host, _, err := splitHostPort(o.Cluster); err != nil {
			errs = append(errs, fmt.Errorf("cluster address %q: %w", o.Cluster, err))
		} else if !loopback(host) {
			errs = append(errs, fmt.Errorf("cluster address %q: the embedded server's routes are not authenticated: loopback only", o.Cluster))
		}
	}
	if o.LeafListen != "" {
		if host, _, err := splitHostPort(o.LeafListen); err != nil {
			errs = append(errs, fmt.Errorf("leaf-node address %q: %w", o.LeafListen, err))
		} else if !loopback(host) {
			errs = append(errs, fmt.Errorf("leaf-node address %q: the embedded server's leaf nodes are not authenticated: loopback only", o.LeafListen))
		}
	}
	if strings.ContainsAny(o.JetStreamDomain, ". *>\t") {
		errs = append(errs, fmt.Errorf("JetStream domain %q: must not contain dots, spaces or wildcards", o.JetStreamDomain))
	}
	return errors.Join(errs...)
}

// loopback reports whether host names a loopback address only.
func loopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

func splitHostPort(addr string) (string, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < -1 || port > 65535 {
		return "", 0, fmt.Errorf("port %q is not a number from -1 to 65535", p)
	}
	if port == 0 {
		port = -1 // the server's "random port"
	}
	return host, port, nil
}

// Start starts the server and waits until it accepts client connections.
func Start(o Options) (*Server, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	host, port, _ := splitHostPort(o.Listen)
	so := &server.Options{
		ServerName: o.ServerName,
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   o.DataDir,
		NoSigs:     true,
		NoLog:      true,
	}
	if o.TLS != nil {
		so.TLSConfig = o.TLS
		so.TLSVerify = o.TLS.ClientAuth == tls.RequireAndVerifyClientCert
		so.TLSTimeout = 5
	}
	if o.Cluster != "" {
		chost, cport, _ := splitHostPort(o.Cluster)
		so.Cluster = server.ClusterOpts{Name: o.ClusterName, Host: chost, Port: cport}
		so.Routes = server.RoutesFromStr(strings.Join(o.Routes, ","))
	}
	if o.LeafListen != "" {
		lhost, lport, _ := splitHostPort(o.LeafListen)
		// NoAdvertise: a loopback URL is of no use to a leaf node elsewhere.
		so.LeafNode = server.LeafNodeOpts{Host: lhost, Port: lport, NoAdvertise: true}
	}
	so.JetStreamDomain = o.JetStreamDomain
	srv, err := server.NewServer(so)
	if err != nil {
		return nil, fmt.Errorf("embedded NATS server: %w", err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(o.ReadyTimeout) {
		srv.Shutdown()
		return nil, fmt.Errorf("embedded NATS server did not accept connections on %s within %s", o.Listen, o.ReadyTimeout)
	}
	return &Server{srv: srv, opts: o}, nil
}

// ClientURL is the URL clients connect to, with the port actually bound.
func (s *Server) ClientURL() string { return s.srv.ClientURL() }

// Addr is the bound client address, "host:port".
func (s *Server) Addr() string {
	if a, ok := s.srv.Addr().(*net.TCPAddr); ok {
		return a.String()
	}
	return s.opts.Listen
}

// LeafAddr is the bound leaf-node address, "host:port", or "" without
// LeafListen.
func (s *Server) LeafAddr() string {
	if s.opts.LeafListen == "" {
		return ""
	}
	if v, err := s.srv.Varz(nil); err == nil && v.LeafNode.Port > 0 {
		return net.JoinHostPort(v.LeafNode.Host, strconv.Itoa(v.LeafNode.Port))
	}
	return ""
}

// ClusterAddr is the bound cluster address, "host:port", or "" without a cluster.
func (s *Server) ClusterAddr() string {
	if a := s.srv.ClusterAddr(); a != nil {
		return a.String()
	}
	return ""
}

// Options returns the options the server was started with, with defaults applied.
func (s *Server) Options() Options { return s.opts }

// Underlying returns the nats-server value, for tests that need more.
func (s *Server) Underlying() *server.Server { return s.srv }

// Shutdown stops the server and waits for it to be gone. Safe to call twice.
func (s *Server) Shutdown() {
	s.srv.Shutdown()
	s.srv.WaitForShutdown()
}

// Restart stops the server and starts a new one on the same address and data
// directory, as an operator restarting it would. The stream survives.
func (s *Server) Restart() error {
	addr := s.Addr()
	s.Shutdown()
	o := s.opts
	o.Listen = addr
	// The port was ours a moment ago, but another socket may hold it for a
	// while (an outgoing connection's ephemeral port): wait until it is free.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		l, err := net.Listen("tcp", addr)
		if err == nil {
			l.Close()
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("restarting the embedded NATS server: %w", err)
		}
	}
	ns, err := Start(o)
	if err != nil {
		return err
	}
	*s = *ns
	return nil
}
