// Package revoke carries Keystone's revocation events to JetStream.
//
// Keystone's notifications do not cover every way a token stops being valid:
// DELETE /v3/auth/tokens publishes nothing, and a CADF group membership
// notification does not name the user. Keystone records both as revocation
// events, listed by GET /v3/OS-REVOKE/events. The
// Poller lists them every PollInterval and publishes each, converted to an
// event.Event of kind event.KindRevocation, on "<prefix>.revocation" with
// Nats-Msg-Id = its content digest, waiting for the PubAck.
//
// Publishing once: several bridge replicas publish the same events with the
// same id within JetStream's duplicate window, so the stream keeps one. Across
// restarts, however long, the poller's position (the newest revoked_at
// published and the ids it may list again) is kept in a JetStream key-value
// entry, written only after the PubAcks: a restarted poller skips what was
// published and publishes what was not. See docs/REVOCATION.md.
package revoke

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/backoff"
	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

// Poller polls Keystone's revocation events and publishes them to JetStream.
// Create it with New and run it with Run (once); Ready reports its health and
// may be called from any goroutine.
type Poller struct {
	o   Options
	js  jetstream.JetStream
	log *slog.Logger
	ks  *keystoneClient
	m   metrics

	// Owned by Run's goroutine.
	store *positionStore
	pos   position
	polls int64 // polls made, for a distinct "since"
	dirty bool  // pos holds published events not yet saved

	// through is the highest stream sequence of a notification not yet
	// covered by a poll; trigger wakes the polling loop (capacity 1).
	through atomic.Uint64
	trigger chan struct{}
	// following is set while the holder follows the stream's notifications.
	following atomic.Bool

	mu       sync.Mutex
	readyErr error
	lastOK   time.Time // last successful poll
}

// Poll stages, the label of keystone_fanout_revoke_poll_errors_total.
const (
	stageAuth     = "auth"
	stageList     = "list"
	stagePublish  = "publish"
	stagePosition = "position"
	stageLease    = "lease"
)

type metrics struct {
	polls, published, duplicates, widened prometheus.Counter
	polledPublished, leaseAcquired        prometheus.Counter
	leaseHeld                             prometheus.Gauge
	errors                                *prometheus.CounterVec
	auth                                  *prometheus.CounterVec
	lastSuccess, position                 prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) (metrics, error) {
	const ns, sub = "keystone_fanout", "revoke"
	m := metrics{
		polls: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "polls_total",
			Help: "Polls of GET /v3/OS-REVOKE/events attempted."}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "poll_errors_total",
			Help: "Failed polls, by stage (auth, list, publish, position)."}, []string{"stage"}),
		published: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "events_published_total",
			Help: "Revocation events published to JetStream and stored as new messages."}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "duplicates_total",
			Help: "Revocation events JetStream acknowledged as duplicates (already published by another replica or before a restart)."}),
		widened: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "events_widened_total",
			Help: "Revocation events published widened (remove every token entry) because they were not understood."}),
		auth: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "auth_total",
			Help: "Authentications to Keystone, by result (success, failure)."}, []string{"result"}),
		lastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "last_success_timestamp_seconds",
			Help: "Unix time of the last successful poll."}),
		position: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "position_timestamp_seconds",
			Help: "revoked_at (Unix time) of the newest revocation event published."}),
		polledPublished: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "polled_published_total",
			Help: "Proofs of progress published: each says a poll started after the stream held a notification, so that agents need not sweep for it."}),
		leaseAcquired: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "lease_acquisitions_total",
			Help: "Times this replica took the poller's lease (it polls while it holds it)."}),
		leaseHeld: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "lease_held",
			Help: "1 while this replica holds the poller's lease and polls, 0 while it stands by."}),
	}
	for _, s := range []string{stageAuth, stageList, stagePublish, stagePosition, stageLease} {
		m.errors.WithLabelValues(s)
	}
	m.auth.WithLabelValues("success")
	m.auth.WithLabelValues("failure")
	if reg != nil {
		for _, c := range []prometheus.Collector{m.polls, m.errors, m.published, m.duplicates, m.widened, m.auth, m.lastSuccess, m.position,
			m.polledPublished, m.leaseAcquired, m.leaseHeld} {
			if err := reg.Register(c); err != nil {
				return m, fmt.Errorf("revoke: registering metrics: %w", err)
			}
		}
	}
	return m, nil
}

// New validates o and returns a Poller that publishes through js. It connects
// to nothing: Run does. reg receives the keystone_fanout_revoke_* metrics (nil:
// none); log (nil discards) is used as given: the caller names the component.
func New(o Options, js jetstream.JetStream, reg prometheus.Registerer, log *slog.Logger) (*Poller, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	if js == nil {
		return nil, errors.New("revoke: no JetStream to publish to")
	}
	o.setDefaults()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Poller{o: o, js: js, log: log, readyErr: errors.New("revocation poller: no successful poll yet"),
		trigger: make(chan struct{}, 1)}
	ks, err := newKeystoneClient(&p.o, log)
	if err != nil {
		return nil, err
	}
	p.ks = ks
	if p.m, err = newMetrics(reg); err != nil {
		return nil, err
	}
	return p, nil
}

// Ready returns nil when this replica holds the lease and its last poll
// succeeded, or stands by while another replica holds it; else why not: no
// poll has succeeded yet, or Keystone, JetStream or the position store failed
// the last attempt (the poller keeps retrying).
func (p *Poller) Ready() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.readyErr
}

// Run loads the position, then takes part in the lease: while this replica
// holds it, it polls (see hold); otherwise it waits to take over. It returns
// nil when ctx is cancelled, after handing the lease over. Errors (Keystone
// away or answering errors, JetStream unavailable) are counted, logged, shown
// by Ready and retried after a backoff that starts at PollInterval and doubles
// up to MaxBackoff, less up to 20% jitter (see internal/backoff); they never
// end Run.
func (p *Poller) Run(ctx context.Context) error {
	p.log.Info("revocation poller starting", "url", p.o.URL, "interval", p.o.PollInterval,
		"bucket", p.o.Bucket, "key", p.o.Key, "subject", p.o.SubjectPrefix+".revocation",
		"holder", p.o.Holder, "lease_ttl", p.o.LeaseTTL)
	bo := backoff.New(p.o.PollInterval, p.o.MaxBackoff)
	for p.store == nil {
		if err := p.open(ctx); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if !backoff.Sleep(ctx, p.failed(stagePosition, err, bo)) {
				return nil
			}
		}
	}
	for {
		l, err := p.acquire(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			if !backoff.Sleep(ctx, p.failed(stageLease, err, bo)) {
				return nil
			}
			continue
		}
		bo.Reset()
		if err := p.reload(ctx); err != nil {
			p.log.Warn("reloading the revocation position on taking the lease failed; polling from the one loaded before", "err", err)
		}
		p.setReady(errors.New("revocation poller: holding the lease, no successful poll yet"))
		p.m.leaseAcquired.Inc()
		p.m.leaseHeld.Set(1)
		p.log.Info("holding the revocation poller's lease: polling Keystone")
		stepDown := p.hold(ctx, l, bo)
		p.m.leaseHeld.Set(0)
		p.flush()
		if stepDown {
			rctx, cancel := context.WithTimeout(ctx, p.o.RequestTimeout)
			_ = l.release(rctx)
			cancel()
			p.setReady(errors.New("revocation poller: gave the lease up after failing polls"))
			if !backoff.Sleep(ctx, 2*p.o.LeaseTTL) { // let another replica take it
				return nil
			}
			continue
		}
		if ctx.Err() != nil {
			rctx, cancel := context.WithTimeout(context.Background(), p.o.RequestTimeout)
			if err := l.release(rctx); err != nil {
				p.log.Warn("handing the lease over failed; another replica takes over after its ttl", "err", err)
			}
			cancel()
			return nil
		}
		p.log.Warn("lost the revocation poller's lease: another replica polls now")
		p.setReady(errors.New("revocation poller: lost the lease, not seen another holder yet"))
	}
}

// hold polls while this replica holds l, until ctx ends or the lease is lost:
// every PollInterval, at once when a notification reaches the stream (then
// again after each of FollowUps), and after errors with bo's backoff. After
// the first successful poll that started once notifications up to stream
// sequence N were stored, it publishes an event.KindPolled event for N.
func (p *Poller) hold(ctx context.Context, l *lease, bo *backoff.Backoff) (stepDown bool) {
	hctx, cancel := context.WithCancel(ctx)
	began := time.Now()
	p.following.Store(false)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	wg.Add(2)
	go func() {
		defer wg.Done()
		defer cancel() // a lost lease ends the holding
		p.renew(hctx, l, began)
	}()
	go func() {
		defer wg.Done()
		p.followNotifications(hctx)
	}()

	timer := time.NewTimer(0) // poll at once on taking the lease
	defer timer.Stop()
	var followUps []time.Time // due extra polls after a notification
	for {
		select {
		case <-hctx.Done():
			return false
		case <-p.trigger:
			if bo.Failures() > 0 {
				continue // backing off: the next attempt will cover it
			}
		case <-timer.C:
		}
		start := time.Now()
		through := p.through.Swap(0)
		stage, err := p.poll(hctx)
		if err == nil && through > 0 {
			if err = p.publishPolled(hctx, through); err != nil {
				stage = stagePublish
			}
		}
		if hctx.Err() != nil {
			return false
		}
		if !p.healthy(began) && time.Since(p.lastSuccess()) > p.unhealthyBound() && time.Since(began) > p.unhealthyBound() {
			// This replica may be the only one that cannot reach Keystone
			// (a route, a CA file, a rotated password): let another try.
			p.log.Warn("the revocation poller's polls keep failing: handing the lease to another replica",
				"failing_for", p.unhealthyBound())
			return true
		}
		next := start.Add(p.o.PollInterval)
		if err != nil {
			p.noteNotification(through) // still owed: the next successful poll covers it
			next = time.Now().Add(p.failed(stage, err, bo))
			followUps = nil
		} else {
			p.succeeded(bo)
			if through > 0 {
				followUps = followUps[:0]
				for _, d := range p.o.FollowUps {
					followUps = append(followUps, start.Add(d))
				}
			}
			for len(followUps) > 0 && !followUps[0].After(time.Now()) {
				followUps = followUps[1:]
			}
			if len(followUps) > 0 && followUps[0].Before(next) {
				next = followUps[0]
			}
		}
		timer.Reset(time.Until(next))
	}
}

// renew renews l every LeaseTTL/4 until ctx ends. It returns when the lease
// is lost: another replica wrote it, or it could not be renewed for LeaseTTL
// (another replica may have taken it over meanwhile).
func (p *Poller) renew(ctx context.Context, l *lease, began time.Time) {
	t := time.NewTicker(p.o.LeaseTTL / 4)
	defer t.Stop()
	renewed := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rctx, cancel := context.WithTimeout(ctx, p.o.LeaseTTL/2)
		err := l.renew(rctx, p.leaseValue(p.healthy(began), l.nonce))
		cancel()
		switch {
		case err == nil:
			renewed = time.Now()
		case ctx.Err() != nil:
			return
		case errors.Is(err, jetstream.ErrKeyExists):
			return // another replica holds it
		case time.Since(renewed) >= p.o.LeaseTTL:
			p.log.Warn("the revocation poller's lease could not be renewed within its ttl", "err", err)
			return
		}
	}
}

// healthy reports whether this holding can resolve notifications: it follows
// the stream's notifications and its last poll succeeded, or it began less
// than three intervals ago.
func (p *Poller) healthy(began time.Time) bool {
	if time.Since(began) < 3*p.o.PollInterval {
		return true
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.readyErr == nil && p.following.Load()
}

// unhealthyBound is how long a holder whose polls fail keeps the lease.
func (p *Poller) unhealthyBound() time.Duration {
	return max(10*p.o.PollInterval, 4*p.o.LeaseTTL)
}

// lastSuccess is when a poll last succeeded (zero: never).
func (p *Poller) lastSuccess() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.lastOK
}

// followNotifications makes every notification stored in the stream trigger
// a poll, through an ordered consumer of its notification subjects (headers
// only), until ctx ends.
func (p *Poller) followNotifications(ctx context.Context) {
	stream.Follower{
		Stream: p.o.Stream,
		Config: func() jetstream.OrderedConsumerConfig {
			return jetstream.OrderedConsumerConfig{
				FilterSubjects: []string{p.o.SubjectPrefix + ".notification.>"},
				DeliverPolicy:  jetstream.DeliverNewPolicy,
				HeadersOnly:    true,
			}
		},
		Handle: func(m jetstream.Msg) {
			if md, err := m.Metadata(); err == nil {
				p.noteNotification(md.Sequence.Stream)
			}
		},
		Started: func() {
			// Notifications stored before the consumer began (while the
			// lease changed hands) count as seen: the next poll covers them.
			p.through.Store(0)
			if s, err := p.js.Stream(ctx, p.o.Stream); err == nil {
				p.noteNotification(s.CachedInfo().State.LastSeq)
			}
			p.following.Store(true)
		},
		Stopped:    func() { p.following.Store(false) },
		MaxBackoff: p.o.MaxBackoff,
		What:       "cannot follow the stream's notifications yet; polling on the interval meanwhile",
	}.Follow(ctx, p.js, p.log)
}

// noteNotification records that notifications up to stream sequence seq are
// stored, and wakes the polling loop.
func (p *Poller) noteNotification(seq uint64) {
	if seq == 0 {
		return
	}
	for {
		cur := p.through.Load()
		if seq <= cur || p.through.CompareAndSwap(cur, seq) {
			break
		}
	}
	select {
	case p.trigger <- struct{}{}:
	default:
	}
}

// publishPolled publishes the proof that a poll started after notifications up
// to stream sequence through were stored, once every event that poll found
// was acknowledged.
func (p *Poller) publishPolled(ctx context.Context, through uint64) error {
	e := event.Event{Version: event.SchemaVersion, Kind: event.KindPolled, Type: event.PolledType,
		ID: fmt.Sprintf("polled-%d", through), Time: p.o.Now().UTC(), Polled: &event.Polled{Through: through}}
	if _, err := p.publish(ctx, &e); err != nil {
		return fmt.Errorf("publishing the poll's progress: %w", err)
	}
	p.m.polledPublished.Inc()
	return nil
}

// setReady sets what Ready reports. A standby replica that sees another
// holder renew the lease is ready: it has nothing to do until that one goes.
func (p *Poller) setReady(err error) {
	p.mu.Lock()
	p.readyErr = err
	p.mu.Unlock()
}

func (p *Poller) open(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, p.o.RequestTimeout)
	defer cancel()
	store, err := openPositionStore(ctx, p.js, &p.o, p.log)
	if err != nil {
		return err
	}
	pos, err := store.load(ctx)
	if err != nil {
		return err
	}
	p.store, p.pos = store, pos
	p.setPositionGauge()
	if pos.RevokedAt.IsZero() {
		p.log.Info("no stored position: publishing every revocation event Keystone lists")
	} else {
		p.log.Info("loaded position", "revoked_at", pos.RevokedAt, "recent", len(pos.Recent))
	}
	return nil
}

// reload merges the stored position into this replica's, on taking the
// lease: another holder may have published much since this one loaded it.
func (p *Poller) reload(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, p.o.RequestTimeout)
	defer cancel()
	stored, err := p.store.load(ctx)
	if err != nil {
		return err
	}
	p.pos.merge(stored)
	p.setPositionGauge()
	return nil
}

// poll lists the events since the position, publishes the new ones in
// revoked_at order, and saves the position. It returns the failed stage.
func (p *Poller) poll(ctx context.Context) (string, error) {
	p.m.polls.Inc()
	if !p.ks.tokenValid() {
		if err := p.authenticate(ctx); err != nil {
			return stageAuth, err
		}
	}
	// Keystone caches its answer by "since" ([revoke] caching); a since
	// of its own, a few microseconds earlier each poll, asks the database.
	p.polls++
	since := p.pos.since(p.o.Overlap)
	if !since.IsZero() { // zero: no position yet, every event
		since = since.Add(-time.Duration(p.polls%1000) * time.Microsecond)
	}
	raw, err := p.ks.listEvents(ctx, since)
	var se *httpStatusError
	if errors.As(err, &se) && se.status == http.StatusUnauthorized {
		// Token revoked or keys rotated before its expiry: once more with a new one.
		if err := p.authenticate(ctx); err != nil {
			return stageAuth, err
		}
		raw, err = p.ks.listEvents(ctx, since)
	}
	if err != nil {
		return stageList, err
	}

	type item struct {
		e  event.Event
		ok bool
	}
	items := make([]item, 0, len(raw))
	for _, r := range raw {
		e, ok := Convert(r)
		items = append(items, item{e, ok})
	}
	slices.SortStableFunc(items, func(a, b item) int { return a.e.Time.Compare(b.e.Time) })

	var pubErr error
	for _, it := range items {
		if p.pos.seen(it.e.ID) {
			continue
		}
		if it.e.Widen != "" {
			p.log.Error("publishing a revocation event widened: region agents remove every token entry",
				"id", it.e.ID, "reason", it.e.Widen)
		}
		dup, err := p.publish(ctx, &it.e)
		if err != nil {
			pubErr = fmt.Errorf("publishing revocation event %s: %w", it.e.ID, err)
			break
		}
		switch {
		case dup:
			p.m.duplicates.Inc()
		default:
			p.m.published.Inc()
			if it.e.Widen != "" {
				p.m.widened.Inc()
			}
			p.log.Debug("published revocation event", "id", it.e.ID, "revoked_at", it.e.Time)
		}
		at := it.e.Time
		if !it.ok {
			at = time.Time{}
		}
		p.pos.add(it.e.ID, at)
		p.dirty = true
	}
	// Save what was acknowledged, also when a later publish failed.
	if p.dirty {
		if err := p.save(ctx); err != nil {
			if pubErr != nil {
				return stagePublish, errors.Join(pubErr, err)
			}
			return stagePosition, err
		}
	}
	if pubErr != nil {
		return stagePublish, pubErr
	}
	return "", nil
}

func (p *Poller) authenticate(ctx context.Context) error {
	if err := p.ks.authenticate(ctx); err != nil {
		p.m.auth.WithLabelValues("failure").Inc()
		return err
	}
	p.m.auth.WithLabelValues("success").Inc()
	p.log.Debug("authenticated to Keystone", "renew_at", p.ks.refreshAt)
	return nil
}

// publish publishes e with Nats-Msg-Id = e.ID and waits for the PubAck; dup is
// JetStream's verdict that the id was already in its duplicate window.
func (p *Poller) publish(ctx context.Context, e *event.Event) (dup bool, err error) {
	data, err := e.Marshal()
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.o.RequestTimeout)
	defer cancel()
	ack, err := p.js.Publish(ctx, stream.Subject(p.o.SubjectPrefix, e), data, jetstream.WithMsgID(e.ID))
	if err != nil {
		return false, err
	}
	return ack.Duplicate, nil
}

func (p *Poller) save(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, p.o.RequestTimeout)
	defer cancel()
	p.pos.prune(p.o.Overlap)
	merged, err := p.store.save(ctx, p.pos.clone())
	if err != nil {
		return err
	}
	p.pos, p.dirty = merged, false
	p.setPositionGauge()
	return nil
}

// flush saves unsaved progress at shutdown, so that a restart does not publish
// it again.
func (p *Poller) flush() {
	if !p.dirty || p.store == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.o.RequestTimeout)
	defer cancel()
	if err := p.save(ctx); err != nil {
		p.log.Warn("saving the revocation position at shutdown failed; a restart may publish some events again",
			"err", err)
	}
}

func (p *Poller) setPositionGauge() {
	if !p.pos.RevokedAt.IsZero() {
		p.m.position.Set(float64(p.pos.RevokedAt.UnixMilli()) / 1000)
	}
}

// failed records a failed attempt and returns the wait before the next one.
func (p *Poller) failed(stage string, err error, bo *backoff.Backoff) time.Duration {
	p.m.errors.WithLabelValues(stage).Inc()
	p.mu.Lock()
	p.readyErr = fmt.Errorf("revocation poller: %s: %w", stage, err)
	p.mu.Unlock()
	d := bo.Next()
	p.log.Warn("revocation poll failed; retrying", "stage", stage, "err", err,
		"failures", bo.Failures(), "retry_in", d)
	return d
}

func (p *Poller) succeeded(bo *backoff.Backoff) {
	p.m.lastSuccess.Set(float64(p.o.Now().UnixMilli()) / 1000)
	p.mu.Lock()
	was := p.readyErr
	p.readyErr = nil
	p.lastOK = time.Now()
	p.mu.Unlock()
	if bo.Failures() > 0 {
		p.log.Info("revocation polling recovered", "after_failures", bo.Failures(), "last_err", was)
	}
	bo.Reset()
}
