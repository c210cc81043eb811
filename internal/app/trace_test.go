package app

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

func TestTraceEvents(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	rc := func(region string, gone time.Duration, evs ...stream.ReceiptEvent) stream.Receipt {
		return stream.Receipt{Version: stream.ReceiptVersion, Region: region, Stream: "KEYSTONE", Events: evs, Gone: t0.Add(gone)}
	}
	e1 := stream.ReceiptEvent{Seq: 1, ID: "m-1", User: "u1", Stored: t0}
	e2 := stream.ReceiptEvent{Seq: 2, ID: "m-2", User: "u1"}
	e3 := stream.ReceiptEvent{Seq: 3, ID: "m-3", User: "u2"}
	receipts := []stream.Receipt{
		rc("regionTwo", time.Millisecond, e1, e3),
		rc("regionThree", 3*time.Millisecond, e1, e2),
		rc("regionTwo", 9*time.Millisecond, e1, e2), // a redelivery: the earliest counts
		{Version: stream.ReceiptVersion, Region: "regionTwo", Stream: "KEYSTONE", Gone: t0.Add(2 * time.Millisecond), Removed: 3,
			Events:  []stream.ReceiptEvent{{Seq: 4, ID: "m-4"}},
			Servers: []stream.ReceiptServer{{Server: "a:11211", Removed: 1}, {Server: "b:11211", Removed: 2}}},
		{Version: stream.ReceiptVersion, Region: "regionTwo", Stream: "KEYSTONE", Gone: t0.Add(7 * time.Millisecond), Removed: 9,
			Events:  []stream.ReceiptEvent{{Seq: 4, ID: "m-4"}},
			Servers: []stream.ReceiptServer{{Server: "a:11211", Removed: 9}, {Server: "b:11211"}}},
	}
	both := map[string]bool{"regionTwo": true, "regionThree": true}
	tests := []struct {
		name   string
		query  string
		expect map[string]bool
		want   []TracedEvent
	}{
		{"by message id, everywhere", "m-1", both, []TracedEvent{{Seq: 1, ID: "m-1", User: "u1", Stored: t0,
			Gone: map[string]time.Time{"regionTwo": t0.Add(time.Millisecond), "regionThree": t0.Add(3 * time.Millisecond)}, Missing: []string{}}}},
		{"by user: every event of the user", "u1", both, []TracedEvent{
			{Seq: 1, ID: "m-1", User: "u1", Stored: t0, Gone: map[string]time.Time{"regionTwo": t0.Add(time.Millisecond), "regionThree": t0.Add(3 * time.Millisecond)}, Missing: []string{}},
			{Seq: 2, ID: "m-2", User: "u1", Gone: map[string]time.Time{"regionTwo": t0.Add(9 * time.Millisecond), "regionThree": t0.Add(3 * time.Millisecond)}, Missing: []string{}},
		}},
		{"a region has not confirmed", "m-3", both, []TracedEvent{{Seq: 3, ID: "m-3", User: "u2",
			Gone: map[string]time.Time{"regionTwo": t0.Add(time.Millisecond)}, Missing: []string{"regionThree"}}}},
		{"an expected region without any receipt", "m-1", map[string]bool{"regionTwo": true, "regionFour": true}, []TracedEvent{{Seq: 1, ID: "m-1", User: "u1", Stored: t0,
			Gone: map[string]time.Time{"regionTwo": t0.Add(time.Millisecond), "regionThree": t0.Add(3 * time.Millisecond)}, Missing: []string{"regionFour"}}}},
		{"nothing matches", "m-9", both, []TracedEvent{}},
		{"per-server removals of the earliest receipt", "m-4", map[string]bool{"regionTwo": true}, []TracedEvent{{Seq: 4, ID: "m-4",
			Gone:    map[string]time.Time{"regionTwo": t0.Add(2 * time.Millisecond)},
			Missing: []string{},
			Batches: map[string]TracedBatch{"regionTwo": {Events: 1, Removed: 3, Servers: []stream.ReceiptServer{{Server: "a:11211", Removed: 1}, {Server: "b:11211", Removed: 2}}}},
		}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := traceEvents(receipts, tt.query, tt.expect)
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got  %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

// TestJudgeRegionalMirror: a region seen through its regional mirror's
// consumer is judged by the mirror: followed is OK, not followed a WARNING,
// and never "no agent attached".
func TestJudgeRegionalMirror(t *testing.T) {
	c := CheckOptions{Regions: []string{"regionTwo"}, WarnLag: DefaultWarnLag, MaxLag: DefaultMaxLag}
	tests := []struct {
		name   string
		region RegionStatus
		want   CheckState
		reason string
	}{
		{"mirror followed", RegionStatus{Name: "regionTwo", Consumer: true, Mirror: true, MirrorBound: true}, CheckOK, ""},
		{"mirror not followed", RegionStatus{Name: "regionTwo", Consumer: true, Mirror: true}, CheckWarning, "regional mirror not following"},
		{"an agent's consumer without a pull", RegionStatus{Name: "regionTwo", Consumer: true}, CheckWarning, "no agent attached"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := judge(&Status{Consumers: []RegionStatus{tt.region}}, c)
			if res.State != tt.want {
				t.Fatalf("state %v, want %v: %+v", res.State, tt.want, res.Problems)
			}
			if tt.reason != "" && (len(res.Problems) != 1 || !strings.Contains(res.Problems[0].Reason, tt.reason)) {
				t.Fatalf("problems %+v, want one saying %q", res.Problems, tt.reason)
			}
		})
	}
}

func TestTracedBatchString(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    TracedBatch
		want string
	}{
		{"targeted", TracedBatch{Events: 2, Removed: 3, Servers: []stream.ReceiptServer{{Server: "a:11211", Removed: 1}, {Server: "b:11211", Removed: 2}}},
			"removed 3 token entries (a:11211 1, b:11211 2) with 2 event(s)"},
		{"swept, one server flushed", TracedBatch{Events: 1, Removed: 7, Swept: true, Servers: []stream.ReceiptServer{{Server: "a:11211", Removed: 7}, {Server: "b:11211", Flushed: true}}},
			"swept every token entry (7) (a:11211 7, b:11211 flushed) with 1 event(s)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.b.String(); got != tc.want {
				t.Fatalf("got  %q\nwant %q", got, tc.want)
			}
		})
	}
}
