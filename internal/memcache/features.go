package memcache

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// Features is what a server supports of what keystone-fanout uses, as Probe
// finds it. Deployments run any memcached from 1.6.18 (Debian 12) to the
// current release; each difference has a fallback chosen by the caller.
type Features struct {
	// Version is the server's version ("1.6.18").
	Version string
	// PID and Started identify the process: a restarted server has another
	// pid or start time (Started is its clock's time minus its uptime).
	PID     string
	Started time.Time
	// Dumps is false on a server started with -X (--disable-dumping): no
	// "lru_crawler metadump" or "mgdump", so its entries cannot be listed.
	Dumps bool
	// Crawler is false on a server started with -o no_lru_crawler (no dump
	// either).
	Crawler bool
	// KeyDump says the server has "lru_crawler mgdump" (1.6.19 and later).
	KeyDump bool
	// DumpOKLine says the server opens its dumps with an "OK" line (1.6.43
	// and later). Crawl accepts it from any version; this is for the record.
	DumpOKLine bool
	// TextAuth is set on a server started with -Y (an auth file): every text
	// command needs a login first, which keystone-fanout does not do.
	TextAuth bool
}

// ErrBinaryOnly is returned by Probe for a server that refuses the text
// protocol: started with -S (SASL, which allows the binary protocol only) or
// -B binary. keystone-fanout speaks the text protocol (watch, lru_crawler and
// gomemcache's key operations exist in no other).
var ErrBinaryOnly = errors.New("this memcached refuses the text protocol")

// ErrSASL wraps ErrBinaryOnly when the server also asked for SASL
// authentication (memcached -S).
var ErrSASL = fmt.Errorf("%w: it requires SASL authentication (memcached -S)", ErrBinaryOnly)

// Probe asks the server what it supports ("stats", "stats settings"). A
// server that closes the connection on a text command is probed with a
// binary NOOP, to tell SASL (ErrSASL) and binary-only servers
// (ErrBinaryOnly) from a broken connection. (A binary-only memcached waits
// for a whole 24-byte binary header, so a text command gets no answer and
// times out after Options.IOTimeout.)
func (s *Server) Probe(ctx context.Context) (Features, error) {
	var f Features
	st, err := s.Stats(ctx, "")
	if err != nil {
		if isBrokenConn(err) || isTimeout(err) {
			if berr := s.binaryProbe(ctx); berr != nil {
				return f, berr
			}
		}
		if errors.Is(err, ErrProtocol) && strings.Contains(err.Error(), "unauthenticated") {
			f.TextAuth = true
			return f, &ServerError{Server: s.addr.Spec, Op: "stats",
				Err: fmt.Errorf("%w: the server requires a login on the text protocol (memcached -Y), which keystone-fanout does not do", ErrProtocol)}
		}
		return f, err
	}
	f.Version, f.PID = st["version"], st["pid"]
	now, _ := strconv.ParseInt(st["time"], 10, 64)
	up, _ := strconv.ParseInt(st["uptime"], 10, 64)
	f.Started = time.Unix(now-up, 0)
	f.KeyDump = versionAtLeast(f.Version, 1, 6, 19)
	f.DumpOKLine = versionAtLeast(f.Version, 1, 6, 43)
	set, err := s.Stats(ctx, "settings")
	if err != nil {
		return f, err
	}
	f.Dumps = set["dump_enabled"] != "no"
	f.Crawler = set["lru_crawler"] != "no"
	return f, nil
}

// versionAtLeast compares a "major.minor.patch[-suffix]" version.
func versionAtLeast(v string, major, minor, patch int) bool {
	v, _, _ = strings.Cut(v, "-")
	parts := strings.SplitN(v, ".", 3)
	want := []int{major, minor, patch}
	for i := range want {
		if i >= len(parts) {
			return false
		}
		n, err := strconv.Atoi(parts[i])
		if err != nil {
			return false
		}
		if n != want[i] {
			return n > want[i]
		}
	}
	return true
}

// binaryProbe sends a binary-protocol NOOP on a new connection and returns
// ErrSASL when the server answers "authentication required", ErrBinaryOnly
// when it answers at all, nil when it does not speak the binary protocol
// either (the text failure was something else).
func (s *Server) binaryProbe(ctx context.Context) error {
	c, err := s.p.dial(ctx)
	if err != nil {
		return nil
	}
	defer c.nc.Close()
	if err := c.extend(ctx, s.io); err != nil {
		return nil
	}
	var req [24]byte
	req[0], req[1] = 0x80, 0x0a // request magic, NOOP
	if _, err := c.nc.Write(req[:]); err != nil {
		return nil
	}
	var resp [24]byte
	if _, err := io.ReadFull(c.nc, resp[:]); err != nil || resp[0] != 0x81 {
		return nil
	}
	if binary.BigEndian.Uint16(resp[6:8]) == 0x20 { // auth error
		return &ServerError{Server: s.addr.Spec, Op: "probe", Err: ErrSASL}
	}
	return &ServerError{Server: s.addr.Spec, Op: "probe", Err: ErrBinaryOnly}
}
