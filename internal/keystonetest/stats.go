package keystonetest

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// userHZ is the unit of the CPU times in /proc/<pid>/stat on Linux.
const userHZ = 100

// CPUTime is the CPU time (user and system) used so far by the running uwsgi
// master and workers serving Keystone, read from /proc. Compare two readings to
// measure what a load costs Keystone.
func (k *Keystone) CPUTime() (time.Duration, error) {
	k.mu.Lock()
	cmd := k.cmd
	k.mu.Unlock()
	if cmd == nil {
		return 0, fmt.Errorf("keystonetest: uwsgi is not running")
	}
	pgid := cmd.Process.Pid
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	var ticks int64
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		data, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue // exited meanwhile
		}
		// "pid (comm) state ppid pgrp ... utime stime ...": comm may hold spaces.
		s := string(data)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		// f[0] is state (field 3), so field n is f[n-3].
		if len(f) < 13 {
			continue
		}
		if pg, _ := strconv.Atoi(f[2]); pg != pgid {
			continue
		}
		ut, _ := strconv.ParseInt(f[11], 10, 64)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		ticks += ut + st
	}
	return time.Duration(ticks) * time.Second / userHZ, nil
}

// CountRequests counts the requests uwsgi has logged whose method is method
// and whose path (with query) starts with prefix, for example
// CountRequests("GET", "/v3/OS-REVOKE/events").
func (k *Keystone) CountRequests(method, prefix string) (int, error) {
	f, err := os.Open(filepath.Join(k.Dir, "uwsgi.log"))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	want := "] " + method + " " + prefix
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "[pid: ") && strings.Contains(line, want) && strings.Contains(line, " => generated ") {
			n++
		}
	}
	return n, sc.Err()
}
