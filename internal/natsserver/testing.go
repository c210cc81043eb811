package natsserver

import "testing"

// StartTest starts an embedded server with JetStream on a random loopback port
// with its storage in a temporary directory, and stops it when the test ends.
func StartTest(t testing.TB) *Server {
	t.Helper()
	s, err := Start(Options{Listen: "127.0.0.1:-1", DataDir: t.TempDir(), ServerName: "test"})
	if err != nil {
		t.Fatalf("starting embedded NATS server: %v", err)
	}
	t.Cleanup(s.Shutdown)
	return s
}
