package osloconfig

import (
	"errors"
	"sort"
	"strings"
)

// Settings are what the files say for keystone-fanout's flags.
type Settings struct {
	// Flags maps a flag name (without "--") to the value the files give it.
	Flags map[string]Setting
	// Errs are values keystone-fanout cannot honour whatever the flags say
	// (Keystone sends no notifications, memcached needs SASL, ...).
	Errs []error
	// Notes are what the files ask that keystone-fanout does differently
	// without harm, for the start-up log.
	Notes []Note
	// SecurityStrategy is [keystone_authtoken] memcache_security_strategy
	// ("None", "MAC" or "ENCRYPT"), empty when the files do not set it (the
	// middleware's default is None).
	SecurityStrategy string
}

// Setting is one flag's value from the files; Err, when set, says why the
// files' value cannot be used (it matters only when the flag is not given).
type Setting struct {
	// Values are the flag's values: one, or several for a repeatable flag.
	Values []string
	From   Where
	Err    error
}

// Note is a difference between what the files ask and what keystone-fanout
// does, that does not stop it.
type Note struct {
	Where Where
	Text  string
}

func (n Note) String() string { return n.Where.String() + ": " + n.Text }

func (s *Settings) set(flag string, from Where, values ...string) {
	if s.Flags == nil {
		s.Flags = map[string]Setting{}
	}
	s.Flags[flag] = Setting{Values: values, From: from}
}

func (s *Settings) fail(flag string, err error) {
	if s.Flags == nil {
		s.Flags = map[string]Setting{}
	}
	s.Flags[flag] = Setting{Err: err}
}

func (s *Settings) note(w Where, text string) { s.Notes = append(s.Notes, Note{Where: w, Text: text}) }

func (s *Settings) err(err error) {
	if err != nil {
		s.Errs = append(s.Errs, err)
	}
}

// Merge adds o's flags, errors and notes to s (all-in-one reads both sides).
func (s *Settings) Merge(o Settings) {
	for k, v := range o.Flags {
		if s.Flags == nil {
			s.Flags = map[string]Setting{}
		}
		s.Flags[k] = v
	}
	s.Errs = append(s.Errs, o.Errs...)
	s.Notes = append(s.Notes, o.Notes...)
	if o.SecurityStrategy != "" {
		s.SecurityStrategy = o.SecurityStrategy
	}
}

// FlagNames returns the flags the files set, sorted.
func (s *Settings) FlagNames() []string {
	out := make([]string, 0, len(s.Flags))
	for k := range s.Flags {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// joinFiles names every file of the stack, for an option none of them sets.
func (s *Stack) joinFiles() string { return strings.Join(s.Files(), ", ") }

// firstErr is the first *Error in err, else err.
func firstErr(err error) error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return err
}
