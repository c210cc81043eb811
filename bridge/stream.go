package bridge

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Defaults of StreamConfig.
const (
	DefaultStreamName      = "KEYSTONE"
	DefaultSubjectPrefix   = "keystone"
	DefaultStreamMaxAge    = 24 * time.Hour
	DefaultStreamReplicas  = 1
	DefaultDuplicateWindow = 2 * time.Minute
)

// StreamConfig is the JetStream stream that carries events from the bridge to
// the region agents. The bridge and the agents both ensure it (EnsureStream),
// so either may start first. A zero field means its default.
type StreamConfig struct {
	// Name (--stream, default "KEYSTONE") is the stream name.
	Name string
	// SubjectPrefix (--subject-prefix, default "keystone"): events are
	// published on (*event.Event).Subject(prefix) and the stream holds
	// "<prefix>.>".
	SubjectPrefix string
	// MaxAge (--stream-max-age, default 24h) is how long events are kept: a
	// region agent that is down longer misses events and must flush its
	// caches when it comes back.
	MaxAge time.Duration
	// Replicas (--stream-replicas, default 1) is the number of copies in a
	// NATS cluster (3 for a production cluster); more than 1 fails on a
	// single server.
	Replicas int
	// DuplicateWindow (--stream-duplicate-window, default 2m) is how long the
	// stream remembers Nats-Msg-Id values to drop redeliveries and the
	// publishes of other bridge replicas. It must cover the time a
	// notification can take to be redelivered (connection loss, restart) and
	// be at most MaxAge.
	DuplicateWindow time.Duration
}

// DefaultStreamConfig returns the stream configuration with every default.
func DefaultStreamConfig() StreamConfig {
	var c StreamConfig
	c.setDefaults()
	return c
}

func (c *StreamConfig) setDefaults() {
	if c.Name == "" {
		c.Name = DefaultStreamName
	}
	if c.SubjectPrefix == "" {
		c.SubjectPrefix = DefaultSubjectPrefix
	}
	if c.MaxAge == 0 {
		c.MaxAge = DefaultStreamMaxAge
	}
	if c.Replicas == 0 {
		c.Replicas = DefaultStreamReplicas
	}
	if c.DuplicateWindow == 0 {
		c.DuplicateWindow = DefaultDuplicateWindow
	}
}

// Subjects is the stream's subject filter, "<prefix>.>".
func (c StreamConfig) Subjects() []string { return []string{c.SubjectPrefix + ".>"} }

// Validate fills zero fields with their defaults and checks the rest. Errors
// name the flag.
func (c *StreamConfig) Validate() error {
	c.setDefaults()
	if strings.ContainsAny(c.Name, " \t\r\n.*>/\\") {
		return fmt.Errorf("--stream %q: a stream name may not contain white space, '.', '*', '>', '/' or '\\': for example %q", c.Name, DefaultStreamName)
	}
	for _, tok := range strings.Split(c.SubjectPrefix, ".") {
		if tok == "" || strings.ContainsAny(tok, " \t\r\n*>") {
			return fmt.Errorf("--subject-prefix %q: must be dot-separated non-empty tokens without white space or wildcards, for example %q", c.SubjectPrefix, DefaultSubjectPrefix)
		}
	}
	if c.MaxAge < time.Minute {
		return fmt.Errorf("--stream-max-age %s: must be at least 1m; it is how long a region agent may be down without losing events (default %s)", c.MaxAge, DefaultStreamMaxAge)
	}
	if c.Replicas < 1 || c.Replicas > 5 {
		return fmt.Errorf("--stream-replicas %d: must be from 1 to 5 (1 for a single server, 3 for a cluster)", c.Replicas)
	}
	if c.DuplicateWindow < time.Second {
		return fmt.Errorf("--stream-duplicate-window %s: must be at least 1s (default %s)", c.DuplicateWindow, DefaultDuplicateWindow)
	}
	if c.DuplicateWindow > c.MaxAge {
		return fmt.Errorf("--stream-duplicate-window %s is longer than --stream-max-age %s: lower it or raise the max age", c.DuplicateWindow, c.MaxAge)
	}
	return nil
}

// jetstreamConfig is the configuration of a new stream.
func (c StreamConfig) jetstreamConfig() jetstream.StreamConfig {
	return jetstream.StreamConfig{
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
}

// EnsureStream creates the stream when it is absent. When it exists, it adds
// the subject filter if missing, sets discard-old, and raises max age,
// replicas and duplicate window to c's where they are lower; it never lowers
// them, so that components started with different flags do not undo each
// other (lower them with the nats CLI, and the flags everywhere). Any other
// setting an operator made is kept. It fails when the existing stream cannot
// carry the events: memory storage or work-queue retention (every region must
// see every event). Calls are bounded by ctx (and by the JetStream default
// timeout when ctx has no deadline).
func EnsureStream(ctx context.Context, js jetstream.JetStream, c StreamConfig) error {
	if err := c.Validate(); err != nil {
		return err
	}
	want := c.jetstreamConfig()
	for attempt := 0; ; attempt++ {
		s, err := js.Stream(ctx, c.Name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			_, err = js.CreateStream(ctx, want)
			if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) && attempt == 0 {
				continue // another replica created it meanwhile: check it
			}
			if err != nil {
				return fmt.Errorf("creating JetStream stream %s: %w", c.Name, err)
			}
			return nil
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
		upd.MaxAge, upd.Replicas, upd.Duplicates = max(have.MaxAge, want.MaxAge), max(have.Replicas, want.Replicas), max(have.Duplicates, want.Duplicates)
		if have.MaxAge == 0 {
			upd.MaxAge = 0 // unlimited already
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
}
