package memcache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"
)

// Server is one memcached server of a Cluster. Its methods are safe for
// concurrent use; each call uses its own pooled connection and is bounded by
// its context and Options.IOTimeout. Every error is a *ServerError naming the
// server.
type Server struct {
	addr Address
	p    *pool
	io   time.Duration
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

// Get fetches keys with one "gets" command (keys missing on the server are
// simply not reported) and calls fn for each value found. Item.Value is only
// valid during fn; copy it to keep it. An error from fn aborts the call and
// is returned as is.
func (s *Server) Get(ctx context.Context, keys []string, fn func(Item) error) error {
	if len(keys) == 0 {
		return nil
	}
	if err := checkKeys(keys); err != nil {
		return &ServerError{Server: s.addr.Spec, Op: "get", Err: err}
	}
	var fnErr error
	var buf []byte
	err := s.p.with(ctx, "get", func(c *conn) error {
		if err := c.extend(ctx, s.io); err != nil {
			return err
		}
		c.w.WriteString("gets")
		for _, k := range keys {
			c.w.WriteByte(' ')
			c.w.WriteString(k)
		}
		c.w.WriteString("\r\n")
		if err := c.w.Flush(); err != nil {
			return err
		}
		for {
			if err := c.extend(ctx, s.io); err != nil {
				return err
			}
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
			it, size, err := parseValueLine(line)
			if err != nil {
				return err
			}
			if cap(buf) < size+2 {
				buf = make([]byte, size+2)
			}
			buf = buf[:size+2]
			if _, err := io.ReadFull(c.r, buf); err != nil {
				return err
			}
			if buf[size] != '\r' || buf[size+1] != '\n' {
				return fmt.Errorf("%w: value of %q not followed by CRLF", ErrProtocol, it.Key)
			}
			it.Value = buf[:size]
			if fnErr == nil {
				fnErr = fn(it)
			}
			// keep reading to END so that the connection stays usable
		}
	})
	if err != nil {
		return err
	}
	return fnErr
}

// parseValueLine parses "VALUE <key> <flags> <bytes> [<cas>]".
func parseValueLine(line []byte) (Item, int, error) {
	bad := func() (Item, int, error) {
		return Item{}, 0, fmt.Errorf("%w: %q", ErrProtocol, truncate(line))
	}
	rest, ok := bytes.CutPrefix(line, []byte("VALUE "))
	if !ok {
		return bad()
	}
	f := bytes.Fields(rest)
	if len(f) != 3 && len(f) != 4 {
		return bad()
	}
	flags, err1 := strconv.ParseUint(string(f[1]), 10, 32)
	size, err2 := strconv.Atoi(string(f[2]))
	if err1 != nil || err2 != nil || size < 0 || size > 1<<30 {
		return bad()
	}
	it := Item{Key: string(f[0]), Flags: uint32(flags)}
	if len(f) == 4 {
		cas, err := strconv.ParseUint(string(f[3]), 10, 64)
		if err != nil {
			return bad()
		}
		it.CAS = cas
	}
	return it, size, nil
}

// maxPipeline bounds how many commands are written before their replies are
// read, so that neither side's socket buffer can fill up.
const maxPipeline = 256

// Delete deletes keys, pipelined, and reports for each key whether it was
// there (DELETED) or not (NOT_FOUND). Deleting a missing key is not an error.
func (s *Server) Delete(ctx context.Context, keys []string) ([]bool, error) {
	if err := checkKeys(keys); err != nil {
		return nil, &ServerError{Server: s.addr.Spec, Op: "delete", Err: err}
	}
	found := make([]bool, len(keys))
	for start := 0; start < len(keys); start += maxPipeline {
		chunk := keys[start:min(start+maxPipeline, len(keys))]
		err := s.p.with(ctx, "delete", func(c *conn) error {
			if err := c.extend(ctx, s.io); err != nil {
				return err
			}
			for _, k := range chunk {
				c.w.WriteString("delete ")
				c.w.WriteString(k)
				c.w.WriteString("\r\n")
			}
			if err := c.w.Flush(); err != nil {
				return err
			}
			for i := range chunk {
				if err := c.extend(ctx, s.io); err != nil {
					return err
				}
				line, err := c.readLine()
				if err != nil {
					return err
				}
				switch string(line) {
				case "DELETED":
					found[start+i] = true
				case "NOT_FOUND":
				default:
					if err := replyError(line); err != nil {
						return err
					}
					return fmt.Errorf("%w: %q", ErrProtocol, truncate(line))
				}
			}
			return nil
		})
		if err != nil {
			return found, err
		}
	}
	return found, nil
}

// Set stores items with the given time to live (whole seconds, at most 30
// days; 0 means no expiry), pipelined. It exists for tests and benchmarks:
// keystone-fanout itself never writes.
func (s *Server) Set(ctx context.Context, items []Item, ttl time.Duration) error {
	exp := int64(ttl / time.Second)
	if exp < 0 || exp > 30*24*3600 {
		return &ServerError{Server: s.addr.Spec, Op: "set", Err: fmt.Errorf("ttl %v out of range", ttl)}
	}
	for start := 0; start < len(items); start += maxPipeline {
		chunk := items[start:min(start+maxPipeline, len(items))]
		err := s.p.with(ctx, "set", func(c *conn) error {
			if err := c.extend(ctx, s.io); err != nil {
				return err
			}
			for _, it := range chunk {
				if !ValidKey(it.Key) {
					return fmt.Errorf("invalid memcached key %q", it.Key)
				}
				fmt.Fprintf(c.w, "set %s %d %d %d\r\n", it.Key, it.Flags, exp, len(it.Value))
				c.w.Write(it.Value)
				c.w.WriteString("\r\n")
			}
			if err := c.w.Flush(); err != nil {
				return err
			}
			for range chunk {
				if err := c.extend(ctx, s.io); err != nil {
					return err
				}
				line, err := c.readLine()
				if err != nil {
					return err
				}
				if string(line) != "STORED" {
					if err := replyError(line); err != nil {
						return err
					}
					return fmt.Errorf("%w: %q", ErrProtocol, truncate(line))
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// FlushAll invalidates every item on the server (flush_all).
func (s *Server) FlushAll(ctx context.Context) error {
	return s.simple(ctx, "flush_all", "flush_all\r\n", "OK")
}

func (s *Server) simple(ctx context.Context, op, cmd, want string) error {
	return s.p.with(ctx, op, func(c *conn) error {
		if err := c.extend(ctx, s.io); err != nil {
			return err
		}
		if _, err := c.w.WriteString(cmd); err != nil {
			return err
		}
		if err := c.w.Flush(); err != nil {
			return err
		}
		line, err := c.readLine()
		if err != nil {
			return err
		}
		if string(line) != want {
			if err := replyError(line); err != nil {
				return err
			}
			return fmt.Errorf("%w: %q", ErrProtocol, truncate(line))
		}
		return nil
	})
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
