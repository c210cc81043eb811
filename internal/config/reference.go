package config

import (
	"flag"
	"strings"
)

// ReferenceHook, when not nil, is called instead of printing the usage when
// a command is given --help: the test that renders docs/CONFIGURATION.md
// from every command's flags sets it. Commands never do.
var ReferenceHook func(*Set)

// Flag describes one flag of a Set.
type Flag struct {
	Name    string // without dashes
	Env     string // its environment variable
	Type    string // "string", "duration", "int", ...; empty for a switch or a list
	Default string // as --help shows it; empty when none
	Usage   string
}

// Name is the subcommand's name, as given to New.
func (s *Set) Name() string { return s.name }

// Usage is the text printed above the flags by --help, as given to New.
func (s *Set) Usage() string { return strings.TrimSpace(s.usage) }

// Flags returns every flag of the set, in name order, as --help lists them.
func (s *Set) Flags() []Flag {
	var out []Flag
	s.fs.VisitAll(func(f *flag.Flag) {
		typ, help := flagType(f)
		if typ == "value" {
			typ = ""
		}
		def := f.DefValue
		if def == "false" || def == "0" {
			def = ""
		}
		out = append(out, Flag{Name: f.Name, Env: EnvName(f.Name), Type: typ, Default: def, Usage: help})
	})
	return out
}

// flagType is the type name and help text of f, as --help shows them.
func flagType(f *flag.Flag) (typ, help string) {
	typ, help = flag.UnquoteUsage(f)
	switch f.Value.(type) {
	case *duration, *seconds:
		typ = "duration"
	case *durations:
		typ = "durations"
	case *List:
		typ = "list"
	}
	return typ, help
}
