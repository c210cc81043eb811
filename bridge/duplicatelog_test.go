package bridge

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a log destination the settler's goroutine and the test share.
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
			b := settlerBridge(t)
			b.log = slog.New(slog.NewJSONHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
			broker := newFakeBroker(t, 1)
			s := newSettler(broker, 16, b.published, b.ackFailed)
			go s.run()
			p, f := pendingFor(1, tt.outcome)
			p.id = "msg-1"
			broker.markSafe(1)
			f.resolve(1, tt.outcome)
			s.add(p)
			if !s.close(10*time.Second) || broker.acked[1] != 1 {
				t.Fatalf("the delivery was not acked: acked %v", broker.acked)
			}

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
