package tokencache

import (
	"encoding/binary"
	"hash/maphash"
	"slices"
	"time"
)

// The index remembers, per server, every token entry a crawl listed: its CAS
// and the fields of its value that the rules look at, as 32-bit hashes.
// memcached gives every stored version of an item a new CAS, so an entry whose
// CAS is unchanged since it was read still holds the same value: a batch only
// fetches the values of entries that are new or were stored again since the
// previous crawl, and matches the others from memory. Remembered entries that
// a crawl does not list are looked up directly (the crawl-hazard defence, see
// the package documentation).
//
// Equal ids have equal hashes, so a rule that matches a token matches its
// entry; two different ids can share a hash (one chance in 2^32 per
// comparison), which can only remove an entry that did not need to go.
//
// Memory: an entry is 80 bytes, its key 33 bytes, its map slot 12 bytes (8
// bytes of the key, 4 of slot number): about 140 bytes in all with the slack of
// growing slices and maps, whatever the tokens look like.
// Role lists are shared: each distinct set of roles is stored once per server.
// Nothing here holds pointers, so the garbage collector does not scan it.

// Entry states.
const (
	// stateKeyOnly: listed by a crawl, value never read (sweep mode).
	stateKeyOnly uint8 = iota
	stateReadable
	stateUnreadable
)

// entry flags.
const (
	// auditUnknown: the token had more than two audit ids (Keystone never
	// makes such tokens); every audit clause matches it.
	auditUnknown uint8 = 1 << iota
)

// roleSetUnknown marks an entry whose role set could not be stored (too
// many distinct sets): every role clause matches it.
const roleSetUnknown = ^uint32(0)

const maxRoleSets = 1 << 16

type entry struct {
	cas     uint64
	gen     uint32 // crawl generation in which the entry was last listed
	ids     [nIDFields]uint32
	roles   uint32 // role set id; 0: no roles
	audit   uint32 // hash of audit_ids[0]; 0: none
	chain   uint32 // hash of audit_ids[1]; 0: none
	issued  uint32 // issued_at, Unix seconds rounded down; 0: unknown
	expires uint32 // expires_at, Unix seconds rounded down; 0: unknown
	state   uint8
	flags   uint8
}

var hashSeed = maphash.MakeSeed()

// hash32 is the index's hash of an id: 0 for "", never 0 otherwise.
func hash32(s string) uint32 {
	if s == "" {
		return 0
	}
	h := maphash.String(hashSeed, s)
	v := uint32(h) ^ uint32(h>>32)
	if v == 0 {
		v = 1
	}
	return v
}

// roleSets stores each distinct set of role hashes once.
type roleSets struct {
	byHash map[uint64]uint32 // hash of the sorted set -> id
	sets   [][]uint32        // id-1 -> sorted set
}

func (rs *roleSets) id(roles []string) uint32 {
	if len(roles) == 0 {
		return 0
	}
	set := make([]uint32, 0, len(roles))
	for _, r := range roles {
		set = append(set, hash32(r))
	}
	slices.Sort(set)
	set = slices.Compact(set)
	var h maphash.Hash
	h.SetSeed(hashSeed)
	var b [4]byte
	for _, v := range set {
		binary.LittleEndian.PutUint32(b[:], v)
		h.Write(b[:])
	}
	key := h.Sum64()
	if id, ok := rs.byHash[key]; ok {
		if slices.Equal(rs.sets[id-1], set) {
			return id
		}
		return roleSetUnknown // a 64-bit collision: match every role clause
	}
	if len(rs.sets) >= maxRoleSets {
		return roleSetUnknown
	}
	if rs.byHash == nil {
		rs.byHash = map[uint64]uint32{}
	}
	rs.sets = append(rs.sets, set)
	id := uint32(len(rs.sets))
	rs.byHash[key] = id
	return id
}

// set returns the role hashes of a set id (not roleSetUnknown).
func (rs *roleSets) set(id uint32) []uint32 {
	if id == 0 {
		return nil
	}
	return rs.sets[id-1]
}

// serverIndex is the index of one server, used under the server's lock only.
type serverIndex struct {
	// slots maps the first 8 bytes of a key's hash (uniformly random: the key
	// is a SHA-256 or HMAC output) to its slot; keys holds the full key of
	// each slot. A second key with the same 8 bytes is not remembered (its
	// value is read by every batch): one chance in 2^64 per pair.
	slots   map[uint64]uint32
	keys    []binKey
	entries []entry
	free    []uint32
	roles   roleSets
	limit   int
}

func newServerIndex(limit int) *serverIndex {
	return &serverIndex{slots: map[uint64]uint32{}, limit: limit}
}

func (k *binKey) short() uint64 { return binary.LittleEndian.Uint64(k[1:9]) }

func (ix *serverIndex) len() int { return len(ix.slots) }

// get returns the entry of k.
func (ix *serverIndex) get(k binKey) (*entry, bool) {
	slot, ok := ix.lookup(k, ^uint32(0))
	if !ok {
		return nil, false
	}
	return &ix.entries[slot], true
}

// lookup returns the slot of k, trying the slot guess first: a crawl lists
// items in the same (hash bucket) order every time and slots are handed out
// in the order of the first crawl, so the slot after the previous hit is
// usually the right one, and checking it is a sequential read instead of a
// map probe.
func (ix *serverIndex) lookup(k binKey, guess uint32) (uint32, bool) {
	if int(guess) < len(ix.keys) && ix.keys[guess] == k {
		return guess, true
	}
	slot, ok := ix.slots[k.short()]
	if !ok || ix.keys[slot] != k {
		return 0, false
	}
	return slot, true
}

// each calls fn for every remembered key and its entry.
func (ix *serverIndex) each(fn func(k binKey, e *entry)) {
	for _, slot := range ix.slots {
		fn(ix.keys[slot], &ix.entries[slot])
	}
}

// makeEntry builds the entry of a parsed value.
func (ix *serverIndex) makeEntry(cas uint64, gen uint32, tok *Token, unreadable bool) entry {
	e := entry{cas: cas, gen: gen}
	switch {
	case unreadable:
		e.state = stateUnreadable
	case tok != nil:
		e.state = stateReadable
		for f := field(0); f < nIDFields; f++ {
			e.ids[f] = hash32(tokenField(tok, f))
		}
		e.roles = ix.roles.id(tok.RoleIDs)
		switch n := len(tok.AuditIDs); {
		case n > 2:
			e.flags |= auditUnknown
		case n == 2:
			e.audit, e.chain = hash32(tok.AuditIDs[0]), hash32(tok.AuditIDs[1])
		case n == 1:
			e.audit = hash32(tok.AuditIDs[0])
		}
		e.issued = unixSeconds(tok.IssuedAt)
		e.expires = unixSeconds(tok.ExpiresAt)
	}
	return e
}

// put stores e under k. It returns false when k is new and the index is full
// (or another key has the same first 8 bytes).
func (ix *serverIndex) put(k binKey, e entry) bool {
	short := k.short()
	slot, ok := ix.slots[short]
	if ok && ix.keys[slot] != k {
		return false
	}
	if !ok {
		if ix.limit >= 0 && len(ix.slots) >= ix.limit {
			return false
		}
		if n := len(ix.free); n > 0 {
			slot = ix.free[n-1]
			ix.free = ix.free[:n-1]
		} else {
			slot = uint32(len(ix.entries))
			ix.entries = append(ix.entries, entry{})
			ix.keys = append(ix.keys, binKey{})
		}
		ix.slots[short] = slot
		ix.keys[slot] = k
	}
	ix.entries[slot] = e
	return true
}

// relayout moves the entries so that the slots follow order (the slots of
// the last crawl's listing), keeping the others after them, so that the slot
// guess of lookup hits again after memcached reordered its hash table (it
// does when the table grows).
func (ix *serverIndex) relayout(order []uint32) {
	n := len(ix.slots)
	keys := make([]binKey, 0, n)
	entries := make([]entry, 0, n)
	moved := make([]bool, len(ix.entries))
	place := func(slot uint32) {
		if int(slot) >= len(moved) || moved[slot] || ix.keys[slot] == (binKey{}) {
			return
		}
		if cur, ok := ix.slots[ix.keys[slot].short()]; !ok || cur != slot {
			return // a freed slot
		}
		moved[slot] = true
		keys = append(keys, ix.keys[slot])
		entries = append(entries, ix.entries[slot])
	}
	for _, slot := range order {
		place(slot)
	}
	for _, slot := range ix.slots {
		place(slot)
	}
	slots := make(map[uint64]uint32, len(keys))
	for i := range keys {
		slots[keys[i].short()] = uint32(i)
	}
	ix.slots, ix.keys, ix.entries, ix.free = slots, keys, entries, nil
}

// remove forgets k.
func (ix *serverIndex) remove(k binKey) {
	short := k.short()
	slot, ok := ix.slots[short]
	if !ok || ix.keys[slot] != k {
		return
	}
	ix.entries[slot] = entry{}
	ix.keys[slot] = binKey{}
	delete(ix.slots, short)
	ix.free = append(ix.free, slot)
}

func unixSeconds(t time.Time) uint32 {
	if t.IsZero() || t.Unix() <= 0 || t.Unix() > 1<<32-1 {
		return 0
	}
	return uint32(t.Unix())
}
