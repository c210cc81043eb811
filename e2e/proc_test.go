package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// proc is one keystone-fanout process (a bridge or an agent). Its stdout and
// stderr go to a log file (printed when the test fails); its /healthz,
// /readyz and /metrics address is read from its own log line, since it is
// started with --http-addr 127.0.0.1:0.
type proc struct {
	t       testing.TB
	name    string
	args    []string
	logPath string
	// wrap, when not empty, is the command the binary runs under (ip netns
	// exec NAME for an agent in its region's network namespace).
	wrap []string

	mu       sync.Mutex
	cmd      *exec.Cmd
	exited   chan struct{}
	exitErr  error
	expected bool // the current run is being stopped or killed by the test
	httpAddr string
	addrSeen chan struct{}
	starts   int
	// unexpected lists exits the test did not cause.
	unexpected []string
}

// opsLogMessage is what internal/ops logs, with "addr", when it listens.
const opsLogMessage = "serving health, readiness and metrics"

func newProc(t testing.TB, logDir, name string, args ...string) *proc {
	return &proc{t: t, name: name, args: args, logPath: filepath.Join(logDir, name+".log")}
}

// start runs the process and waits until it serves /readyz with 200.
func (p *proc) start(readyTimeout time.Duration) {
	p.t.Helper()
	p.startNoWait()
	p.waitReady(readyTimeout)
}

// startNoWait runs the process and waits only for its HTTP address.
func (p *proc) startNoWait() {
	p.t.Helper()
	p.mu.Lock()
	if p.cmd != nil {
		p.mu.Unlock()
		p.t.Fatalf("%s: start while it runs", p.name)
	}
	f, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		p.mu.Unlock()
		p.t.Fatalf("%s: log file: %v", p.name, err)
	}
	p.starts++
	argv := append(append(append([]string(nil), p.wrap...), binary), p.args...)
	fmt.Fprintf(f, "=== %s start #%d at %s: %s\n", p.name, p.starts, time.Now().Format(time.RFC3339Nano),
		strings.Join(argv, " "))
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = cleanProcessEnv()
	w := &logScanner{f: f, onAddr: p.setAddr}
	cmd.Stdout = w
	cmd.Stderr = w
	p.addrSeen = make(chan struct{})
	p.httpAddr = ""
	if err := cmd.Start(); err != nil {
		f.Close()
		p.mu.Unlock()
		p.t.Fatalf("%s: starting %s: %v", p.name, binary, err)
	}
	p.cmd = cmd
	p.expected = false
	exited := make(chan struct{})
	p.exited = exited
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		w.flush()
		fmt.Fprintf(f, "=== %s exited at %s: %v\n", p.name, time.Now().Format(time.RFC3339Nano), err)
		f.Close()
		p.mu.Lock()
		p.exitErr = err
		if !p.expected {
			p.unexpected = append(p.unexpected, fmt.Sprintf("%s (start #%d) exited by itself: %v", p.name, p.starts, err))
		}
		if p.cmd == cmd {
			p.cmd = nil
		}
		p.mu.Unlock()
		close(exited)
	}()

	select {
	case <-p.addrSeen:
	case <-exited:
		p.t.Fatalf("%s exited before serving HTTP: %v\n%s", p.name, p.exitErr, p.logTail(60))
	case <-time.After(30 * time.Second):
		p.t.Fatalf("%s did not log %q within 30s\n%s", p.name, opsLogMessage, p.logTail(60))
	}
}

func (p *proc) setAddr(addr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.httpAddr == "" {
		p.httpAddr = addr
		close(p.addrSeen)
	}
}

// addr is the HTTP address of the current run.
func (p *proc) addr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.httpAddr
}

// running reports whether the process is running.
func (p *proc) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil
}

// unexpectedExits lists the exits the test did not cause.
func (p *proc) unexpectedExits() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.unexpected...)
}

// waitReady polls /readyz until it answers 200.
func (p *proc) waitReady(timeout time.Duration) {
	p.t.Helper()
	testutil.Eventually(p.t, timeout, p.name+" /readyz to answer 200", func() (bool, string) {
		if !p.running() {
			return false, "the process is not running"
		}
		code, body, err := httpGet("http://" + p.addr() + "/readyz")
		if err != nil {
			return false, err.Error()
		}
		return code == http.StatusOK, fmt.Sprintf("%d %s", code, strings.TrimSpace(body))
	})
}

// kill sends SIGKILL (a crash) and waits for the exit.
func (p *proc) kill() { p.signal(syscall.SIGKILL, 10*time.Second) }

func (p *proc) signal(sig syscall.Signal, timeout time.Duration) {
	p.t.Helper()
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	if cmd == nil {
		p.mu.Unlock()
		return
	}
	p.expected = true
	p.mu.Unlock()
	_ = cmd.Process.Signal(sig)
	select {
	case <-exited:
	case <-time.After(timeout):
		_ = cmd.Process.Kill()
		<-exited
		p.t.Errorf("%s did not exit within %s of %v; killed\n%s", p.name, timeout, sig, p.logTail(40))
	}
}

// metrics scrapes /metrics.
func (p *proc) metrics() (metricSet, error) {
	code, body, err := httpGet("http://" + p.addr() + "/metrics")
	if err != nil {
		return nil, err
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("/metrics answered %d", code)
	}
	return parseMetrics(body), nil
}

// logTail returns the last n lines of the log file.
func (p *proc) logTail(n int) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(log %s: %v)", p.logPath, err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("... (%d earlier lines in %s)", len(lines)-n, p.logPath)}, lines[len(lines)-n:]...)
	}
	return fmt.Sprintf("----- %s (%s) -----\n%s\n----- end of %s -----", p.name, p.logPath, strings.Join(lines, "\n"), p.name)
}

// cleanProcessEnv is the test's environment without KEYSTONE_FANOUT_*
// settings, so that only the flags the test gives apply.
func cleanProcessEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "KEYSTONE_FANOUT_") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// logScanner writes a process's output to its log file and watches it for the
// line that gives the HTTP address.
type logScanner struct {
	mu     sync.Mutex
	f      *os.File
	buf    []byte
	onAddr func(string)
}

func (w *logScanner) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, err := w.f.Write(b); err != nil {
		return 0, err
	}
	w.buf = append(w.buf, b...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.line(w.buf[:i])
		w.buf = w.buf[i+1:]
	}
	return len(b), nil
}

func (w *logScanner) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 {
		w.line(w.buf)
		w.buf = nil
	}
}

func (w *logScanner) line(l []byte) {
	if !bytes.Contains(l, []byte(opsLogMessage)) {
		return
	}
	var rec struct {
		Msg  string `json:"msg"`
		Addr string `json:"addr"`
	}
	if json.Unmarshal(l, &rec) == nil && rec.Msg == opsLogMessage && rec.Addr != "" {
		w.onAddr(rec.Addr)
		return
	}
	// Text format: ... msg="serving health, readiness and metrics" addr=127.0.0.1:1234
	if i := bytes.Index(l, []byte(" addr=")); i >= 0 {
		rest := string(l[i+len(" addr="):])
		if j := strings.IndexByte(rest, ' '); j >= 0 {
			rest = rest[:j]
		}
		w.onAddr(strings.Trim(rest, `"`))
	}
}

var httpClient = &http.Client{Timeout: 5 * time.Second}

func httpGet(url string) (int, string, error) {
	resp, err := httpClient.Get(url)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

// metricSet is a scraped /metrics page: every sample by its name and labels.
type metricSet []metricSample

type metricSample struct {
	name   string
	labels map[string]string
	value  float64
}

// parseMetrics reads the Prometheus text format (enough of it for counters,
// gauges and histogram series).
func parseMetrics(text string) metricSet {
	var out metricSet
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		s := metricSample{labels: map[string]string{}}
		rest := line
		if i := strings.IndexByte(line, '{'); i >= 0 {
			j := strings.LastIndexByte(line, '}')
			if j < i {
				continue
			}
			s.name = line[:i]
			parseLabels(line[i+1:j], s.labels)
			rest = strings.TrimSpace(line[j+1:])
		} else {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			s.name, rest = f[0], f[1]
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		s.value = v
		out = append(out, s)
	}
	return out
}

func parseLabels(s string, into map[string]string) {
	for len(s) > 0 {
		eq := strings.IndexByte(s, '=')
		if eq < 0 || eq+1 >= len(s) || s[eq+1] != '"' {
			return
		}
		name := strings.TrimSpace(strings.TrimPrefix(s[:eq], ","))
		var val strings.Builder
		i := eq + 2
		for ; i < len(s) && s[i] != '"'; i++ {
			if s[i] == '\\' && i+1 < len(s) {
				i++
				switch s[i] {
				case 'n':
					val.WriteByte('\n')
				default:
					val.WriteByte(s[i])
				}
				continue
			}
			val.WriteByte(s[i])
		}
		into[name] = val.String()
		s = s[min(i+1, len(s)):]
		s = strings.TrimPrefix(s, ",")
	}
}

// sum adds up the samples of name whose labels include every given
// name/value pair.
func (m metricSet) sum(name string, labels ...string) float64 {
	var total float64
outer:
	for _, s := range m {
		if s.name != name {
			continue
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if s.labels[labels[i]] != labels[i+1] {
				continue outer
			}
		}
		total += s.value
	}
	return total
}

// byLabel returns the samples of name by the value of one label.
func (m metricSet) byLabel(name, label string) map[string]float64 {
	out := map[string]float64{}
	for _, s := range m {
		if s.name == name {
			out[s.labels[label]] += s.value
		}
	}
	return out
}
