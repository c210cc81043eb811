// Package keystonetest runs a real Keystone for tests: Debian's keystone 22
// package served by Debian's uwsgi, backed by a database of its own on the
// MariaDB at 127.0.0.1:3306, with a fernet key repository in a temporary
// directory, on a free loopback port.
//
// Install what it needs with install-deps.sh (beside this file) first. Start
// takes several seconds (db_sync, bootstrap, uwsgi loading Keystone), so a package
// starts one Keystone in TestMain and shares it between its tests; every test
// then creates the users, projects and groups it needs under unique names.
//
// Set KEYSTONE_FANOUT_TEST_KEEP=1 to keep Keystone's directory (configuration
// and logs) after Close. A test binary killed before its cleanup leaves a
// database and a directory behind; the next Start removes them.
//
// The harness talks to uwsgi with "Connection: close" on every request: uwsgi's
// http-socket closes the connection after each response without saying so, and a
// client that reuses such a connection sees spurious EOFs.
package keystonetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Paths of the Debian programs the harness runs.
const (
	KeystoneManage = "/usr/bin/keystone-manage"
	KeystoneWSGI   = "/usr/bin/keystone-wsgi-public"
	UWSGI          = "/usr/bin/uwsgi"
	MariaDBClient  = "/usr/bin/mariadb"
)

// EtcKeystone is where a packaged Keystone keeps its configuration and keys.
// The harness's Keystone must need nothing from there: see Keystone.Isolated.
const EtcKeystone = "/etc/keystone"

// keyRepositories are the key directories the harness makes in its own
// directory and names in keystone.conf. A repository left unnamed defaults to
// a directory under /etc/keystone, which a fresh machine does not have.
var keyRepositories = []string{"fernet-keys", "fernet-receipts", "credential-keys"}

// dbPrefix starts the name of every database the harness creates; the owning
// process id follows, so that databases left behind by a killed test binary can
// be recognised and dropped by a later Start.
const dbPrefix = "keystone_fanout_test_"

// Options configures a Keystone started by Start. The zero value is usable.
type Options struct {
	// MySQLAddr is the MariaDB server, "host:port", reached as root without a
	// password. Default: $KEYSTONE_FANOUT_TEST_MYSQL_ADDR, else "127.0.0.1:3306".
	MySQLAddr string
	// Notifications, when set, makes Keystone publish its notifications to
	// RabbitMQ (driver messagingv2). Default: none (driver noop).
	Notifications *Notifications
	// TokenExpiration is Keystone's [token] expiration. Default 1 h.
	TokenExpiration time.Duration
	// TLS serves Keystone over HTTPS with a certificate for 127.0.0.1 signed by a
	// CA the harness generates; Keystone.CAFile is that CA's PEM file.
	TLS bool
	// NoCache turns Keystone's own cache off. By default Keystone caches in
	// memory ([cache] backend dogpile.cache.memory), as production Keystone
	// does in memcached: without it every authenticated request costs about
	// 200 SQL queries (250 ms here). An in-memory cache is per process, so with
	// it uwsgi runs one process (Threads threads), keeping cache invalidation
	// (for example of revocation events) exact.
	NoCache bool
	// Processes and Threads are uwsgi's worker counts. Default 1 process (more
	// only with NoCache) and 8 threads.
	Processes, Threads int
	// StartTimeout bounds each of the setup commands and the wait for uwsgi to
	// answer. Default 90 s.
	StartTimeout time.Duration
}

// Notifications points Keystone's notifications at a RabbitMQ exchange.
type Notifications struct {
	// TransportURL is oslo.messaging's transport_url, for example
	// "rabbit://guest:guest@127.0.0.1:5672/".
	TransportURL string
	// ControlExchange is the exchange Keystone publishes to (the [DEFAULT]
	// control_exchange). Default "keystone"; tests sharing a broker should use a
	// unique name.
	ControlExchange string
	// Format is "basic" or "cadf" ([DEFAULT] notification_format). Default "cadf".
	Format string
	// Topics is [oslo_messaging_notifications] topics. Default "notifications".
	// The routing key is "<topic>.info", and oslo.messaging declares and binds
	// a queue of that name, which fills up when nobody reads it: tests sharing
	// a broker use a unique topic and delete that queue and the exchange at the
	// end (see TestNotifications).
	Topics string
}

// Keystone is a running Keystone. Its methods are safe for concurrent use.
type Keystone struct {
	// URL is the v3 endpoint, for example "http://127.0.0.1:41234/v3".
	URL string
	// Admin credentials created by keystone-manage bootstrap: user AdminUser
	// with password AdminPassword has role "admin" on project AdminProject; both
	// are in domain "Default".
	AdminUser, AdminPassword, AdminProject, Domain string
	// Region is the region id created by bootstrap.
	Region string
	// CAFile is the PEM file of the CA that signed Keystone's certificate when
	// Options.TLS is set, else empty.
	CAFile string
	// Dir holds keystone.conf, the fernet keys and the logs.
	Dir string
	// Database is the MariaDB database Keystone uses.
	Database string
	// Isolated reports that keystone-manage and uwsgi ran where /etc/keystone
	// is empty, so this Keystone depends on nothing a packaged Keystone left
	// there: true when there is no /etc/keystone, or when the harness runs as
	// root with unshare(1), which gives each of those programs a private mount
	// namespace with an empty tmpfs over /etc/keystone.
	Isolated bool

	opts     Options
	port     int
	client   *http.Client
	mu       sync.Mutex
	cmd      *exec.Cmd
	waitDone chan struct{}
	waitErr  error
	token    string // cached admin token
	closed   bool
	hideEtc  bool // run Keystone's programs with /etc/keystone hidden
}

// Start creates a database and the fernet and credential key repositories,
// runs keystone-manage db_sync and bootstrap, and starts uwsgi serving
// Keystone on a free loopback port. It returns when Keystone answers GET /v3.
// On error everything it made is removed again.
func Start(ctx context.Context, o Options) (*Keystone, error) {
	if o.MySQLAddr == "" {
		o.MySQLAddr = os.Getenv("KEYSTONE_FANOUT_TEST_MYSQL_ADDR")
	}
	if o.MySQLAddr == "" {
		o.MySQLAddr = "127.0.0.1:3306"
	}
	if o.TokenExpiration <= 0 {
		o.TokenExpiration = time.Hour
	}
	if o.Processes <= 0 {
		o.Processes = 1
	}
	if o.Processes > 1 && !o.NoCache {
		return nil, errors.New("keystonetest: Processes > 1 needs NoCache: an in-memory cache is per process")
	}
	if o.Threads <= 0 {
		o.Threads = 8
	}
	if o.StartTimeout <= 0 {
		o.StartTimeout = 90 * time.Second
	}
	if n := o.Notifications; n != nil {
		if n.TransportURL == "" {
			return nil, errors.New("keystonetest: Notifications.TransportURL is required")
		}
		if n.Format != "" && n.Format != "basic" && n.Format != "cadf" {
			return nil, fmt.Errorf("keystonetest: Notifications.Format %q: want basic or cadf", n.Format)
		}
	}
	for _, p := range []string{KeystoneManage, KeystoneWSGI, UWSGI, MariaDBClient} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("keystonetest: %s missing (run internal/keystonetest/install-deps.sh as root): %w", p, err)
		}
	}

	k := &Keystone{
		AdminUser:     "admin",
		AdminPassword: "admin-" + randomHex(8),
		AdminProject:  "admin",
		Domain:        "Default",
		Region:        "RegionOne",
		opts:          o,
	}
	ok := false
	defer func() {
		if !ok {
			_ = k.Close()
		}
	}()

	k.dropStale(ctx)
	k.Isolated, k.hideEtc = isolation()

	dir, err := os.MkdirTemp("", fmt.Sprintf("keystonetest-%d-", os.Getpid()))
	if err != nil {
		return nil, fmt.Errorf("keystonetest: %w", err)
	}
	k.Dir = dir
	for _, d := range keyRepositories {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			return nil, fmt.Errorf("keystonetest: %w", err)
		}
	}

	db := fmt.Sprintf("%s%d_%s", dbPrefix, os.Getpid(), randomHex(4))
	if err := k.mysql(ctx, "CREATE DATABASE "+db+" CHARACTER SET utf8mb4"); err != nil {
		return nil, err
	}
	k.Database = db

	scheme := "http"
	tlsCfg := &tls.Config{}
	if o.TLS {
		scheme = "https"
		caPEM, err := writeTLSFiles(dir)
		if err != nil {
			return nil, err
		}
		k.CAFile = filepath.Join(dir, "ca.pem")
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(caPEM)
		tlsCfg.RootCAs = pool
	}
	k.client = &http.Client{
		Timeout:   30 * time.Second,
		Transport: &http.Transport{TLSClientConfig: tlsCfg, DisableKeepAlives: true},
	}

	if err := os.WriteFile(k.confPath(), []byte(k.keystoneConf()), 0o600); err != nil {
		return nil, fmt.Errorf("keystonetest: %w", err)
	}

	// fernet_setup and credential_setup would each start Python for what
	// amounts to writing two random keys: write them directly.
	for _, d := range keyRepositories {
		if err := writeFernetKeys(filepath.Join(dir, d)); err != nil {
			return nil, err
		}
	}
	if err := k.manage(ctx, "db_sync"); err != nil {
		return nil, err
	}
	// The port is picked as late as possible; should another process take it
	// before uwsgi binds it, pick another (bootstrap updates the catalog).
	for attempt := 1; ; attempt++ {
		if k.port, err = pickPort(); err != nil {
			return nil, err
		}
		k.URL = fmt.Sprintf("%s://127.0.0.1:%d/v3", scheme, k.port)
		if err := os.WriteFile(filepath.Join(dir, "uwsgi.ini"), []byte(k.uwsgiINI()), 0o600); err != nil {
			return nil, fmt.Errorf("keystonetest: %w", err)
		}
		if err := k.manage(ctx, "bootstrap",
			"--bootstrap-username", k.AdminUser,
			"--bootstrap-password", k.AdminPassword,
			"--bootstrap-project-name", k.AdminProject,
			"--bootstrap-role-name", "admin",
			"--bootstrap-service-name", "keystone",
			"--bootstrap-region-id", k.Region,
			"--bootstrap-public-url", k.URL,
			"--bootstrap-internal-url", k.URL,
			"--bootstrap-admin-url", k.URL,
		); err != nil {
			return nil, err
		}
		err := k.StartServer(ctx)
		if err == nil {
			break
		}
		if attempt == 3 || !strings.Contains(err.Error(), "Address already in use") {
			return nil, err
		}
	}
	ok = true
	return k, nil
}

// TB is the part of testing.TB that StartTest uses.
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
	Cleanup(func())
	Context() context.Context
}

// StartTest starts a Keystone for one test and removes it when the test ends.
// A Keystone that cannot start fails the test: it is a required service.
func StartTest(t TB, o Options) *Keystone {
	t.Helper()
	k, err := Start(t.Context(), o)
	if err != nil {
		t.Fatalf("starting Keystone: %v", err)
	}
	t.Cleanup(func() { _ = k.Close() })
	return k
}

// Addr is the "host:port" Keystone listens on.
func (k *Keystone) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(k.port)) }

// HTTPClient is a client that trusts Keystone's certificate (when TLS is on)
// and does not keep connections alive.
func (k *Keystone) HTTPClient() *http.Client { return k.client }

// StopServer stops uwsgi (SIGTERM to its process group, SIGKILL after 10 s) and
// waits for it to exit. The database and keys stay: StartServer brings the same
// Keystone back on the same port. Stopping a stopped server does nothing.
func (k *Keystone) StopServer() error {
	k.mu.Lock()
	cmd, done := k.cmd, k.waitDone
	k.cmd = nil
	k.mu.Unlock()
	if cmd == nil {
		return nil
	}
	pgid := cmd.Process.Pid
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-done
	}
	// Workers may outlive the master by a moment; make sure the group is gone.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	return nil
}

// StartServer starts uwsgi for this Keystone and waits until GET /v3 answers
// 200. It fails when uwsgi exits or does not answer within StartTimeout; the
// error carries the end of uwsgi's log.
func (k *Keystone) StartServer(ctx context.Context) error {
	k.mu.Lock()
	if k.cmd != nil {
		k.mu.Unlock()
		return nil
	}
	logf, err := os.OpenFile(filepath.Join(k.Dir, "uwsgi.out"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		k.mu.Unlock()
		return fmt.Errorf("keystonetest: %w", err)
	}
	argv := k.argv(UWSGI, "--ini", filepath.Join(k.Dir, "uwsgi.ini"))
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = k.Dir
	cmd.Env = debianEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own process group, so that StopServer reaches the workers too; and die
	// with the test binary rather than linger.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		k.mu.Unlock()
		logf.Close()
		return fmt.Errorf("keystonetest: starting %s: %w", UWSGI, err)
	}
	done := make(chan struct{})
	k.cmd, k.waitDone = cmd, done
	k.mu.Unlock()
	go func() {
		err := cmd.Wait()
		logf.Close()
		k.mu.Lock()
		k.waitErr = err
		k.mu.Unlock()
		close(done)
	}()

	ctx, cancel := context.WithTimeout(ctx, k.opts.StartTimeout)
	defer cancel()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	exited := func() error {
		k.mu.Lock()
		k.cmd = nil
		werr := k.waitErr
		k.mu.Unlock()
		return fmt.Errorf("keystonetest: uwsgi exited (%v) before answering; log:\n%s", werr, k.LogTail(4000))
	}
	var last error
	for {
		select {
		case <-done:
			return exited()
		default:
		}
		if err := k.ping(ctx); err == nil {
			return nil
		} else {
			last = err
		}
		select {
		case <-done:
			return exited()
		case <-ctx.Done():
			_ = k.StopServer()
			return fmt.Errorf("keystonetest: Keystone did not answer within %s (last: %v); log:\n%s",
				k.opts.StartTimeout, last, k.LogTail(4000))
		case <-tick.C:
		}
	}
}

// ping sends GET /v3 with a short timeout and wants 200.
func (k *Keystone) ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.URL, nil)
	if err != nil {
		return err
	}
	req.Close = true
	resp, err := k.client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", k.URL, resp.Status)
	}
	return nil
}

// LogTail returns up to n bytes from the end of Keystone's and uwsgi's logs.
func (k *Keystone) LogTail(n int) string {
	var b strings.Builder
	for _, f := range []string{"keystone.log", "uwsgi.log", "uwsgi.out"} {
		data, err := os.ReadFile(filepath.Join(k.Dir, f))
		if err != nil || len(data) == 0 {
			continue
		}
		if len(data) > n {
			data = data[len(data)-n:]
		}
		fmt.Fprintf(&b, "==> %s <==\n%s\n", f, data)
	}
	return b.String()
}

// Close stops uwsgi, drops the database and removes the directory. It is safe
// to call more than once.
func (k *Keystone) Close() error {
	k.mu.Lock()
	if k.closed {
		k.mu.Unlock()
		return nil
	}
	k.closed = true
	k.mu.Unlock()
	err := k.StopServer()
	if k.Database != "" {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if derr := k.mysql(ctx, "DROP DATABASE IF EXISTS "+k.Database); derr != nil && err == nil {
			err = derr
		}
	}
	if k.Dir != "" && os.Getenv("KEYSTONE_FANOUT_TEST_KEEP") == "" {
		if rerr := os.RemoveAll(k.Dir); rerr != nil && err == nil {
			err = rerr
		}
	}
	return err
}

func (k *Keystone) confPath() string { return filepath.Join(k.Dir, "keystone.conf") }

func (k *Keystone) keystoneConf() string {
	host, port, _ := net.SplitHostPort(k.opts.MySQLAddr)
	var b strings.Builder
	fmt.Fprintf(&b, `[DEFAULT]
log_file = %s
use_stderr = false
debug = false
`, filepath.Join(k.Dir, "keystone.log"))
	n := k.opts.Notifications
	if n != nil {
		exchange, format, topics := n.ControlExchange, n.Format, n.Topics
		if exchange == "" {
			exchange = "keystone"
		}
		if format == "" {
			format = "cadf"
		}
		if topics == "" {
			topics = "notifications"
		}
		fmt.Fprintf(&b, "control_exchange = %s\nnotification_format = %s\n", exchange, format)
		fmt.Fprintf(&b, "\n[oslo_messaging_notifications]\ndriver = messagingv2\ntransport_url = %s\ntopics = %s\n", n.TransportURL, topics)
	} else {
		b.WriteString("\n[oslo_messaging_notifications]\ndriver = noop\n")
	}
	fmt.Fprintf(&b, `
[database]
connection = mysql+pymysql://root@%s:%s/%s

[token]
provider = fernet
expiration = %d

[fernet_tokens]
key_repository = %s

[fernet_receipts]
key_repository = %s

[credential]
key_repository = %s

[identity]
# bcrypt's minimum cost: these are throw-away test passwords.
password_hash_rounds = 4

[cache]
enabled = %t
backend = dogpile.cache.memory
`, host, port, k.Database, int(k.opts.TokenExpiration/time.Second),
		filepath.Join(k.Dir, "fernet-keys"), filepath.Join(k.Dir, "fernet-receipts"),
		filepath.Join(k.Dir, "credential-keys"), !k.opts.NoCache)
	return b.String()
}

func (k *Keystone) uwsgiINI() string {
	socket := fmt.Sprintf("http-socket = 127.0.0.1:%d", k.port)
	if k.opts.TLS {
		socket = fmt.Sprintf("https-socket = 127.0.0.1:%d,%s,%s", k.port,
			filepath.Join(k.Dir, "server.pem"), filepath.Join(k.Dir, "server-key.pem"))
	}
	return fmt.Sprintf(`[uwsgi]
plugins = python3
%s
wsgi-file = %s
master = true
processes = %d
threads = %d
enable-threads = true
lazy-apps = true
need-app = true
die-on-term = true
no-orphans = true
buffer-size = 65535
env = OS_KEYSTONE_CONFIG_FILES=%s
logto = %s
`, socket, KeystoneWSGI, k.opts.Processes, k.opts.Threads, k.confPath(), filepath.Join(k.Dir, "uwsgi.log"))
}

// manage runs keystone-manage with this Keystone's configuration.
func (k *Keystone) manage(ctx context.Context, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, k.opts.StartTimeout)
	defer cancel()
	argv := k.argv(KeystoneManage, append([]string{"--config-file", k.confPath()}, args...)...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Dir = k.Dir
	cmd.Env = debianEnv()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("keystonetest: keystone-manage %s: %w\n%s\n%s", args[0], err, out, k.LogTail(3000))
	}
	return nil
}

// unshare is util-linux's unshare(1).
const unshare = "/usr/bin/unshare"

// isolation decides whether Keystone's programs can run without seeing
// /etc/keystone (isolated), and whether that needs hiding it (hide).
func isolation() (isolated, hide bool) {
	if _, err := os.Stat(EtcKeystone); errors.Is(err, os.ErrNotExist) {
		return true, false
	}
	if os.Geteuid() != 0 {
		return false, false
	}
	if _, err := os.Stat(unshare); err != nil {
		return false, false
	}
	return true, true
}

// argv is the command line that runs program with args: as it is, or, when
// /etc/keystone is to be hidden, through unshare(1) in a mount namespace of
// its own where an empty tmpfs covers /etc/keystone. unshare and the shell
// exec the program, so it keeps the process id (and process group) that the
// harness signals.
func (k *Keystone) argv(program string, args ...string) []string {
	if !k.hideEtc {
		return append([]string{program}, args...)
	}
	script := "mount -t tmpfs -o mode=0755,size=64k keystonetest-empty " + EtcKeystone + ` && exec "$@"`
	return append([]string{unshare, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "keystonetest", program}, args...)
}

// mysql runs one statement with the mariadb client as root over TCP.
func (k *Keystone) mysql(ctx context.Context, stmt string) error {
	_, err := k.mysqlOutput(ctx, stmt)
	return err
}

func (k *Keystone) mysqlOutput(ctx context.Context, stmt string) (string, error) {
	host, port, err := net.SplitHostPort(k.opts.MySQLAddr)
	if err != nil {
		return "", fmt.Errorf("keystonetest: MySQLAddr %q: %w", k.opts.MySQLAddr, err)
	}
	cmd := exec.CommandContext(ctx, MariaDBClient, "--protocol=TCP", "-h", host, "-P", port, "-u", "root",
		"--batch", "--skip-column-names", "-e", stmt)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("keystonetest: MariaDB at %s as root (%q): %w: %s", k.opts.MySQLAddr, stmt, err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

var staleDB = regexp.MustCompile(`^` + dbPrefix + `([0-9]+)_[0-9a-f]+$`)

var staleDir = regexp.MustCompile(`^keystonetest-([0-9]+)-[0-9]+$`)

// dropStale drops databases and removes directories left by harness processes
// that no longer exist (a test binary killed before its cleanup).
func (k *Keystone) dropStale(ctx context.Context) {
	if entries, err := os.ReadDir(os.TempDir()); err == nil {
		for _, e := range entries {
			m := staleDir.FindStringSubmatch(e.Name())
			if m == nil || !e.IsDir() {
				continue
			}
			if pid, err := strconv.Atoi(m[1]); err == nil && pid != os.Getpid() && !alive(pid) {
				_ = os.RemoveAll(filepath.Join(os.TempDir(), e.Name()))
			}
		}
	}
	out, err := k.mysqlOutput(ctx, "SHOW DATABASES LIKE '"+dbPrefix+"%'")
	if err != nil {
		return
	}
	for _, name := range strings.Fields(out) {
		m := staleDB.FindStringSubmatch(name)
		if m == nil {
			continue
		}
		pid, err := strconv.Atoi(m[1])
		if err != nil || pid == os.Getpid() {
			continue
		}
		if !alive(pid) {
			_ = k.mysql(ctx, "DROP DATABASE IF EXISTS "+name)
		}
	}
}

// alive reports whether a process with this id exists.
func alive(pid int) bool {
	return !errors.Is(syscall.Kill(pid, 0), syscall.ESRCH)
}

// debianEnv is the environment for Debian's Python programs: without the
// variables of another Python installation (pyenv) and with /usr/bin first.
func debianEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch {
		case name == "PYTHONPATH", name == "PYTHONHOME", name == "PYTHONSTARTUP",
			name == "VIRTUAL_ENV", strings.HasPrefix(name, "PYENV"), name == "PATH":
			continue
		case strings.HasPrefix(name, "OS_"): // an openstack client's settings
			continue
		}
		env = append(env, kv)
	}
	return append(env, "PATH=/usr/sbin:/usr/bin:/sbin:/bin")
}

// writeFernetKeys fills an empty key repository the way keystone-manage
// fernet_setup does: key 0 (staged) and key 1 (primary), each the URL-safe
// base64 of 32 random bytes.
func writeFernetKeys(dir string) error {
	for _, name := range []string{"0", "1"} {
		key := make([]byte, 32)
		_, _ = rand.Read(key)
		enc := base64.URLEncoding.EncodeToString(key)
		if err := os.WriteFile(filepath.Join(dir, name), []byte(enc), 0o600); err != nil {
			return fmt.Errorf("keystonetest: writing fernet key: %w", err)
		}
	}
	return nil
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("keystonetest: finding a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// pickPort chooses uwsgi's port; tests replace it.
var pickPort = freePort
