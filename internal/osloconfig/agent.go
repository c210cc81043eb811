package osloconfig

import (
	"fmt"
	"strconv"
	"strings"
)

const sectionAuthtoken = "keystone_authtoken"

// Agent maps a service's [keystone_authtoken] (keystonemiddleware's options)
// onto the agent's flags:
//
//	--memcached          memcached_servers, in order
//	--token-cache-time   token_cache_time
//	--memcached-tls      memcache_tls_enabled
//	--memcached-tls-ca, --memcached-tls-cert, --memcached-tls-key
//	                     memcache_tls_cafile, memcache_tls_certfile, memcache_tls_keyfile
//
// memcache_security_strategy is checked and returned in
// Settings.SecurityStrategy (the agent reads None and MAC entries and removes
// ENCRYPT ones unread, so it needs no memcache_secret_key). [cache] is not
// read: it is the service's own cache, not keystonemiddleware's token cache.
//
// It fails when the middleware caches tokens where the agent cannot reach
// them (no memcached_servers, a WSGI environment cache), when caching is off,
// and when memcached needs SASL, which speaks only memcached's binary
// protocol: it has no crawl, so the agent could not list the entries.
func Agent(s *Stack) Settings {
	var out Settings
	if v, ok, err := s.Get(sectionAuthtoken, "cache"); err != nil {
		out.err(err)
	} else if ok && strings.TrimSpace(v.Text) != "" {
		out.err(&Error{Where: v.Where, Value: v.Text,
			Problem: "the middleware caches tokens in the WSGI environment's cache (swift's memcache ring), whose servers this file does not name",
			Fix:     "give the agent that cache's servers with --memcached and leave this file out"})
	}

	servers, ok, err := s.Get(sectionAuthtoken, "memcached_servers", "memcache_servers")
	switch {
	case err != nil:
		out.fail("memcached", err)
	case !ok || len(listValue(servers)) == 0:
		w := servers.Where
		if !ok {
			w = Where{File: s.joinFiles(), Section: sectionAuthtoken, Option: "memcached_servers"}
		}
		out.fail("memcached", &Error{Where: w,
			Problem: "not set: the middleware then caches tokens inside each service process, where nothing can remove them before token_cache_time ends " +
				"([cache] memcache_servers is the service's own cache, not the token cache)",
			Fix: "set [keystone_authtoken] memcached_servers in the services' configuration, or give the agent --memcached"})
	default:
		out.set("memcached", servers.Where, strings.Join(listValue(servers), ","))
	}

	if v, ok, err := s.Get(sectionAuthtoken, "token_cache_time"); err != nil {
		out.fail("token-cache-time", err)
	} else if ok {
		n, perr := strconv.Atoi(strings.TrimSpace(v.Text))
		switch {
		case perr != nil:
			out.fail("token-cache-time", &Error{Where: v.Where, Value: v.Text, Problem: "not a whole number of seconds", Fix: "write it like 300"})
		case n < 0:
			out.err(&Error{Where: v.Where, Value: v.Text,
				Problem: "the middleware caches no token, so the agent has nothing to remove for this service",
				Fix:     "leave this file out of --oslo-config"})
		case n == 0:
			out.fail("token-cache-time", &Error{Where: v.Where, Value: v.Text,
				Problem: "memcached then keeps each entry until the token itself expires",
				Fix:     "give --token-cache-time Keystone's [token] expiration (default 3600)"})
		default:
			out.set("token-cache-time", v.Where, strconv.Itoa(n))
		}
	}

	if v, ok, err := s.Get(sectionAuthtoken, "memcache_security_strategy"); err != nil {
		out.err(err)
	} else if ok {
		switch strings.ToLower(strings.TrimSpace(v.Text)) {
		case "none":
			out.SecurityStrategy = "None"
		case "mac":
			out.SecurityStrategy = "MAC"
		case "encrypt":
			out.SecurityStrategy = "ENCRYPT"
			out.note(v.Where, "an ENCRYPT entry cannot be read without its token, so every event removes every such entry of the region: "+
				"after each change in Keystone every user of this service validates their token again (docs/OPERATIONS.md)")
		default:
			out.err(&Error{Where: v.Where, Value: v.Text, Problem: "not a strategy keystonemiddleware knows", Fix: "write None, MAC or ENCRYPT"})
		}
	}

	if v, ok, err := s.Get(sectionAuthtoken, "memcache_sasl_enabled"); err != nil {
		out.err(err)
	} else if ok {
		on, err := boolValue(v)
		if err != nil {
			out.err(err)
		} else if on {
			out.err(&Error{Where: v.Where, Value: v.Text,
				Problem: "memcached with SASL speaks only its binary protocol, which cannot list a server's entries (lru_crawler metadump), so the agent cannot find the entries to remove",
				Fix:     "run the region's memcached without SASL on a network only the services reach, with TLS and client certificates (memcache_tls_*) to authenticate them"})
		}
	}
	memcacheTLS(s, &out)
	return out
}

// memcacheTLS maps memcache_tls_* (used only with memcache_tls_enabled).
func memcacheTLS(s *Stack, out *Settings) {
	v, ok, err := s.Get(sectionAuthtoken, "memcache_tls_enabled")
	if err != nil {
		out.fail("memcached-tls", err)
		return
	}
	if !ok {
		return
	}
	on, err := boolValue(v)
	if err != nil {
		out.fail("memcached-tls", err)
		return
	}
	out.set("memcached-tls", v.Where, strconv.FormatBool(on))
	if !on {
		return
	}
	got := map[string]Value{}
	for _, f := range []struct{ option, flag string }{
		{"memcache_tls_cafile", "memcached-tls-ca"},
		{"memcache_tls_certfile", "memcached-tls-cert"},
		{"memcache_tls_keyfile", "memcached-tls-key"},
	} {
		v, ok, err := s.Get(sectionAuthtoken, f.option)
		if err != nil {
			out.fail(f.flag, err)
			continue
		}
		if ok && strings.TrimSpace(v.Text) != "" {
			v.Text = strings.TrimSpace(v.Text)
			got[f.option] = v
			out.set(f.flag, v.Where, v.Text)
		}
	}
	// Python's ssl takes the key from the certificate file when no key file
	// is given.
	if c, ok := got["memcache_tls_certfile"]; ok {
		if _, ok := got["memcache_tls_keyfile"]; !ok {
			out.set("memcached-tls-key", c.Where, c.Text)
		}
	}
	if v, ok, _ := s.Get(sectionAuthtoken, "memcache_tls_allowed_ciphers"); ok && strings.TrimSpace(v.Text) != "" {
		out.note(v.Where, fmt.Sprintf("the agent uses Go's TLS 1.2 and 1.3 cipher suites, not this OpenSSL list (%s); keystone-fanout doctor agent shows whether memcached accepts them", v.Text))
	}
}
