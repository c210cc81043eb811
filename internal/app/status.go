package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

// StatusOptions configures `keystone-fanout status`.
type StatusOptions struct {
	NATS   natsconn.Options
	Stream string // default stream.DefaultName
	JSON   bool   // print JSON instead of a table
}

// Status is what `keystone-fanout status` reports.
type Status struct {
	Stream    string         `json:"stream"`
	Messages  uint64         `json:"messages"`
	Bytes     uint64         `json:"bytes"`
	FirstSeq  uint64         `json:"first_seq"`
	LastSeq   uint64         `json:"last_seq"`
	FirstTime time.Time      `json:"first_time"`
	LastTime  time.Time      `json:"last_time"`
	Replicas  int            `json:"replicas"`
	MaxAge    time.Duration  `json:"max_age_ns"`
	Consumers []RegionStatus `json:"consumers"`
}

// RegionStatus is one durable consumer: a region agent's position.
type RegionStatus struct {
	Name        string     `json:"name"`
	Pending     uint64     `json:"pending"`
	AckPending  int        `json:"ack_pending"`
	Redelivered int        `json:"redelivered"`
	AckFloor    uint64     `json:"ack_floor_stream_seq"`
	LastActive  *time.Time `json:"last_active,omitempty"`
	// Gap is true when the stream no longer holds messages this consumer has
	// not acknowledged: its agent will remove every token entry.
	Gap bool `json:"gap"`
}

// RunStatus prints the stream and every consumer of it to w.
func RunStatus(ctx context.Context, o StatusOptions, w io.Writer, log *slog.Logger) error {
	if o.Stream == "" {
		o.Stream = stream.DefaultName
	}
	js, closeNATS, err := oneShotJetStream(ctx, o.NATS, "keystone-fanout-status", log)
	if err != nil {
		return err
	}
	defer closeNATS()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := GetStatus(ctx, js, o.Stream)
	if errors.Is(err, errNoStream) {
		return fmt.Errorf("stream %q does not exist on the NATS server at %s: give the bridge's NATS with --nats-url (and its stream with --stream), or start a bridge there",
			o.Stream, natsconn.Redact(o.NATS.URL))
	}
	if err != nil {
		return err
	}
	if o.JSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	fmt.Fprintf(w, "stream %s: %d messages, %d bytes, sequences %d..%d, replicas %d, max age %s\n",
		st.Stream, st.Messages, st.Bytes, st.FirstSeq, st.LastSeq, st.Replicas, st.MaxAge)
	if !st.LastTime.IsZero() {
		fmt.Fprintf(w, "newest event %s ago\n", time.Since(st.LastTime).Round(time.Millisecond))
	}
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CONSUMER\tPENDING\tACK PENDING\tREDELIVERED\tACK FLOOR\tLAST ACTIVE\tGAP")
	for _, c := range st.Consumers {
		active := "never"
		if c.LastActive != nil {
			active = time.Since(*c.LastActive).Round(time.Second).String() + " ago"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%s\t%v\n", c.Name, c.Pending, c.AckPending, c.Redelivered, c.AckFloor, active, c.Gap)
	}
	return tw.Flush()
}

// errNoStream is GetStatus's error when the stream does not exist.
var errNoStream = errors.New("has a bridge run against this NATS? (--stream)")

// GetStatus reads the stream's state and its consumers.
func GetStatus(ctx context.Context, js jetstream.JetStream, stream string) (*Status, error) {
	s, err := js.Stream(ctx, stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("stream %q does not exist: %w", stream, errNoStream)
	}
	if err != nil {
		return nil, fmt.Errorf("stream %q: %w", stream, err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("stream %q: %w", stream, err)
	}
	st := &Status{
		Stream: stream, Messages: info.State.Msgs, Bytes: info.State.Bytes,
		FirstSeq: info.State.FirstSeq, LastSeq: info.State.LastSeq,
		FirstTime: info.State.FirstTime, LastTime: info.State.LastTime,
		Replicas: info.Config.Replicas, MaxAge: info.Config.MaxAge,
	}
	consumers := s.ListConsumers(ctx)
	for ci := range consumers.Info() {
		st.Consumers = append(st.Consumers, RegionStatus{
			Name: ci.Name, Pending: ci.NumPending, AckPending: ci.NumAckPending,
			Redelivered: ci.NumRedelivered, AckFloor: ci.AckFloor.Stream, LastActive: ci.AckFloor.Last,
			Gap: info.State.FirstSeq > 1 && ci.AckFloor.Stream+1 < info.State.FirstSeq,
		})
	}
	if err := consumers.Err(); err != nil {
		return nil, fmt.Errorf("listing consumers of %q: %w", stream, err)
	}
	return st, nil
}

// oneShotJetStream connects for a short command (status, sweep): the first
// connection is bounded by 5 s instead of a daemon's patience.
func oneShotJetStream(ctx context.Context, o natsconn.Options, name string, log *slog.Logger) (jetstream.JetStream, func(), error) {
	o.ConnectTimeout = 5 * time.Second
	nc, err := natsconn.Connect(ctx, o, name, log, nil)
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return js, nc.Close, nil
}
