package testutil

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"
)

// recorder is a testing.TB that records Fatalf instead of stopping the test.
type recorder struct {
	testing.TB
	fatal string
}

func (r *recorder) Helper() {}

func (r *recorder) Fatalf(format string, args ...any) {
	r.fatal = fmt.Sprintf(format, args...)
	panic(r) // Fatalf must not return
}

func runEventually(timeout time.Duration, what string, cond func() (bool, string)) (fatal string) {
	r := &recorder{}
	defer func() {
		if p := recover(); p != nil && p != any(r) {
			panic(p)
		}
		fatal = r.fatal
	}()
	Eventually(r, timeout, what, cond)
	return ""
}

func TestEventually(t *testing.T) {
	tests := []struct {
		name      string
		okAfter   int // calls; 0: never
		wantFatal []string
	}{
		{name: "true at once", okAfter: 1},
		{name: "true after a few polls", okAfter: 3},
		{name: "never true", wantFatal: []string{"expected the thing to happen", "last seen: call"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			fatal := runEventually(200*time.Millisecond, "the thing to happen", func() (bool, string) {
				calls++
				return tc.okAfter > 0 && calls >= tc.okAfter, fmt.Sprintf("call %d", calls)
			})
			if tc.wantFatal == nil {
				if fatal != "" {
					t.Fatalf("Eventually failed: %s", fatal)
				}
				if calls != tc.okAfter {
					t.Fatalf("cond called %d times, want %d", calls, tc.okAfter)
				}
				return
			}
			for _, w := range tc.wantFatal {
				if !strings.Contains(fatal, w) {
					t.Errorf("failure %q does not contain %q", fatal, w)
				}
			}
		})
	}
}

func TestAMQPURL(t *testing.T) {
	t.Setenv("KEYSTONE_FANOUT_TEST_AMQP_URL", "")
	if got := AMQPURL(); got != DefaultAMQPURL {
		t.Errorf("AMQPURL() = %q without the variable, want %q", got, DefaultAMQPURL)
	}
	t.Setenv("KEYSTONE_FANOUT_TEST_AMQP_URL", "amqp://u:p@rabbit:5673/v")
	if got := AMQPURL(); got != "amqp://u:p@rabbit:5673/v" {
		t.Errorf("AMQPURL() = %q, want the variable's value", got)
	}
}

func TestNameSuffix(t *testing.T) {
	a, b := NameSuffix(), NameSuffix()
	if !regexp.MustCompile(`^[0-9a-f]{12}$`).MatchString(a) {
		t.Errorf("NameSuffix() = %q, want 12 hex characters", a)
	}
	if a == b {
		t.Errorf("two NameSuffix() calls both returned %q", a)
	}
}
