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
