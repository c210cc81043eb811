package e2e

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

var (
	flagRegions = flag.Int("e2e.regions", 3,
		"number of agent regions (regionTwo, regionThree, ...); 50 for the benchmark")
	flagSoak         = flag.Bool("e2e.soak", false, "run TestSoak (mixed events and random faults; not in the default run)")
	flagSoakDuration = flag.Duration("e2e.soak-duration", 10*time.Minute, "how long TestSoak publishes")
	flagSoakRegions  = flag.Int("e2e.soak-regions", 10, "agent regions of TestSoak")
	flagSoakRate     = flag.Float64("e2e.soak-rate", 5, "token-affecting notifications per second in TestSoak")
	flagKeepLogs     = flag.Bool("e2e.keep-logs", false, "keep every process's log file, also when the test passes")
)

// binary is the keystone-fanout executable built once by TestMain.
var binary string

// TestMain builds cmd/keystone-fanout once into a temporary directory; every
// test runs that executable. A failed build fails the run (nothing skips).
func TestMain(m *testing.M) {
	flag.Parse()
	dir, err := os.MkdirTemp("", "ksf-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "keystone-fanout")
	start := time.Now()
	cmd := exec.Command(goTool(), "build", "-o", binary, "github.com/keystone-fanout/keystone-fanout/cmd/keystone-fanout")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: building cmd/keystone-fanout: %v\n", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	if testing.Verbose() {
		fmt.Fprintf(os.Stderr, "e2e: built %s in %s\n", binary, time.Since(start).Round(time.Millisecond))
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// goTool is the go command of the toolchain running the tests.
func goTool() string {
	if root := os.Getenv("GOROOT"); root != "" {
		if p := filepath.Join(root, "bin", "go"); fileExists(p) {
			return p
		}
	}
	return "go"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
