package memcache

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"
)

// CrawlMode selects how "lru_crawler metadump" walks a server.
type CrawlMode string

const (
	// CrawlHash walks the hash table ("lru_crawler metadump hash"). Every
	// linked item is visited exactly once: the walk holds each bucket's
	// item lock and only skips items that are being freed. This is the mode
	// to use; see the package documentation for the measurements.
	CrawlHash CrawlMode = "hash"
	// CrawlLRU walks the LRU queues ("lru_crawler metadump all"). It skips
	// items whose lock or reference another thread holds at that instant
	// (items being read) and items that the LRU maintainer moves ahead of the
	// crawler, so it can miss exactly the entries in active use.
	CrawlLRU CrawlMode = "all"
	// CrawlKeys walks the hash table like CrawlHash but lists keys only
	// ("lru_crawler mgdump hash", memcached 1.6.19 and later): less for
	// memcached to format and for us to parse, and no CAS, expiry or size
	// (MetaItem.CAS is 0). Older servers answer ERROR
	// (ErrCrawlModeUnsupported).
	CrawlKeys CrawlMode = "keys"
)

// command is the request line of a crawl mode.
func (m CrawlMode) command() string {
	switch m {
	case CrawlHash:
		return "lru_crawler metadump hash\r\n"
	case CrawlLRU:
		return "lru_crawler metadump all\r\n"
	case CrawlKeys:
		return "lru_crawler mgdump hash\r\n"
	}
	return ""
}

// end is the line that ends a successful crawl of the mode.
func (m CrawlMode) end() string {
	if m == CrawlKeys {
		return "EN"
	}
	return "END"
}

// MetaItem is one line of a metadump (or of an mgdump: the key only).
type MetaItem struct {
	// Key is the URL-decoded key. It is only valid during the callback.
	Key []byte
	// Exp is the absolute expiry time in Unix seconds by the server's clock,
	// -1 for an item that never expires (and for an mgdump line).
	Exp int64
	// LastAccess is the last access time in Unix seconds.
	LastAccess int64
	// CAS is the item's CAS value: unique per stored version on this server
	// (memcached never gives 0), 0 when unknown (mgdump).
	CAS uint64
	// Fetched says whether the item was read since it was stored.
	Fetched bool
	// Class is the slab class; Size the item's total size in bytes.
	Class int
	Size  int
}

// CrawlStats describes one finished (or failed) crawl.
type CrawlStats struct {
	Mode CrawlMode
	// Items is the number of lines delivered to the callback.
	Items int
	// BusyRetries is how many times memcached answered BUSY (another crawl,
	// often its own background crawler, was running) before this one ran.
	BusyRetries int
	// Duration is the time from the first request to END.
	Duration time.Duration
}

var (
	// ErrCrawlerBusy is returned (wrapped in a *ServerError) when memcached
	// kept answering BUSY until the crawl's time ran out.
	ErrCrawlerBusy = errors.New("lru_crawler stayed BUSY")
	// ErrCrawlModeUnsupported is returned when the server does not know the
	// requested mode (an old memcached answers BADCLASS to "metadump hash",
	// memcached before 1.6.19 ERROR to "mgdump").
	ErrCrawlModeUnsupported = errors.New("crawl mode not supported by this memcached")
	// ErrDumpDisabled is returned by a server started with -X
	// (--disable-dumping), which refuses every dump.
	ErrDumpDisabled = errors.New("dumps disabled on this memcached (-X)")
	// ErrCrawlerDisabled is returned by a server started with
	// -o no_lru_crawler.
	ErrCrawlerDisabled = errors.New("LRU crawler disabled on this memcached (-o no_lru_crawler)")
	// ErrCrawlIncomplete is returned when memcached stopped a walk after
	// listing part of it ("ERROR locked try again later" while its hash
	// table grows, memcached 1.6.? and later): the items already delivered
	// are not the whole server; crawl again.
	ErrCrawlIncomplete = errors.New("memcached stopped the walk before its end")
	errAbort           = errors.New("crawl aborted by callback")
)

// lockedAnswer is memcached's answer when its hash table is being expanded.
const lockedAnswer = "ERROR locked try again later"

// Crawl lists every item of the server with "lru_crawler metadump <mode>",
// streaming: fn is called once per line as it is read, so memory does not
// grow with the number of items. Crawls from this process to one server are
// serialised; when memcached answers BUSY the request is retried with a short
// backoff (2 ms doubling to 100 ms, with jitter) until ctx or
// Options.CrawlTimeout ends, and ErrCrawlerBusy is returned then. BUSY is
// never taken for an empty cache.
//
// If fn returns an error, the crawl is abandoned (its connection closed) and
// that error is returned as is.
func (s *Server) Crawl(ctx context.Context, mode CrawlMode, fn func(*MetaItem) error) (CrawlStats, error) {
	st := CrawlStats{Mode: mode}
	cmd := mode.command()
	if cmd == "" {
		return st, &ServerError{Server: s.addr.Spec, Op: "metadump", Err: fmt.Errorf("unknown crawl mode %q", mode)}
	}
	ctx, cancel := context.WithTimeout(ctx, s.p.opts.CrawlTimeout)
	defer cancel()

	s.p.crawlMu.Lock()
	defer s.p.crawlMu.Unlock()

	start := time.Now()
	backoff := 2 * time.Millisecond
	var fnErr error
	var busyLine string // memcached's last BUSY answer
	for {
		busy := false
		err := s.p.with(ctx, "metadump", func(c *conn) error {
			if err := c.extend(ctx, s.io); err != nil {
				return err
			}
			if _, err := c.w.WriteString(cmd); err != nil {
				return err
			}
			if err := c.w.Flush(); err != nil {
				return err
			}
			var it MetaItem
			var keyBuf []byte
			first, listed := true, 0
			for {
				// Only a read that may block needs a fresh deadline.
				if c.r.Buffered() < 1024 {
					if err := c.extend(ctx, s.io); err != nil {
						return err
					}
				}
				line, err := c.readLine()
				if err != nil {
					return err
				}
				if string(line) == mode.end() {
					return nil
				}
				if first {
					first = false
					switch {
					case string(line) == "OK":
						// memcached 1.6.43 and later open every dump with OK.
						first = true
						continue
					case hasPrefix(line, "BUSY"), string(line) == lockedAnswer:
						busy, busyLine = true, string(line)
						return nil
					case hasPrefix(line, "NOTSTARTED"):
						return nil // nothing to walk
					case hasPrefix(line, "BADCLASS"), string(line) == "ERROR":
						return fmt.Errorf("%w: %q answered %q", ErrCrawlModeUnsupported, strings.TrimSpace(cmd), truncate(line))
					case hasPrefix(line, "ERROR") && bytes.HasSuffix(line, []byte("not allowed")):
						return fmt.Errorf("%w: %w: %s", ErrDumpDisabled, ErrProtocol, truncate(line))
					case string(line) == "CLIENT_ERROR lru crawler disabled":
						return fmt.Errorf("%w: %w: %s", ErrCrawlerDisabled, ErrProtocol, truncate(line))
					}
				}
				if string(line) == lockedAnswer {
					return fmt.Errorf("%w after %d items: %q", ErrCrawlIncomplete, listed, lockedAnswer)
				}
				if err := replyError(line); err != nil {
					return err
				}
				if mode == CrawlKeys {
					keyBuf, err = parseKeyLine(line, &it, keyBuf)
				} else {
					keyBuf, err = parseMetaLine(line, &it, keyBuf)
				}
				if err != nil {
					return err
				}
				st.Items++
				listed++
				if err := fn(&it); err != nil {
					fnErr = err
					return errAbort
				}
			}
		})
		if fnErr != nil {
			st.Duration = time.Since(start)
			return st, fnErr
		}
		if err != nil {
			st.Duration = time.Since(start)
			if st.BusyRetries > 0 && errors.Is(err, context.DeadlineExceeded) {
				return st, &ServerError{Server: s.addr.Spec, Op: "metadump",
					Err: fmt.Errorf("%w after %d attempts in %v (last answer %q): %v", ErrCrawlerBusy, st.BusyRetries, st.Duration.Round(time.Millisecond), busyLine, err)}
			}
			return st, err
		}
		if !busy {
			st.Duration = time.Since(start)
			return st, nil
		}
		st.BusyRetries++
		jitter := time.Duration(rand.Int64N(int64(backoff)/2 + 1))
		t := time.NewTimer(backoff + jitter)
		select {
		case <-ctx.Done():
			t.Stop()
			st.Duration = time.Since(start)
			return st, &ServerError{Server: s.addr.Spec, Op: "metadump",
				Err: fmt.Errorf("%w after %d attempts in %v (last answer %q): %v", ErrCrawlerBusy, st.BusyRetries, st.Duration.Round(time.Millisecond), busyLine, ctx.Err())}
		case <-t.C:
		}
		backoff = min(backoff*2, 100*time.Millisecond)
	}
}

// parseKeyLine parses an mgdump line, "mg <key>" or, for a binary key,
// "mg <base64 of the key> b", into it (key only), decoding into buf.
func parseKeyLine(line []byte, it *MetaItem, buf []byte) ([]byte, error) {
	*it = MetaItem{Exp: -1}
	rest, ok := bytes.CutPrefix(line, []byte("mg "))
	if !ok || len(rest) == 0 {
		return buf, fmt.Errorf("%w: mgdump line %q", ErrProtocol, truncate(line))
	}
	key, flags, _ := bytes.Cut(rest, []byte(" "))
	if string(flags) == "b" {
		n := base64.StdEncoding.DecodedLen(len(key))
		if cap(buf) < n {
			buf = make([]byte, n)
		}
		m, err := base64.StdEncoding.Decode(buf[:n], key)
		if err != nil {
			return buf, fmt.Errorf("%w: mgdump binary key %q is not base64", ErrProtocol, truncate(key))
		}
		it.Key = buf[:m]
		return buf, nil
	}
	buf = append(buf[:0], key...)
	it.Key = buf
	return buf, nil
}

// parseMetaLine parses "key=<urlenc> exp=<n> la=<n> cas=<n> fetch=<yes|no>
// cls=<n> size=<n>" into it, decoding the key into buf (returned, reused).
// Unknown fields are ignored, so that newer memcached versions still parse.
func parseMetaLine(line []byte, it *MetaItem, buf []byte) ([]byte, error) {
	*it = MetaItem{Exp: -1}
	haveKey := false
	for len(line) > 0 {
		var field []byte
		if i := bytes.IndexByte(line, ' '); i >= 0 {
			field, line = line[:i], line[i+1:]
		} else {
			field, line = line, nil
		}
		if len(field) == 0 {
			continue
		}
		eq := bytes.IndexByte(field, '=')
		if eq < 0 {
			return buf, fmt.Errorf("%w: metadump field %q has no '='", ErrProtocol, truncate(field))
		}
		name, val := field[:eq], field[eq+1:]
		var err error
		switch string(name) {
		case "key":
			buf, err = unescapeKey(buf[:0], val)
			if err != nil {
				return buf, err
			}
			it.Key = buf
			haveKey = true
		case "exp":
			it.Exp, err = atoi64(val)
		case "la":
			it.LastAccess, err = atoi64(val)
		case "cas":
			it.CAS, err = atou64(val)
		case "fetch":
			it.Fetched = string(val) == "yes"
		case "cls":
			var v int64
			v, err = atoi64(val)
			it.Class = int(v)
		case "size":
			var v int64
			v, err = atoi64(val)
			it.Size = int(v)
		}
		if err != nil {
			return buf, fmt.Errorf("%w: metadump field %q: %v", ErrProtocol, truncate(field), err)
		}
	}
	if !haveKey {
		return buf, fmt.Errorf("%w: metadump line without key=", ErrProtocol)
	}
	return buf, nil
}

var errNumber = errors.New("not a number")

// atou64 parses a decimal number without allocating.
func atou64(b []byte) (uint64, error) {
	if len(b) == 0 || len(b) > 20 {
		return 0, errNumber
	}
	var n uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, errNumber
		}
		d := uint64(c - '0')
		if n > (1<<64-1-d)/10 {
			return 0, errNumber
		}
		n = n*10 + d
	}
	return n, nil
}

func atoi64(b []byte) (int64, error) {
	neg := len(b) > 0 && b[0] == '-'
	if neg {
		b = b[1:]
	}
	u, err := atou64(b)
	if err != nil || u > 1<<63-1 {
		return 0, errNumber
	}
	if neg {
		return -int64(u), nil
	}
	return int64(u), nil
}

// unescapeKey appends the %XX-decoded form of s to dst. memcached encodes
// every byte outside [A-Za-z0-9-._~]; '+' stays '+' (it is not a space).
func unescapeKey(dst, s []byte) ([]byte, error) {
	for len(s) > 0 {
		i := bytes.IndexByte(s, '%')
		if i < 0 {
			return append(dst, s...), nil
		}
		dst = append(dst, s[:i]...)
		if i+2 >= len(s) {
			return dst, fmt.Errorf("%w: truncated escape in metadump key", ErrProtocol)
		}
		h, ok1 := unhex(s[i+1])
		l, ok2 := unhex(s[i+2])
		if !ok1 || !ok2 {
			return dst, fmt.Errorf("%w: bad escape in metadump key", ErrProtocol)
		}
		dst = append(dst, h<<4|l)
		s = s[i+3:]
	}
	return dst, nil
}

func unhex(c byte) (byte, bool) {
	switch {
	case '0' <= c && c <= '9':
		return c - '0', true
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10, true
	case 'A' <= c && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}
