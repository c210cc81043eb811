package doctor

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
)

// sampled is what one server's crawl and sample found.
type sampled struct {
	items, tokens int
	// by strategy of the values read: "None", "MAC", "ENCRYPT", "unreadable"
	kinds map[string]int
}

// memcached checks every server of the region, then what the values say
// about the strategy.
func memcached(ctx context.Context, o *AgentOptions, r *Report) {
	cluster, err := memcache.New(o.Memcache)
	if err != nil {
		r.add(Finding{Check: "memcached.connect", Level: LevelFail, Summary: err.Error()})
		return
	}
	defer cluster.Close()
	total := sampled{kinds: map[string]int{}}
	reached := 0
	for _, s := range cluster.Servers() {
		got, ok := memcachedServer(ctx, s, o, r)
		if !ok {
			continue
		}
		reached++
		total.items += got.items
		total.tokens += got.tokens
		for k, n := range got.kinds {
			total.kinds[k] += n
		}
	}
	if reached > 0 {
		strategy(o, total, reached, len(cluster.Servers()), r)
	}
}

// memcachedServer checks one server: version, TLS, what the agent needs
// (crawl allowed), then crawls it and reads a sample of token entries.
func memcachedServer(ctx context.Context, s *memcache.Server, o *AgentOptions, r *Report) (sampled, bool) {
	target := s.String()
	cctx, cancel := context.WithTimeout(ctx, o.timeout())
	defer cancel()
	version, err := s.Version(cctx)
	if err != nil {
		f := Finding{Check: "memcached.connect", Target: target, Level: LevelFail, Summary: "no answer to version: " + err.Error()}
		f.Detail, f.Fix = explainMemcacheError(err, o.Memcache.TLS.Enabled)
		r.add(f)
		return sampled{}, false
	}
	tlsText := "plain TCP"
	if o.Memcache.TLS.Enabled {
		tlsText = "TLS"
	}
	settings, err := s.Stats(cctx, "settings")
	if err != nil {
		r.add(Finding{Check: "memcached.connect", Target: target, Level: LevelFail, Summary: "stats settings failed: " + err.Error()})
		return sampled{}, false
	}
	stats, _ := s.Stats(cctx, "")
	f := Finding{Check: "memcached.connect", Target: target, Level: LevelOK,
		Summary: fmt.Sprintf("memcached %s over %s, %s items", version, tlsText, stats["curr_items"])}
	if settings["ssl_enabled"] == "yes" && !o.Memcache.TLS.Enabled {
		f.Level = LevelWarn
		f.Detail = "The server also offers TLS, and the agent does not use it."
		f.Fix = "--memcached-tls with --memcached-tls-ca (memcache_tls_enabled in [keystone_authtoken])"
	}
	r.add(f)

	crawl := Finding{Check: "memcached.crawl", Target: target}
	switch {
	case settings["dump_enabled"] == "no":
		crawl.Level = LevelFail
		crawl.Summary = "memcached runs with -X (--disable-dumping): lru_crawler metadump is refused"
		crawl.Detail = "The agent lists a server's entries with lru_crawler metadump to find the token entries to remove; without it it cannot remove any."
		crawl.Fix = "start memcached without -X"
		r.add(crawl)
		return sampled{}, true
	case settings["lru_crawler"] == "no":
		crawl.Level = LevelFail
		crawl.Summary = "memcached runs with -o no_lru_crawler: lru_crawler metadump is refused"
		crawl.Detail = "The agent lists a server's entries with lru_crawler metadump to find the token entries to remove."
		crawl.Fix = "start memcached without no_lru_crawler"
		r.add(crawl)
		return sampled{}, true
	}
	got := sampled{kinds: map[string]int{}}
	var sample []string // reservoir of token keys
	n := o.sample()
	st, err := s.Crawl(ctx, memcache.CrawlHash, func(it *memcache.MetaItem) error {
		got.items++
		if !tokencache.IsTokenKey(string(it.Key)) {
			return nil
		}
		got.tokens++
		if len(sample) < n {
			sample = append(sample, string(it.Key))
		} else if i := rand.IntN(got.tokens); i < n {
			sample[i] = string(it.Key)
		}
		return nil
	})
	if err != nil {
		crawl.Level = LevelFail
		crawl.Summary = "lru_crawler metadump hash failed: " + err.Error()
		if errors.Is(err, memcache.ErrCrawlModeUnsupported) {
			crawl.Fix = "upgrade memcached to 1.6.10 or later (the hash walk finds every entry, the LRU walk may not)"
		} else {
			crawl.Fix = "start memcached without -X and with its LRU crawler (the default)"
		}
		r.add(crawl)
		return sampled{}, true
	}
	crawl.Level = LevelOK
	crawl.Summary = fmt.Sprintf("lru_crawler metadump allowed: %d items, %d token entries, crawled in %s", got.items, got.tokens, st.Duration.Round(100*time.Microsecond))
	if settings["lru_crawler_sleep"] != "" && settings["lru_crawler_sleep"] != "0" {
		crawl.Detail = fmt.Sprintf("memcached pauses %s µs between crawler steps (lru_crawler_sleep); "+
			"with -o lru_crawler_sleep=0 each invalidation is several times faster (docs/BENCHMARKS.md).", settings["lru_crawler_sleep"])
	}
	r.add(crawl)

	if len(sample) > 0 {
		err := s.Get(cctx, sample, func(it memcache.Item) error {
			got.kinds[valueKind(it)]++
			return nil
		})
		if err != nil {
			r.add(Finding{Check: "memcached.values", Target: target, Level: LevelWarn, Summary: "reading sampled values failed: " + err.Error()})
		}
	}
	return got, true
}

// valueKind says which strategy wrote a token entry, from its key and value.
func valueKind(it memcache.Item) string {
	kind := tokencache.KindOf(it.Key)
	_, err := tokencache.ParseValue(kind, it.Flags, it.Value)
	switch {
	case err == nil && kind == tokencache.KeyNone:
		return "None"
	case err == nil:
		return "MAC"
	case errors.Is(err, tokencache.ErrEncrypted):
		return "ENCRYPT"
	}
	return "unreadable"
}

func explainMemcacheError(err error, tlsOn bool) (detail, fix string) {
	var unknownCA x509.UnknownAuthorityError
	var badName x509.HostnameError
	var recordErr tls.RecordHeaderError
	msg := err.Error()
	switch {
	case strings.Contains(msg, "unauthenticated"):
		return "memcached asks for authentication (-Y or -S); the agent speaks the text protocol without it, and SASL memcached cannot list its entries.",
			"run the region's memcached without authentication on a network only the services reach, with TLS client certificates to authenticate them"
	case errors.As(err, &unknownCA):
		return "", "give the CA of memcached's certificate with --memcached-tls-ca (memcache_tls_cafile)"
	case errors.As(err, &badName):
		return "", "give --memcached-tls-server-name with a name the certificate holds"
	case errors.As(err, &recordErr) || (tlsOn && strings.Contains(msg, "first record")):
		return "The server does not speak TLS.", "drop --memcached-tls (memcache_tls_enabled), or start memcached with -Z"
	case !tlsOn && (strings.Contains(msg, "EOF") || strings.Contains(msg, "reset") || strings.Contains(msg, "timeout")):
		return "A memcached started with -Z (TLS) answers plain connections this way.", "if the server uses TLS: --memcached-tls and --memcached-tls-ca (memcache_tls_enabled, memcache_tls_cafile)"
	}
	return "", "check --memcached (the services' memcached_servers) and that firewalls let this host reach every server"
}

// strategy reports what one event costs the region, from the sampled values.
func strategy(o *AgentOptions, s sampled, reached, servers int, r *Report) {
	f := Finding{Check: "strategy", Target: string(o.Strategy)}
	read := 0
	var parts []string
	for _, k := range []string{"None", "MAC", "ENCRYPT", "unreadable"} {
		if s.kinds[k] > 0 {
			read += s.kinds[k]
			parts = append(parts, fmt.Sprintf("%s %d", k, s.kinds[k]))
		}
	}
	counts := strings.Join(parts, ", ")
	where := fmt.Sprintf("%d token entries on %d of %d server(s)", s.tokens, reached, servers)
	unread := s.kinds["ENCRYPT"] + s.kinds["unreadable"]
	switch {
	case o.Strategy == tokencache.Flush:
		f.Level = LevelInfo
		f.Summary = "flush: every event empties every server (flush_all)"
		f.Detail = "Every cached validation, and everything else the servers hold, is gone after each change in Keystone. Only for memcached servers that keystonemiddleware alone uses."
	case o.Strategy == tokencache.Sweep:
		f.Level = LevelInfo
		f.Summary = fmt.Sprintf("sweep: every event removes every token entry (%s now)", where)
		f.Detail = fmt.Sprintf("After each change in Keystone each of the %d entries is validated again by Keystone at its next use.", s.tokens)
	case s.tokens == 0:
		f.Level = LevelWarn
		f.Summary = "no token entries: what an event costs cannot be told yet"
		f.Detail = "Either no service validated a token since these servers started, or the services cache elsewhere."
		f.Fix = "compare --memcached with the services' [keystone_authtoken] memcached_servers (or pass a service's file with --oslo-config), then run doctor again after some API calls"
	case read == 0:
		f.Level = LevelWarn
		f.Summary = "no sampled value could be read back: " + where
	case unread == 0:
		f.Level = LevelOK
		f.Summary = fmt.Sprintf("targeted: every sampled entry is readable (%s): each event removes only the entries it concerns", counts)
	case unread == read:
		f.Level = LevelWarn
		f.Summary = fmt.Sprintf("every event sweeps: no sampled entry is readable (%s)", counts)
		f.Detail = fmt.Sprintf("An ENCRYPT entry cannot be read without its token, so the agent removes every such entry for every event (%s now): "+
			"after each change in Keystone each of them is validated again by Keystone at its next use.", where)
		f.Fix = "if only the services reach these servers (and TLS protects the wire), memcache_security_strategy = MAC keeps entries authenticated " +
			"and lets the agent remove only what a change concerns; otherwise keep ENCRYPT and size Keystone for these re-validations"
	default:
		f.Level = LevelInfo
		f.Summary = fmt.Sprintf("mixed: %s", counts)
		f.Detail = fmt.Sprintf("Readable entries are removed only when an event concerns them; the unreadable share (about %d%% of %s) is removed for every event.",
			100*unread/read, where)
	}
	if o.SecurityStrategy != "" && read > 0 {
		switch {
		case o.SecurityStrategy == "ENCRYPT" && s.kinds["ENCRYPT"] < read:
			f.Detail = strings.TrimSpace(f.Detail + " The file says ENCRYPT; other services of the region write readable entries.")
		case o.SecurityStrategy != "ENCRYPT" && s.kinds["ENCRYPT"] > 0:
			f.Detail = strings.TrimSpace(f.Detail + fmt.Sprintf(" The file says %s; another service of the region writes ENCRYPT entries.", o.SecurityStrategy))
		}
	}
	r.add(f)
}
