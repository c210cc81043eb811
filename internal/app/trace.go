package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

// TraceOptions configures `keystone-fanout trace`.
type TraceOptions struct {
	NATS natsconn.Options
	// JetStreamDomain (--js-domain) is the streams' JetStream domain, when
	// reached through a leaf node.
	JetStreamDomain string
	// Stream (--stream, default KEYSTONE) is the events' stream, whose
	// consumers name the regions expected to confirm.
	Stream string
	// Query is a message id (the event's Nats-Msg-Id, oslo's message_id) or a
	// user id.
	Query string
	// Regions (--expect-regions) must each confirm; empty: every region with a
	// consumer on Stream (a mirror's consumer names its region) or a receipt.
	Regions []string
	JSON    bool
}

// ErrNotConfirmed is RunTrace's error when some expected region has not
// confirmed a matching event, or no receipt matches.
var ErrNotConfirmed = errors.New("not confirmed everywhere")

// TracedEvent is one event matching the query and, per region, when its cache
// entries were gone (zero: not confirmed).
type TracedEvent struct {
	Seq  uint64 `json:"seq"`
	ID   string `json:"id"`
	User string `json:"user,omitempty"`
	// Stored is when the stream stored the event (zero: unknown).
	Stored  time.Time            `json:"stored,omitzero"`
	Gone    map[string]time.Time `json:"gone"`
	Missing []string             `json:"missing"`
	// Batches holds, per region, what the invalidation that confirmed the
	// event first removed (with the other events of its batch); absent for
	// receipts that do not say it per server.
	Batches map[string]TracedBatch `json:"batches,omitempty"`
}

// TracedBatch is what one invalidation in one region removed: Removed token
// entries over every server, per server in Servers, for Events events.
type TracedBatch struct {
	Events  int                    `json:"events"`
	Removed int                    `json:"removed"`
	Swept   bool                   `json:"swept,omitempty"`
	Servers []stream.ReceiptServer `json:"servers"`
}

// RunTrace reads every receipt (stream.ReceiptsStream) and prints, for each
// event whose id or user is o.Query, when it took effect in each region and
// which regions have not confirmed it. It returns ErrNotConfirmed (after
// printing) unless every expected region confirmed every matching event. An
// event no region has confirmed yet is not known to trace: receipts are its
// only source.
func RunTrace(ctx context.Context, o TraceOptions, w io.Writer, log *slog.Logger) error {
	if o.Query == "" {
		return errors.New("give a message id or a user id: keystone-fanout trace <id>")
	}
	if o.Stream == "" {
		o.Stream = stream.DefaultName
	}
	js, closeNATS, err := oneShotJetStream(ctx, o.NATS, o.JetStreamDomain, "keystone-fanout-trace", log)
	if err != nil {
		return err
	}
	defer closeNATS()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()

	receipts, err := readReceipts(ctx, js)
	if err != nil {
		return err
	}
	regions := map[string]bool{}
	for _, r := range o.Regions {
		regions[r] = true
	}
	if len(o.Regions) == 0 {
		for _, r := range receipts {
			regions[r.Region] = true
		}
		names, err := stream.Regions(ctx, js, o.Stream)
		if err != nil {
			log.Warn("cannot list the regions' consumers; expecting the regions with receipts", "err", err)
		}
		for _, n := range names {
			regions[n] = true
		}
	}
	events := traceEvents(receipts, o.Query, regions)
	if o.JSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(events); err != nil {
			return err
		}
	} else {
		printTrace(w, events, o.Query, sortedKeys(regions))
	}
	if len(events) == 0 {
		return ErrNotConfirmed
	}
	for _, e := range events {
		if len(e.Missing) > 0 {
			return ErrNotConfirmed
		}
	}
	return nil
}

// readReceipts reads the whole receipts stream with an ordered consumer.
func readReceipts(ctx context.Context, js jetstream.JetStream) ([]stream.Receipt, error) {
	s, err := js.Stream(ctx, stream.ReceiptsStream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("no JetStream stream %s: the bridge creates it (a bridge of this version, with the permission to)", stream.ReceiptsStream)
	}
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", stream.ReceiptsStream, err)
	}
	last := s.CachedInfo().State.LastSeq
	if s.CachedInfo().State.Msgs == 0 {
		return nil, nil
	}
	c, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{FilterSubjects: []string{stream.ReceiptSubjectPrefix + ".>"}})
	if err != nil {
		return nil, fmt.Errorf("reading stream %s: %w", stream.ReceiptsStream, err)
	}
	var out []stream.Receipt
	for {
		batch, err := c.Fetch(512, jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			return nil, fmt.Errorf("reading stream %s: %w", stream.ReceiptsStream, err)
		}
		n := 0
		var seq, pending uint64
		for m := range batch.Messages() {
			n++
			md, err := m.Metadata()
			if err != nil {
				continue
			}
			seq, pending = md.Sequence.Stream, md.NumPending
			if r, err := stream.UnmarshalReceipt(m.Data()); err == nil {
				out = append(out, r)
			}
		}
		if err := batch.Error(); err != nil && !errors.Is(err, jetstream.ErrNoMessages) {
			return nil, fmt.Errorf("reading stream %s: %w", stream.ReceiptsStream, err)
		}
		if n == 0 || seq >= last || pending == 0 {
			return out, nil
		}
	}
}

// traceEvents gathers, from receipts, every event whose id or user is query,
// with the earliest time each region confirmed it and the regions of expect
// that did not.
func traceEvents(receipts []stream.Receipt, query string, expect map[string]bool) []TracedEvent {
	bySeq := map[string]*TracedEvent{} // stream and sequence
	var order []string
	for _, r := range receipts {
		for _, e := range r.Events {
			if e.ID != query && e.User != query {
				continue
			}
			k := fmt.Sprintf("%s/%d", r.Stream, e.Seq)
			t := bySeq[k]
			if t == nil {
				t = &TracedEvent{Seq: e.Seq, ID: e.ID, User: e.User, Stored: e.Stored, Gone: map[string]time.Time{}}
				bySeq[k] = t
				order = append(order, k)
			}
			if g, ok := t.Gone[r.Region]; !ok || r.Gone.Before(g) {
				t.Gone[r.Region] = r.Gone
				if len(r.Servers) > 0 {
					if t.Batches == nil {
						t.Batches = map[string]TracedBatch{}
					}
					t.Batches[r.Region] = TracedBatch{Events: len(r.Events), Removed: r.Removed, Swept: r.Swept, Servers: r.Servers}
				} else {
					delete(t.Batches, r.Region)
				}
			}
		}
	}
	out := make([]TracedEvent, 0, len(order))
	for _, k := range order {
		t := bySeq[k]
		t.Missing = []string{}
		for _, region := range sortedKeys(expect) {
			if _, ok := t.Gone[region]; !ok {
				t.Missing = append(t.Missing, region)
			}
		}
		out = append(out, *t)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Seq < out[j].Seq })
	return out
}

func printTrace(w io.Writer, events []TracedEvent, query string, regions []string) {
	if len(events) == 0 {
		fmt.Fprintf(w, "no region has confirmed an event with message id or user id %q (yet); expected regions: %s\n",
			query, strings.Join(regions, ", "))
		return
	}
	for _, e := range events {
		fmt.Fprintf(w, "event %s (stream seq %d", e.ID, e.Seq)
		if e.User != "" {
			fmt.Fprintf(w, ", user %s", e.User)
		}
		if !e.Stored.IsZero() {
			fmt.Fprintf(w, ", stored %s", e.Stored.UTC().Format(time.RFC3339Nano))
		}
		fmt.Fprintln(w, ")")
		names := sortedKeys(e.Gone)
		for _, m := range e.Missing {
			if !slices.Contains(names, m) {
				names = append(names, m)
			}
		}
		sort.Strings(names)
		for _, r := range names {
			if g, ok := e.Gone[r]; ok && !e.Stored.IsZero() {
				fmt.Fprintf(w, "  %-20s gone %s (%s after the stream stored it)\n", r, g.UTC().Format(time.RFC3339Nano), g.Sub(e.Stored).Round(time.Microsecond))
			} else if ok {
				fmt.Fprintf(w, "  %-20s gone %s\n", r, g.UTC().Format(time.RFC3339Nano))
			} else {
				fmt.Fprintf(w, "  %-20s NOT CONFIRMED\n", r)
			}
			if b, ok := e.Batches[r]; ok {
				fmt.Fprintf(w, "  %-20s %s\n", "", b)
			}
		}
		fmt.Fprintf(w, "  confirmed by %d of %d regions\n", len(e.Gone), len(e.Gone)+len(e.Missing))
	}
}

// String says what the batch removed, for example "removed 3 token entries
// (10.0.0.5:11211 1, 10.0.0.6:11211 2) with 2 events".
func (b TracedBatch) String() string {
	var per []string
	for _, s := range b.Servers {
		if s.Flushed {
			per = append(per, s.Server+" flushed")
		} else {
			per = append(per, fmt.Sprintf("%s %d", s.Server, s.Removed))
		}
	}
	what := fmt.Sprintf("removed %d token entries", b.Removed)
	if b.Swept {
		what = fmt.Sprintf("swept every token entry (%d)", b.Removed)
	}
	return fmt.Sprintf("%s (%s) with %d event(s)", what, strings.Join(per, ", "), b.Events)
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
