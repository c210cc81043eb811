package memcache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Watching a server: memcached's "watch" command (gomemcache lacks it)
// turns a connection into a one-way stream of log lines. With the topic
// "mutations" memcached prints one line per store of any protocol (set, add,
// replace, append, prepend, cas, the binary protocol's and the meta
// commands' stores: all go through its do_store_item), for example
//
//	ts=1796290997.133 gid=2 type=item_store key=tokens%2Fabc0 status=stored cmd=set ttl=300 clsid=1 cfd=25 size=5
//
// and with "evictions" one line per item evicted to make room. The "ts"
// field is seconds, a dot and microseconds printed without leading zeros
// (".133" is 133 µs). A line memcached could not queue for this watcher is
// lost; it then prints "skipped=N" before the next line it can queue
// (logger.c). Lines a worker thread could not hand to memcached's logger at
// all (its 64 KiB buffer full) are lost for every watcher and only counted
// in "stats" as log_worker_dropped.

// WatchKind is the kind of a watch line.
type WatchKind uint8

const (
	// WatchStore is a store ("type=item_store"); Stored says whether it
	// changed the item.
	WatchStore WatchKind = iota + 1
	// WatchEviction is an item evicted to make room ("type=eviction").
	WatchEviction
	// WatchDeletion is a deleted item ("type=deleted", memcached 1.6.? and
	// later with the topic "deletions").
	WatchDeletion
	// WatchSkipped says memcached dropped Skipped lines for this watcher
	// (its buffer was full): whatever they reported is unknown.
	WatchSkipped
	// WatchOther is any other line (other topics, newer line types).
	WatchOther
)

// WatchLine is one line of a watch.
type WatchLine struct {
	Kind WatchKind
	// Key is the URL-decoded key. It is only valid during the callback.
	Key []byte
	// Stored is set for a store that changed the item (status=stored).
	Stored bool
	// Time is when memcached logged the line, by its clock (ts).
	Time time.Time
	// TTL is the item's remaining time to live in seconds for a store, 0 for
	// none (ttl).
	TTL int64
	// Skipped is the number of lines lost, for WatchSkipped.
	Skipped uint64
}

var (
	// ErrWatchRefused is returned by a server started with -W
	// (--disable-watch): "CLIENT_ERROR watch commands not allowed".
	ErrWatchRefused = errors.New("watch commands disabled on this memcached (-W)")
	// ErrWatchTooMany is returned when the server already has as many
	// watchers as it allows (20 in memcached 1.6).
	ErrWatchTooMany = errors.New("memcached's watcher limit is reached")
	// ErrWatchTopicUnsupported is returned when the server does not know a
	// requested topic (it answers ERROR): memcached 1.6.18 has no
	// "deletions".
	ErrWatchTopicUnsupported = errors.New("watch topic not supported by this memcached")
)

// Watch opens a dedicated connection (same TLS and dial timeout as the
// others), sends "watch <topics>" and, once memcached answered OK, calls
// started (if not nil) and then fn for every line, until ctx ends (Watch
// then returns nil), the connection fails, or fn returns an error (returned
// as is). Every store memcached logs after it registered the watcher, that
// is before it sent OK, is delivered or counted by a WatchSkipped line.
//
// The stream has no timeout: a quiet server sends nothing. The caller
// detects a stalled watch itself (for example by storing a key of its own
// and waiting for its line) and ends it by cancelling ctx.
func (s *Server) Watch(ctx context.Context, topics []string, started func(), fn func(*WatchLine) error) error {
	werr := func(err error) error {
		var se *ServerError
		if errors.As(err, &se) {
			return err
		}
		return &ServerError{Server: s.addr.Spec, Op: "watch", Err: err}
	}
	if len(topics) == 0 {
		return werr(errors.New("no watch topic"))
	}
	c, err := s.p.dial(ctx)
	if err != nil {
		return &ServerError{Server: s.addr.Spec, Op: "watch (dial)", Err: err}
	}
	defer c.nc.Close()
	stop := context.AfterFunc(ctx, func() { c.nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := c.extend(ctx, s.io); err != nil {
		return werr(err)
	}
	if _, err := c.w.WriteString("watch " + strings.Join(topics, " ") + "\r\n"); err != nil {
		return werr(err)
	}
	if err := c.w.Flush(); err != nil {
		return werr(err)
	}
	line, err := c.readLine()
	if err != nil {
		return werr(err)
	}
	switch {
	case string(line) == "OK":
	case string(line) == "ERROR":
		return werr(fmt.Errorf("%w: %q answered ERROR", ErrWatchTopicUnsupported, strings.Join(topics, " ")))
	case bytes.Contains(line, []byte("watch commands not allowed")):
		return werr(fmt.Errorf("%w: %s", ErrWatchRefused, truncate(line)))
	case hasPrefix(line, "WATCHER_TOO_MANY"):
		return werr(fmt.Errorf("%w: %s", ErrWatchTooMany, truncate(line)))
	default:
		return werr(fmt.Errorf("%w: watch answered %q", ErrProtocol, truncate(line)))
	}
	// From here on only memcached writes; no deadline while it is quiet.
	if err := c.nc.SetDeadline(time.Time{}); err != nil {
		return werr(err)
	}
	if ctx.Err() != nil {
		return nil
	}
	if started != nil {
		started()
	}
	var wl WatchLine
	var keyBuf []byte
	for {
		line, err := c.readLine()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return werr(err)
		}
		keyBuf, err = parseWatchLine(line, &wl, keyBuf)
		if err != nil {
			return werr(err)
		}
		if err := fn(&wl); err != nil {
			return err
		}
	}
}

// parseWatchLine parses one watch line into wl, decoding the key into buf
// (returned, reused). Unknown fields are ignored; a line of an unknown type
// is WatchOther.
func parseWatchLine(line []byte, wl *WatchLine, buf []byte) ([]byte, error) {
	*wl = WatchLine{Kind: WatchOther}
	if rest, ok := bytes.CutPrefix(line, []byte("skipped=")); ok {
		n, err := atou64(rest)
		if err != nil {
			return buf, fmt.Errorf("%w: watch line %q", ErrProtocol, truncate(line))
		}
		wl.Kind, wl.Skipped = WatchSkipped, n
		return buf, nil
	}
	var typ, status []byte
	haveKey := false
	for len(line) > 0 {
		var field []byte
		if i := bytes.IndexByte(line, ' '); i >= 0 {
			field, line = line[:i], line[i+1:]
		} else {
			field, line = line, nil
		}
		name, val, ok := bytes.Cut(field, []byte("="))
		if !ok {
			continue // a future format's bare word
		}
		var err error
		switch string(name) {
		case "ts":
			wl.Time, err = parseWatchTime(val)
		case "type":
			typ = val
		case "key":
			buf, err = unescapeKey(buf[:0], val)
			wl.Key, haveKey = buf, true
		case "status":
			status = val
		case "ttl":
			var v int64
			if v, err = atoi64(val); err == nil {
				wl.TTL = v
			}
		}
		if err != nil {
			return buf, fmt.Errorf("%w: watch field %q: %v", ErrProtocol, truncate(field), err)
		}
	}
	switch string(typ) {
	case "item_store":
		wl.Kind = WatchStore
		wl.Stored = string(status) == "stored"
	case "eviction":
		wl.Kind = WatchEviction
	case "deleted":
		wl.Kind = WatchDeletion
	}
	if wl.Kind != WatchOther && !haveKey {
		return buf, fmt.Errorf("%w: watch line of type %s without key=", ErrProtocol, typ)
	}
	return buf, nil
}

// parseWatchTime reads memcached's "%lld.%d" of seconds and microseconds
// (not zero-padded: "5.133" is 5 s and 133 µs).
func parseWatchTime(b []byte) (time.Time, error) {
	sec, usec, _ := bytes.Cut(b, []byte("."))
	s, err := atoi64(sec)
	if err != nil {
		return time.Time{}, err
	}
	var u int64
	if len(usec) > 0 {
		if u, err = atoi64(usec); err != nil || u < 0 || u > 999999 {
			return time.Time{}, errNumber
		}
	}
	return time.Unix(s, u*1000), nil
}
