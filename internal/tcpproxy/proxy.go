// Package tcpproxy is a small loopback TCP proxy for tests that need to break
// a connection the way a network or a broker does: close every connection
// (the peer went away), pause forwarding (a black hole: bytes stop flowing but
// nothing is closed, so only heartbeats notice), and refuse new connections
// (the peer is down).
//
// It is test infrastructure: it listens on 127.0.0.1 on a free port and
// forwards every accepted connection to one target address.
package tcpproxy

import (
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"time"
)

// Proxy forwards connections accepted on Addr to a target address.
// Its methods are safe for concurrent use.
type Proxy struct {
	target string
	ln     net.Listener

	mu       sync.Mutex
	conns    map[*pair]struct{}
	resumed  chan struct{} // closed while forwarding; open while paused
	refusing bool
	closed   bool
	accepted int

	wg sync.WaitGroup
}

// pair is one proxied connection: the accepted client side and the dialled
// upstream side.
type pair struct {
	client, upstream net.Conn
	once             sync.Once
	done             chan struct{} // closed by close
}

func (p *pair) close() {
	p.once.Do(func() {
		close(p.done)
		p.client.Close()
		p.upstream.Close()
	})
}

// DialTimeout bounds the proxy's connection to the target.
const DialTimeout = 5 * time.Second

// Start listens on a free loopback port and forwards to target ("host:port").
// Close it when done.
func Start(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return start(target, ln), nil
}

// StartTLS is Start with TLS terminated at the proxy: clients connect with
// TLS under cfg (its certificate, and ClientAuth/ClientCAs to require client
// certificates; GetConfigForClient lets a test rotate them), and the proxy
// forwards the plain bytes to target. A client whose handshake fails is
// disconnected. Tests use it to put TLS in front of a shared service they
// must not reconfigure (the machine's RabbitMQ).
func StartTLS(target string, cfg *tls.Config) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return start(target, tls.NewListener(ln, cfg)), nil
}

func start(target string, ln net.Listener) *Proxy {
	resumed := make(chan struct{})
	close(resumed)
	p := &Proxy{target: target, ln: ln, conns: map[*pair]struct{}{}, resumed: resumed}
	p.wg.Add(1)
	go p.acceptLoop()
	return p
}

// Addr is the proxy's listening address, "127.0.0.1:port".
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Target is the address connections are forwarded to.
func (p *Proxy) Target() string { return p.target }

// Accepted is how many connections the proxy has accepted and forwarded so
// far (refused ones are not counted).
func (p *Proxy) Accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepted
}

// Connections is the number of currently open proxied connections.
func (p *Proxy) Connections() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

// CloseConnections closes every open proxied connection, both sides, as a
// broker that drops its clients does. The proxy keeps accepting new ones.
// It returns how many connections were closed.
func (p *Proxy) CloseConnections() int {
	p.mu.Lock()
	pairs := make([]*pair, 0, len(p.conns))
	for c := range p.conns {
		pairs = append(pairs, c)
	}
	p.mu.Unlock()
	for _, c := range pairs {
		c.close()
	}
	return len(pairs)
}

// Pause stops forwarding bytes in both directions on every connection, open
// or new, without closing anything: the peers see a silent network. Resume
// undoes it.
func (p *Proxy) Pause() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.resumed:
		p.resumed = make(chan struct{})
	default: // already paused
	}
}

// Resume forwards again after Pause; data held meanwhile is delivered.
func (p *Proxy) Resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.resumed:
	default:
		close(p.resumed)
	}
}

// Refuse makes the proxy close new connections as soon as it accepts them
// (refuse=true), as a stopped broker would, or forward them again (false).
// Open connections are not affected; use CloseConnections too.
func (p *Proxy) Refuse(refuse bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.refusing = refuse
}

// Close stops listening, closes every connection and waits for the proxy's
// goroutines to end.
func (p *Proxy) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	p.mu.Unlock()
	err := p.ln.Close()
	p.Resume() // release copiers blocked on a pause
	p.CloseConnections()
	p.wg.Wait()
	return err
}

func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		p.mu.Lock()
		if p.closed || p.refusing {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.accepted++
		p.wg.Add(1)
		p.mu.Unlock()
		go p.serve(c)
	}
}

// serve dials the target for the accepted client and forwards both ways.
func (p *Proxy) serve(client net.Conn) {
	defer p.wg.Done()
	if tc, ok := client.(*tls.Conn); ok {
		tc.SetDeadline(time.Now().Add(DialTimeout))
		if err := tc.Handshake(); err != nil {
			client.Close()
			return
		}
		tc.SetDeadline(time.Time{})
	}
	up, err := net.DialTimeout("tcp", p.target, DialTimeout)
	if err != nil {
		client.Close()
		return
	}
	pr := &pair{client: client, upstream: up, done: make(chan struct{})}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		pr.close()
		return
	}
	p.conns[pr] = struct{}{}
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.conns, pr)
		p.mu.Unlock()
	}()
	finished := make(chan struct{}, 2)
	go func() { p.copy(pr, up, client); finished <- struct{}{} }()
	go func() { p.copy(pr, client, up); finished <- struct{}{} }()
	<-finished
	pr.close() // one direction ended: end the other
	<-finished
}

// copy forwards src to dst until either fails or pr is closed, waiting while
// the proxy is paused before each write.
func (p *Proxy) copy(pr *pair, dst, src net.Conn) {
	buf := make([]byte, 32*1024)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			resumed := p.resumed
			p.mu.Unlock()
			select {
			case <-resumed:
			case <-pr.done:
				return
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil { // io.EOF or a closed connection alike
			return
		}
	}
}
