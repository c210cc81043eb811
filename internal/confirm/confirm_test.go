package confirm

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

func TestCollector(t *testing.T) {
	t0 := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	ev := func(id string, stored time.Duration) stream.ReceiptEvent {
		return stream.ReceiptEvent{Seq: 1, ID: id, Stored: t0.Add(stored)}
	}
	rc := func(region string, gone time.Duration, evs ...stream.ReceiptEvent) stream.Receipt {
		return stream.Receipt{Version: stream.ReceiptVersion, Region: region, Stream: stream.DefaultName, Gone: t0.Add(gone), Events: evs}
	}
	type want struct {
		everywhere    int     // observations
		everywhereSum float64 // seconds
		unconfirmed   map[string]float64
		pending       float64
	}
	for _, tc := range []struct {
		name     string
		regions  []string // expected; nil: set later through setExpected
		later    []string // setExpected after the receipts
		receipts []stream.Receipt
		after    time.Duration // clock at Expire, from t0
		want     want
	}{
		{
			name:     "every region confirms: the last one counts",
			regions:  []string{"regionTwo", "regionThree"},
			receipts: []stream.Receipt{rc("regionTwo", 30*time.Millisecond, ev("m1", 0)), rc("regionThree", 80*time.Millisecond, ev("m1", 0))},
			after:    time.Second,
			want:     want{everywhere: 1, everywhereSum: 0.08},
		},
		{
			name:    "a repeated receipt keeps the earliest and settles once",
			regions: []string{"regionTwo"},
			receipts: []stream.Receipt{rc("regionTwo", 30*time.Millisecond, ev("m1", 0)), rc("regionTwo", 10*time.Millisecond, ev("m1", 0)),
				rc("regionTwo", 50*time.Millisecond, ev("m1", 0))},
			after: time.Second,
			want:  want{everywhere: 1, everywhereSum: 0.03},
		},
		{
			name:     "a region missing at the deadline is counted",
			regions:  []string{"regionTwo", "regionThree", "regionFour"},
			receipts: []stream.Receipt{rc("regionTwo", 30*time.Millisecond, ev("m1", 0), ev("m2", 0))},
			after:    6 * time.Minute,
			want:     want{unconfirmed: map[string]float64{"regionThree": 2, "regionFour": 2}},
		},
		{
			name:     "before the deadline it is pending",
			regions:  []string{"regionTwo", "regionThree"},
			receipts: []stream.Receipt{rc("regionTwo", 30*time.Millisecond, ev("m1", 0))},
			after:    4 * time.Minute,
			want:     want{pending: 1},
		},
		{
			name:     "regions learnt after the receipts complete the event",
			later:    []string{"regionTwo"},
			receipts: []stream.Receipt{rc("regionTwo", 20*time.Millisecond, ev("m1", 0))},
			after:    time.Second,
			want:     want{everywhere: 1, everywhereSum: 0.02},
		},
		{
			name:     "a region outside the expected ones does not hold an event back",
			regions:  []string{"regionTwo"},
			receipts: []stream.Receipt{rc("regionNine", 90*time.Millisecond, ev("m1", 0)), rc("regionTwo", 40*time.Millisecond, ev("m1", 0))},
			after:    time.Second,
			want:     want{everywhere: 1, everywhereSum: 0.04},
		},
		{
			name:     "an event stored before the collector started is ignored",
			regions:  []string{"regionTwo"},
			receipts: []stream.Receipt{rc("regionTwo", 40*time.Millisecond, ev("m1", -time.Second))},
			after:    10 * time.Minute,
		},
		{
			name:     "a gone time before the stored time counts as zero",
			regions:  []string{"regionTwo"},
			receipts: []stream.Receipt{rc("regionTwo", -5*time.Millisecond, ev("m1", 0))},
			after:    time.Second,
			want:     want{everywhere: 1},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			now := t0
			reg := prometheus.NewRegistry()
			c, err := New(Options{Regions: tc.regions, Now: func() time.Time { return now }}, nil, reg, testutil.Logger(t))
			if err != nil {
				t.Fatal(err)
			}
			c.started = t0
			for _, r := range tc.receipts {
				c.Add(r)
			}
			if tc.later != nil {
				c.setExpected(tc.later)
			}
			now = t0.Add(tc.after)
			c.Expire()
			if got := testutil.Metric(reg, MetricsPrefix+"everywhere_seconds"); int(got) != tc.want.everywhere {
				t.Errorf("everywhere observations %v, want %d", got, tc.want.everywhere)
			}
			if got := testutil.HistogramSum(reg, MetricsPrefix+"everywhere_seconds"); fmt.Sprintf("%.3f", got) != fmt.Sprintf("%.3f", tc.want.everywhereSum) {
				t.Errorf("everywhere sum %v s, want %v s", got, tc.want.everywhereSum)
			}
			for _, r := range []string{"regionTwo", "regionThree", "regionFour"} {
				if got := testutil.Metric(reg, MetricsPrefix+"unconfirmed_total", "region", r); got != tc.want.unconfirmed[r] {
					t.Errorf("unconfirmed in %s: %v, want %v", r, got, tc.want.unconfirmed[r])
				}
			}
			if got := testutil.Metric(reg, MetricsPrefix+"pending_events"); got != tc.want.pending {
				t.Errorf("pending %v, want %v", got, tc.want.pending)
			}
		})
	}
}

func TestMaxPending(t *testing.T) {
	reg := prometheus.NewRegistry()
	c, err := New(Options{Regions: []string{"regionTwo", "regionThree"}, MaxPending: 2}, nil, reg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	c.started = t0.Add(-time.Minute)
	for i := range 5 {
		c.Add(stream.Receipt{Version: stream.ReceiptVersion, Region: "regionTwo", Gone: t0,
			Events: []stream.ReceiptEvent{{ID: fmt.Sprint("m", i), Stored: t0}}})
	}
	if got := testutil.Metric(reg, MetricsPrefix+"pending_events"); got != 2 {
		t.Errorf("pending %v, want 2", got)
	}
	if got := testutil.Metric(reg, MetricsPrefix+"untracked_total"); got != 3 {
		t.Errorf("untracked %v, want 3", got)
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    Options
		want string
	}{
		{"zero", Options{}, ""},
		{"bad region", Options{Regions: []string{"region two"}}, `--expect-regions: "region two"`},
		{"negative deadline", Options{Deadline: -time.Second}, "--confirm-deadline -1s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.o.Validate()
			if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
				t.Fatalf("Validate() = %v, want %q", err, tc.want)
			}
		})
	}
}
