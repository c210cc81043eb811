package stream

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/backoff"
)

// Follower reads a stream with an ordered consumer (nothing durable) until
// its context ends; see Follow.
type Follower struct {
	// Stream is the stream's name.
	Stream string
	// Config returns the consumer's configuration, called at each start (a
	// start time may move on).
	Config func() jetstream.OrderedConsumerConfig
	// Handle is called with each message, in stream order.
	Handle func(jetstream.Msg)
	// Started, if set, is called each time consuming begins; Stopped each
	// time it ends.
	Started, Stopped func()
	// MaxBackoff bounds the wait between attempts (default 30 s).
	MaxBackoff time.Duration
	// What names the follower in log lines, for example "cannot follow the
	// stream's notifications yet".
	What string
}

// Follow consumes until ctx ends or the connection is closed. It re-creates
// the consumer with back-off (100 ms doubling to MaxBackoff) whenever it
// cannot be created or stops, and logs the failure on the 1st, 2nd, 4th...
// attempt: at INFO while the stream does not exist (the bridge creates
// it), else at WARN.
func (f Follower) Follow(ctx context.Context, js jetstream.JetStream, log *slog.Logger) {
	if f.MaxBackoff <= 0 {
		f.MaxBackoff = 30 * time.Second
	}
	retry := backoff.New(100*time.Millisecond, f.MaxBackoff)
	for ctx.Err() == nil {
		cons, err := js.OrderedConsumer(ctx, f.Stream, f.Config())
		if err == nil {
			var cc jetstream.ConsumeContext
			cc, err = cons.Consume(f.Handle)
			if err == nil {
				if f.Started != nil {
					f.Started()
				}
				retry.Reset()
				select {
				case <-ctx.Done():
					cc.Stop()
				case <-cc.Closed():
					err = errors.New("the ordered consumer stopped")
				}
				if f.Stopped != nil {
					f.Stopped()
				}
				if ctx.Err() != nil {
					return
				}
			}
		}
		if errors.Is(err, nats.ErrConnectionClosed) {
			return
		}
		d := retry.Next()
		level := slog.LevelWarn
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			level = slog.LevelInfo // the bridge creates it
		}
		if n := retry.Failures(); n&(n-1) == 0 { // the 1st, 2nd, 4th... attempt
			log.Log(ctx, level, f.What, "stream", f.Stream, "err", err, "attempts", n, "retry_in", d)
		}
		if !backoff.Sleep(ctx, d) {
			return
		}
	}
}
