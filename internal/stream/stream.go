// Package stream is the contract between keystone-fanout's publishers (the
// bridge, the revocation poller, sweep) and its readers (the region agents,
// status): the JetStream stream's configuration and Ensure, the subject of
// each event, and the names of the agents' consumers and checkpoints.
//
// Only the bridge creates or updates the stream (Ensure); the agents, the
// poller and the commands use it as they find it. A region agent may create
// its own regional mirror of it (EnsureMirror).
package stream

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
)

// Defaults of Config, and the agents' checkpoint bucket.
const (
	DefaultName             = "KEYSTONE"
	DefaultSubjectPrefix    = "keystone"
	DefaultMaxAge           = 24 * time.Hour
	DefaultReplicas         = 1
	DefaultDuplicateWindow  = 10 * time.Minute
	DefaultCheckpointBucket = "keystone-fanout-agents"
)

// Config is the stream that carries events from the bridge to the region
// agents. A zero field means its default.
type Config struct {
	// Name (--stream, default "KEYSTONE") is the stream name.
	Name string
	// SubjectPrefix (--subject-prefix, default "keystone"): events are
	// published on Subject(prefix, event) and the stream holds "<prefix>.>".
	SubjectPrefix string
	// MaxAge (--stream-max-age, default 24h) is how long events are kept: a
	// region agent that is down longer misses events and sweeps its caches
	// when it comes back.
	MaxAge time.Duration
	// Replicas (--stream-replicas, default 1) is the number of copies in a
	// NATS cluster (3 for a production cluster); more than 1 fails on a
	// single server.
	Replicas int
	// DuplicateWindow (--stream-duplicate-window, default 10m) is how long
	// the stream remembers Nats-Msg-Id values to drop redeliveries and the
	// publishes of other bridge replicas. It must cover the time a
	// notification can take to be redelivered (connection loss, restart, or
	// a requeue behind a burst of thousands): the default outlives the
	// bridge queue's message TTL (6 min), after which RabbitMQ drops it. At
	// most MaxAge.
	DuplicateWindow time.Duration
}

// Default returns the configuration with every default.
func Default() Config {
	var c Config
	c.setDefaults()
	return c
}

func (c *Config) setDefaults() {
	if c.Name == "" {
		c.Name = DefaultName
	}
	if c.SubjectPrefix == "" {
		c.SubjectPrefix = DefaultSubjectPrefix
	}
	if c.MaxAge == 0 {
		c.MaxAge = DefaultMaxAge
	}
	if c.Replicas == 0 {
		c.Replicas = DefaultReplicas
	}
	if c.DuplicateWindow == 0 {
		c.DuplicateWindow = DefaultDuplicateWindow
	}
}

// Validate fills zero fields with their defaults and checks the others. The
// errors, joined, name the flag.
func (c *Config) Validate() error {
	c.setDefaults()
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if err := CheckName(c.Name); err != nil {
		errs = append(errs, err)
	}
	if err := CheckSubjectPrefix(c.SubjectPrefix); err != nil {
		errs = append(errs, err)
	}
	if c.MaxAge < time.Minute {
		add("--stream-max-age %s: must be at least 1m; it is how long a region agent may be down without losing events (default %s)", c.MaxAge, DefaultMaxAge)
	}
	if c.Replicas < 1 || c.Replicas > 5 {
		add("--stream-replicas %d: must be from 1 to 5 (1 for a single server, 3 for a cluster)", c.Replicas)
	}
	if c.DuplicateWindow < time.Second {
		add("--stream-duplicate-window %s: must be at least 1s (default %s)", c.DuplicateWindow, DefaultDuplicateWindow)
	} else if c.DuplicateWindow > c.MaxAge && c.MaxAge >= time.Minute {
		add("--stream-duplicate-window %s is longer than --stream-max-age %s: lower it or raise the max age", c.DuplicateWindow, c.MaxAge)
	}
	return errors.Join(errs...)
}

// CheckName checks a stream name given with --stream.
func CheckName(name string) error {
	if name == "" || len(name) > 255 || strings.ContainsAny(name, " \t\r\n.*>/\\") {
		return fmt.Errorf("--stream %q: a stream name is 1 to 255 characters without white space, '.', '*', '>', '/' or '\\', for example %q", name, DefaultName)
	}
	return nil
}

// CheckSubjectPrefix checks a subject prefix given with --subject-prefix.
func CheckSubjectPrefix(prefix string) error {
	for _, tok := range strings.Split(prefix, ".") {
		if tok == "" || strings.ContainsAny(tok, " \t\r\n*>") {
			return fmt.Errorf("--subject-prefix %q: must be dot-separated non-empty tokens without white space or wildcards, for example %q", prefix, DefaultSubjectPrefix)
		}
	}
	return nil
}

// Subjects is the stream's subject filter, "<prefix>.>".
func (c Config) Subjects() []string { return []string{c.SubjectPrefix + ".>"} }

// Subject is the subject e is published on under prefix:
// "<prefix>.revocation" for a revocation event, "<prefix>.polled" for the
// revocation poller's proof of progress, else
// "<prefix>.notification.<event type>" with white space and wildcards in the
// type replaced by '_' ("unknown" for a type that is no valid token).
func Subject(prefix string, e *event.Event) string {
	switch e.Kind {
	case event.KindRevocation:
		return prefix + ".revocation"
	case event.KindPolled:
		return prefix + ".polled"
	}
	t := strings.Map(func(r rune) rune {
		switch r {
		case ' ', '\t', '\r', '\n', '*', '>':
			return '_'
		}
		return r
	}, e.Type)
	if t == "" || strings.Contains(t, "..") || strings.HasPrefix(t, ".") || strings.HasSuffix(t, ".") {
		t = "unknown"
	}
	return prefix + "." + string(event.KindNotification) + "." + t
}

// ConsumerName is the durable consumer of a region's agent: the region name.
// Agents of one region share it.
func ConsumerName(region string) string { return region }

// CheckpointKey is the key of a region's checkpoint in the checkpoint bucket
// (DefaultCheckpointBucket): the region name.
func CheckpointKey(region string) string { return region }

// Ensure creates the stream when it is absent. When it exists, it adds the
// subject filter if missing, sets discard-old, and raises max age, replicas
// and duplicate window to c's where they are lower; it never lowers them, so
// that bridges started with different flags do not undo each other (lower
// them with the nats CLI, and the flags everywhere). Any other setting an
// operator made is kept. It fails when the existing stream cannot carry the
// events: memory storage or work-queue retention (every region must see every
// event). Calls are bounded by ctx (and by the JetStream default timeout when
// ctx has no deadline).
func Ensure(ctx context.Context, js jetstream.JetStream, c Config) error {
	if err := c.Validate(); err != nil {
		return err
	}
	want := jetstream.StreamConfig{
		Name:        c.Name,
		Description: "Keystone token-affecting changes, published by keystone-fanout's bridge",
		Subjects:    c.Subjects(),
		Retention:   jetstream.LimitsPolicy,
		Storage:     jetstream.FileStorage,
		Discard:     jetstream.DiscardOld,
		MaxAge:      c.MaxAge,
		Replicas:    c.Replicas,
		Duplicates:  c.DuplicateWindow,
	}
	s, err := js.Stream(ctx, c.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		_, err = js.CreateStream(ctx, want)
		if !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			if err != nil {
				return fmt.Errorf("creating JetStream stream %s: %w", c.Name, err)
			}
			return nil
		}
		s, err = js.Stream(ctx, c.Name) // another bridge created it meanwhile: check it
	}
	if err != nil {
		return fmt.Errorf("looking up JetStream stream %s: %w", c.Name, err)
	}
	have := s.CachedInfo().Config
	if have.Storage != jetstream.FileStorage {
		return fmt.Errorf("JetStream stream %s uses %s storage: events must survive a server restart; "+
			"delete the stream (nats stream rm %s) or choose another --stream", c.Name, have.Storage, c.Name)
	}
	if have.Retention == jetstream.WorkQueuePolicy {
		return fmt.Errorf("JetStream stream %s has work-queue retention: every region must see every event; "+
			"delete the stream (nats stream rm %s) or choose another --stream", c.Name, c.Name)
	}
	upd := have
	for _, subj := range want.Subjects {
		if !slices.Contains(upd.Subjects, subj) {
			upd.Subjects = append(slices.Clone(upd.Subjects), subj)
		}
	}
	upd.Replicas, upd.Duplicates = max(have.Replicas, want.Replicas), max(have.Duplicates, want.Duplicates)
	if have.MaxAge != 0 { // 0 is unlimited already
		upd.MaxAge = max(have.MaxAge, want.MaxAge)
	}
	upd.Discard = jetstream.DiscardOld
	if slices.Equal(upd.Subjects, have.Subjects) && upd.MaxAge == have.MaxAge && upd.Replicas == have.Replicas &&
		upd.Duplicates == have.Duplicates && upd.Discard == have.Discard {
		return nil
	}
	if _, err := js.UpdateStream(ctx, upd); err != nil {
		return fmt.Errorf("updating JetStream stream %s (subjects %v, max age %s, replicas %d, duplicate window %s): %w",
			c.Name, upd.Subjects, upd.MaxAge, upd.Replicas, upd.Duplicates, err)
	}
	return nil
}

// MirrorConsumerName is the durable consumer on the central stream that a
// region's mirror (EnsureMirror) reads through: "<region>_mirror".
func MirrorConsumerName(region string) string { return region + "_mirror" }

// MirrorDeliverSubject is the subject MirrorConsumerName(region) delivers to:
// "keystone-fanout.mirror.<region>", outside the stream's subjects, so that
// each region may subscribe to its own mirror's feed only.
func MirrorDeliverSubject(region string) string { return "keystone-fanout.mirror." + region }

// MirrorAPIPrefix is the JetStream API prefix of a domain, as a mirror in
// another domain reaches it: "$JS.<domain>.API".
func MirrorAPIPrefix(domain string) string { return "$JS." + domain + ".API" }

// ErrNotMirror is EnsureMirror's error when the region's domain holds a
// stream of the name that is not the mirror it would create: consuming it
// could miss events, so the agent does not.
var ErrNotMirror = errors.New("not the regional mirror keystone-fanout creates")

// EnsureMirror makes region's regional mirror of the stream name exist: on
// central (the JetStream of the central stream, reached in its domain
// fromDomain) the durable push consumer MirrorConsumerName(region), which
// acknowledges by flow control so that the central server keeps the mirror's
// position; on local (the region's own JetStream domain) the stream name,
// mirroring the central one through that consumer, with the central stream's
// max age. An existing mirror is kept as it is; a stream of that name that is
// no such mirror is ErrNotMirror, found without the central side. It needs
// NATS server 2.14 or later on both sides (durable sourcing) and fails when
// the central stream does not exist yet.
func EnsureMirror(ctx context.Context, central, local jetstream.JetStream, name, region, fromDomain string) error {
	cname, deliver := MirrorConsumerName(region), MirrorDeliverSubject(region)
	s, err := local.Stream(ctx, name)
	exists := err == nil
	switch {
	case exists:
		m := s.CachedInfo().Config.Mirror
		if m == nil || m.Name != name || m.Consumer == nil || m.Consumer.Name != cname ||
			m.External == nil || m.External.APIPrefix != MirrorAPIPrefix(fromDomain) {
			return fmt.Errorf("JetStream stream %s in the region's domain: %w (of %s in domain %s through consumer %s): "+
				"delete it (nats stream rm %s) and the agent creates it", name, ErrNotMirror, name, fromDomain, cname, name)
		}
	case !errors.Is(err, jetstream.ErrStreamNotFound):
		return fmt.Errorf("regional mirror %s: %w", name, err)
	}
	origin, err := central.Stream(ctx, name)
	if err != nil {
		return fmt.Errorf("central JetStream stream %s (domain %s): %w", name, fromDomain, err)
	}
	if _, err := central.CreateOrUpdatePushConsumer(ctx, name, jetstream.ConsumerConfig{
		Durable:        cname,
		Description:    "keystone-fanout regional mirror of " + region,
		DeliverSubject: deliver,
		DeliverPolicy:  jetstream.DeliverAllPolicy,
		AckPolicy:      jetstream.AckFlowControlPolicy,
		FlowControl:    true,
		IdleHeartbeat:  5 * time.Second,
	}); err != nil {
		return fmt.Errorf("mirror consumer %s on the central stream %s (domain %s): %w", cname, name, fromDomain, err)
	}
	if exists {
		return nil
	}
	_, err = local.CreateStream(ctx, jetstream.StreamConfig{
		Name:        name,
		Description: "keystone-fanout regional mirror of the central stream " + name,
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld,
		MaxAge:      origin.CachedInfo().Config.MaxAge,
		Mirror: &jetstream.StreamSource{
			Name:     name,
			External: &jetstream.ExternalStream{APIPrefix: MirrorAPIPrefix(fromDomain)},
			Consumer: &jetstream.StreamConsumerSource{Name: cname, DeliverSubject: deliver},
		},
	})
	if err != nil && !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
		return fmt.Errorf("creating the regional mirror %s: %w", name, err)
	}
	return nil
}
