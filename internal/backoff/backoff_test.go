package backoff

import (
	"context"
	"testing"
	"time"
)

func TestBackoffSteps(t *testing.T) {
	const ms = time.Millisecond
	tests := []struct {
		name     string
		lo, hi   time.Duration
		steps    []time.Duration // un-jittered waits of consecutive Next calls
		afterRst time.Duration
	}{
		{"bridge reconnects", 100 * ms, time.Second,
			[]time.Duration{100 * ms, 200 * ms, 400 * ms, 800 * ms, time.Second, time.Second, time.Second}, 100 * ms},
		{"revocation poll errors", time.Second, 5 * time.Second,
			[]time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 5 * time.Second, 5 * time.Second}, time.Second},
		{"max below min is a constant wait", time.Second, 10 * ms,
			[]time.Duration{time.Second, time.Second, time.Second}, time.Second},
		{"max equal to min", 50 * ms, 50 * ms, []time.Duration{50 * ms, 50 * ms}, 50 * ms},
		{"zero min waits zero", 0, time.Second, []time.Duration{0, 0, 0}, 0},
		{"large max does not overflow", time.Hour, 1 << 62,
			[]time.Duration{time.Hour, 2 * time.Hour, 4 * time.Hour}, time.Hour},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// Jitter is random: repeat to exercise its range.
			for range 200 {
				b := New(tc.lo, tc.hi)
				for i, want := range tc.steps {
					if got := b.Next(); got > want || got < want-want/5 {
						t.Fatalf("Next() #%d = %s, want %s minus at most 20%%", i+1, got, want)
					}
					if b.Failures() != i+1 {
						t.Fatalf("Failures() = %d after %d Next calls", b.Failures(), i+1)
					}
				}
				b.Reset()
				if b.Failures() != 0 {
					t.Fatalf("Failures() = %d after Reset, want 0", b.Failures())
				}
				if got := b.Next(); got > tc.afterRst || got < tc.afterRst-tc.afterRst/5 {
					t.Fatalf("Next() after Reset = %s, want %s minus at most 20%%", got, tc.afterRst)
				}
			}
		})
	}
}

func TestManyFailuresStayCapped(t *testing.T) {
	b := New(time.Millisecond, time.Second)
	for range 10000 {
		b.Next()
	}
	if d := b.Next(); d > time.Second || d < 800*time.Millisecond {
		t.Fatalf("after 10000 failures Next() = %s, want 0.8s to 1s", d)
	}
}

func TestSleep(t *testing.T) {
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	tests := []struct {
		name string
		ctx  context.Context
		d    time.Duration
		want bool
	}{
		{"the wait passes", context.Background(), time.Millisecond, true},
		{"zero wait passes", context.Background(), 0, true},
		{"an ended context stops a long wait", cancelled, time.Hour, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Sleep(tc.ctx, tc.d); got != tc.want {
				t.Fatalf("Sleep(%s) = %v, want %v", tc.d, got, tc.want)
			}
		})
	}
}

func TestCapped(t *testing.T) {
	tests := []struct {
		name   string
		lo, hi time.Duration
		n      int
		want   time.Duration
	}{
		{"no failure yet", 100 * time.Millisecond, time.Second, 0, 100 * time.Millisecond},
		{"negative count", 100 * time.Millisecond, time.Second, -1, 100 * time.Millisecond},
		{"doubling", 100 * time.Millisecond, time.Second, 2, 400 * time.Millisecond},
		{"capped", 100 * time.Millisecond, time.Second, 10, time.Second},
		{"many failures stay capped", 100 * time.Millisecond, time.Second, 10000, time.Second},
		{"hi below lo is constant", time.Second, time.Millisecond, 3, time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Capped(tt.lo, tt.hi, tt.n); got != tt.want {
				t.Fatalf("Capped(%s, %s, %d) = %s, want %s", tt.lo, tt.hi, tt.n, got, tt.want)
			}
		})
	}
}
