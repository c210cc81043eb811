package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/fixtures"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache/kmwtest"
)

// The ids Keystone itself puts in every CADF payload of the captures: its
// own service id (observer.id, which is also the identity service's id in the
// catalog of every token) and the admin who made the changes (initiator).
// Tokens that carry them but are not concerned by an event must survive it.
const (
	fixtureObserverID       = "e61395e9abc2459eb2ee472f92b9e933"
	fixtureAdminUserID      = "597ad1e7cf654faeae8d0bbc0df52721"
	fixtureAdminProjectID   = "0c49c1cae9f74c82835f0f5b391498f6"
	fixtureMemberRoleID     = "4ac1eba0fe314a829a048d674a3f2322"
	keystoneDefaultDomainID = "default"
)

// kind is what a Keystone id in a notification names.
type kind string

const (
	kUser    kind = "user"
	kProject kind = "project"
	kDomain  kind = "domain"
	kGroup   kind = "group"
	kTrust   kind = "trust"
	kAppCred kind = "application_credential"
)

// template is a captured notification whose object ids can be replaced by a
// test's own, so that many distinct notifications keep Keystone's exact
// bytes, envelope and AMQP properties.
type template struct {
	fx        fixtures.Notification
	eventType string
	// slots maps each object id of the capture to what it names.
	slots map[string]kind
	// messageID, uniqueID and cadfID are the capture's values, replaced by
	// fresh ones in every rendering.
	messageID, uniqueID, cadfID string
	// filtered: the bridge acknowledges it without publishing.
	filtered bool
	// bounded: it concerns only the tokens that carry its ids (otherwise
	// agents remove every token entry for it).
	bounded bool
	// domainScoped: the tokens it concerns are scoped to its domain (a
	// non-inherited group assignment on a domain).
	domainScoped bool
}

var (
	templatesOnce sync.Once
	templatesAll  []*template
	templatesErr  error
)

// loadTemplates turns every capture of fixtures.All() into a template.
func loadTemplates(t testing.TB) []*template {
	t.Helper()
	templatesOnce.Do(func() {
		all, err := fixtures.All()
		if err != nil {
			templatesErr = err
			return
		}
		filter, err := event.NewFilter(event.DefaultFilter)
		if err != nil {
			templatesErr = err
			return
		}
		for _, fx := range all {
			tpl, err := newTemplate(fx, filter)
			if err != nil {
				templatesErr = fmt.Errorf("fixture %s/%s: %w", fx.Format, fx.Name, err)
				return
			}
			templatesAll = append(templatesAll, tpl)
		}
	})
	if templatesErr != nil {
		t.Fatalf("loading the Keystone captures: %v", templatesErr)
	}
	return templatesAll
}

func newTemplate(fx fixtures.Notification, filter *event.Filter) (*template, error) {
	var outer struct {
		Msg string `json:"oslo.message"`
	}
	if err := json.Unmarshal(fx.Body, &outer); err != nil {
		return nil, err
	}
	var inner struct {
		MessageID string         `json:"message_id"`
		UniqueID  string         `json:"_unique_id"`
		EventType string         `json:"event_type"`
		Payload   map[string]any `json:"payload"`
	}
	if err := json.Unmarshal([]byte(outer.Msg), &inner); err != nil {
		return nil, err
	}
	if inner.EventType != fx.Meta.EventType {
		return nil, fmt.Errorf("event_type %q, meta says %q", inner.EventType, fx.Meta.EventType)
	}
	tpl := &template{fx: fx, eventType: inner.EventType, slots: map[string]kind{},
		messageID: inner.MessageID, uniqueID: inner.UniqueID}
	p := inner.Payload
	str := func(k string) string { s, _ := p[k].(string); return s }
	if str("typeURI") != "" {
		tpl.cadfID = str("id")
	}
	resource := map[string]kind{
		"user": kUser, "project": kProject, "domain": kDomain, "group": kGroup,
		"OS-TRUST:trust": kTrust, "application_credential": kAppCred,
	}
	parts := strings.Split(inner.EventType, ".")
	if id := str("resource_info"); id != "" && len(parts) == 3 {
		if k, ok := resource[parts[1]]; ok {
			tpl.slots[id] = k
		}
	}
	for field, k := range map[string]kind{"user": kUser, "project": kProject, "domain": kDomain, "group": kGroup, "actor_id": kUser} {
		if id := str(field); id != "" {
			tpl.slots[id] = k
		}
	}
	tpl.filtered = filter.Filtered(inner.EventType)
	switch {
	case tpl.filtered:
	case inner.EventType == "identity.group.updated":
		tpl.bounded = str("actor_id") != ""
	case inner.EventType == "identity.group.deleted", inner.EventType == "identity.role.deleted",
		inner.EventType == "identity.role.updated":
		tpl.bounded = false
	case strings.HasPrefix(inner.EventType, "identity.role_assignment."):
		inherited, _ := p["inherited_to_projects"].(bool)
		tpl.bounded = (str("user") != "" || str("group") != "") && (str("domain") != "" || (str("project") != "" && !inherited))
		tpl.domainScoped = str("user") == "" && str("domain") != "" && !inherited
	default:
		tpl.bounded = len(tpl.slots) > 0
	}
	return tpl, nil
}

// slotKinds are the kinds of ids the template names.
func (tpl *template) slotKinds() []kind {
	var out []kind
	for _, k := range tpl.slots {
		if !slices.Contains(out, k) {
			out = append(out, k)
		}
	}
	return out
}

var (
	timestampRE = regexp.MustCompile(`(\\"timestamp\\": \\")[0-9: .-]+(\\")`)
	eventTimeRE = regexp.MustCompile(`(\\"eventTime\\": \\")[0-9T:.+-]+(\\")`)
)

// render returns the capture's bytes with fresh message_id, _unique_id and
// CADF event id, the current time, and ids[kind] in place of the capture's
// object ids (kinds missing from ids keep the capture's id). msgID is the new
// oslo message_id.
func (tpl *template) render(msgID string, ids map[kind]string, now time.Time) []byte {
	s := string(tpl.fx.Body)
	var pairs []string
	pairs = append(pairs, tpl.messageID, msgID)
	if tpl.uniqueID != "" {
		pairs = append(pairs, tpl.uniqueID, strings.ReplaceAll(newUUID(), "-", ""))
	}
	if tpl.cadfID != "" {
		pairs = append(pairs, tpl.cadfID, newUUID())
	}
	old := make([]string, 0, len(tpl.slots))
	for id := range tpl.slots {
		old = append(old, id)
	}
	sort.Strings(old)
	for _, id := range old {
		if nid := ids[tpl.slots[id]]; nid != "" {
			pairs = append(pairs, id, nid)
		}
	}
	s = strings.NewReplacer(pairs...).Replace(s)
	now = now.UTC()
	s = timestampRE.ReplaceAllString(s, "${1}"+now.Format("2006-01-02 15:04:05.000000")+"${2}")
	s = eventTimeRE.ReplaceAllString(s, "${1}"+now.Format("2006-01-02T15:04:05.000000")+"+0000${2}")
	return []byte(s)
}

// amqpMessage is a body with the routing key and properties Keystone
// published it with (the capture's meta).
type amqpMessage struct {
	routingKey string
	props      amqp.Publishing
	body       []byte
}

func (tpl *template) message(body []byte) amqpMessage {
	return keystoneMessage(tpl.fx.Meta, body)
}

// keystoneMessage applies a capture's AMQP properties to body.
func keystoneMessage(meta fixtures.Meta, body []byte) amqpMessage {
	p := meta.Properties
	headers := amqp.Table{}
	for k, v := range p.Headers {
		headers[k] = v
	}
	return amqpMessage{
		routingKey: meta.RoutingKey,
		props: amqp.Publishing{
			ContentType:     p.ContentType,
			ContentEncoding: p.ContentEncoding,
			DeliveryMode:    p.DeliveryMode,
			Priority:        p.Priority,
			Headers:         headers,
		},
		body: body,
	}
}

// outcome is what the bridge must do with a published AMQP message.
type outcome struct {
	// published: the stream must hold it once, under msgID.
	published bool
	msgID     string
	// widen is the bridge's widened_total reason, when published widened.
	widen string
	// reject is the bridge's rejected_total reason.
	reject event.Reason
	// filtered: acknowledged without publishing.
	filtered bool
}

// victim is one subject of a token-affecting notification: the ids it names,
// the template that names them and the tokens it concerns (cached in every
// region).
type victim struct {
	tpl     *template
	ids     map[kind]string
	entries []kmwtest.Entry
	keys    []string // memcached keys of entries (strategy None)
}

// workload makes victims, unrelated tokens and notifications for one test.
type workload struct {
	mu      sync.Mutex
	gen     *kmwtest.Gen
	bounded []*template // token-affecting, bounded
	filter  []*template // filtered by the bridge
	next    int
}

func newWorkload(t testing.TB, seed uint64) *workload {
	w := &workload{gen: kmwtest.NewGen(seed)}
	w.gen.KeystoneServiceID = fixtureObserverID
	for _, tpl := range loadTemplates(t) {
		switch {
		case tpl.filtered:
			w.filter = append(w.filter, tpl)
		case tpl.bounded:
			w.bounded = append(w.bounded, tpl)
		}
	}
	if len(w.bounded) < 20 || len(w.filter) < 5 {
		t.Fatalf("the captures give %d bounded and %d filtered templates; expected at least 20 and 5", len(w.bounded), len(w.filter))
	}
	return w
}

// victims makes n victims, cycling through every bounded template, each with
// tokensPer cached tokens that its notification concerns.
func (w *workload) victims(n, tokensPer int) []*victim {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make([]*victim, 0, n)
	for range n {
		tpl := w.bounded[w.next%len(w.bounded)]
		w.next++
		v := &victim{tpl: tpl, ids: map[kind]string{}}
		for _, k := range []kind{kUser, kProject, kDomain, kGroup, kTrust, kAppCred} {
			v.ids[k] = w.gen.ID()
		}
		kinds := tpl.slotKinds()
		for range tokensPer {
			spec := kmwtest.Spec{
				UserID: v.ids[kUser], UserDomainID: v.ids[kDomain],
				ProjectID: v.ids[kProject], ProjectDomainID: v.ids[kDomain],
				Roles: []kmwtest.Role{{ID: fixtureMemberRoleID, Name: "member"}},
			}
			if tpl.domainScoped {
				spec.ProjectID, spec.ProjectDomainID, spec.DomainID = "", "", v.ids[kDomain]
			}
			if slices.Contains(kinds, kTrust) {
				spec.TrustID, spec.TrustorID, spec.TrusteeID = v.ids[kTrust], v.ids[kUser], w.gen.ID()
			}
			if slices.Contains(kinds, kAppCred) {
				spec.AppCredID = v.ids[kAppCred]
			}
			e := w.gen.Entry(spec)
			v.entries = append(v.entries, e)
			v.keys = append(v.keys, kmwtest.NoneKey(e.TokenID))
		}
		out = append(out, v)
	}
	return out
}

// unrelated makes n tokens that no bounded notification of this workload
// concerns: other users, projects and domains, among them the admin who made
// the captured changes (its ids are in every CADF payload) and tokens whose
// catalog holds Keystone's observer id.
func (w *workload) unrelated(n int) (entries []kmwtest.Entry, keys []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i := range n {
		var spec kmwtest.Spec
		switch i % 4 {
		case 0:
			spec = kmwtest.Spec{UserID: fixtureAdminUserID, UserName: "admin", UserDomainID: keystoneDefaultDomainID,
				ProjectID: fixtureAdminProjectID, ProjectDomainID: keystoneDefaultDomainID,
				Roles: []kmwtest.Role{{ID: w.gen.ID(), Name: "admin"}, {ID: fixtureMemberRoleID, Name: "member"}}}
		case 1:
			spec = kmwtest.Spec{UserID: fixtureAdminUserID, UserName: "admin", UserDomainID: keystoneDefaultDomainID,
				System: true, Roles: []kmwtest.Role{{ID: w.gen.ID(), Name: "admin"}}}
		default:
			d := w.gen.ID()
			spec = kmwtest.Spec{UserID: w.gen.ID(), UserDomainID: d, ProjectID: w.gen.ID(), ProjectDomainID: d,
				Roles: []kmwtest.Role{{ID: fixtureMemberRoleID, Name: "member"}}}
		}
		e := w.gen.Entry(spec)
		entries = append(entries, e)
		keys = append(keys, kmwtest.NoneKey(e.TokenID))
	}
	return entries, keys
}

// notification renders v's notification.
func (v *victim) notification(now time.Time) (amqpMessage, outcome) {
	id := newUUID()
	return v.tpl.message(v.tpl.render(id, v.ids, now)), outcome{published: true, msgID: id}
}

// harmless renders a notification the bridge filters (a creation or an
// authentication), with fresh ids.
func (w *workload) harmless(now time.Time) (amqpMessage, outcome) {
	w.mu.Lock()
	tpl := w.filter[w.next%len(w.filter)]
	w.next++
	ids := map[kind]string{}
	for _, k := range []kind{kUser, kProject, kDomain, kGroup, kTrust, kAppCred} {
		ids[k] = w.gen.ID()
	}
	w.mu.Unlock()
	id := newUUID()
	return tpl.message(tpl.render(id, ids, now)), outcome{filtered: true, msgID: id}
}

// mixed returns, for the victims, their notifications with one harmless
// notification after every fourth, in order.
func (w *workload) mixed(victims []*victim) ([]amqpMessage, []outcome) {
	var msgs []amqpMessage
	var outs []outcome
	now := time.Now()
	for i, v := range victims {
		m, o := v.notification(now)
		msgs, outs = append(msgs, m), append(outs, o)
		if i%4 == 3 {
			m, o := w.harmless(now)
			msgs, outs = append(msgs, m), append(outs, o)
		}
	}
	return msgs, outs
}

func allKeys(victims []*victim) []string {
	var keys []string
	for _, v := range victims {
		keys = append(keys, v.keys...)
	}
	return keys
}

func allEntries(victims []*victim) []kmwtest.Entry {
	var out []kmwtest.Entry
	for _, v := range victims {
		out = append(out, v.entries...)
	}
	return out
}

func newUUID() string {
	b := make([]byte, 16)
	rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func randomSuffix() string {
	b := make([]byte, 5)
	rand.Read(b)
	return hex.EncodeToString(b)
}
