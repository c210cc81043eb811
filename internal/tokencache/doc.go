// Package tokencache knows keystonemiddleware 10.1's token cache in memcached
// and removes the entries that Keystone changes make stale: everything from
// "a batch of events" to "the affected entries are gone from every server".
//
// # What is in memcached
//
// A key is "tokens/" + 64 lowercase hex digits (memcache_security_strategy
// None) or "tokens/b'<base64 of 16 bytes>'" (MAC and ENCRYPT); IsTokenKey
// tells them from every other key, which is never touched. A None value is the
// JSON of the validation ({"token": {...}} as Keystone's GET /v3/auth/tokens
// returns it, plus "version" and "auth_token"), a MAC value a 64-character MAC
// followed by base64 of the same JSON, an ENCRYPT value unreadable without the
// token. ParseValue reads a value into a Token; Affects says whether an event
// concerns a Token (rules: docs/INVALIDATION.md).
//
// # Using an Invalidator (for the region agent)
//
//	cluster, err := memcache.New(memcache.Options{Servers: "mc1:11211,mc2:11211"})
//	inv, err := tokencache.NewInvalidator(cluster, tokencache.Options{}, reg, log)
//	go inv.Run(ctx) // keeps the index warm; returns nil when ctx ends
//	...
//	res, err := inv.Invalidate(ctx, events) // one crawl per server for the batch
//	if err != nil {
//		// at least one server did not finish: do not ack, retry with backoff
//	}
//	// ack the batch; schedule the same call again a few seconds later (second
//	// pass) to catch entries that a service stored from a validation that
//	// raced with the change. Invalidate is idempotent.
//
// Invalidate returns when every server is done. A nil error means every
// server finished. Otherwise the error is a *multierror.Error of
// *memcache.ServerError, one per failed server, each naming it; Result still
// counts what was done (per server in Result.Servers). Calls are safe from
// several goroutines; the work on one server is serialised (so a batch may
// wait for a running refresh of that server). Every network operation is
// bounded by ctx and by memcache.Options.IOTimeout; a crawl also by
// memcache.Options.CrawlTimeout.
//
// An event that cannot be bounded (event.Event.Unbounded: unknown type or
// kind, newer schema, Widen set) removes every token entry; so should the
// caller's stand-in for a stream message it cannot decode (for example an
// Event with Widen set). An empty batch does nothing.
//
// Strategies: Targeted (default) removes the entries the events concern plus
// every unreadable token entry (ENCRYPT, corrupt), and nothing else; Sweep
// removes every token entry and nothing else, without reading values; Flush
// runs flush_all on every server.
//
// Options.OnRemove reports every removed entry (server, key, reason, event
// id) for logs; the Invalidator's own Prometheus metrics are named
// keystone_fanout_invalidator_* (entries removed by server and reason,
// kept, values fetched, crawl durations and BUSY retries, hidden entries
// caught, server errors by operation, index size).
//
// # How a batch runs on one server
//
//  1. "stats" notices a restarted memcached (new pid or start time) and drops
//     what was remembered about it (CAS values start again after a restart).
//  2. "lru_crawler metadump hash" lists every item, read by its own goroutine
//     into a queue so that memcached's crawler never waits for us (see
//     memcache's package documentation for why "metadump all" is not used).
//  3. Each listed token entry is matched: from the index when its CAS is the
//     one remembered (the value is unchanged), otherwise its value is fetched
//     ("gets", 100 keys per command), parsed, remembered and matched.
//  4. Matching entries are deleted, pipelined (100 per round trip).
//  5. Remembered entries that the crawl did not list are fetched directly
//     (deleted directly for a sweep): one that still exists is the crawl
//     hazard (docs/INVALIDATION.md, "Finding every entry"), caught and
//     counted (Counts.Hidden,
//     keystone_fanout_invalidator_crawl_hidden_entries_total); one that is
//     gone is forgotten.
//
// The index keeps per entry its CAS and 32-bit hashes of the fields the rules
// read (about 150 bytes an entry, Options.IndexLimit bounds it); rules are
// compiled once per batch and matched by hash, so the cost per entry does not
// grow with the batch. A hash collision can only remove an entry too many.
// Memory does not grow with values: they are streamed, 100 at a time.
//
// # Limits
//
// An entry that a service stores after the crawl has passed it is not seen by
// that pass: that is what the second pass is for.
//
// memcached's hash walk sets the floor of a batch's latency: with memcached's
// default crawler pauses (lru_crawler_sleep 100 µs) it takes about 14 ms for
// the 65,536 buckets of a fresh server however few items there are; with
// memcached started with -o lru_crawler_sleep=0 (or "lru_crawler sleep 0" at
// run time) about 2 ms, and a batch at 1,000 entries per server drops from
// about 15 ms to about 6 ms (docs/BENCHMARKS.md). keystone-fanout does not
// change that setting itself: the servers belong to the region's services.
package tokencache
