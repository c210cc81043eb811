package regionagent

import (
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/tokencache"
)

// receiptTimeout bounds the wait for a receipt's PubAck.
const receiptTimeout = 10 * time.Second

// sendReceipt publishes the receipt of a first pass that removed the entries
// of batch at gone (stream.Receipt), without waiting: a receipt is evidence
// for `keystone-fanout trace`, and its loss (no receipts stream, no
// permission, NATS away) is counted in receipt_errors_total, never retried,
// and never holds an event back. Gap sweeps have no receipt.
func (a *Agent) sendReceipt(batch []*item, res tokencache.Result, gone time.Time) {
	r := stream.Receipt{Version: stream.ReceiptVersion, Region: a.o.Region, Stream: a.o.Stream, Gone: gone.UTC(),
		Removed: res.Removed, Swept: res.Swept || res.Flushed}
	for _, sr := range res.Servers {
		r.Servers = append(r.Servers, stream.ReceiptServer{Server: sr.Server, Removed: sr.Removed, Flushed: sr.Flushed})
	}
	for _, it := range batch {
		if it.msg != nil {
			user := it.ev.UserID
			if user == "" && it.ev.Revocation != nil {
				user = it.ev.Revocation.UserID
			}
			r.Events = append(r.Events, stream.ReceiptEvent{Seq: it.seq, ID: it.ev.ID, User: user, Stored: it.stored.UTC()})
		}
	}
	if len(r.Events) == 0 {
		return
	}
	body, err := r.Marshal()
	if err != nil {
		a.m.receiptErrors.Inc()
		return
	}
	// Receipts go to the central side whichever way the agent consumes; the
	// publish is routed by subject, the receipts stream answers.
	f, err := a.central.PublishAsync(stream.ReceiptSubject(a.o.Region), body)
	if err != nil {
		a.m.receiptErrors.Inc()
		a.log.Debug("receipt not sent", "err", err)
		return
	}
	a.checks.Add(1) // Run waits for it
	go func() {
		defer a.checks.Done()
		t := time.NewTimer(receiptTimeout)
		defer t.Stop()
		select {
		case <-a.life.Done():
		case <-f.Ok():
		case err := <-f.Err():
			a.m.receiptErrors.Inc()
			a.log.Debug("receipt not stored", "err", err)
		case <-t.C:
			a.m.receiptErrors.Inc()
		}
	}()
}
