// Package tcpproxy is a small loopback TCP proxy for tests that need to break
// a connection the way a network or a broker does: close every connection
// (the peer went away), pause forwarding (a black hole: bytes stop flowing but
// nothing is closed, so only heartbeats notice), and refuse new connections
// (the peer is down).
//
// It is test infrastructure: it listens on 127.0.0.1 on a free port (or the
// address StartWith is given) and forwards every accepted connection to one
// target address. StartWith can also delay each direction, as a long network
// link does, and every proxy counts the bytes it forwards each way.
package tcpproxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Proxy forwards connections accepted on Addr to a target address.
// Its methods are safe for concurrent use.
type Proxy struct {
	target string
	ln     net.Listener
	o      Options

	up, down atomic.Int64 // bytes written to the target, to the clients

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

// Options shape a proxy made with StartWith. The zero value is Start's proxy:
// loopback, no delay.
type Options struct {
	// Listen is the address to listen on, "host:port"; default "127.0.0.1:0"
	// (a free loopback port).
	Listen string
	// Up delays the bytes going to the target, Down those coming back.
	Up, Down Delay
}

// Delay holds back every chunk of bytes read from one side for Base plus a
// uniformly random offset in [-Jitter, +Jitter] before writing it to the
// other side, but never before the previous chunk of the same connection and
// direction: a chunk is delivered at max(previous delivery, arrival + Base +
// offset). Bytes are never reordered (TCP would not reorder them either), so
// jitter bunches chunks instead: the delay a chunk sees is at least
// Base-Jitter. The zero Delay forwards at once.
type Delay struct {
	Base, Jitter time.Duration
}

// Validate checks the options without listening; it returns every problem.
func (o Options) Validate() error {
	var errs []error
	if o.Listen != "" {
		if _, _, err := net.SplitHostPort(o.Listen); err != nil {
			errs = append(errs, fmt.Errorf("tcpproxy: listen address %q: %w", o.Listen, err))
		}
	}
	for _, d := range []struct {
		name string
		d    Delay
	}{{"up", o.Up}, {"down", o.Down}} {
		if d.d.Base < 0 || d.d.Jitter < 0 {
			errs = append(errs, fmt.Errorf("tcpproxy: %s delay %s ± %s: negative", d.name, d.d.Base, d.d.Jitter))
		} else if d.d.Jitter > d.d.Base {
			errs = append(errs, fmt.Errorf("tcpproxy: %s delay %s ± %s: the jitter exceeds the delay", d.name, d.d.Base, d.d.Jitter))
		}
	}
	return errors.Join(errs...)
}

// Start listens on a free loopback port and forwards to target ("host:port").
// Close it when done.
func Start(target string) (*Proxy, error) { return StartWith(target, Options{}) }

// StartWith listens as o says and forwards to target ("host:port"), delaying
// each direction by o.Up and o.Down. Invalid options are an error before
// anything listens. Close it when done.
func StartWith(target string, o Options) (*Proxy, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if o.Listen == "" {
		o.Listen = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return nil, err
	}
	return start(target, ln, o), nil
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
	return start(target, tls.NewListener(ln, cfg), Options{}), nil
}

func start(target string, ln net.Listener, o Options) *Proxy {
	resumed := make(chan struct{})
	close(resumed)
	p := &Proxy{target: target, ln: ln, o: o, conns: map[*pair]struct{}{}, resumed: resumed}
	p.wg.Add(1)
	go p.acceptLoop()
	return p
}

// Bytes returns how many bytes the proxy has written to the target (up) and
// back to its clients (down) so far, over every connection.
func (p *Proxy) Bytes() (up, down int64) { return p.up.Load(), p.down.Load() }

// Addr is the proxy's listening address, "host:port" ("127.0.0.1:port" for
// Start).
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
	go func() { p.copy(pr, up, client, p.o.Up, &p.up); finished <- struct{}{} }()
	go func() { p.copy(pr, client, up, p.o.Down, &p.down); finished <- struct{}{} }()
	<-finished
	pr.close() // one direction ended: end the other
	<-finished
}

// copy forwards src to dst until either fails or pr is closed, waiting while
// the proxy is paused before each write, and counts the bytes written. With a
// delay, a reader queues timed chunks and a writer delivers them in order;
// when src ends, what was read is still delivered before copy returns.
func (p *Proxy) copy(pr *pair, dst, src net.Conn, d Delay, written *atomic.Int64) {
	if d == (Delay{}) {
		buf := make([]byte, 32*1024)
		for {
			n, err := src.Read(buf)
			if n > 0 && !p.write(pr, dst, buf[:n], written) {
				return
			}
			if err != nil { // io.EOF or a closed connection alike
				return
			}
		}
	}
	type chunk struct {
		b  []byte
		at time.Time
	}
	queue := make(chan chunk, 1024)
	wrote := make(chan struct{})
	go func() {
		defer close(wrote)
		timer := time.NewTimer(0)
		defer timer.Stop()
		for c := range queue {
			if wait := time.Until(c.at); wait > 0 {
				timer.Reset(wait)
				select {
				case <-timer.C:
				case <-pr.done:
					return
				}
			}
			if !p.write(pr, dst, c.b, written) {
				pr.close() // the reader may be blocked on a full queue
				return
			}
		}
	}()
	defer func() { <-wrote }()
	defer close(queue)
	var last time.Time
	for {
		buf := make([]byte, 32*1024)
		n, err := src.Read(buf)
		if n > 0 {
			at := time.Now().Add(d.Base)
			if d.Jitter > 0 {
				at = at.Add(time.Duration(rand.Int64N(int64(2*d.Jitter)+1)) - d.Jitter)
			}
			if at.Before(last) {
				at = last
			}
			last = at
			select {
			case queue <- chunk{b: buf[:n], at: at}:
			case <-pr.done:
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// write writes b to dst once the proxy is not paused; false when the
// connection is closed or the write failed.
func (p *Proxy) write(pr *pair, dst net.Conn, b []byte, written *atomic.Int64) bool {
	p.mu.Lock()
	resumed := p.resumed
	p.mu.Unlock()
	select {
	case <-resumed:
	case <-pr.done:
		return false
	}
	n, err := dst.Write(b)
	written.Add(int64(n))
	return err == nil
}
