// Package tokencache knows keystonemiddleware's token cache in memcached and
// removes the entries that Keystone changes make stale: everything from "a
// batch of events" to "the affected entries are gone from every server".
//
// # What is in memcached
//
// A key is "tokens/" + 64 lowercase hex digits (memcache_security_strategy
// None) or "tokens/b'<base64 of 16 bytes>'" (MAC and ENCRYPT); IsTokenKey
// tells them from every other key, which is never touched. A None value is the
// JSON of the validation ({"token": {...}} as Keystone's GET /v3/auth/tokens
// returns it, plus "version" and "auth_token"), a MAC value a 64-character MAC
// followed by base64 of the same JSON, an ENCRYPT value unreadable without the
// token. Values stored through python-binary-memcached (newer middleware
// releases with memcache_tls_enabled or SASL) carry flags 16, and 24 when
// zlib-compressed; both are read. ParseValue reads a value into a Token;
// Affects says whether an event concerns a Token (rules:
// docs/INVALIDATION.md).
//
// # Using an Invalidator (for the region agent)
//
//	cluster, err := memcache.New(memcache.Options{Servers: "mc1:11211,mc2:11211"})
//	inv, err := tokencache.NewInvalidator(cluster, tokencache.Options{}, reg, log)
//	go inv.Run(ctx) // the live index; returns nil when ctx ends
//	...
//	res, err := inv.Invalidate(ctx, events) // first pass
//	// not acknowledged yet; a second later, the same call again (second
//	// pass), then acknowledge. Invalidate is idempotent.
//
// Invalidate returns when every server is done. A nil error means every
// server finished. Otherwise the error is a *multierror.Error of
// *memcache.ServerError, one per failed server, each naming it; Result still
// counts what was done (per server in Result.Servers). Calls are safe from
// several goroutines. Every network operation is bounded by
// memcache.Options.IOTimeout (and by ctx between operations); a crawl also
// by memcache.Options.CrawlTimeout.
//
// An event that cannot be bounded (event.Event.Unbounded: unknown type or
// kind, newer schema, Widen set) removes every token entry; so should the
// caller's stand-in for a stream message it cannot decode. An empty batch
// does nothing.
//
// Strategies: Targeted (default) removes the entries the events concern plus
// every unreadable token entry (ENCRYPT, corrupt), and nothing else; Sweep
// removes every token entry and nothing else, without reading values; Flush
// runs flush_all on every server.
//
// Options.OnRemove reports every removed entry (server, key, reason, event
// id, late) for logs; the Invalidator's Prometheus metrics are named
// keystone_fanout_invalidator_*.
//
// # The live index
//
// While Run runs, each server has a watcher: a connection on which memcached
// reports every store ("watch mutations evictions", see memcache.Watch).
// Every stored token key it reports is read shortly after, 100 at a time,
// parsed and remembered in the server's index (key, CAS, expiry, and the
// fields the rules look at, hashed); evicted keys are forgotten. A crawl
// fills the index at start and reconciles it every Options.RefreshInterval.
//
// A server's index is complete when:
//
//  1. the current watch connection was registered (memcached answered OK)
//     before the last full crawl began, and is still open;
//  2. that crawl listed every item and the index took every token entry it
//     listed or that a read found (Options.IndexLimit was not reached);
//  3. since that crawl began, nothing was lost: no "skipped=N" line (lines
//     memcached dropped for this watcher), no rise of memcached's
//     log_worker_dropped (lines its worker threads could not log at all), no
//     restart, no failed read of a reported store, no failed delete, and no
//     more than Options.MaxPending reported stores waiting.
//
// Then every token entry the server holds is in the index with the CAS of
// its current value, or is a reported store not read yet (pending): memcached
// changes a value only by a store, every store after the watch was
// registered is reported, and the crawl saw every item stored before. A
// reported store is read after the report, so the value read is the one
// reported or a newer one (whose own report follows); reads of one server are
// serialised and applied in order, so the index ends with the newest value.
// The index may also hold entries memcached removed without telling the
// watcher (deleted by another client: memcached 1.6.18 has no "watch
// deletions"; expired; dropped by the slab mover): removing them again is
// harmless, and the next crawl forgets them.
// TestLiveIndexMatchesCrawl checks this against a real memcached after
// random stores, expiries, evictions and deletes.
//
// A lost line is only known after it was lost: a skipped=N line comes before
// the next line memcached can queue, and log_worker_dropped is counted when
// memcached's logger thread next reads the worker's buffer. So the index is
// used only while the heartbeat has confirmed it recently
// (Options.MaxConfirmLag): every Options.HeartbeatInterval the Invalidator
// stores its marker key (keystone-fanout/watch/<random>, not a token key,
// a 10 s TTL) and waits for the watcher to report it; three markers in a row,
// each stored after the previous one was reported, and a stats read showing
// no drop, prove that every store logged before the first was reported or
// its loss recorded (see heartbeatLoop for why three). The markers also keep
// memcached's logger thread awake, which otherwise sleeps up to a second and
// delays every report.
//
// # A batch on a server
//
// With a complete, confirmed index: the stores reported but not read yet are
// read first; then the entries the events concern are found in memory,
// through the index's columns (the entries of one user, project, role ...
// without looking at the others), forgotten and deleted. No crawl. Otherwise
// (no watcher: Run not running, memcached -W, connection down; an
// incomplete or unconfirmed index) the batch crawls the server:
//
//  1. "stats" notices a restarted memcached (new pid or start time) and drops
//     what was remembered about it (CAS values start again after a restart).
//  2. "lru_crawler metadump hash" lists every item, read by its own goroutine
//     into a queue so that memcached's crawler never waits for us (see
//     memcache's package documentation for why "metadump all" is not used).
//  3. Each listed token entry is matched: from the index when its CAS is the
//     one remembered, otherwise its value is read, remembered and matched.
//  4. Matching entries are deleted.
//  5. Remembered entries that the crawl did not list are read directly: one
//     that still exists is the crawl hazard (docs/INVALIDATION.md, "Finding
//     every entry"), caught and counted; one that is gone is forgotten.
//
// The new path is never less safe than the crawl: a loss that happened before
// a batch but was noticed after it makes the server incomplete, and the
// agent's second pass, which runs after the heartbeat confirmed the first
// (regionagent Options.SecondPassDelay), then crawls it; a crawl after a loss
// also matches every value it reads against the recent window below.
//
// # Late write-backs
//
// A service that started validating a token before a change may store the
// stale answer after the batch removed the entry. Every value read after a
// batch (a reported store, a crawl's new or changed value) is matched against
// the events of the recent window (recent.go): a notification for
// Options.LateWriteBackWindow (15 s), a revocation event until no token it
// concerns can still be valid (issued_before + Options.TokenLifetime). Only
// tokens issued before the event count (its time, plus a 2 s allowance for
// Keystone's clocks and its issued_at to the second): a token issued after a
// change is validated after it. A match is removed at once, within
// milliseconds of its store (BenchmarkLateWriteBack).
//
// # Servers that cannot do all this
//
// Run probes each server (memcache.Server.Probe) and uses the named fallback,
// logged at start and shown in keystone_fanout_invalidator_server_mode:
// "crawl" for a server that refuses watch (-W: every batch crawls, late
// write-backs wait for the second pass); "flush" for a server that cannot
// list its items (-X or -o no_lru_crawler: flush_all once a watch connection
// is open, which makes the empty index complete, and flush_all for every
// batch while it is not); "unusable" for one that refuses the text protocol
// (SASL -S, -B binary) or wants a login (-Y): every batch fails there and is
// retried, nothing is acknowledged. Entries of memcache_security_strategy
// ENCRYPT cannot be read: they are removed for every event, which the log
// says once per server and keystone_fanout_invalidator_encrypted_entries
// counts (use MAC).
//
// # Memory
//
// The index keeps about 104 bytes per entry in columns of fixed-size fields
// (index.go; 127 bytes per entry measured at 100,000 entries per server with
// the slack of growing slices and maps); rules are compiled once per batch
// and matched by hash. A hash collision can only remove an entry too many.
// Values are read 100 at a time and not kept.
package tokencache
