package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// A minimal memcached text-protocol client, independent of the product's
// internal/memcache: the tests check the product with it.

func mcDial(addr string) (net.Conn, *bufio.Reader, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, nil, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c, bufio.NewReaderSize(c, 1<<16), nil
}

// mcSet stores value under key with no expiry.
func mcSet(addr, key string, value []byte) error {
	c, r, err := mcDial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := fmt.Fprintf(c, "set %s 0 0 %d\r\n%s\r\n", key, len(value), value); err != nil {
		return err
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != "STORED" {
		return fmt.Errorf("set %s: %q", key, strings.TrimSpace(line))
	}
	return nil
}

// mcPresent returns which of keys the server holds (values are read and
// discarded). It uses a pooled connection per server (polling loops would
// otherwise exhaust the loopback's ephemeral ports) and retries once on a
// fresh connection.
func mcPresent(addr string, keys []string) (map[string]bool, error) {
	if len(keys) == 0 {
		return map[string]bool{}, nil
	}
	c := mcPool.get(addr)
	c.mu.Lock()
	defer c.mu.Unlock()
	found, err := c.present(keys)
	if err != nil {
		c.reset()
		found, err = c.present(keys)
		if err != nil {
			c.reset()
		}
	}
	return found, err
}

// mcConn is one pooled connection to a memcached server.
type mcConn struct {
	mu   sync.Mutex
	addr string
	c    net.Conn
	r    *bufio.Reader
}

type connPool struct {
	mu    sync.Mutex
	conns map[string]*mcConn
}

var mcPool = &connPool{conns: map[string]*mcConn{}}

func (p *connPool) get(addr string) *mcConn {
	p.mu.Lock()
	defer p.mu.Unlock()
	c := p.conns[addr]
	if c == nil {
		c = &mcConn{addr: addr}
		p.conns[addr] = c
	}
	return c
}

func (c *mcConn) reset() {
	if c.c != nil {
		c.c.Close()
	}
	c.c, c.r = nil, nil
}

func (c *mcConn) present(keys []string) (map[string]bool, error) {
	if c.c == nil {
		conn, r, err := mcDial(c.addr)
		if err != nil {
			return nil, err
		}
		c.c, c.r = conn, r
	}
	c.c.SetDeadline(time.Now().Add(10 * time.Second))
	found := map[string]bool{}
	r := c.r
	const batch = 100
	for start := 0; start < len(keys); start += batch {
		chunk := keys[start:min(start+batch, len(keys))]
		if _, err := fmt.Fprintf(c.c, "get %s\r\n", strings.Join(chunk, " ")); err != nil {
			return nil, err
		}
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return nil, err
			}
			line = strings.TrimRight(line, "\r\n")
			if line == "END" {
				break
			}
			f := strings.Fields(line)
			if len(f) < 4 || f[0] != "VALUE" {
				return nil, fmt.Errorf("memcached %s: unexpected answer %q", c.addr, line)
			}
			n, err := strconv.Atoi(f[3])
			if err != nil {
				return nil, fmt.Errorf("memcached %s: bad length in %q", c.addr, line)
			}
			if _, err := io.CopyN(io.Discard, r, int64(n)+2); err != nil {
				return nil, err
			}
			found[f[1]] = true
		}
	}
	return found, nil
}

// presentIn returns the keys that any of the servers holds, by key, with
// the server holding them.
func presentIn(servers []string, keys []string) (map[string]string, error) {
	out := map[string]string{}
	for _, s := range servers {
		found, err := mcPresent(s, keys)
		if err != nil {
			return nil, fmt.Errorf("memcached %s: %w", s, err)
		}
		for k := range found {
			out[k] = s
		}
	}
	return out, nil
}
