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
	dirty bool // pos holds published events not yet saved

	mu       sync.Mutex
	readyErr error
}

// Poll stages, the label of keystone_fanout_revoke_poll_errors_total.
const (
	stageAuth     = "auth"
	stageList     = "list"
	stagePublish  = "publish"
	stagePosition = "position"
)

type metrics struct {
	polls, published, duplicates, widened prometheus.Counter
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
		lastSuccess: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "last_success_timestamp",
			Help: "Unix time of the last successful poll."}),
		position: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Subsystem: sub, Name: "position_timestamp",
			Help: "revoked_at (Unix time) of the newest revocation event published."}),
	}
	for _, s := range []string{stageAuth, stageList, stagePublish, stagePosition} {
		m.errors.WithLabelValues(s)
	}
	m.auth.WithLabelValues("success")
	m.auth.WithLabelValues("failure")
	if reg != nil {
		for _, c := range []prometheus.Collector{m.polls, m.errors, m.published, m.duplicates, m.widened, m.auth, m.lastSuccess, m.position} {
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
	p := &Poller{o: o, js: js, log: log, readyErr: errors.New("revocation poller: no successful poll yet")}
	ks, err := newKeystoneClient(&p.o)
	if err != nil {
		return nil, err
	}
	p.ks = ks
	if p.m, err = newMetrics(reg); err != nil {
		return nil, err
	}
	return p, nil
}

// Ready returns nil when the last poll succeeded, else why not: no poll has
// succeeded yet, or Keystone, JetStream or the position store failed the last
// attempt (the poller keeps retrying).
func (p *Poller) Ready() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.readyErr
}

// Run loads the position and polls until ctx is cancelled, then returns nil.
// Errors (Keystone away or answering errors, JetStream unavailable) are
// counted, logged, shown by Ready and retried after a backoff that starts at
// PollInterval and doubles up to MaxBackoff, less up to 20% jitter (see
// internal/backoff); they never end Run.
func (p *Poller) Run(ctx context.Context) error {
	p.log.Info("polling Keystone revocation events", "url", p.o.URL, "interval", p.o.PollInterval,
		"bucket", p.o.Bucket, "key", p.o.Key, "subject", p.o.SubjectPrefix+".revocation")
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
		stage, err := p.poll(ctx)
		if ctx.Err() != nil {
			p.flush()
			return nil
		}
		delay := p.o.PollInterval
		if err != nil {
			delay = p.failed(stage, err, bo)
		} else {
			p.succeeded(bo)
		}
		if !backoff.Sleep(ctx, delay) {
			p.flush()
			return nil
		}
	}
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

// poll lists the events since the position, publishes the new ones in
// revoked_at order, and saves the position. It returns the failed stage.
func (p *Poller) poll(ctx context.Context) (string, error) {
	p.m.polls.Inc()
	if !p.ks.tokenValid() {
		if err := p.authenticate(ctx); err != nil {
			return stageAuth, err
		}
	}
	since := p.pos.since(p.o.Overlap)
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
	p.mu.Unlock()
	if bo.Failures() > 0 {
		p.log.Info("revocation polling recovered", "after_failures", bo.Failures(), "last_err", was)
	}
	bo.Reset()
}
