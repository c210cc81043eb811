package app

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/event"
	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

// SweepOptions configures `keystone-fanout sweep`.
type SweepOptions struct {
	NATS natsconn.Options
	// JetStreamDomain (--js-domain) is the stream's JetStream domain, when
	// reached through a leaf node; empty: the server's own.
	JetStreamDomain string
	SubjectPrefix   string // default stream.DefaultSubjectPrefix
	// Reason is recorded in the event and in every agent's log.
	Reason string
}

// SweepEventType is the type of the event `keystone-fanout sweep` publishes.
const SweepEventType = "keystone-fanout.sweep"

// RunSweep publishes one unbounded event to the stream: every region agent
// removes every token entry of its region when it handles it, exactly once
// per region, wherever it is. For changes Keystone announces nowhere (an
// identity provider deleted or disabled).
func RunSweep(ctx context.Context, o SweepOptions, w io.Writer, log *slog.Logger) error {
	if o.SubjectPrefix == "" {
		o.SubjectPrefix = stream.DefaultSubjectPrefix
	}
	if o.Reason == "" {
		return fmt.Errorf("--reason is required: say why every region should drop its cached tokens (it is logged by every agent)")
	}
	js, closeNATS, err := oneShotJetStream(ctx, o.NATS, o.JetStreamDomain, "keystone-fanout-sweep", log)
	if err != nil {
		return err
	}
	defer closeNATS()
	id := make([]byte, 16)
	_, _ = rand.Read(id)
	e := event.Event{Version: event.SchemaVersion, Kind: event.KindNotification, ID: "sweep-" + hex.EncodeToString(id),
		Type: SweepEventType, Time: time.Now().UTC(), Widen: "operator: " + o.Reason}
	body, err := e.Marshal()
	if err != nil {
		return err
	}
	msg := &nats.Msg{Subject: stream.Subject(o.SubjectPrefix, &e), Data: body, Header: nats.Header{}}
	msg.Header.Set(jetstream.MsgIDHeader, e.ID)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ack, err := js.PublishMsg(ctx, msg)
	if err != nil {
		return fmt.Errorf("publishing the sweep to %s: %w (is the stream there? --subject-prefix)", msg.Subject, err)
	}
	fmt.Fprintf(w, "sweep %s stored in stream %s at sequence %d: every region agent will remove every token entry\n", e.ID, ack.Stream, ack.Sequence)
	return nil
}
