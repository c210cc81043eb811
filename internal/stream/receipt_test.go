package stream

import (
	"strings"
	"testing"
	"time"
)

func TestReceiptRoundTrip(t *testing.T) {
	r := Receipt{Version: ReceiptVersion, Region: "regionTwo", Stream: DefaultName, Gone: time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC),
		Events: []ReceiptEvent{{Seq: 7, ID: "m-7", User: "u1"}}, Removed: 3}
	b, err := r.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		body    string
		wantErr string
	}{
		{"a receipt", string(b), ""},
		{"not JSON", "{", "not a receipt"},
		{"a newer version", `{"v":2,"region":"regionTwo"}`, "version 2"},
		{"no region", `{"v":1}`, `region ""`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := UnmarshalReceipt([]byte(tt.body))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got.Region != r.Region || !got.Gone.Equal(r.Gone) || len(got.Events) != 1 || got.Events[0] != r.Events[0] || got.Removed != 3 {
				t.Fatalf("got %+v, %v; want %+v", got, err, r)
			}
		})
	}
	if s := ReceiptSubject("regionTwo"); s != "keystone-fanout.receipts.regionTwo" || strings.HasPrefix(s, DefaultSubjectPrefix+".") {
		t.Fatalf("receipt subject %q must lie outside the events' subjects", s)
	}
}
