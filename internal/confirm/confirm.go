// Package confirm turns the region agents' receipts (stream.Receipt) into
// the central side's evidence that a change took effect everywhere: a
// histogram of the time from the stream storing an event to the last
// expected region removing its cache entries, the same per region, and a
// count of the events a region did not confirm in time.
//
// A Collector follows the receipts stream from the moment it starts (an
// ordered consumer, nothing durable). An event is known from its first
// receipt; it is effective everywhere when every expected region has sent
// a receipt naming it, and unconfirmed in each missing region when Deadline
// passes after the stream stored it first. Events no region confirms are not
// seen here: the regions' consumer lag (`keystone-fanout status`, the
// agent-lag alerts) shows those. Events stored before the Collector started
// are ignored, so a restart never reports a partial event.
//
// The expected regions are Options.Regions, or else the regions consuming
// the events' stream (stream.Regions), re-read every RegionsRefresh and when
// a receipt comes from a region not expected yet.
package confirm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

// Defaults of Options.
const (
	DefaultDeadline       = 5 * time.Minute
	DefaultRegionsRefresh = 30 * time.Second
	DefaultMaxPending     = 100_000
)

// Options configures a Collector. The zero value is usable.
type Options struct {
	// Stream is the events' stream whose consumers name the expected
	// regions. Default stream.DefaultName.
	Stream string
	// Regions (--expect-regions), when set, are the regions every event must
	// be confirmed by; empty: the regions consuming Stream.
	Regions []string
	// Deadline (--confirm-deadline, default 5 min: keystonemiddleware's
	// token_cache_time, after which a stale entry has expired anyway) is how
	// long after the stream stored an event each expected region has to
	// confirm it.
	Deadline time.Duration
	// RegionsRefresh (default 30 s) is how often the expected regions are
	// re-read from Stream's consumers.
	RegionsRefresh time.Duration
	// MaxPending (default 100,000) bounds the events awaiting a region; past
	// it the oldest are dropped and counted as untracked.
	MaxPending int
	// Now is the clock; default time.Now (tests).
	Now func() time.Time
}

// Validate reports every invalid option; it changes nothing.
func (o Options) Validate() error {
	var errs []error
	if o.Stream != "" {
		if err := stream.CheckName(o.Stream); err != nil {
			errs = append(errs, err)
		}
	}
	for _, r := range o.Regions {
		if !stream.ValidRegionName(r) {
			errs = append(errs, fmt.Errorf("--expect-regions: %q is not a region name (1 to 64 of A-Z, a-z, 0-9, '_', '-')", r))
		}
	}
	if o.Deadline < 0 {
		errs = append(errs, fmt.Errorf("--confirm-deadline %s: must not be negative", o.Deadline))
	}
	if o.RegionsRefresh < 0 || o.MaxPending < 0 {
		errs = append(errs, errors.New("confirm: RegionsRefresh and MaxPending must not be negative"))
	}
	return errors.Join(errs...)
}

func (o *Options) setDefaults() {
	if o.Stream == "" {
		o.Stream = stream.DefaultName
	}
	if o.Deadline == 0 {
		o.Deadline = DefaultDeadline
	}
	if o.RegionsRefresh == 0 {
		o.RegionsRefresh = DefaultRegionsRefresh
	}
	if o.MaxPending == 0 {
		o.MaxPending = DefaultMaxPending
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// pending is one event some expected region has not confirmed yet.
type pending struct {
	id     string
	stored time.Time
	gone   map[string]time.Time // region -> earliest Gone
}

// Collector computes the confirmation metrics from the receipts. Its
// methods are safe for concurrent use.
type Collector struct {
	o   Options
	js  jetstream.JetStream
	log *slog.Logger
	m   *metrics

	mu       sync.Mutex
	started  time.Time
	expected []string // sorted
	events   map[string]*pending
	order    []string // event ids by first receipt, for MaxPending
	done     map[string]time.Time
	kick     chan struct{} // a receipt of an unexpected region: re-read the regions now
}

// New checks o and registers the metrics on reg.
func New(o Options, js jetstream.JetStream, reg prometheus.Registerer, log *slog.Logger) (*Collector, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	o.setDefaults()
	c := &Collector{o: o, js: js, log: log, events: map[string]*pending{}, done: map[string]time.Time{},
		kick: make(chan struct{}, 1)}
	m, err := newMetrics(reg, c.pendingCount, c.expectedCount)
	if err != nil {
		return nil, err
	}
	c.m = m
	if len(o.Regions) > 0 {
		c.expected = slices.Sorted(slices.Values(o.Regions))
		c.expected = slices.Compact(c.expected)
	}
	return c, nil
}

// Run follows the receipts until ctx ends. Failures (no receipts stream
// yet, no permission, NATS away) are logged and retried with back-off; Run
// returns nil when ctx ends.
func (c *Collector) Run(ctx context.Context) error {
	c.mu.Lock()
	c.started = c.o.Now()
	c.mu.Unlock()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); c.refreshRegions(ctx) }()
	go func() { defer wg.Done(); c.expireLoop(ctx) }()
	c.follow(ctx)
	wg.Wait()
	return nil
}

// follow reads receipts with an ordered consumer from the start on, until
// ctx ends.
func (c *Collector) follow(ctx context.Context) {
	stream.Follower{
		Stream: stream.ReceiptsStream,
		Config: func() jetstream.OrderedConsumerConfig {
			return jetstream.OrderedConsumerConfig{
				FilterSubjects: []string{stream.ReceiptSubjectPrefix + ".>"},
				DeliverPolicy:  jetstream.DeliverByStartTimePolicy,
				OptStartTime:   ptr(c.startTime()),
			}
		},
		Handle: func(m jetstream.Msg) {
			r, err := stream.UnmarshalReceipt(m.Data())
			if err != nil {
				c.m.rejected.Inc()
				c.log.Debug("not a receipt", "subject", m.Subject(), "err", err)
				return
			}
			c.Add(r)
		},
		What: "cannot read the regions' receipts yet; no confirmations meanwhile",
	}.Follow(ctx, c.js, c.log)
}

func ptr[T any](v T) *T { return &v }

func (c *Collector) startTime() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.started
}

// refreshRegions re-reads the expected regions from the stream's consumers
// every RegionsRefresh, unless Options.Regions names them.
func (c *Collector) refreshRegions(ctx context.Context) {
	if len(c.o.Regions) > 0 {
		return
	}
	for {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		regions, err := stream.Regions(rctx, c.js, c.o.Stream)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			c.log.Debug("cannot list the regions; keeping the last known", "err", err)
		} else {
			c.setExpected(regions)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(c.o.RegionsRefresh):
		case <-c.kick:
		}
	}
}

func (c *Collector) setExpected(regions []string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !slices.Equal(c.expected, regions) {
		c.log.Info("regions expected to confirm every event", "regions", regions)
	}
	c.expected = regions
	// A region that left may complete events.
	for id, p := range c.events {
		c.completeLocked(id, p)
	}
}

func (c *Collector) expireLoop(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.Expire()
		}
	}
}

// Add records a receipt: each event it names is confirmed in r.Region at
// r.Gone (the earliest, when several receipts name it).
func (c *Collector) Add(r stream.Receipt) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.o.Regions) == 0 && !slices.Contains(c.expected, r.Region) {
		select { // a new region: its consumer should be listed now
		case c.kick <- struct{}{}:
		default:
		}
	}
	for _, e := range r.Events {
		if e.ID == "" || e.Stored.IsZero() || e.Stored.Before(c.started) {
			continue // stored before this collector began: partial at best
		}
		if _, ok := c.done[e.ID]; ok {
			continue // a late or repeated receipt of an event already settled
		}
		p := c.events[e.ID]
		if p == nil {
			p = &pending{id: e.ID, stored: e.Stored, gone: map[string]time.Time{}}
			c.events[e.ID] = p
			c.order = append(c.order, e.ID)
			c.trimLocked()
		}
		g, seen := p.gone[r.Region]
		if seen && !r.Gone.Before(g) {
			continue
		}
		if !seen {
			c.m.regionSeconds.WithLabelValues(r.Region).Observe(nonNegative(r.Gone.Sub(p.stored)).Seconds())
		}
		p.gone[r.Region] = r.Gone
		c.completeLocked(e.ID, p)
	}
}

// completeLocked settles p when every expected region confirmed it.
func (c *Collector) completeLocked(id string, p *pending) {
	if len(c.expected) == 0 {
		return // regions unknown yet
	}
	var last time.Time
	for _, r := range c.expected {
		g, ok := p.gone[r]
		if !ok {
			return
		}
		if g.After(last) {
			last = g
		}
	}
	c.m.everywhere.Observe(nonNegative(last.Sub(p.stored)).Seconds())
	c.settleLocked(id, p)
}

func (c *Collector) settleLocked(id string, p *pending) {
	delete(c.events, id)
	c.done[id] = p.stored
}

// trimLocked drops the oldest pending events past MaxPending.
func (c *Collector) trimLocked() {
	for len(c.events) > c.o.MaxPending && len(c.order) > 0 {
		id := c.order[0]
		c.order = c.order[1:]
		if p, ok := c.events[id]; ok {
			c.m.untracked.Inc()
			c.settleLocked(id, p)
		}
	}
}

// Expire settles the events whose Deadline passed, counting each expected
// region that did not confirm them, and forgets settled events after twice
// the deadline. Run calls it every second.
func (c *Collector) Expire() {
	now := c.o.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	missing := map[string]int{}
	var example string
	for id, p := range c.events {
		if now.Sub(p.stored) < c.o.Deadline {
			continue
		}
		for _, r := range c.expected {
			if _, ok := p.gone[r]; !ok {
				missing[r]++
				c.m.unconfirmed.WithLabelValues(r).Inc()
				example = id
			}
		}
		c.settleLocked(id, p)
	}
	if len(missing) > 0 {
		c.log.Warn("events not confirmed by every region within the deadline (keystone-fanout trace <id> shows one)",
			"deadline", c.o.Deadline.String(), "missing_by_region", missing, "example", example)
	}
	kept := c.order[:0]
	for _, id := range c.order {
		if _, ok := c.events[id]; ok {
			kept = append(kept, id)
		}
	}
	c.order = kept
	for id, stored := range c.done {
		if now.Sub(stored) > 2*c.o.Deadline {
			delete(c.done, id)
		}
	}
}

func (c *Collector) pendingCount() float64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return float64(len(c.events))
}

func (c *Collector) expectedCount() float64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return float64(len(c.expected))
}

func nonNegative(d time.Duration) time.Duration { return max(d, 0) }
