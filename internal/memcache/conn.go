package memcache

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/tlsconf"
)

// ServerError is the error of one operation on one server. Errors from
// several servers are combined in a *multierror.Error whose entries are
// *ServerError.
type ServerError struct {
	// Server is the server as configured (Address.Spec).
	Server string
	// Op is the operation: "dial", "get", "delete", "set", "flush_all",
	// "version", "stats", "metadump".
	Op  string
	Err error
}

func (e *ServerError) Error() string {
	return fmt.Sprintf("memcached %s: %s: %v", e.Server, e.Op, e.Err)
}

func (e *ServerError) Unwrap() error { return e.Err }

// ErrProtocol marks a response memcached should not have sent (or an
// ERROR/CLIENT_ERROR/SERVER_ERROR reply). The connection is dropped.
var ErrProtocol = errors.New("unexpected response")

// ErrClosed is returned by operations on a closed Cluster.
var ErrClosed = errors.New("memcache cluster closed")

const bufSize = 64 << 10

// conn is one connection to one server. It is used by one goroutine at a
// time (the pool hands it out).
type conn struct {
	nc net.Conn
	r  *bufio.Reader
	w  *bufio.Writer
	// deadline currently set on nc, to avoid a syscall per read.
	deadline time.Time
	// reused says the connection came from the idle pool; got that a reply
	// was read on it during the current operation.
	reused, got bool
}

// pool keeps idle connections of one server.
type pool struct {
	addr Address
	// tlsConfig returns the TLS configuration of one new connection (the
	// files on disk now); nil when TLS is off.
	tlsConfig func() *tls.Config
	tlsFiles  tlsconf.Files
	opts      Options
	mu        sync.Mutex
	idle      []*conn
	closed    bool
	dialer    net.Dialer
	crawlMu   sync.Mutex // one metadump at a time from this process
}

func newPool(addr Address, tlsFiles *tlsconf.Reloader, opts Options) *pool {
	p := &pool{addr: addr, opts: opts, dialer: net.Dialer{Timeout: opts.DialTimeout, KeepAlive: 30 * time.Second}}
	if tlsFiles != nil {
		host := ""
		if addr.Network == "tcp" {
			host, _, _ = net.SplitHostPort(addr.Addr)
		}
		p.tlsConfig = func() *tls.Config { return tlsFiles.Config(host) }
		p.tlsFiles = tlsFiles.Files()
	}
	return p
}

func (p *pool) get(ctx context.Context) (*conn, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	if n := len(p.idle); n > 0 {
		c := p.idle[n-1]
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		c.reused = true
		return c, nil
	}
	p.mu.Unlock()
	return p.dial(ctx)
}

func (p *pool) dial(ctx context.Context) (*conn, error) {
	dctx, cancel := context.WithTimeout(ctx, p.opts.DialTimeout)
	defer cancel()
	nc, err := p.dialer.DialContext(dctx, p.addr.Network, p.addr.Addr)
	if err != nil {
		return nil, err
	}
	if p.tlsConfig != nil {
		tc := tls.Client(nc, p.tlsConfig())
		if err := tc.HandshakeContext(dctx); err != nil {
			nc.Close()
			return nil, fmt.Errorf("TLS handshake: %w", tlsconf.Explain(err, p.tlsFiles, memcachedFlags))
		}
		nc = tc
	}
	return &conn{nc: nc, r: bufio.NewReaderSize(nc, bufSize), w: bufio.NewWriterSize(nc, 16<<10)}, nil
}

// put returns a healthy connection to the pool.
func (p *pool) put(c *conn) {
	p.mu.Lock()
	if p.closed || len(p.idle) >= p.opts.MaxIdlePerServer {
		p.mu.Unlock()
		c.nc.Close()
		return
	}
	p.idle = append(p.idle, c)
	p.mu.Unlock()
}

func (p *pool) close() {
	p.mu.Lock()
	p.closed = true
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, c := range idle {
		c.nc.Close()
	}
}

// dropIdle closes idle connections (after an error, the others are likely
// dead too: a restarted server).
func (p *pool) dropIdle() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, c := range idle {
		c.nc.Close()
	}
}

// with runs fn on a pooled connection, bounded by ctx and IOTimeout. A
// connection on which fn failed is closed, never reused. When a connection
// taken from the idle pool fails before any reply was read (the server
// restarted or closed it while idle), fn is retried once on a new
// connection; fn must not have had visible effects then, which holds because
// it only acts on replies.
func (p *pool) with(ctx context.Context, op string, fn func(c *conn) error) error {
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return &ServerError{Server: p.addr.Spec, Op: op, Err: err}
		}
		c, err := p.get(ctx)
		if err != nil {
			if !errors.Is(err, ErrClosed) {
				op = op + " (dial)"
			}
			return &ServerError{Server: p.addr.Spec, Op: op, Err: err}
		}
		c.deadline, c.got = time.Time{}, false
		stop := context.AfterFunc(ctx, func() { c.nc.SetDeadline(time.Unix(1, 0)) })
		err = fn(c)
		if !stop() && err == nil {
			// ctx ended while fn ran: the deadline was forced into the past.
			err = ctx.Err()
		}
		if err == nil {
			c.reused = false
			p.put(c)
			return nil
		}
		c.nc.Close()
		p.dropIdle()
		if attempt == 0 && c.reused && !c.got && isBrokenConn(err) {
			continue
		}
		if isTimeout(err) {
			if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
				err = fmt.Errorf("%w (%v)", context.DeadlineExceeded, err)
			} else if cerr := ctx.Err(); cerr != nil {
				err = fmt.Errorf("%w (%v)", cerr, err)
			}
		}
		if p.tlsConfig != nil && !c.reused && !c.got {
			// A new connection's first exchange is where TLS 1.3 tells of
			// a client certificate the server refused: its alert, or only
			// the connection closed when the alert was lost to a reset.
			err = tlsconf.Explain(err, p.tlsFiles, memcachedFlags)
			if p.tlsFiles.Cert != "" && (errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)) {
				err = fmt.Errorf("%w (the server closed the connection right after the TLS handshake: it may have refused %s %s)",
					err, memcachedFlags.Cert, p.tlsFiles.Cert)
			}
		}
		return &ServerError{Server: p.addr.Spec, Op: op, Err: err}
	}
}

// isBrokenConn reports errors of a connection the peer closed.
func isBrokenConn(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// extend pushes the connection deadline to now+IOTimeout (capped by the
// context deadline). It only calls into the kernel when the deadline moved
// by more than a quarter of IOTimeout, so that streaming reads stay cheap.
func (c *conn) extend(ctx context.Context, io time.Duration) error {
	now := time.Now()
	d := now.Add(io)
	if dl, ok := ctx.Deadline(); ok && dl.Before(d) {
		d = dl
	}
	if !c.deadline.IsZero() && d.Sub(c.deadline) < io/4 && !d.Before(c.deadline) {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	c.deadline = d
	return c.nc.SetDeadline(d)
}

// readLine returns the next line without its "\r\n" or "\n". The slice is
// only valid until the next read.
func (c *conn) readLine() ([]byte, error) {
	line, err := c.r.ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, fmt.Errorf("%w: line longer than %d bytes", ErrProtocol, bufSize)
		}
		return nil, err
	}
	c.got = true
	line = line[:len(line)-1]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, nil
}

// replyError turns a memcached error reply into an error, or returns nil.
func replyError(line []byte) error {
	switch {
	case string(line) == "ERROR":
		return fmt.Errorf("%w: ERROR (command unknown to this memcached)", ErrProtocol)
	case hasPrefix(line, "CLIENT_ERROR"), hasPrefix(line, "SERVER_ERROR"), hasPrefix(line, "ERROR "):
		return fmt.Errorf("%w: %s", ErrProtocol, truncate(line))
	}
	return nil
}

func hasPrefix(b []byte, p string) bool { return len(b) >= len(p) && string(b[:len(p)]) == p }

func truncate(b []byte) string {
	if len(b) > 120 {
		return string(b[:120]) + "..."
	}
	return string(b)
}
