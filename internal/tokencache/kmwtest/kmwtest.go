// Package kmwtest writes and reads token cache entries exactly as
// keystonemiddleware 10.1 does, by running its own TokenCache /
// SecureTokenCache classes under Debian's /usr/bin/python3 (the formats:
// docs/INVALIDATION.md, "What keystonemiddleware stores"), and generates
// realistic Keystone token bodies. It also has a fast Go writer of the
// strategy-None format for benchmarks (WriteNone), checked against the
// middleware by this package's tests.
//
// A missing interpreter or missing Debian packages fail the test; nothing is
// skipped.
package kmwtest

import (
	"bufio"
	"bytes"
	_ "embed"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"
)

//go:embed kmw.py
var script string

// Python is the interpreter that has keystonemiddleware installed: Debian's,
// not the first python3 on PATH.
var Python = "/usr/bin/python3"

// Strategy is [keystone_authtoken] memcache_security_strategy.
type Strategy string

const (
	None    Strategy = "None"
	MAC     Strategy = "MAC"
	Encrypt Strategy = "ENCRYPT"
)

// Strategies lists every strategy, for table tests.
var Strategies = []Strategy{None, MAC, Encrypt}

// Entry is one token validation to cache: the token and the body Keystone
// returned for GET /v3/auth/tokens ({"token": {...}}).
type Entry struct {
	TokenID string
	Body    json.RawMessage
}

// Written reports where the middleware put an entry.
type Written struct {
	TokenID string
	// Key is the memcached key the middleware used.
	Key string
	// Server is the "host:port" python-memcache chose ("*" for
	// python-binary-memcached, which writes to every server).
	Server string
	// Stored says whether the middleware could read the entry back.
	Stored bool
}

// Cache is a running middleware token cache (one python process) for a
// server list and strategy. Its methods are safe for concurrent use.
type Cache struct {
	t      testing.TB
	cmd    *exec.Cmd
	in     io.WriteCloser
	out    *bufio.Reader
	stderr *bytes.Buffer
	mu     sync.Mutex
}

// Start runs the middleware's cache for servers ("host:port" each, in
// memcached_servers order), strategy and secret (ignored for None). The
// process ends with the test. cacheTime is token_cache_time; 0 means 300 s.
func Start(t testing.TB, servers []string, strategy Strategy, secret string, cacheTime time.Duration) *Cache {
	t.Helper()
	return StartWith(t, Options{Servers: servers, Strategy: strategy, Secret: secret, CacheTime: cacheTime})
}

// Client is the memcached client library the middleware stores through.
type Client string

const (
	// PythonMemcache is python-memcache, keystonemiddleware's default.
	PythonMemcache Client = "python-memcache"
	// BinaryMemcached is python-binary-memcached (Debian's
	// python3-binary-memcached, through oslo.cache's BMemcacheClientPool),
	// which newer keystonemiddleware releases use when
	// memcache_tls_enabled or memcache_sasl_enabled is set. It stores the
	// middleware's bytes with flags 16, zlib-compressed with flags 24 when
	// longer than 128 bytes, and writes every entry to every server.
	BinaryMemcached Client = "python-binary-memcached"
)

// Options configure StartWith.
type Options struct {
	Servers  []string
	Strategy Strategy
	Secret   string
	// CacheTime is token_cache_time; 0 means 300 s.
	CacheTime time.Duration
	// Client is the memcached library; default PythonMemcache.
	Client Client
	// TLSCA is a CA file: TLS towards memcached (BinaryMemcached only).
	TLSCA string
}

// StartWith runs the middleware's cache as o says; see Start.
func StartWith(t testing.TB, o Options) *Cache {
	t.Helper()
	servers, strategy, secret, cacheTime := o.Servers, o.Strategy, o.Secret, o.CacheTime
	if _, err := os.Stat(Python); err != nil {
		t.Fatalf("kmwtest: %s is required (Debian python3 with python3-keystonemiddleware): %v", Python, err)
	}
	if cacheTime == 0 {
		cacheTime = 300 * time.Second
	}
	cmd := exec.Command(Python, "-c", script)
	cmd.Env = cleanEnv()
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatalf("kmwtest: %v", err)
	}
	outPipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("kmwtest: %v", err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("kmwtest: starting %s: %v", Python, err)
	}
	c := &Cache{t: t, cmd: cmd, in: in, out: bufio.NewReaderSize(outPipe, 1<<20), stderr: &stderr}
	t.Cleanup(c.close)
	cfg := map[string]any{"servers": servers, "strategy": string(strategy), "secret": secret,
		"cache_time": int(cacheTime / time.Second), "client": string(o.Client), "tls_ca": o.TLSCA}
	var ready struct{ Ready bool }
	if err := c.roundTrip(cfg, &ready); err != nil || !ready.Ready {
		t.Fatalf("kmwtest: middleware cache did not start: %v\n%s", err, stderr.String())
	}
	return c
}

// cleanEnv drops variables that could point the Debian interpreter at
// another Python installation (pyenv and the like).
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "PYTHON") || strings.HasPrefix(kv, "PYENV") || strings.HasPrefix(kv, "VIRTUAL_ENV") {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "PYTHONDONTWRITEBYTECODE=1")
}

func (c *Cache) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd == nil {
		return
	}
	c.in.Close()
	done := make(chan struct{})
	go func() { c.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		c.cmd.Process.Kill()
		<-done
	}
	c.cmd = nil
}

func (c *Cache) roundTrip(req any, resp any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cmd == nil {
		return fmt.Errorf("kmwtest: cache process already closed")
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	if _, err := c.in.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("writing to python: %w (stderr: %s)", err, c.stderr.String())
	}
	line, err := c.out.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("reading from python: %w (stderr: %s)", err, c.stderr.String())
	}
	var e struct{ Error string }
	if json.Unmarshal(line, &e) == nil && e.Error != "" {
		return fmt.Errorf("python: %s (stderr: %s)", e.Error, c.stderr.String())
	}
	return json.Unmarshal(line, resp)
}

// Write caches entries through the middleware (TokenCache.set, with the body
// wrapped in keystoneclient's AccessInfoV3 exactly as fetch_token does) and
// reports where each went. It fails the test if the middleware reports an
// error; an entry that could not be stored (a server down) has Stored false.
func (c *Cache) Write(entries []Entry) []Written {
	c.t.Helper()
	type wire struct {
		TokenID string          `json:"token_id"`
		Body    json.RawMessage `json:"body"`
	}
	req := struct {
		Op      string `json:"op"`
		Entries []wire `json:"entries"`
	}{Op: "write"}
	for _, e := range entries {
		req.Entries = append(req.Entries, wire{e.TokenID, e.Body})
	}
	var resp struct {
		Written []struct {
			TokenID string `json:"token_id"`
			Key     string `json:"key"`
			Server  string `json:"server"`
			Stored  bool   `json:"stored"`
		} `json:"written"`
	}
	if err := c.roundTrip(req, &resp); err != nil {
		c.t.Fatalf("kmwtest: write: %v", err)
	}
	out := make([]Written, len(resp.Written))
	for i, w := range resp.Written {
		out[i] = Written{TokenID: w.TokenID, Key: w.Key, Server: w.Server, Stored: w.Stored}
	}
	return out
}

// Read looks tokens up through the middleware (TokenCache.get) and returns
// the cached data of those found, by token id. A token whose entry is gone,
// or whose MAC/ENCRYPT entry does not verify, is absent from the map.
func (c *Cache) Read(tokenIDs []string) map[string]json.RawMessage {
	c.t.Helper()
	req := struct {
		Op       string   `json:"op"`
		TokenIDs []string `json:"token_ids"`
	}{"read", tokenIDs}
	var resp struct {
		Read []struct {
			TokenID string          `json:"token_id"`
			Found   bool            `json:"found"`
			Data    json.RawMessage `json:"data"`
		} `json:"read"`
	}
	if err := c.roundTrip(req, &resp); err != nil {
		c.t.Fatalf("kmwtest: read: %v", err)
	}
	out := map[string]json.RawMessage{}
	for _, r := range resp.Read {
		if r.Found {
			out[r.TokenID] = r.Data
		}
	}
	return out
}

// Write caches entries through the middleware with a one-off process; see
// Cache.Write.
func Write(t testing.TB, servers []string, strategy Strategy, secret string, entries []Entry) []Written {
	t.Helper()
	c := Start(t, servers, strategy, secret, 0)
	defer c.close()
	return c.Write(entries)
}

// Read looks tokens up through the middleware with a one-off process; see
// Cache.Read.
func Read(t testing.TB, servers []string, strategy Strategy, secret string, tokenIDs []string) map[string]json.RawMessage {
	t.Helper()
	c := Start(t, servers, strategy, secret, 0)
	defer c.close()
	return c.Read(tokenIDs)
}
