// Package memcachetest runs real memcached processes (/usr/bin/memcached) for
// tests, on loopback ports memcached picks itself, and kills them when the
// test ends. A missing
// memcached binary fails the test: tests never skip for lack of a service.
package memcachetest

import (
	"bufio"
	"bytes"
	"cmp"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// Binary is the memcached executable the helpers run.
var Binary = "/usr/bin/memcached"

// Options tune the servers Start runs.
type Options struct {
	// MemoryMB is memcached -m. Default 64.
	MemoryMB int
	// TLS starts the servers with -Z and a certificate for "localhost" and
	// 127.0.0.1 signed by a fresh CA (written to Server.CAFile).
	TLS bool
	// TLSFiles starts the servers with -Z and these files instead (TLS is
	// then implied), and a second, plain listener (Server.PlainAddr) for
	// test clients without TLS. RefreshCerts makes the servers read them
	// again.
	TLSFiles *TLSFiles
	// Args are extra memcached arguments.
	Args []string
	// Env are extra environment variables ("NAME=value") of the process,
	// for example SASL_CONF_PATH for a server started with -S.
	Env []string
	// Listen is the address memcached listens on (-l); default 127.0.0.1.
	Listen string
	// Wrap, when not empty, is a command memcached runs under, for example
	// ip netns exec NAME to run it in a network namespace.
	Wrap []string
}

// TLSFiles are the PEM files of a TLS memcached: its certificate and key,
// and, when ClientCA is set, the CA its clients' certificates must be signed
// by (ssl_verify_mode=2: a client certificate is required).
type TLSFiles struct {
	CA, Cert, Key, ClientCA string
}

// Server is one memcached process.
type Server struct {
	// Addr is "127.0.0.1:<port>", stable across Restart.
	Addr string
	// PlainAddr is a listener without TLS of a server started with
	// TLSFiles (memcached's notls: listener), stable across Restart; else
	// Addr.
	PlainAddr string
	// CAFile is the PEM CA that signed the server certificate (TLS only).
	CAFile string

	t        testing.TB
	plain    bool // a second, notls listener
	args     []string
	portFile string
	env      []string
	host     string
	wrap     []string
	mu       sync.Mutex
	cmd      *exec.Cmd
	done     chan struct{}
	stderr   *bytes.Buffer
}

// Start runs n memcached servers with default options.
func Start(t testing.TB, n int) []*Server { return StartWith(t, n, Options{}) }

// StartWith runs n memcached servers. Each is killed when the test ends.
func StartWith(t testing.TB, n int, o Options) []*Server {
	t.Helper()
	if _, err := os.Stat(Binary); err != nil {
		t.Fatalf("memcachetest: %s is required (apt-get install memcached): %v", Binary, err)
	}
	if o.MemoryMB == 0 {
		o.MemoryMB = 64
	}
	var tlsArgs []string
	var caFile string
	switch {
	case o.TLSFiles != nil:
		caFile = o.TLSFiles.CA
		ext := "ssl_chain_cert=" + o.TLSFiles.Cert + ",ssl_key=" + o.TLSFiles.Key
		if o.TLSFiles.ClientCA != "" {
			ext += ",ssl_ca_cert=" + o.TLSFiles.ClientCA + ",ssl_verify_mode=2"
		}
		tlsArgs = []string{"-Z", "-o", ext}
	case o.TLS:
		caFile, tlsArgs = makeCerts(t)
	}
	out := make([]*Server, 0, n)
	for range n {
		s := &Server{t: t, CAFile: caFile, portFile: filepath.Join(t.TempDir(), "ports"), env: o.Env,
			host: cmp.Or(o.Listen, "127.0.0.1"), wrap: o.Wrap, plain: o.TLSFiles != nil}
		s.args = []string{"-U", "0", "-m", strconv.Itoa(o.MemoryMB), "-c", "1024", "-t", "2"}
		if os.Geteuid() == 0 {
			s.args = append(s.args, "-u", "root")
		}
		s.args = append(s.args, tlsArgs...)
		s.args = append(s.args, o.Args...)
		if err := s.start(); err != nil {
			t.Fatalf("memcachetest: starting memcached: %v", err)
		}
		t.Cleanup(s.Stop)
		out = append(out, s)
	}
	return out
}

// List returns the servers as a memcached_servers string
// ("127.0.0.1:p1,127.0.0.1:p2").
func List(servers []*Server) string {
	addrs := make([]string, len(servers))
	for i, s := range servers {
		addrs[i] = s.Addr
	}
	return strings.Join(addrs, ",")
}

// Addrs returns the servers' addresses.
func Addrs(servers []*Server) []string {
	addrs := make([]string, len(servers))
	for i, s := range servers {
		addrs[i] = s.Addr
	}
	return addrs
}

// start runs memcached: the first time on a port it picks (-p -1), which it
// writes to $MEMCACHED_PORT_FILENAME, then again on the same port.
func (s *Server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	port, plainPort := "-1", "-1"
	if s.Addr != "" {
		_, port, _ = net.SplitHostPort(s.Addr)
	}
	if s.PlainAddr != "" {
		_, plainPort, _ = net.SplitHostPort(s.PlainAddr)
	}
	listen := s.host
	if s.plain {
		listen += ",notls:" + s.host + ":" + plainPort
	}
	_ = os.Remove(s.portFile)
	argv := append(append(append([]string(nil), s.wrap...), Binary, "-p", port, "-l", listen), s.args...)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(append(os.Environ(), s.env...), "MEMCACHED_PORT_FILENAME="+s.portFile)
	var stderr bytes.Buffer
	cmd.Stdout = &stderr
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case <-done:
			return fmt.Errorf("memcached %v exited: %s", s.args, strings.TrimSpace(stderr.String()))
		default:
		}
		if s.Addr == "" {
			s.Addr, s.PlainAddr = boundAddr(s.portFile, s.host, s.plain)
		}
		if s.Addr != "" && s.plain && ping(s.PlainAddr, false) == nil {
			break
		}
		if s.Addr != "" && !s.plain && ping(s.Addr, s.CAFile != "" || slices.Contains(s.args, "-S") || slices.Contains(s.args, "-B")) == nil {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			<-done
			return fmt.Errorf("memcached on %s did not answer within 10s: %s", s.Addr, stderr.String())
		}
		time.Sleep(10 * time.Millisecond) // polling for readiness of an external process
	}
	s.cmd, s.done, s.stderr = cmd, done, &stderr
	return nil
}

// boundAddr reads the TCP ports memcached wrote to its port file ("TCP INET:
// 12345", one line per listener in -l order) on host; "" until they are
// there. plain says a second (notls) listener follows; without one,
// PlainAddr is addr.
func boundAddr(portFile, host string, plain bool) (addr, plainAddr string) {
	b, err := os.ReadFile(portFile)
	if err != nil {
		return "", ""
	}
	var addrs []string
	for _, line := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "TCP INET: "); ok {
			addrs = append(addrs, net.JoinHostPort(host, strings.TrimSpace(p)))
		}
	}
	switch {
	case !plain && len(addrs) >= 1:
		return addrs[0], addrs[0]
	case plain && len(addrs) >= 2:
		return addrs[0], addrs[1]
	}
	return "", ""
}

// RefreshCerts makes a server started with TLSFiles read its certificate,
// key and client CA again (memcached's refresh_certs, sent on PlainAddr).
// Connections already open keep their session.
func (s *Server) RefreshCerts() error {
	c, err := net.DialTimeout("tcp", s.PlainAddr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("refresh_certs\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "OK\r\n" {
		return fmt.Errorf("memcached %s: refresh_certs answered %q", s.Addr, strings.TrimSpace(line))
	}
	return nil
}

// ping connects and runs "version" (for TLS, SASL or binary-only servers
// only a TCP connect).
func ping(addr string, connectOnly bool) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	if connectOnly {
		return nil
	}
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("version\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "VERSION ") {
		return fmt.Errorf("unexpected answer %q", line)
	}
	return nil
}

// Stop kills the server (SIGKILL, as a crash) and waits for it. Its port is
// then closed: clients get "connection refused". Stop on a stopped server
// does nothing.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGCONT) // a paused process must run to die
	s.cmd.Process.Kill()
	<-s.done
	s.cmd = nil
}

// Restart starts a stopped server again on the same port, with an empty
// cache. It stops it first if it is running.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	var err error
	for attempt := 0; attempt < 50; attempt++ {
		if err = s.start(); err == nil {
			return
		}
		time.Sleep(20 * time.Millisecond) // the port may linger briefly after a kill
	}
	s.t.Fatalf("memcachetest: restarting %s: %v", s.Addr, err)
}

// Pause freezes the server (SIGSTOP): connections are accepted by the
// kernel but nothing is answered, like a hung server. Resume undoes it.
func (s *Server) Pause() { s.signal(syscall.SIGSTOP) }

// Resume continues a paused server (SIGCONT) with its cache intact.
func (s *Server) Resume() { s.signal(syscall.SIGCONT) }

func (s *Server) signal(sig syscall.Signal) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		s.t.Fatalf("memcachetest: %s is not running", s.Addr)
	}
	if err := s.cmd.Process.Signal(sig); err != nil {
		s.t.Fatalf("memcachetest: signalling %s: %v", s.Addr, err)
	}
}

// PID returns the process id of the running server, 0 when it is stopped.
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Running reports whether the process is running.
func (s *Server) Running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cmd != nil
}

// makeCerts writes a CA and a server certificate for localhost/127.0.0.1 and
// returns the CA file and the memcached TLS arguments.
func makeCerts(t testing.TB) (string, []string) {
	t.Helper()
	dir := t.TempDir()
	ca := testutil.NewCA(t, "memcachetest CA")
	caFile := ca.WriteCA(t, filepath.Join(dir, "ca.pem"))
	certFile, keyFile := filepath.Join(dir, "server.pem"), filepath.Join(dir, "server-key.pem")
	ca.Issue(t, certFile, keyFile, testutil.Leaf{Name: "localhost", Hosts: []string{"localhost", "127.0.0.1"}})
	return caFile, []string{"-Z", "-o", "ssl_chain_cert=" + certFile + ",ssl_key=" + keyFile}
}
