package tokencache

import (
	"encoding/binary"
	"hash/maphash"
	"math/bits"
	"slices"
	"time"
)

// The index remembers, per server, every token entry it knows: its key, its
// CAS, its expiry and the fields of its value that the rules look at, as
// 32-bit hashes. memcached gives every stored version of an item a new CAS,
// so an entry whose CAS is unchanged since it was read still holds the same
// value. Entries are filled by crawls and by the reads of the stores the
// watcher reports (see live.go), and matched in memory.
//
// Equal ids have equal hashes, so a rule that matches a token matches its
// entry; two different ids can share a hash (one chance in 2^32 per
// comparison), which can only remove an entry that did not need to go.
//
// Layout: one slice per field (columns), indexed by slot, so that finding
// the entries of one id reads one column of 4 bytes per entry (about 0.4 MB
// for 100,000 entries) instead of every entry. The fields most tokens lack
// (trust, trustor, trustee, application credential, OAuth consumer) live in
// a map of the few entries that have any. Memory: 33 bytes of key, 8 of CAS,
// 4 of expiry, 1 of state, 40 of hashed fields, about 18 of map slot: about
// 104 bytes an entry plus the slack of growing slices and maps, whatever the
// tokens look like. Role lists are shared: each distinct set of roles is
// stored once per server. Nothing here holds pointers but the rare-field
// map's values, so the garbage collector scans almost nothing.

// Entry states (the low bits of meta).
const (
	// stateKeyOnly: known key, value never read (strategy Sweep).
	stateKeyOnly uint8 = iota
	stateReadable
	// stateUnreadable: a value that is not the middleware's readable JSON
	// (corrupt, foreign, pickled): removed for every event.
	stateUnreadable
	// stateEncrypted: an ENCRYPT value: removed for every event.
	stateEncrypted
	stateMask = 0x03
)

// entry flags (the high bits of meta).
const (
	// auditUnknown: the token had more than two audit ids (Keystone never
	// makes such tokens); every audit clause matches it.
	auditUnknown uint8 = 1 << 4
)

// roleSetUnknown marks an entry whose role set could not be stored (too
// many distinct sets): every role clause matches it.
const roleSetUnknown = ^uint32(0)

const maxRoleSets = 1 << 16

// entry is one index entry as the matcher reads it: built from the columns
// (serverIndex.entry) or from a value just read (makeEntry).
type entry struct {
	cas     uint64
	exp     uint32 // expiry, Unix seconds by the server's clock; 0: none or unknown
	ids     [nIDFields]uint32
	roles   uint32 // role set id; 0: no roles
	audit   uint32 // hash of audit_ids[0]; 0: none
	chain   uint32 // hash of audit_ids[1]; 0: none
	issued  uint32 // issued_at, Unix seconds rounded down; 0: unknown
	expires uint32 // expires_at, Unix seconds rounded down; 0: unknown
	meta    uint8  // state | flags
}

func (e *entry) state() uint8 { return e.meta & stateMask }

// removedForEvery reports whether the entry is removed for every event
// (its value cannot be read).
func (e *entry) removedForEvery() bool {
	s := e.state()
	return s == stateUnreadable || s == stateEncrypted
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

// withRole returns a bitmap of the role set ids whose set holds h.
func (rs *roleSets) withRole(h uint32) []uint64 {
	out := make([]uint64, (len(rs.sets)+1+63)/64)
	for i, set := range rs.sets {
		if _, ok := slices.BinarySearch(set, h); ok {
			id := i + 1
			out[id/64] |= 1 << (id % 64)
		}
	}
	return out
}

// Dense id columns; the others are rare (see rareIDs).
const nDense = 5 // fUser, fUserDomain, fProject, fProjectDomain, fDomain

// rareIDs are the hashed fields most tokens lack.
type rareIDs [nIDFields - nDense]uint32

// serverIndex is the index of one server, used under the server's lock.
type serverIndex struct {
	// slots maps the first 8 bytes of a key (uniformly random: the key is a
	// SHA-256 or HMAC output) to its slot; keys holds the full key of each
	// slot. A second key with the same 8 bytes is not remembered (such a
	// server's index cannot be complete): one chance in 2^64 per pair.
	slots   map[uint64]uint32
	keys    []binKey
	cas     []uint64
	exp     []uint32
	meta    []uint8
	dense   [nDense][]uint32
	roles   []uint32
	audit   []uint32
	chain   []uint32
	issued  []uint32
	expires []uint32
	rare    map[uint32]*rareIDs
	// forEvery holds the slots of entries removed for every event
	// (unreadable, encrypted).
	forEvery map[uint32]struct{}
	free     []uint32
	roleSets roleSets
	limit    int
	// full is set when an entry could not be remembered (limit, or an
	// 8-byte key prefix shared by two keys) since the index was made.
	full bool
	// encrypted counts ENCRYPT entries.
	encrypted int
}

func newServerIndex(limit int) *serverIndex {
	return &serverIndex{slots: map[uint64]uint32{}, rare: map[uint32]*rareIDs{}, forEvery: map[uint32]struct{}{}, limit: limit}
}

func (k *binKey) short() uint64 { return binary.LittleEndian.Uint64(k[1:9]) }

func (ix *serverIndex) len() int { return len(ix.slots) }

// lookup returns the slot of k.
func (ix *serverIndex) lookup(k binKey) (uint32, bool) {
	slot, ok := ix.slots[k.short()]
	if !ok || ix.keys[slot] != k {
		return 0, false
	}
	return slot, true
}

// entry returns the entry in slot.
func (ix *serverIndex) entry(slot uint32) entry {
	e := entry{cas: ix.cas[slot], exp: ix.exp[slot], meta: ix.meta[slot], roles: ix.roles[slot],
		audit: ix.audit[slot], chain: ix.chain[slot], issued: ix.issued[slot], expires: ix.expires[slot]}
	for f := range nDense {
		e.ids[f] = ix.dense[f][slot]
	}
	if r := ix.rare[slot]; r != nil {
		copy(e.ids[nDense:], r[:])
	}
	return e
}

// each calls fn for every remembered slot.
func (ix *serverIndex) each(fn func(slot uint32)) {
	for _, slot := range ix.slots {
		fn(slot)
	}
}

// makeEntry builds the entry of a value that was read: tok when it could be
// read, else state says why not.
func (ix *serverIndex) makeEntry(cas uint64, exp uint32, tok *Token, state uint8) entry {
	e := entry{cas: cas, exp: exp, meta: state}
	if state != stateReadable || tok == nil {
		return e
	}
	for f := field(0); f < nIDFields; f++ {
		e.ids[f] = hash32(tokenField(tok, f))
	}
	e.roles = ix.roleSets.id(tok.RoleIDs)
	switch n := len(tok.AuditIDs); {
	case n > 2:
		e.meta |= auditUnknown
	case n == 2:
		e.audit, e.chain = hash32(tok.AuditIDs[0]), hash32(tok.AuditIDs[1])
	case n == 1:
		e.audit = hash32(tok.AuditIDs[0])
	}
	e.issued = unixSeconds(tok.IssuedAt)
	e.expires = unixSeconds(tok.ExpiresAt)
	return e
}

// put stores e under k. It returns false, and marks the index full, when k
// is new and the index is full (or another key has the same first 8
// bytes).
func (ix *serverIndex) put(k binKey, e entry) bool {
	short := k.short()
	slot, ok := ix.slots[short]
	if ok && ix.keys[slot] != k {
		ix.full = true
		return false
	}
	if !ok {
		if ix.limit >= 0 && len(ix.slots) >= ix.limit {
			ix.full = true
			return false
		}
		if n := len(ix.free); n > 0 {
			slot = ix.free[n-1]
			ix.free = ix.free[:n-1]
		} else {
			slot = uint32(len(ix.keys))
			ix.keys = append(ix.keys, binKey{})
			ix.cas = append(ix.cas, 0)
			ix.exp = append(ix.exp, 0)
			ix.meta = append(ix.meta, 0)
			for f := range nDense {
				ix.dense[f] = append(ix.dense[f], 0)
			}
			ix.roles = append(ix.roles, 0)
			ix.audit = append(ix.audit, 0)
			ix.chain = append(ix.chain, 0)
			ix.issued = append(ix.issued, 0)
			ix.expires = append(ix.expires, 0)
		}
		ix.slots[short] = slot
		ix.keys[slot] = k
	} else {
		ix.clearSlot(slot)
	}
	ix.cas[slot], ix.exp[slot], ix.meta[slot] = e.cas, e.exp, e.meta
	for f := range nDense {
		ix.dense[f][slot] = e.ids[f]
	}
	ix.roles[slot], ix.audit[slot], ix.chain[slot] = e.roles, e.audit, e.chain
	ix.issued[slot], ix.expires[slot] = e.issued, e.expires
	var r rareIDs
	copy(r[:], e.ids[nDense:])
	if r != (rareIDs{}) {
		ix.rare[slot] = &r
	}
	if e.removedForEvery() {
		ix.forEvery[slot] = struct{}{}
	}
	if e.state() == stateEncrypted {
		ix.encrypted++
	}
	return true
}

// clearSlot forgets what slot holds besides its key.
func (ix *serverIndex) clearSlot(slot uint32) {
	delete(ix.rare, slot)
	if _, ok := ix.forEvery[slot]; ok {
		delete(ix.forEvery, slot)
	}
	if ix.meta[slot]&stateMask == stateEncrypted {
		ix.encrypted--
	}
}

// remove forgets k and reports whether it was remembered.
func (ix *serverIndex) remove(k binKey) bool {
	slot, ok := ix.lookup(k)
	if !ok {
		return false
	}
	ix.clearSlot(slot)
	ix.keys[slot] = binKey{}
	ix.meta[slot] = 0
	delete(ix.slots, k.short())
	ix.free = append(ix.free, slot)
	return true
}

// scan calls fn for every remembered slot whose field f holds hash h (for
// fRole: whose role set holds h; for fAuditAny: either audit id); with h 0,
// for every slot where f is set. Freed slots are never reported.
func (ix *serverIndex) scan(f field, h uint32, fn func(slot uint32)) {
	live := func(slot uint32) bool { return ix.keys[slot] != (binKey{}) }
	col := func(c []uint32) {
		if h == 0 {
			for slot, v := range c {
				if v != 0 && live(uint32(slot)) {
					fn(uint32(slot))
				}
			}
			return
		}
		for slot, v := range c {
			if v == h && live(uint32(slot)) {
				fn(uint32(slot))
			}
		}
	}
	switch {
	case f < nDense:
		col(ix.dense[f])
	case f < nIDFields:
		for slot, r := range ix.rare {
			if v := r[f-nDense]; v != 0 && (h == 0 || v == h) {
				fn(slot)
			}
		}
	case f == fRole:
		if h == 0 {
			col(ix.roles)
			return
		}
		sets := ix.roleSets.withRole(h)
		for slot, id := range ix.roles {
			if id == 0 || id == roleSetUnknown {
				continue // unknown sets: see matcher.wide
			}
			if int(id/64) < len(sets) && sets[id/64]&(1<<(id%64)) != 0 && live(uint32(slot)) {
				fn(uint32(slot))
			}
		}
	case f == fAudit:
		col(ix.audit)
	case f == fAuditAny:
		if h == 0 {
			col(ix.audit)
			return
		}
		for slot := range ix.audit {
			if (ix.audit[slot] == h || ix.chain[slot] == h) && live(uint32(slot)) {
				fn(uint32(slot))
			}
		}
	}
}

// scanAny calls fn for every remembered slot whose field f holds one of the
// hashes hs (none 0): one pass over the column for any number of ids. A slot
// may be reported more than once.
func (ix *serverIndex) scanAny(f field, hs []uint32, fn func(slot uint32)) {
	rare := f >= nDense && f < nIDFields // a small map: per id is fine
	if len(hs) == 1 || rare || f == fRole {
		for _, h := range hs {
			ix.scan(f, h, fn)
		}
		return
	}
	var bloom uint64
	want := make(map[uint32]struct{}, len(hs))
	for _, h := range hs {
		bloom |= 1 << (h & 63)
		want[h] = struct{}{}
	}
	match := func(v uint32) bool {
		if v == 0 || bloom&(1<<(v&63)) == 0 {
			return false
		}
		_, ok := want[v]
		return ok
	}
	col := func(c []uint32) {
		for slot, v := range c {
			if match(v) && ix.keys[slot] != (binKey{}) {
				fn(uint32(slot))
			}
		}
	}
	switch f {
	case fAudit:
		col(ix.audit)
	case fAuditAny:
		col(ix.audit)
		col(ix.chain)
	default:
		col(ix.dense[f])
	}
}

// slotSet is a set of slots, as a bitmap.
type slotSet []uint64

// add puts slot in the set. An emptied set (s[:0]) reuses its memory.
func (s *slotSet) add(slot uint32) {
	i := int(slot / 64)
	if n := len(*s); i >= n {
		if i < cap(*s) {
			*s = (*s)[:i+1]
			clear((*s)[n:])
		} else {
			*s = append(*s, make([]uint64, i+1-n)...)
		}
	}
	(*s)[i] |= 1 << (slot % 64)
}

func (s slotSet) has(slot uint32) bool {
	i := int(slot / 64)
	return i < len(s) && s[i]&(1<<(slot%64)) != 0
}

// each calls fn for every slot of the set, in order.
func (s slotSet) each(fn func(slot uint32)) {
	for i, w := range s {
		for w != 0 {
			b := bits.TrailingZeros64(w)
			fn(uint32(i*64 + b))
			w &= w - 1
		}
	}
}

func unixSeconds(t time.Time) uint32 {
	if t.IsZero() || t.Unix() <= 0 || t.Unix() > 1<<32-1 {
		return 0
	}
	return uint32(t.Unix())
}
