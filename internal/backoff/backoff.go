// Package backoff is the capped exponential back-off with jitter that
// keystone-fanout's components wait with between retries, and a sleep that
// ends early when its context does.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff gives the waits between consecutive failed attempts: Min, then
// doubling up to Max, each shortened by a random jitter of up to 20% so that
// replicas do not retry in step. A wait is therefore in [0.8·d, d] where d is
// the un-jittered step: it never exceeds Max. Reset starts again from Min.
//
// A Backoff is not safe for concurrent use; the zero value waits 0.
type Backoff struct {
	min, max time.Duration
	failures int
}

// New returns a Backoff from lo doubling up to hi. A hi below lo is taken as
// lo (a constant wait); a lo of zero or less gives zero waits.
func New(lo, hi time.Duration) *Backoff {
	return &Backoff{min: lo, max: max(lo, hi)}
}

// step is the un-jittered wait after n failures: min·2ⁿ capped at max.
func (b *Backoff) step(n int) time.Duration { return Capped(b.min, b.max, n) }

// Capped is lo·2ⁿ, capped at hi, without jitter: for callers that keep the
// failure count themselves, per item. n of zero or less gives lo.
func Capped(lo, hi time.Duration, n int) time.Duration {
	d := lo
	for i := 0; i < n && d > 0 && d < hi; i++ {
		d *= 2
	}
	return min(d, max(lo, hi))
}

// Next records one more failure and returns the wait before the next
// attempt.
func (b *Backoff) Next() time.Duration {
	d := b.step(b.failures)
	b.failures++
	if d <= 0 {
		return 0
	}
	return d - rand.N(d/5+1)
}

// Failures is the number of Next calls since New or the last Reset: the
// consecutive failures, for logs.
func (b *Backoff) Failures() int { return b.failures }

// Reset forgets the failures: the next wait is Min again.
func (b *Backoff) Reset() { b.failures = 0 }

// Sleep waits d, or less when ctx ends first; it reports whether the whole d
// passed (false: ctx ended).
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
