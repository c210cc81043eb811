package tokencache

import (
	"slices"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

// matcher evaluates a batch of events against index entries. It is built
// once per batch from the events' predicates (compile), with the clause ids
// hashed like the entries' fields, and indexed by (field, hash) so that the
// cost per entry does not grow with the number of events. It is read-only
// once built and shared by the servers' crawls and by the live path, which
// finds the entries to look at through the index's columns (candidates).
type matcher struct {
	events []event.Event
	// wide: strategy Sweep, every event removes every token.
	wide bool
	// all is the first event that removes every token, -1 if none.
	all int32

	// Notification rules: any clause.
	orKeys    map[uint64]int32 // (field, hash) -> first event with such a clause
	orBloom   uint64
	orPresent [nFields]int32 // presence clauses, per field
	orRole    int32          // first event with a role clause (entries with unknown roles)
	orAudit   int32          // first event with an audit clause (entries with unknown audit ids)

	// Predicates with every clause to match and a time condition: the
	// revocation events, and in a late matcher (see newLateMatcher) every
	// event. Each is found through its first (most selective) clause; the
	// slices below hold indexes into preds.
	preds     []*hpred
	revKeys   map[uint64][]int32
	revBloom  uint64
	revLinear []int32 // without an id clause to find them by
	revRole   []int32 // anchored on a role: for entries with unknown roles
	revAudit  []int32 // anchored on an audit id: for entries with unknown audit ids
}

type hclause struct {
	fields fieldSet
	h      uint32 // 0: presence clause
}

type hpred struct {
	ev            int32 // the event it comes from
	and           []hclause
	hasIssued     bool
	issuedBefore  int64 // Unix seconds, rounded down
	hasExpires    bool
	expiresSecond int64
}

func key(f field, h uint32) uint64 { return uint64(f)<<32 | uint64(h) }

func bloomBit(k uint64) uint64 { return 1 << ((k * 0x9e3779b97f4a7c15) >> 58) }

func minEvent(a, b int32) int32 {
	if a < 0 || (b >= 0 && b < a) {
		return b
	}
	return a
}

// newMatcher compiles events. With wide (strategy Sweep) every event that
// is not the poller's progress removes every token.
func newMatcher(events []event.Event, wide bool) *matcher {
	return compileMatcher(events, wide, false)
}

// issuedSkew is how much later than a notification's time a token may have
// been issued and still be treated as issued before it: Keystone writes
// issued_at to the second (rounded down) and its hosts' clocks differ.
const issuedSkew = 2 * time.Second

// newLateMatcher compiles the events of the recent window for the values
// read after them (late write-backs). A token issued after a change is
// validated after it, so its validation cannot be stale: a notification (or
// an event that removes every token) concerns only the tokens issued before
// its time plus issuedSkew, as a revocation event concerns only tokens
// issued before its issued_before. Without its time, an event concerns
// every token it names.
func newLateMatcher(events []event.Event, wide bool) *matcher {
	return compileMatcher(events, wide, true)
}

func compileMatcher(events []event.Event, wide, late bool) *matcher {
	m := &matcher{events: events, wide: wide, all: -1, orKeys: map[uint64]int32{}, orRole: -1, orAudit: -1,
		revKeys: map[uint64][]int32{}}
	for f := range m.orPresent {
		m.orPresent[f] = -1
	}
	addPred := func(hp *hpred) {
		pi := int32(len(m.preds))
		m.preds = append(m.preds, hp)
		if len(hp.and) == 0 || hp.and[0].h == 0 {
			m.revLinear = append(m.revLinear, pi)
			return
		}
		anchor := hp.and[0]
		for f := field(0); f < nFields; f++ {
			if anchor.fields.has(f) {
				k := key(f, anchor.h)
				m.revKeys[k] = append(m.revKeys[k], pi)
				m.revBloom |= bloomBit(k)
			}
		}
		if anchor.fields.has(fRole) {
			m.revRole = append(m.revRole, pi)
		}
		if anchor.fields.has(fAudit) || anchor.fields.has(fAuditAny) {
			m.revAudit = append(m.revAudit, pi)
		}
	}
	for i := range events {
		idx := int32(i)
		e := &events[i]
		p := compile(e)
		if wide && e.Kind != event.KindPolled {
			p = predicate{all: true}
		}
		if late && !p.revocation && !e.Time.IsZero() && (p.all || len(p.or) > 0) {
			// Only the tokens issued before the event.
			before := e.Time.Add(issuedSkew).Unix()
			if p.all {
				addPred(&hpred{ev: idx, hasIssued: true, issuedBefore: before})
				continue
			}
			for _, c := range p.or {
				addPred(&hpred{ev: idx, hasIssued: true, issuedBefore: before, and: []hclause{{c.fields, hash32(c.id)}}})
			}
			continue
		}
		switch {
		case p.all:
			m.all = minEvent(m.all, idx)
		case p.revocation:
			hp := &hpred{ev: idx}
			if !p.issuedBefore.IsZero() {
				hp.hasIssued, hp.issuedBefore = true, p.issuedBefore.Unix()
			}
			if p.expiresAt != nil {
				hp.hasExpires, hp.expiresSecond = true, p.expiresAt.Unix()
			}
			for _, c := range p.and {
				hp.and = append(hp.and, hclause{c.fields, hash32(c.id)})
			}
			addPred(hp)
		default:
			for _, c := range p.or {
				h := hash32(c.id)
				for f := field(0); f < nFields; f++ {
					if !c.fields.has(f) {
						continue
					}
					switch f {
					case fRole:
						m.orRole = minEvent(m.orRole, idx)
					case fAudit, fAuditAny:
						m.orAudit = minEvent(m.orAudit, idx)
					}
					if h == 0 {
						m.orPresent[f] = minEvent(m.orPresent[f], idx)
						continue
					}
					k := key(f, h)
					if old, ok := m.orKeys[k]; !ok || idx < old {
						m.orKeys[k] = idx
					}
					m.orBloom |= bloomBit(k)
				}
			}
		}
	}
	return m
}

// reason is the metric label and Removal.Reason for event i.
func (m *matcher) reason(i int32) string {
	e := &m.events[i]
	switch {
	case m.wide:
		return "sweep"
	case e.Unbounded():
		return "unbounded"
	case e.Kind == event.KindRevocation:
		return "revocation"
	case e.Kind == event.KindPolled:
		return "polled"
	}
	return e.Type // one of event.KnownTypes: bounded
}

// entryKeys appends the (field, hash) keys of a readable entry to buf.
func entryKeys(ix *serverIndex, en *entry, buf []uint64) []uint64 {
	for f := field(0); f < nIDFields; f++ {
		if v := en.ids[f]; v != 0 {
			buf = append(buf, key(f, v))
		}
	}
	if en.roles != roleSetUnknown {
		for _, r := range ix.roleSets.set(en.roles) {
			buf = append(buf, key(fRole, r))
		}
	}
	if en.meta&auditUnknown == 0 {
		if en.audit != 0 {
			buf = append(buf, key(fAudit, en.audit), key(fAuditAny, en.audit))
		}
		if en.chain != 0 {
			buf = append(buf, key(fAuditAny, en.chain))
		}
	}
	return buf
}

// match returns the first event that concerns a readable entry, or -1. buf
// is scratch space, returned for reuse.
func (m *matcher) match(ix *serverIndex, en *entry, buf []uint64) (int32, []uint64) {
	if m.all >= 0 {
		return m.all, buf
	}
	buf = entryKeys(ix, en, buf[:0])
	best := int32(-1)
	if m.orBloom != 0 {
		for _, k := range buf {
			if m.orBloom&bloomBit(k) != 0 {
				if i, ok := m.orKeys[k]; ok {
					best = minEvent(best, i)
				}
			}
		}
	}
	for f := field(0); f < nIDFields; f++ {
		if m.orPresent[f] >= 0 && en.ids[f] != 0 {
			best = minEvent(best, m.orPresent[f])
		}
	}
	if en.roles == roleSetUnknown {
		best = minEvent(best, m.orRole)
	} else if m.orPresent[fRole] >= 0 && en.roles != 0 {
		best = minEvent(best, m.orPresent[fRole])
	}
	if en.meta&auditUnknown != 0 {
		best = minEvent(best, m.orAudit)
	} else if en.audit != 0 {
		best = minEvent(best, m.orPresent[fAudit])
		best = minEvent(best, m.orPresent[fAuditAny])
	}
	if best >= 0 || len(m.preds) == 0 {
		return best, buf
	}
	check := func(pi int32) {
		p := m.preds[pi]
		if (best < 0 || p.ev < best) && p.matchEntry(ix, en) {
			best = p.ev
		}
	}
	if m.revBloom != 0 {
		for _, k := range buf {
			if m.revBloom&bloomBit(k) != 0 {
				for _, i := range m.revKeys[k] {
					check(i)
				}
			}
		}
	}
	for _, i := range m.revLinear {
		check(i)
	}
	if en.roles == roleSetUnknown {
		for _, i := range m.revRole {
			check(i)
		}
	}
	if en.meta&auditUnknown != 0 {
		for _, i := range m.revAudit {
			check(i)
		}
	}
	return best, buf
}

func (p *hpred) matchEntry(ix *serverIndex, en *entry) bool {
	if p.hasIssued && en.issued != 0 && int64(en.issued) > p.issuedBefore {
		return false // issued after the event: not revoked
	}
	if p.hasExpires && en.expires != 0 && int64(en.expires) != p.expiresSecond {
		return false
	}
	for i := range p.and {
		if !p.and[i].matchEntry(ix, en) {
			return false
		}
	}
	return true
}

func (c *hclause) matchEntry(ix *serverIndex, en *entry) bool {
	for f := field(0); f < nFields; f++ {
		if !c.fields.has(f) {
			continue
		}
		switch f {
		case fRole:
			if en.roles == roleSetUnknown {
				return true
			}
			set := ix.roleSets.set(en.roles)
			if c.h == 0 && len(set) > 0 {
				return true
			}
			if _, ok := slices.BinarySearch(set, c.h); ok && c.h != 0 {
				return true
			}
		case fAudit, fAuditAny:
			if en.meta&auditUnknown != 0 {
				return true
			}
			if c.h == 0 && en.audit != 0 || c.h != 0 && en.audit == c.h {
				return true
			}
			if f == fAuditAny && c.h != 0 && en.chain == c.h {
				return true
			}
		default:
			v := en.ids[f]
			if c.h == 0 && v != 0 || c.h != 0 && v == c.h {
				return true
			}
		}
	}
	return false
}

// none reports whether m cannot match anything (every event is the poller's
// progress, or there is none).
func (m *matcher) none() bool {
	if m.all >= 0 || len(m.orKeys) > 0 || len(m.preds) > 0 {
		return false
	}
	for _, i := range m.orPresent {
		if i >= 0 {
			return false
		}
	}
	return m.orRole < 0 && m.orAudit < 0
}

// candidates returns the slots of ix that an event of m may concern, found
// through the index's columns, in set (emptied first, its memory reused);
// every slot returned must still be checked with match. all is true when m
// must look at every entry: an event that removes every token, a presence
// clause ("every project-scoped token"), a revocation event without an id
// clause. Entries removed for every event (ix.forEvery) are not included.
func (m *matcher) candidates(ix *serverIndex, set slotSet) (_ slotSet, all bool) {
	set = set[:0]
	if m.all >= 0 || len(m.revLinear) > 0 {
		return set, true
	}
	for _, i := range m.orPresent {
		if i >= 0 {
			return set, true
		}
	}
	add := func(slot uint32) { set.add(slot) }
	// One scan per field for all the ids the batch looks for in it.
	var byField [nFields][]uint32
	for k := range m.orKeys {
		byField[field(k>>32)] = append(byField[field(k>>32)], uint32(k))
	}
	for k := range m.revKeys {
		byField[field(k>>32)] = append(byField[field(k>>32)], uint32(k))
	}
	for f, hs := range byField {
		if len(hs) > 0 {
			ix.scanAny(field(f), hs, add)
		}
	}
	if m.orRole >= 0 || len(m.revRole) > 0 {
		for slot, id := range ix.roles {
			if id == roleSetUnknown && ix.keys[slot] != (binKey{}) {
				set.add(uint32(slot))
			}
		}
	}
	if m.orAudit >= 0 || len(m.revAudit) > 0 {
		for slot, meta := range ix.meta {
			if meta&auditUnknown != 0 && ix.keys[slot] != (binKey{}) {
				set.add(uint32(slot))
			}
		}
	}
	return set, false
}
