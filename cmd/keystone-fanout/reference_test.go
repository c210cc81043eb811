package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/keystone-fanout/keystone-fanout/internal/config"
)

var update = flag.Bool("update", false, "rewrite docs/CONFIGURATION.md from the commands' flags")

const referenceFile = "../../docs/CONFIGURATION.md"

// referenceOrder is the order of the commands in docs/CONFIGURATION.md;
// commands not named here follow in name order.
var referenceOrder = []string{"bridge", "agent", "all-in-one", "status", "sweep", "trace"}

// renderReference renders every command's flags, as --help would list them,
// as Markdown.
func renderReference(t *testing.T) []byte {
	t.Helper()
	sets := map[string]*config.Set{}
	config.ReferenceHook = func(s *config.Set) { sets[s.Name()] = s }
	defer func() { config.ReferenceHook = nil }()
	names := make([]string, 0, len(commands))
	for name := range commands {
		args := [][]string{{name}}
		if name == "doctor" { // a command per component
			args = [][]string{{name, "bridge"}, {name, "agent"}}
		}
		for _, a := range args {
			full := strings.Join(a, " ")
			names = append(names, full)
			if code := run(append(a, "--help"), io.Discard, io.Discard, func(string) string { return "" }); code != 0 {
				t.Fatalf("%s --help: exit status %d", full, code)
			}
			if sets[full] == nil {
				t.Fatalf("%s --help did not show its flags through internal/config", full)
			}
		}
	}
	sort.Slice(names, func(i, j int) bool {
		a, b := slices.Index(referenceOrder, names[i]), slices.Index(referenceOrder, names[j])
		switch {
		case a >= 0 && b >= 0:
			return a < b
		case a >= 0 || b >= 0:
			return a >= 0
		}
		return names[i] < names[j]
	})

	var b bytes.Buffer
	b.WriteString(`# Configuration reference

<!-- Generated from the commands' flags: do not edit. After changing a flag, run
     go test ./cmd/keystone-fanout -run TestConfigurationReference -update -->

Every command reads its settings from flags, then from the environment, then from its
defaults:

- every flag ` + "`--some-name`" + ` may also be given as the variable ` + "`KEYSTONE_FANOUT_SOME_NAME`" + `;
  a flag on the command line wins over its variable;
- a secret flag ` + "`--x`" + ` has a twin ` + "`--x-file`" + ` (` + "`KEYSTONE_FANOUT_X_FILE`" + `) naming a file that
  holds it, trailing newlines removed, so that it is never on a command line or in the
  environment;
- a ` + "`list`" + ` flag may be repeated, or given comma-separated;
- a ` + "`duration`" + ` is written like ` + "`500ms`" + `, ` + "`30s`" + ` or ` + "`5m`" + `; where the description says
  "seconds", a bare number of seconds as in OpenStack's files (` + "`300`" + `) works too.
  A negative duration is refused.

A value that does not parse, a missing required flag or a file that cannot be read exits
with status 2 and a message naming the flag, before anything is started
([OPERATIONS.md](OPERATIONS.md)). ` + "`keystone-fanout <command> --help`" + ` prints the same
list.

`)
	for _, name := range names {
		fmt.Fprintf(&b, "- [`%s`](#keystone-fanout-%s)\n", name, strings.ReplaceAll(name, " ", "-"))
	}
	for _, name := range names {
		s := sets[name]
		fmt.Fprintf(&b, "\n## keystone-fanout %s\n\n", name)
		fmt.Fprintf(&b, "```\n%s\n```\n\n", s.Usage())
		b.WriteString("| flag | variable | default | description |\n|---|---|---|---|\n")
		for _, f := range s.Flags() {
			flagText := "`--" + f.Name + "`"
			if f.Type != "" {
				flagText = "`--" + f.Name + " " + f.Type + "`"
			}
			def := ""
			if f.Default != "" {
				def = "`" + f.Default + "`"
			}
			fmt.Fprintf(&b, "| %s | `%s` | %s | %s |\n", flagText, f.Env, def, cell(f.Usage))
		}
	}
	return b.Bytes()
}

// cell escapes text for a Markdown table cell.
func cell(s string) string {
	return strings.NewReplacer("|", `\|`, "\n", " ", "<", "&lt;", ">", "&gt;").Replace(s)
}

// TestConfigurationReference: docs/CONFIGURATION.md lists every flag of
// every command as the code defines it.
func TestConfigurationReference(t *testing.T) {
	want := renderReference(t)
	if *update {
		if err := os.WriteFile(referenceFile, want, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(referenceFile)
	if err != nil {
		t.Fatalf("%v: generate it with go test ./cmd/keystone-fanout -run TestConfigurationReference -update", err)
	}
	if !bytes.Equal(got, want) {
		gl, wl := strings.Split(string(got), "\n"), strings.Split(string(want), "\n")
		i := 0
		for i < len(gl) && i < len(wl) && gl[i] == wl[i] {
			i++
		}
		at := func(l []string) string {
			if i < len(l) {
				return l[i]
			}
			return "(end of file)"
		}
		t.Fatalf("docs/CONFIGURATION.md is not what the flags say (line %d: %q, want %q).\n"+
			"Regenerate it: go test ./cmd/keystone-fanout -run TestConfigurationReference -update", i+1, at(gl), at(wl))
	}
}
