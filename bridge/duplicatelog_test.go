package bridge

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/testutil"
)

// syncBuffer is a log destination the acker's goroutine and the test share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestDuplicateLoggedAtDebug: a notification the stream already held (a
// PubAck with "duplicate": true) is acked and logged at debug level with its
// message id and event type; a stored one is not logged as a duplicate.
func TestDuplicateLoggedAtDebug(t *testing.T) {
	tests := []struct {
		name    string
		outcome outcome
		wantLog bool
	}{
		{"stored", stored, false},
		{"duplicate", storedDuplicate, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var logs syncBuffer
			b := ackerBridge(t, 16, 16)
			b.log = slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
			broker := newFakeBroker(t, 1)
			s := ackerSession(16)
			done := make(chan struct{})
			go b.acker(s, broker, done)
			s.slots <- struct{}{}
			b.m.inFlight.Inc()
			s.pending <- inflight{tag: 1, how: settlePublished, id: "msg-1", typ: "identity.user.updated", since: time.Now()}
			broker.markSafe(1)
			s.replies <- replyTo(1, tt.outcome)
			testutil.Eventually(t, 10*time.Second, "the delivery acked", func() (bool, string) {
				broker.mu.Lock()
				defer broker.mu.Unlock()
				return broker.acked[1] == 1, fmt.Sprintf("acked %v", broker.acked)
			})
			close(s.pending)
			<-done

			var found []map[string]any
			for _, line := range bytes.Split([]byte(logs.String()), []byte("\n")) {
				var rec map[string]any
				if len(line) == 0 || json.Unmarshal(line, &rec) != nil {
					continue
				}
				if m, _ := rec["msg"].(string); bytes.Contains([]byte(m), []byte("duplicate")) {
					found = append(found, rec)
				}
			}
			if !tt.wantLog {
				if len(found) != 0 {
					t.Fatalf("a stored notification logged as a duplicate: %v", found)
				}
				return
			}
			if len(found) != 1 {
				t.Fatalf("%d duplicate log records, want 1; log:\n%s", len(found), logs.String())
			}
			rec := found[0]
			if rec["level"] != "DEBUG" || rec["message_id"] != "msg-1" || rec["event_type"] != "identity.user.updated" {
				t.Fatalf("duplicate log record %v: want level DEBUG, message_id msg-1, event_type identity.user.updated", rec)
			}
		})
	}
}
