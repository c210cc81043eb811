package memcache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	gomemcache "github.com/bradfitz/gomemcache/memcache"
)

// Server is one memcached server of a Cluster. Its methods are safe for
// concurrent use. The key operations (Get, Delete, Set, FlushAll, Ping) go
// through gomemcache, one client per server, each command bounded by
// Options.IOTimeout; the commands gomemcache lacks (Version, Stats, Crawl,
// Watch) use this package's own connections, bounded by their context and
// Options.IOTimeout. Every error is a *ServerError naming the server.
type Server struct {
	addr Address
	p    *pool
	io   time.Duration
	mc   *gomemcache.Client
}

// Addr returns the server address as configured.
func (s *Server) Addr() Address { return s.addr }

// String returns the server as configured, for logs and metric labels.
func (s *Server) String() string { return s.addr.Spec }

// maxKeyLen is memcached's key length limit.
const maxKeyLen = 250

// ValidKey reports whether memcached's text protocol accepts key: 1 to 250
// bytes, no control characters, spaces or DEL. Quotes, '+', '/' and '=' are
// fine.
func ValidKey(key string) bool {
	if len(key) == 0 || len(key) > maxKeyLen {
		return false
	}
	for i := 0; i < len(key); i++ {
		if key[i] <= ' ' || key[i] == 0x7f {
			return false
		}
	}
	return true
}

func checkKeys(keys []string) error {
	for _, k := range keys {
		if !ValidKey(k) {
			return fmt.Errorf("invalid memcached key %q", k)
		}
	}
	return nil
}

// Version returns the server's version string ("1.6.18"). It doubles as a
// health check.
func (s *Server) Version(ctx context.Context) (string, error) {
	var v string
	err := s.p.with(ctx, "version", func(c *conn) error {
		if err := c.extend(ctx, s.io); err != nil {
			return err
		}
		if _, err := c.w.WriteString("version\r\n"); err != nil {
			return err
		}
		if err := c.w.Flush(); err != nil {
			return err
		}
		line, err := c.readLine()
		if err != nil {
			return err
		}
		rest, ok := bytes.CutPrefix(line, []byte("VERSION "))
		if !ok {
			return fmt.Errorf("%w: %q", ErrProtocol, truncate(line))
		}
		v = string(rest)
		return nil
	})
	return v, err
}

// Item is a value returned by Get.
type Item struct {
	Key   string
	Value []byte
	Flags uint32
	CAS   uint64
}

// getBatch is how many keys one "gets" command (gomemcache's GetMulti)
// carries.
const getBatch = 100

// Get fetches keys with "gets" commands of up to 100 keys (keys missing on
// the server are simply not reported) and calls fn for each value found,
// through gomemcache. An error from fn aborts the call and is returned as
// is. gomemcache bounds each command by Options.IOTimeout and does not take
// a context: ctx is checked between commands.
func (s *Server) Get(ctx context.Context, keys []string, fn func(Item) error) error {
	if err := checkKeys(keys); err != nil {
		return &ServerError{Server: s.addr.Spec, Op: "get", Err: err}
	}
	for start := 0; start < len(keys); start += getBatch {
		if err := ctx.Err(); err != nil {
			return &ServerError{Server: s.addr.Spec, Op: "get", Err: err}
		}
		var items map[string]*gomemcache.Item
		err := s.once(func() (err error) {
			items, err = s.mc.GetMulti(keys[start:min(start+getBatch, len(keys))])
			return err
		})
		if err != nil {
			return s.keyError("get", err)
		}
		for _, it := range items {
			if err := fn(Item{Key: it.Key, Value: it.Value, Flags: it.Flags, CAS: it.CasID}); err != nil {
				return err
			}
		}
	}
	return nil
}

// keyParallelism is how many gomemcache operations run at once on one
// server for Delete and Set: gomemcache sends one command per round trip,
// so a few connections in parallel keep a long list of keys from costing a
// round trip each in sequence.
const keyParallelism = 8

// each runs op(i) for i in [0, n) on up to keyParallelism goroutines and
// returns the first error; no new op starts after an error or after ctx
// ended.
func (s *Server) each(ctx context.Context, opName string, n int, op func(i int) error) error {
	var (
		next  atomic.Int64
		mu    sync.Mutex
		first error
		wg    sync.WaitGroup
	)
	fail := func(err error) {
		mu.Lock()
		if first == nil {
			first = err
		}
		mu.Unlock()
	}
	failed := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return first != nil
	}
	for range min(n, keyParallelism) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || failed() {
					return
				}
				if err := ctx.Err(); err != nil {
					fail(&ServerError{Server: s.addr.Spec, Op: opName, Err: err})
					return
				}
				if err := op(i); err != nil {
					fail(s.keyError(opName, err))
					return
				}
			}
		}()
	}
	wg.Wait()
	return first
}

// Delete deletes keys through gomemcache, several at a time, and reports
// for each key whether it was there (DELETED) or not (NOT_FOUND). Deleting
// a missing key is not an error. After an error, keys not yet sent are
// reported as not found.
func (s *Server) Delete(ctx context.Context, keys []string) ([]bool, error) {
	if err := checkKeys(keys); err != nil {
		return nil, &ServerError{Server: s.addr.Spec, Op: "delete", Err: err}
	}
	found := make([]bool, len(keys))
	err := s.each(ctx, "delete", len(keys), func(i int) error {
		switch err := s.once(func() error { return s.mc.Delete(keys[i]) }); {
		case err == nil:
			found[i] = true
		case errors.Is(err, gomemcache.ErrCacheMiss):
		default:
			return err
		}
		return nil
	})
	return found, err
}

// Set stores items with the given time to live (whole seconds, at most 30
// days; 0 means no expiry) through gomemcache, several at a time.
// keystone-fanout itself writes only the heartbeat markers of its live index
// (internal/tokencache); tests and benchmarks write entries with it.
func (s *Server) Set(ctx context.Context, items []Item, ttl time.Duration) error {
	exp := int64(ttl / time.Second)
	if exp < 0 || exp > 30*24*3600 {
		return &ServerError{Server: s.addr.Spec, Op: "set", Err: fmt.Errorf("ttl %v out of range", ttl)}
	}
	for _, it := range items {
		if !ValidKey(it.Key) {
			return &ServerError{Server: s.addr.Spec, Op: "set", Err: fmt.Errorf("invalid memcached key %q", it.Key)}
		}
	}
	return s.each(ctx, "set", len(items), func(i int) error {
		it := &gomemcache.Item{Key: items[i].Key, Value: items[i].Value, Flags: items[i].Flags, Expiration: int32(exp)}
		return s.once(func() error { return s.mc.Set(it) })
	})
}

// once runs a gomemcache operation and, when it failed on a connection the
// server had closed, closes the other idle connections (likely closed too:
// a restarted server) and runs it again on a new one. gomemcache reuses
// idle connections without checking them. Every operation used here is
// idempotent.
func (s *Server) once(op func() error) error {
	err := op()
	if err != nil && isBrokenConn(err) {
		s.mc.Close() // the client stays usable
		err = op()
	}
	return err
}

// keyError wraps an error of a gomemcache operation.
func (s *Server) keyError(op string, err error) error {
	var se *ServerError
	if errors.As(err, &se) {
		return err
	}
	if errors.Is(err, gomemcache.ErrServerError) || errors.Is(err, gomemcache.ErrMalformedKey) ||
		strings.HasPrefix(err.Error(), "memcache: unexpected") || strings.HasPrefix(err.Error(), "memcache: corrupt") {
		err = fmt.Errorf("%w: %v", ErrProtocol, err)
	}
	var cte *gomemcache.ConnectTimeoutError
	if errors.As(err, &cte) {
		op += " (dial)"
		err = fmt.Errorf("%w: %v", context.DeadlineExceeded, err)
	}
	return &ServerError{Server: s.addr.Spec, Op: op, Err: err}
}

// FlushAll invalidates every item on the server (flush_all), through
// gomemcache.
func (s *Server) FlushAll(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return &ServerError{Server: s.addr.Spec, Op: "flush_all", Err: err}
	}
	if err := s.once(s.mc.FlushAll); err != nil {
		return s.keyError("flush_all", err)
	}
	return nil
}

// Ping checks that the server answers "version", through gomemcache.
func (s *Server) Ping(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return &ServerError{Server: s.addr.Spec, Op: "version", Err: err}
	}
	if err := s.once(s.mc.Ping); err != nil {
		return s.keyError("version", err)
	}
	return nil
}

// Stats runs "stats" or "stats <group>" (group "" for the general stats,
// "items", "slabs", ...) and returns the STAT lines as a map.
func (s *Server) Stats(ctx context.Context, group string) (map[string]string, error) {
	cmd := "stats\r\n"
	if group != "" {
		if !ValidKey(group) {
			return nil, &ServerError{Server: s.addr.Spec, Op: "stats", Err: fmt.Errorf("invalid stats group %q", group)}
		}
		cmd = "stats " + group + "\r\n"
	}
	out := map[string]string{}
	err := s.p.with(ctx, "stats", func(c *conn) error {
		if err := c.extend(ctx, s.io); err != nil {
			return err
		}
		if _, err := c.w.WriteString(cmd); err != nil {
			return err
		}
		if err := c.w.Flush(); err != nil {
			return err
		}
		for {
			line, err := c.readLine()
			if err != nil {
				return err
			}
			if string(line) == "END" {
				return nil
			}
			if err := replyError(line); err != nil {
				return err
			}
			rest, ok := bytes.CutPrefix(line, []byte("STAT "))
			if !ok {
				return fmt.Errorf("%w: %q", ErrProtocol, truncate(line))
			}
			k, v, _ := bytes.Cut(rest, []byte(" "))
			out[string(k)] = string(v)
		}
	})
	return out, err
}

// errorsIsServer reports whether err is a *ServerError, for callers that
// want the server name.
func errorsIsServer(err error) (*ServerError, bool) {
	var se *ServerError
	return se, errors.As(err, &se)
}
