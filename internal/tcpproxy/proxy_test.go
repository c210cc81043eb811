package tcpproxy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// echoServer answers every line it reads with the same line.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func startProxy(t *testing.T, target string) *Proxy {
	t.Helper()
	p, err := Start(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func dial(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, bufio.NewReader(c)
}

func roundTrip(t *testing.T, c net.Conn, r *bufio.Reader, line string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(line + "\n")); err != nil {
		t.Fatalf("write through proxy: %v", err)
	}
	got, err := r.ReadString('\n')
	if err != nil {
		t.Fatalf("read through proxy: want %q, got error %v", line, err)
	}
	if got != line+"\n" {
		t.Fatalf("read through proxy: want %q, got %q", line, got)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestForward(t *testing.T) {
	p := startProxy(t, echoServer(t))
	c, r := dial(t, p.Addr())
	roundTrip(t, c, r, "hello")
	if got := p.Connections(); got != 1 {
		t.Fatalf("Connections() = %d, want 1", got)
	}
	if p.Target() == "" || p.Accepted() != 1 {
		t.Fatalf("Target() = %q, Accepted() = %d; want the echo address and 1", p.Target(), p.Accepted())
	}
}

func TestCloseConnections(t *testing.T) {
	p := startProxy(t, echoServer(t))
	c, r := dial(t, p.Addr())
	roundTrip(t, c, r, "before")
	if n := p.CloseConnections(); n != 1 {
		t.Fatalf("CloseConnections() = %d, want 1", n)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := r.ReadString('\n'); !errors.Is(err, io.EOF) && !isReset(err) {
		t.Fatalf("read after CloseConnections: want EOF or reset, got %v", err)
	}
	waitFor(t, "no open connections", func() bool { return p.Connections() == 0 })
	// New connections still work.
	c2, r2 := dial(t, p.Addr())
	roundTrip(t, c2, r2, "after")
}

func isReset(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && !op.Timeout()
}

func TestPauseResume(t *testing.T) {
	p := startProxy(t, echoServer(t))
	c, r := dial(t, p.Addr())
	roundTrip(t, c, r, "before")
	p.Pause()
	p.Pause() // idempotent
	if _, err := c.Write([]byte("held\n")); err != nil {
		t.Fatal(err)
	}
	// Nothing may come back while paused. A short deadline can only make
	// this check pass wrongly, never fail wrongly.
	c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if got, err := r.ReadString('\n'); err == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read while paused: want a timeout, got %q, %v", got, err)
	}
	p.Resume()
	p.Resume() // idempotent
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := r.ReadString('\n')
	if err != nil || got != "held\n" {
		t.Fatalf("read after Resume: want %q, got %q, %v", "held\n", got, err)
	}
}

func TestCloseConnectionsWhilePaused(t *testing.T) {
	p := startProxy(t, echoServer(t))
	c, r := dial(t, p.Addr())
	roundTrip(t, c, r, "before")
	p.Pause()
	c.Write([]byte("held\n"))
	p.CloseConnections()
	waitFor(t, "no open connections while paused", func() bool { return p.Connections() == 0 })
	p.Resume()
}

func TestRefuse(t *testing.T) {
	p := startProxy(t, echoServer(t))
	p.Refuse(true)
	c, r := dial(t, p.Addr())
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := r.ReadString('\n'); err == nil {
		t.Fatal("read on a refused connection: want an error, got data")
	}
	p.Refuse(false)
	c2, r2 := dial(t, p.Addr())
	roundTrip(t, c2, r2, "accepted again")
}

func TestCloseEndsEverything(t *testing.T) {
	p, err := Start(echoServer(t))
	if err != nil {
		t.Fatal(err)
	}
	c, r := dial(t, p.Addr())
	roundTrip(t, c, r, "x")
	p.Pause()
	if err := p.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := net.DialTimeout("tcp", p.Addr(), time.Second); err == nil {
		t.Fatal("dial after Close: want an error")
	}
}
