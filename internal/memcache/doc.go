// Package memcache is keystone-fanout's client for the memcached servers of a
// region. The key operations (gets, delete, set, flush_all, version as a
// ping) go through github.com/bradfitz/gomemcache, one client per server
// (TLS through its DialContext); this package's own protocol code covers only
// what gomemcache lacks: "watch" (Server.Watch), "lru_crawler metadump" and
// "mgdump" (Server.Crawl), "stats" and "version" (Server.Stats, Version,
// Probe), over small per-server connection pools with the same TLS and
// timeouts. Every call is bounded by Options.IOTimeout; this package's own
// commands also by their context (gomemcache's take none: the context is
// checked between commands).
//
// # Versions
//
// Deployments run memcached from 1.6.18 (Debian 12) to the current release.
// Probe reports what differs (Features): "lru_crawler mgdump" from 1.6.19,
// the "OK" line that opens every dump from 1.6.43 (Crawl accepts it from any
// version), dumps disabled by -X, the text protocol refused by -S (SASL) or
// -B binary, a login required by -Y. Crawl also accepts "NOTSTARTED" (nothing
// to walk) and "ERROR locked try again later" (the hash table is growing:
// retried like BUSY when it comes first, ErrCrawlIncomplete when it ends a
// walk). Watch reports -W (ErrWatchRefused) and topics a version does not
// know (ErrWatchTopicUnsupported: "deletions" is newer than 1.6.18).
//
// # Every server, no hashing
//
// keystonemiddleware stores a token validation on the server python-memcache
// picks with its own CRC32 hash, and while a server is marked dead it rehashes
// to another one, so an entry can be on any server of the list. A Cluster
// therefore never picks a server for a key: callers run each operation on
// every server (Cluster.Each, Cluster.Delete, ...). A server that is down
// fails its part of the operation with a *ServerError naming it; errors of
// several servers are combined in a *multierror.Error. The caller retries and
// does not acknowledge its input until every server succeeded.
//
// # Enumerating a server: metadump hash, not all
//
// Server.Crawl streams "lru_crawler metadump hash" by default. memcached's
// LRU walk ("metadump all") skips an item whenever another thread holds its
// item lock or a reference to it at that instant, and items that the LRU
// maintainer moves ahead of the crawler (crawler.c: item_trylock /
// refcount_incr != 2). Both happen to entries being read, which are exactly the
// entries of tokens in use. The hash walk holds each bucket's lock and takes
// every linked item whose reference count is at least one.
//
// Measured on memcached 1.6.18 (TestCrawlModesWithConcurrentReaders: 9,000
// entries written by keystonemiddleware, aged until memcached moved them all
// out of its HOT LRU; in each of 30 rounds 100 of them are read in a loop by 4
// concurrent readers while the server is crawled in both modes): "metadump
// all" missed entries in 24 of the 30 rounds, 3,379 entries in total, 2,278 of
// them among the 100 being read (often all 100 of a round); "metadump hash"
// missed none in any round. Even with no reader at all, "metadump all" of
// 100,000 freshly written items listed 99,989 (BenchmarkCrawl). The invalidator
// tests confirm it end to end (tokencache TestEntriesInActiveUse: 30 rounds,
// 0 entries missed by the hash walk; TestLRUCrawlMissesAreCaught: with the LRU
// walk forced, 342-400 entries in use missed over 6 passes, all caught by the
// invalidator's remembered-keys check). The price: the hash walk visits every
// bucket, about 14 ms for the 65,536 buckets of a fresh server even when it is
// empty, because of memcached's crawler pauses (lru_crawler_sleep, 100 µs);
// about 2 ms with -o lru_crawler_sleep=0 (BenchmarkCrawl, docs/BENCHMARKS.md).
//
// A crawl that meets another one (memcached runs its own background crawler)
// is answered "BUSY currently processing crawler request"; Crawl retries with a
// short backoff and never reads BUSY as an empty cache.
//
// # Keys
//
// Keys are sent as they are: the text protocol accepts the quotes, '+', '/'
// and '=' of keystonemiddleware's MAC/ENCRYPT keys (tokens/b'...'), which the
// metadump prints URL-encoded and Crawl decodes.
package memcache
