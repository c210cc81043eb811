// Package osloconfig reads the oslo.config files an OpenStack deployment
// already has (keystone.conf, a service's nova.conf) and maps the options
// keystone-fanout needs onto its flags: Bridge for keystone.conf's
// notification and RabbitMQ options, Agent for a service's
// [keystone_authtoken] cache options. The command line fills only the flags
// given neither on the command line nor in the environment with them.
//
// A file is read the way oslo.config reads it: "key = value" or "key: value";
// whole-line comments starting with '#' or ';' (a '#' inside a value is part of
// it); a value in matching quotes loses them; indented lines continue the value
// before them; a repeated key keeps every value (multi-valued options such as
// [oslo_messaging_notifications] driver use them all, others the last); later
// files override earlier ones; "$name", "${name}" and "${section.name}" are
// replaced by that option's value from the files, "$$" and "\$" by "$".
//
// Every error names the file, the section and the option.
package osloconfig

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"gopkg.in/ini.v1"
)

// Stack is the files one service reads, in order (oslo.config's
// --config-file; a directory stands for its *.conf files in name order, as
// --config-dir).
type Stack struct {
	files []*file
}

type file struct {
	path string
	ini  *ini.File
}

// Where is the place an option is set: a file, a section, an option.
type Where struct {
	File, Section, Option string
}

func (w Where) String() string {
	return fmt.Sprintf("%s [%s] %s", w.File, w.Section, w.Option)
}

// Value is one value of an option: its text after substitution and where it
// is written.
type Value struct {
	Text  string
	Where Where
}

// iniOptions make gopkg.in/ini.v1 read a file as oslo.config's own parser
// does (oslo_config/iniparser.py).
var iniOptions = ini.LoadOptions{
	// "key = value # text": the value includes "# text".
	IgnoreInlineComment: true,
	// A trailing backslash is part of the value, not a line continuation.
	IgnoreContinuation: true,
	// Indented lines continue the value before them.
	AllowPythonMultilineValues: true,
	// "driver = a" twice keeps both values.
	AllowShadows:              true,
	PreserveEmptyShadowValues: true,
	// oslo.config has no section inheritance: "[a.b]" is not a child of "[a]".
	ChildSectionDelimiter: "\x00",
	KeyValueDelimiters:    "=:",
}

// Load reads the files (or directories) in order. A file that cannot be read
// or parsed is an error naming it.
func Load(paths []string) (*Stack, error) {
	s := &Stack{}
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			return nil, fmt.Errorf("--oslo-config: %w", err)
		}
		names := []string{p}
		if fi.IsDir() {
			names, err = filepath.Glob(filepath.Join(p, "*.conf"))
			if err != nil {
				return nil, fmt.Errorf("--oslo-config %s: %w", p, err)
			}
			sort.Strings(names)
		}
		for _, name := range names {
			b, err := os.ReadFile(name)
			if err != nil {
				return nil, fmt.Errorf("--oslo-config: %w", err)
			}
			f, err := ini.LoadSources(iniOptions, b)
			if err != nil {
				return nil, fmt.Errorf("--oslo-config %s: not an oslo.config file: %w", name, err)
			}
			s.files = append(s.files, &file{path: name, ini: f})
		}
	}
	if len(s.files) == 0 {
		return nil, fmt.Errorf("--oslo-config %s: no *.conf file there", strings.Join(paths, ","))
	}
	return s, nil
}

// Files returns the paths read, in order.
func (s *Stack) Files() []string {
	out := make([]string, len(s.files))
	for i, f := range s.files {
		out[i] = f.path
	}
	return out
}

// name is an option's place: section and option name.
type name struct{ section, option string }

// raw returns every value written for one of names, file by file in order,
// each file's values in the order written. For each file the first name that
// the file sets is used (the current name before deprecated ones).
func (s *Stack) raw(names ...name) []Value {
	var out []Value
	for _, f := range s.files {
		for _, n := range names {
			var vals []Value
			for _, sec := range f.ini.Sections() {
				if sectionName(sec.Name()) != n.section {
					continue
				}
				k, err := sec.GetKey(n.option)
				if err != nil {
					continue
				}
				for _, v := range k.ValueWithShadows() {
					vals = append(vals, Value{Text: continuation(v), Where: Where{File: f.path, Section: n.section, Option: n.option}})
				}
			}
			if len(vals) > 0 {
				out = append(out, vals...)
				break
			}
		}
	}
	return out
}

// sectionName is a section's name as oslo.config knows it: lower case, but
// for DEFAULT.
func sectionName(section string) string {
	if section == "DEFAULT" {
		return section
	}
	return strings.ToLower(section)
}

// continuation strips the indentation of continuation lines, which
// oslo.config does not keep.
func continuation(v string) string {
	if !strings.Contains(v, "\n") {
		return v
	}
	lines := strings.Split(v, "\n")
	for i := 1; i < len(lines); i++ {
		lines[i] = strings.TrimLeft(lines[i], " \t\f")
	}
	return strings.Join(lines, "\n")
}

// Get returns the value of a single-valued option, the current name first and
// then its deprecated names: the last value written in the last file that
// sets it. ok is false when no file sets it.
func (s *Stack) Get(section, option string, deprecated ...string) (v Value, ok bool, err error) {
	vals := s.raw(names(section, option, deprecated)...)
	if len(vals) == 0 {
		return Value{}, false, nil
	}
	v = vals[len(vals)-1]
	v.Text, err = s.substitute(v, 0)
	return v, true, err
}

// All returns every value of a multi-valued option (MultiStrOpt), in order.
func (s *Stack) All(section, option string, deprecated ...string) ([]Value, error) {
	vals := s.raw(names(section, option, deprecated)...)
	var errs []error
	for i := range vals {
		var err error
		vals[i].Text, err = s.substitute(vals[i], 0)
		errs = append(errs, err)
	}
	return vals, errors.Join(errs...)
}

// names lists an option's current name and its deprecated names, each
// "option" (same section) or "SECTION/option".
func names(section, option string, deprecated []string) []name {
	section = sectionName(section)
	out := []name{{section, option}}
	for _, d := range deprecated {
		if sec, opt, ok := strings.Cut(d, "/"); ok {
			out = append(out, name{sectionName(sec), opt})
		} else {
			out = append(out, name{section, d})
		}
	}
	return out
}

// template matches what oslo.config's string.Template substitutes: "$$",
// "$name", "${name}" (names are [_a-z][._a-z0-9]*, any case) and a lone "$".
var template = regexp.MustCompile(`(?i)\$(?:(\$)|([_a-z][._a-z0-9]*)|\{([_a-z][._a-z0-9]*)\}|)`)

// substitute applies oslo.config's substitution to v: "$$" and "\$" become
// "$", "$name" and "${name}" the value of name in v's section (else in
// [DEFAULT]), "${section.name}" that of name in section. An option the files
// do not set cannot be resolved here (oslo.config would use its default,
// which only the service knows): that is an error naming v.
func (s *Stack) substitute(v Value, depth int) (string, error) {
	text := strings.ReplaceAll(v.Text, `\$`, "$$")
	if !strings.Contains(text, "$") {
		return text, nil
	}
	if depth > 10 {
		return "", &Error{Where: v.Where, Problem: "its $-substitutions refer to each other in a loop"}
	}
	var err error
	out := template.ReplaceAllStringFunc(text, func(m string) string {
		sub := template.FindStringSubmatch(m)
		ref := sub[2] + sub[3]
		switch {
		case sub[1] != "":
			return "$"
		case ref == "":
			return m // a '$' that starts no name is kept, as string.Template's safe_substitute does
		}
		section, option := v.Where.Section, ref
		if sec, opt, ok := strings.Cut(ref, "."); ok {
			if sec == "DEFAULT" {
				if err == nil {
					err = &Error{Where: v.Where, Problem: fmt.Sprintf("oslo.config cannot refer to [DEFAULT] as ${%s}", ref),
						Fix: fmt.Sprintf("write $%s", opt)}
				}
				return m
			}
			section, option = strings.ToLower(sec), opt
		}
		refs := s.raw(name{section, option})
		if len(refs) == 0 && !strings.Contains(ref, ".") {
			refs = s.raw(name{"DEFAULT", option})
		}
		if len(refs) == 0 {
			if err == nil {
				err = &Error{Where: v.Where, Problem: fmt.Sprintf("refers to $%s, which these files do not set", ref),
					Fix: "write the value out in full, or escape a literal '$' as '$$'"}
			}
			return m
		}
		r, rerr := s.substitute(refs[len(refs)-1], depth+1)
		if rerr != nil && err == nil {
			err = rerr
		}
		return r
	})
	return out, err
}

// Error is an option whose value keystone-fanout cannot honour.
type Error struct {
	Where Where
	// Value is shown in the message; empty for secrets.
	Value string
	// Problem says what is wrong; Fix what to do.
	Problem, Fix string
}

func (e *Error) Error() string {
	msg := e.Where.String()
	if e.Value != "" {
		msg += " = " + e.Value
	}
	msg += ": " + e.Problem
	if e.Fix != "" {
		msg += ": " + e.Fix
	}
	return msg
}

// boolValue parses an oslo.config boolean (true/false, 1/0, on/off, yes/no,
// any case).
func boolValue(v Value) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(v.Text)) {
	case "true", "1", "on", "yes":
		return true, nil
	case "false", "0", "off", "no":
		return false, nil
	}
	return false, &Error{Where: v.Where, Value: v.Text, Problem: "not a boolean", Fix: "write true or false"}
}

// listValue splits an oslo.config list option ("a, b,c") into its items.
func listValue(v Value) []string {
	var out []string
	for _, item := range strings.Split(v.Text, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}
