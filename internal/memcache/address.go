package memcache

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// DefaultPort is the memcached port used when a server string names none,
// as python-memcache does.
const DefaultPort = 11211

// Address is one memcached server of a region, as written in
// [keystone_authtoken] memcached_servers.
type Address struct {
	// Network is "tcp" or "unix".
	Network string
	// Addr is "host:port" for tcp (IPv6 hosts in brackets) or a socket path
	// for unix.
	Addr string
	// Spec is the server exactly as configured, for messages and metric labels.
	Spec string
}

// String returns the configured form of the address.
func (a Address) String() string { return a.Spec }

// ParseServers parses a server list in the form keystonemiddleware's
// memcached_servers option takes it: comma separated entries, each one of
//
//	host                 (port 11211)
//	host:port
//	inet:host[:port]
//	inet6:[v6addr][:port]
//	[v6addr][:port]
//	unix:/path/to/socket
//
// Order is kept: it is the order python-memcache hashes over. Duplicates,
// empty entries and bad ports are errors naming the entry.
func ParseServers(list string) ([]Address, error) {
	var out []Address
	seen := map[string]bool{}
	for _, raw := range strings.Split(list, ",") {
		spec := strings.TrimSpace(raw)
		if spec == "" {
			if strings.TrimSpace(list) == "" {
				return nil, fmt.Errorf("memcached server list is empty: give at least one host:port")
			}
			return nil, fmt.Errorf("memcached server list %q has an empty entry", list)
		}
		a, err := parseServer(spec)
		if err != nil {
			return nil, err
		}
		id := a.Network + " " + a.Addr
		if seen[id] {
			return nil, fmt.Errorf("memcached server %q is listed twice", spec)
		}
		seen[id] = true
		out = append(out, a)
	}
	return out, nil
}

func parseServer(spec string) (Address, error) {
	bad := func(why string) (Address, error) {
		return Address{}, fmt.Errorf("memcached server %q: %s (want host:port, inet:host:port, [v6addr]:port or unix:/path)", spec, why)
	}
	if path, ok := strings.CutPrefix(spec, "unix:"); ok {
		if path == "" {
			return bad("empty socket path")
		}
		return Address{Network: "unix", Addr: path, Spec: spec}, nil
	}
	rest := spec
	if r, ok := strings.CutPrefix(rest, "inet6:"); ok {
		if !strings.HasPrefix(r, "[") {
			return bad("inet6 address must be in brackets")
		}
		rest = r
	} else if r, ok := strings.CutPrefix(rest, "inet:"); ok {
		rest = r
	}
	var host, port string
	if strings.HasPrefix(rest, "[") {
		end := strings.Index(rest, "]")
		if end < 0 {
			return bad("missing ']'")
		}
		host = rest[1:end]
		tail := rest[end+1:]
		switch {
		case tail == "":
		case strings.HasPrefix(tail, ":"):
			port = tail[1:]
		default:
			return bad("unexpected text after ']'")
		}
		if ip := net.ParseIP(host); ip == nil || ip.To4() != nil && !strings.Contains(host, ":") {
			return bad("not an IPv6 address in brackets")
		}
	} else {
		if strings.Count(rest, ":") > 1 {
			return bad("IPv6 addresses must be written in brackets")
		}
		h, p, found := strings.Cut(rest, ":")
		host, port = h, p
		if found && port == "" {
			return bad("empty port")
		}
	}
	if host == "" {
		return bad("empty host")
	}
	n := DefaultPort
	if port != "" {
		v, err := strconv.Atoi(port)
		if err != nil || v < 1 || v > 65535 {
			return bad("port must be a number from 1 to 65535")
		}
		n = v
	}
	return Address{Network: "tcp", Addr: net.JoinHostPort(host, strconv.Itoa(n)), Spec: spec}, nil
}
