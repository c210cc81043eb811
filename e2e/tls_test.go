package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache/memcachetest"
	"github.com/keystone-fanout/keystone-fanout/internal/tcpproxy"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// tlsEnv is the PKI of a deployment with envOptions.tls: one CA (ca.pem)
// that signs the servers' certificate (server.pem, for 127.0.0.1 and
// localhost: the test's NATS server, the TLS proxy in front of RabbitMQ and
// every memcached) and one client certificate per process (<name>.pem),
// which the servers require. rotate replaces them all, in place.
type tlsEnv struct {
	dir                           string
	caFile, serverCert, serverKey string

	mu      sync.Mutex
	mcProxy map[string][]*tcpproxy.Proxy // by region: the agents' paths to memcached
	ca      *testutil.CA
	clients []string // names of the client certificates issued
	gen     int
}

func newTLSEnv(t *testing.T) *tlsEnv {
	t.Helper()
	dir := t.TempDir()
	x := &tlsEnv{dir: dir, caFile: filepath.Join(dir, "ca.pem"),
		serverCert: filepath.Join(dir, "server.pem"), serverKey: filepath.Join(dir, "server-key.pem")}
	x.clientFiles(t, "e2e-checks")
	x.rotate(t)
	return x
}

// rotate makes a new CA and writes it, the server certificate and every
// client certificate it signs over the old files.
func (x *tlsEnv) rotate(t testing.TB) *testutil.CA {
	t.Helper()
	x.mu.Lock()
	defer x.mu.Unlock()
	x.gen++
	ca := testutil.NewCA(t, fmt.Sprintf("keystone-fanout e2e CA %d", x.gen))
	ca.Issue(t, x.serverCert, x.serverKey, testutil.Leaf{Name: "e2e server", Hosts: []string{"127.0.0.1", "localhost"}})
	for _, name := range x.clients {
		cert, key := x.paths(name)
		ca.Issue(t, cert, key, testutil.Leaf{Name: name, Client: true})
	}
	ca.WriteCA(t, x.caFile)
	x.ca = ca
	return ca
}

func (x *tlsEnv) paths(name string) (cert, key string) {
	return filepath.Join(x.dir, name+".pem"), filepath.Join(x.dir, name+"-key.pem")
}

// clientFiles issues name's client certificate (once) and returns its files.
func (x *tlsEnv) clientFiles(t testing.TB, name string) (cert, key string) {
	t.Helper()
	x.mu.Lock()
	defer x.mu.Unlock()
	cert, key = x.paths(name)
	for _, n := range x.clients {
		if n == name {
			return cert, key
		}
	}
	x.clients = append(x.clients, name)
	if x.ca != nil {
		x.ca.Issue(t, cert, key, testutil.Leaf{Name: name, Client: true})
	}
	return cert, key
}

// filesConfig is the servers' TLS configuration as the files say now: their
// certificate, and client certificates required and checked against ca.pem.
func (x *tlsEnv) filesConfig() (*tls.Config, error) {
	pair, err := tls.LoadX509KeyPair(x.serverCert, x.serverKey)
	if err != nil {
		return nil, err
	}
	pem, err := os.ReadFile(x.caFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("no certificate in " + x.caFile)
	}
	return &tls.Config{Certificates: []tls.Certificate{pair}, ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs: pool, MinVersion: tls.VersionTLS12}, nil
}

// serverConfig is filesConfig, read once (the NATS server's: restarting it
// takes new files).
func (x *tlsEnv) serverConfig(t testing.TB) *tls.Config {
	t.Helper()
	cfg, err := x.filesConfig()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// proxyConfig reads the files at every handshake (the RabbitMQ proxy's).
func (x *tlsEnv) proxyConfig(testing.TB) *tls.Config {
	return &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) { return x.filesConfig() }}
}

// memcachedOptions start memcached with the files (client certificates
// required) and a plain listener for the test; none without TLS.
func (x *tlsEnv) memcachedOptions() memcachetest.Options {
	if x == nil {
		return memcachetest.Options{}
	}
	return memcachetest.Options{TLSFiles: &memcachetest.TLSFiles{CA: x.caFile, Cert: x.serverCert, Key: x.serverKey, ClientCA: x.caFile}}
}

// memcachedList is the agent's --memcached: the region's servers, through
// proxies that forward the TLS connections (so that the test can end them
// without restarting memcached, which keystonemiddleware's client would
// then avoid for minutes); without TLS the servers themselves.
func (x *tlsEnv) memcachedList(t testing.TB, r *region) string {
	if x == nil {
		return memcachetest.List(r.servers)
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.mcProxy == nil {
		x.mcProxy = map[string][]*tcpproxy.Proxy{}
	}
	var addrs []string
	for _, s := range r.servers {
		px, err := tcpproxy.Start(s.Addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { px.Close() })
		x.mcProxy[r.name] = append(x.mcProxy[r.name], px)
		addrs = append(addrs, px.Addr())
	}
	return strings.Join(addrs, ",")
}

// natsOptions are the TLS options of the test's own NATS connection, which
// reads the files at every (re)connection too; none without TLS.
func (x *tlsEnv) natsOptions(t testing.TB) []nats.Option {
	if x == nil {
		return nil
	}
	cert, key := x.clientFiles(t, "e2e-checks")
	return []nats.Option{nats.ClientTLSConfig(
		func() (tls.Certificate, error) { return tls.LoadX509KeyPair(cert, key) },
		func() (*x509.CertPool, error) {
			cfg, err := x.filesConfig()
			if err != nil {
				return nil, err
			}
			return cfg.ClientCAs, nil
		})}
}

func (x *tlsEnv) natsArgs(t testing.TB, name string) []string {
	cert, key := x.clientFiles(t, name)
	return []string{"--nats-tls-ca", x.caFile, "--nats-tls-cert", cert, "--nats-tls-key", key}
}

// agentArgs are an agent's TLS flags: NATS and memcached with its own
// client certificate; none without TLS.
func (x *tlsEnv) agentArgs(t testing.TB, region string) []string {
	if x == nil {
		return nil
	}
	name := "agent-" + region
	cert, key := x.clientFiles(t, name)
	return append(x.natsArgs(t, name), "--memcached-tls", "--memcached-tls-ca", x.caFile,
		"--memcached-tls-cert", cert, "--memcached-tls-key", key)
}

// bridgeArgs are a bridge's TLS flags: NATS and RabbitMQ (amqps through the
// TLS proxy); none without TLS.
func (x *tlsEnv) bridgeArgs(t testing.TB, name string) []string {
	if x == nil {
		return nil
	}
	cert, key := x.clientFiles(t, name)
	return append(x.natsArgs(t, name), "--amqp-tls-ca", x.caFile, "--amqp-tls-cert", cert, "--amqp-tls-key", key)
}

// rotateTLS writes a new CA and new certificates over the old files and makes
// the servers use them: the NATS server restarts, the RabbitMQ proxy (which
// reads the files at each handshake) drops its connections, every memcached
// reads them again (refresh_certs) and the agents' connections to it are
// ended. The bridges and agents keep running: their next connections must
// present the new client certificates and trust the new CA.
func (e *env) rotateTLS() {
	t := e.t
	t.Helper()
	e.tls.rotate(t)
	for _, n := range e.nodes {
		n.opts.TLS = e.tls.serverConfig(t)
		n.restart(t)
	}
	e.amqpProxy.CloseConnections()
	for _, r := range e.regions {
		for _, s := range r.servers {
			if err := s.RefreshCerts(); err != nil {
				t.Fatal(err)
			}
		}
		for _, px := range e.tls.mcProxy[r.name] {
			px.CloseConnections()
		}
	}
}

// waitAllReady waits until every bridge and agent answers /readyz with 200.
func (e *env) waitAllReady() {
	e.t.Helper()
	for _, p := range e.allProcs() {
		p.waitReady(readyTimeout)
	}
}

func (p *proc) startCount() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.starts
}

// logHas reports whether p's log has a line holding every one of parts.
func (p *proc) logHas(parts ...string) bool {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return false
	}
lines:
	for _, l := range strings.Split(string(b), "\n") {
		for _, s := range parts {
			if !strings.Contains(l, s) {
				continue lines
			}
		}
		return true
	}
	return false
}

// TestTLSRotation runs every link over TLS with client certificates —
// bridge and agents to NATS, bridge to RabbitMQ (amqps, through a
// TLS-terminating proxy), agents to memcached — with the usual workload and
// end checks; then replaces the CA, the servers' and every client's
// certificates on disk and restarts the servers with them, and proves that
// the same bridge and agent processes, not restarted, connect again with
// the new files and invalidate the next events.
func TestTLSRotation(t *testing.T) {
	e := newEnv(t, envOptions{tls: true})
	w := e.work
	if e.amqpProxy.Accepted() == 0 {
		t.Fatal("expected the bridge to connect to RabbitMQ through the TLS proxy; it did not")
	}

	victims := w.victims(len(w.bounded), 1)
	unrelated, _ := w.unrelated(12)
	e.writeEntries(append(allEntries(victims), unrelated...))
	msgs, outs := w.mixed(victims)
	e.publishNow(msgs, outs)
	e.verify(expect{gone: victimTokens(victims), kept: entryTokens(unrelated)})

	starts := map[string]int{}
	for _, p := range e.allProcs() {
		starts[p.name] = p.startCount()
	}
	accepted := e.amqpProxy.Accepted()
	mcAccepted := map[*tcpproxy.Proxy]int{}
	for _, pxs := range e.tls.mcProxy {
		for _, px := range pxs {
			mcAccepted[px] = px.Accepted()
		}
	}
	e.rotateTLS()
	// Connections with the old client certificates or the old CA cannot
	// succeed any more: a ready process has re-read its files.
	e.waitAllReady()
	testutil.Eventually(t, readyTimeout, "the bridge to connect to RabbitMQ again through the TLS proxy", func() (bool, string) {
		return e.amqpProxy.Accepted() > accepted && e.amqpProxy.Connections() > 0,
			fmt.Sprintf("%d connections accepted (%d before the rotation), %d open", e.amqpProxy.Accepted(), accepted, e.amqpProxy.Connections())
	})
	for _, p := range e.allProcs() {
		if n := p.startCount(); n != starts[p.name] || !p.running() {
			t.Fatalf("%s was started %d times (%d before the rotation), running: %v; expected the same process", p.name, n, starts[p.name], p.running())
		}
		flags := []string{"--nats-tls-ca", "--nats-tls-cert", "--memcached-tls-ca", "--memcached-tls-cert"}
		if strings.HasPrefix(p.name, "bridge") {
			flags = []string{"--nats-tls-ca", "--nats-tls-cert", "--amqp-tls-ca", "--amqp-tls-cert"}
		}
		for _, flag := range flags {
			// The test copies the process's output to its log a moment later.
			testutil.Eventually(t, 10*time.Second, fmt.Sprintf("%s: a log line saying %s was re-read after the rotation", p.name, flag), func() (bool, string) {
				return p.logHas("TLS file changed on disk", flag), "not in its log"
			})
		}
	}

	for px, n := range mcAccepted {
		if px.Accepted() == n {
			t.Errorf("expected the agent to connect again to memcached %s after the rotation; no new connection", px.Target())
		}
	}

	victims = w.victims(len(w.bounded), 1)
	unrelated, _ = w.unrelated(12)
	e.writeEntries(append(allEntries(victims), unrelated...))
	msgs, outs = w.mixed(victims)
	e.publishNow(msgs, outs)
	e.verify(expect{gone: victimTokens(victims), kept: entryTokens(unrelated)})
}

// TestTLSClientCertificateProblems: an agent's client certificate is
// replaced on disk, while it runs, first by an expired one (refused by the
// agent itself: it keeps the last good one, says so in its log naming
// --nats-tls-cert and counts it), then by one of a CA the servers do not
// trust (the NATS server refuses it: /readyz names the flag and the file),
// then by a good one again (it recovers without a restart).
func TestTLSClientCertificateProblems(t *testing.T) {
	e := newEnv(t, envOptions{tls: true, regions: 1, serversPerRegion: 1})
	r := e.regions[0]
	cert, key := e.tls.clientFiles(t, "agent-"+r.name)
	reconnect := func() {
		for _, px := range r.natsProxy {
			px.CloseConnections()
		}
	}

	e.tls.mu.Lock()
	ca := e.tls.ca
	e.tls.mu.Unlock()
	ca.Issue(t, cert, key, testutil.Leaf{Name: "expired", Client: true, NotAfter: time.Now().Add(-time.Minute)})
	reconnect()
	testutil.Eventually(t, readyTimeout, "the agent to log that its new client certificate expired", func() (bool, string) {
		return r.agent.logHas("cannot be used", "--nats-tls-cert", "expired"), r.agent.logTail(5)
	})
	r.agent.waitReady(readyTimeout) // on the last good certificate
	m, err := r.agent.metrics()
	if err != nil {
		t.Fatal(err)
	}
	if n := m.sum("keystone_fanout_tls_reload_errors_total", "flag", "--nats-tls-cert"); n < 1 {
		t.Errorf("keystone_fanout_tls_reload_errors_total{flag=\"--nats-tls-cert\"} = %v, want at least 1", n)
	}

	testutil.NewCA(t, "untrusted CA").Issue(t, cert, key, testutil.Leaf{Name: "untrusted", Client: true})
	reconnect()
	want := "--nats-tls-cert " + cert
	var readyz string
	testutil.Eventually(t, readyTimeout, "the agent's /readyz to name "+want, func() (bool, string) {
		code, body, err := httpGet("http://" + r.agent.addr() + "/readyz")
		if err != nil {
			return false, err.Error()
		}
		readyz = fmt.Sprintf("%d %s", code, strings.TrimSpace(body))
		return code == http.StatusServiceUnavailable && strings.Contains(body, want), readyz
	})
	t.Logf("/readyz with an untrusted client certificate: %s", readyz)

	ca.Issue(t, cert, key, testutil.Leaf{Name: "agent-" + r.name, Client: true})
	r.agent.waitReady(readyTimeout)
	victims := e.work.victims(4, 1)
	e.writeEntries(allEntries(victims))
	msgs, outs := e.work.mixed(victims)
	e.publishNow(msgs, outs)
	e.verify(expect{gone: victimTokens(victims)})
}
