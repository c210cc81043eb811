// Package testutil holds helpers shared by keystone-fanout's tests. Only
// _test.go files and other test-helper packages (memcachetest) import it.
package testutil

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"testing"
	"time"
)

// pollEvery is how often Eventually checks its condition.
const pollEvery = 20 * time.Millisecond

// Eventually calls cond every 20 ms until it returns ok, or fails the test
// (t.Fatalf) once timeout has passed, saying what was expected (what) and
// what cond last saw (seen).
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() (ok bool, seen string)) {
	t.Helper()
	EventuallyEvery(t, pollEvery, timeout, what, cond)
}

// EventuallyEvery is Eventually polling every interval: a short one for
// latency measurements, where the polling interval bounds the resolution.
func EventuallyEvery(t testing.TB, interval, timeout time.Duration, what string, cond func() (ok bool, seen string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, seen := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: expected %s; last seen: %s", timeout, what, seen)
		}
		time.Sleep(interval)
	}
}

// DefaultAMQPURL is the RabbitMQ the tests use unless
// KEYSTONE_FANOUT_TEST_AMQP_URL says otherwise.
const DefaultAMQPURL = "amqp://guest:guest@127.0.0.1:5672/"

// AMQPURL is the RabbitMQ the tests use: $KEYSTONE_FANOUT_TEST_AMQP_URL, or
// DefaultAMQPURL.
func AMQPURL() string {
	if u := os.Getenv("KEYSTONE_FANOUT_TEST_AMQP_URL"); u != "" {
		return u
	}
	return DefaultAMQPURL
}

// NameSuffix returns 12 random hex characters, to make the names a test
// gives to shared resources (RabbitMQ exchanges and queues, streams) its own.
func NameSuffix() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
