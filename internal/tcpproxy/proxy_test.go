package tcpproxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
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

// TestDelayKeepsOrderAndCounts: with a delay and jitter each way, a round
// trip takes at least both delays less their jitter (a lower bound: a slow
// machine only adds), many small writes come back in order, and the byte
// counters see every byte each way.
func TestDelayKeepsOrderAndCounts(t *testing.T) {
	o := Options{Up: Delay{Base: 30 * time.Millisecond, Jitter: 10 * time.Millisecond},
		Down: Delay{Base: 20 * time.Millisecond, Jitter: 10 * time.Millisecond}}
	p, err := StartWith(echoServer(t), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	c, r := dial(t, p.Addr())
	start := time.Now()
	roundTrip(t, c, r, "first")
	if rt, least := time.Since(start), 30*time.Millisecond; rt < least {
		t.Fatalf("a round trip took %s; with 30±10 ms up and 20±10 ms down it cannot take less than %s", rt, least)
	}
	// Many writes, each its own chunk: jitter must not reorder them.
	const n = 300
	var want []byte
	go func() {
		for i := range n {
			line := fmt.Sprintf("line %d\n", i)
			if _, err := c.Write([]byte(line)); err != nil {
				return
			}
			time.Sleep(100 * time.Microsecond)
		}
	}()
	for i := range n {
		want = append(want, fmt.Sprintf("line %d\n", i)...)
	}
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	got := make([]byte, len(want))
	if _, err := io.ReadFull(r, got); err != nil {
		t.Fatalf("reading %d lines back: %v", n, err)
	}
	if string(got) != string(want) {
		t.Fatalf("bytes came back reordered or changed through the delaying proxy")
	}
	total := int64(len("first\n") + len(want))
	waitFor(t, "the counters to see every byte", func() bool {
		up, down := p.Bytes()
		return up == total && down == total
	})
}

// TestDelayDeliversBeforeClosing: what was read before the client closed
// is still delivered to the target after the delay.
func TestDelayDeliversBeforeClosing(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got := make(chan string, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		got <- string(b)
	}()
	p, err := StartWith(ln.Addr().String(), Options{Up: Delay{Base: 50 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	c, _ := dial(t, p.Addr())
	c.Write([]byte("last words"))
	c.Close()
	select {
	case s := <-got:
		if s != "last words" {
			t.Fatalf("the target read %q, want %q", s, "last words")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the target read nothing")
	}
}

func TestOptionsValidate(t *testing.T) {
	tests := []struct {
		name    string
		o       Options
		wantErr string
	}{
		{"zero", Options{}, ""},
		{"listen and delays", Options{Listen: "127.0.0.1:0", Up: Delay{Base: time.Second, Jitter: time.Second}}, ""},
		{"bad listen", Options{Listen: "127.0.0.1"}, "listen address"},
		{"negative", Options{Down: Delay{Base: -time.Second}}, "negative"},
		{"jitter above the delay", Options{Up: Delay{Base: time.Millisecond, Jitter: 2 * time.Millisecond}}, "exceeds"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.o.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Validate: %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Validate: %v, want an error containing %q", err, tt.wantErr)
			}
			if _, err := StartWith("127.0.0.1:1", tt.o); err == nil {
				t.Fatal("StartWith accepted invalid options")
			}
		})
	}
}
