package main

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestBinaryLinksNoTestCode: the production binary depends on no testing
// package and no test helper of the project.
func TestBinaryLinksNoTestCode(t *testing.T) {
	out, err := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		if pkg == "testing" || strings.HasPrefix(pkg, "testing/") || strings.HasSuffix(pkg, "/testutil") ||
			strings.HasSuffix(pkg, "test") && strings.Contains(pkg, "keystone-fanout/internal/") {
			t.Errorf("keystone-fanout depends on %s", pkg)
		}
	}
}
