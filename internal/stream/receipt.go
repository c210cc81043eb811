package stream

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// The receipts: after each invalidation of new events an agent publishes a
// Receipt on ReceiptSubject(region), which the stream ReceiptsStream keeps for
// `keystone-fanout trace`. Receipts live apart from the events' stream: they
// are evidence, never events, and a region may publish its own only.
const (
	ReceiptsStream       = "KEYSTONE_RECEIPTS"
	ReceiptSubjectPrefix = "keystone-fanout.receipts"
	ReceiptsMaxAge       = DefaultMaxAge
	ReceiptVersion       = 1
)

// ReceiptSubject is the subject of region's receipts,
// "keystone-fanout.receipts.<region>".
func ReceiptSubject(region string) string { return ReceiptSubjectPrefix + "." + region }

// Receipt says that a region's agent removed the cache entries of Events of
// stream Stream from every memcached server of the region, at Gone (the end
// of the first pass; the second pass follows --second-pass-delay later,
// before the events are acknowledged).
type Receipt struct {
	Version int            `json:"v"`
	Region  string         `json:"region"`
	Stream  string         `json:"stream"`
	Events  []ReceiptEvent `json:"events"`
	Gone    time.Time      `json:"gone"`
	// Removed is the number of token entries the invalidation removed, over
	// every server of the region; Swept is set when it removed every one.
	Removed int  `json:"removed"`
	Swept   bool `json:"swept,omitempty"`
	// Servers is the part of Removed of each memcached server of the
	// region, in the agent's --memcached order.
	Servers []ReceiptServer `json:"servers,omitempty"`
}

// ReceiptServer is what an invalidation removed from one memcached server:
// Removed token entries, or everything when Flushed (flush_all).
type ReceiptServer struct {
	Server  string `json:"server"`
	Removed int    `json:"removed"`
	Flushed bool   `json:"flushed,omitempty"`
}

// ReceiptEvent names one event a receipt covers: its stream sequence, its
// Nats-Msg-Id (event.Event.ID), the user it concerns, if one, and when the
// stream stored it (on the NATS server's clock).
type ReceiptEvent struct {
	Seq    uint64    `json:"seq"`
	ID     string    `json:"id"`
	User   string    `json:"user,omitempty"`
	Stored time.Time `json:"stored,omitzero"`
}

// Marshal encodes r.
func (r *Receipt) Marshal() ([]byte, error) { return json.Marshal(r) }

// UnmarshalReceipt decodes a receipt; one of a newer version is an error.
func UnmarshalReceipt(b []byte) (Receipt, error) {
	var r Receipt
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("not a receipt: %w", err)
	}
	if r.Version != ReceiptVersion || r.Region == "" {
		return r, fmt.Errorf("not a receipt of version %d (version %d, region %q)", ReceiptVersion, r.Version, r.Region)
	}
	return r, nil
}

// EnsureReceipts creates the receipts stream when it is absent (file storage,
// ReceiptsMaxAge, replicas as the events' stream c). The bridge calls it.
func EnsureReceipts(ctx context.Context, js jetstream.JetStream, c Config) error {
	if err := c.Validate(); err != nil {
		return err
	}
	_, err := js.Stream(ctx, ReceiptsStream)
	if err == nil {
		return nil
	}
	if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return fmt.Errorf("looking up JetStream stream %s: %w", ReceiptsStream, err)
	}
	_, err = js.CreateStream(ctx, jetstream.StreamConfig{
		Name:        ReceiptsStream,
		Description: "keystone-fanout region agents' receipts: which events each region's caches are rid of, and when",
		Subjects:    []string{ReceiptSubjectPrefix + ".>"},
		Retention:   jetstream.LimitsPolicy,
		Storage:     jetstream.FileStorage,
		Discard:     jetstream.DiscardOld,
		MaxAge:      ReceiptsMaxAge,
		Replicas:    c.Replicas,
	})
	if err != nil && !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
		return fmt.Errorf("creating JetStream stream %s: %w", ReceiptsStream, err)
	}
	return nil
}
