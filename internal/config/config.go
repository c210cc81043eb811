// Package config reads a subcommand's settings from flags, then from the
// environment, then from defaults, the same way for every subcommand:
//
//   - every flag --some-name may also be given as KEYSTONE_FANOUT_SOME_NAME;
//     a flag on the command line wins over the environment;
//   - a secret flag --x also has --x-file (KEYSTONE_FANOUT_X_FILE): the secret is
//     read from that file, trailing newlines removed, so that it never has to be
//     on a command line or in the environment;
//   - repeatable flags accept several occurrences and comma-separated values;
//   - a command with a file layer (Set.Files, --oslo-config) fills the flags
//     given neither on the command line nor in the environment from files
//     (Set.Fill), before the defaults apply.
package config

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
)

// EnvPrefix is prepended to a flag's upper-cased name to form its variable.
const EnvPrefix = "KEYSTONE_FANOUT_"

// EnvName is the environment variable that sets flag name.
func EnvName(name string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
}

// Set is a subcommand's flags.
type Set struct {
	fs      *flag.FlagSet
	secrets map[string]*string // flag name -> its value, read from name-file when given
	files   map[string]*string
	lists   map[string]*List
	// example is the first flag registered: the help text's example of a
	// variable, so that it names a flag the command has.
	example string
	// name and usage are New's arguments (for Reference).
	name, usage string
	// explicit holds the flags given on the command line or in the
	// environment (a secret also when its -file twin was given).
	explicit map[string]bool
	// fileLayer is the flag naming the files of Fill, when there is one.
	fileLayer string
}

// New returns an empty Set for the subcommand name; usage is printed above the
// flag list by --help.
func New(name, usage string, out io.Writer) *Set {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(out)
	s := &Set{fs: fs, secrets: map[string]*string{}, files: map[string]*string{}, lists: map[string]*List{},
		name: name, usage: usage}
	fs.Usage = func() {
		if ReferenceHook != nil {
			ReferenceHook(s)
			return
		}
		fmt.Fprintf(out, "%s\n\n", strings.TrimSpace(usage))
		if s.fileLayer != "" {
			fmt.Fprintf(out, "Each setting comes from, in order of precedence: its flag; its environment variable\n"+
				"%s<FLAG> (for example %s);\nthe files of --%s; its default.\n\nFlags:\n",
				EnvPrefix, EnvName(s.example), s.fileLayer)
		} else {
			fmt.Fprintf(out, "Flags (each also from the environment as %s<FLAG>, for example %s):\n",
				EnvPrefix, EnvName(s.example))
		}
		fs.VisitAll(func(f *flag.Flag) {
			typ, help := flagType(f)
			fmt.Fprintf(out, "  --%s", f.Name)
			if typ != "" && typ != "value" {
				fmt.Fprintf(out, " %s", typ)
			}
			fmt.Fprintf(out, "  [%s]\n        %s", EnvName(f.Name), help)
			if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" {
				fmt.Fprintf(out, " (default %s)", f.DefValue)
			}
			fmt.Fprintln(out)
		})
	}
	return s
}

// registered notes that flag name was registered.
func (s *Set) registered(name string) {
	if s.example == "" {
		s.example = name
	}
}

// String registers a string flag.
func (s *Set) String(p *string, name, def, usage string) {
	s.registered(name)
	s.fs.StringVar(p, name, def, usage)
}

// Bool registers a boolean flag.
func (s *Set) Bool(p *bool, name string, def bool, usage string) {
	s.registered(name)
	s.fs.BoolVar(p, name, def, usage)
}

// Int registers an integer flag.
func (s *Set) Int(p *int, name string, def int, usage string) {
	s.registered(name)
	s.fs.IntVar(p, name, def, usage)
}

// Duration registers a duration flag ("2s", "24h"). A negative value is
// rejected.
func (s *Set) Duration(p *time.Duration, name string, def time.Duration, usage string) {
	s.registered(name)
	*p = def
	s.fs.Var((*duration)(p), name, usage)
}

// duration is a flag.Value like flag.Duration's that rejects negative values.
type duration time.Duration

func (d *duration) String() string {
	if d == nil {
		return ""
	}
	return time.Duration(*d).String()
}

func (d *duration) Set(v string) error {
	x, err := time.ParseDuration(strings.TrimSpace(v))
	if err != nil {
		return fmt.Errorf("%q is not a duration: write it like 500ms, 30s or 5m", v)
	}
	if x < 0 {
		return negative(v)
	}
	*d = duration(x)
	return nil
}

// negative is the error of a negative duration flag value.
func negative(v string) error {
	return fmt.Errorf("%q is negative: give 0 or a positive duration such as 5s", v)
}

// Secret registers a secret string flag and its --name-file twin.
func (s *Set) Secret(p *string, name, usage string) {
	s.registered(name)
	s.fs.StringVar(p, name, "", usage+" (prefer --"+name+"-file)")
	f := new(string)
	s.fs.StringVar(f, name+"-file", "", "file holding --"+name)
	s.secrets[name] = p
	s.files[name] = f
}

// List registers a repeatable flag; def is used when the flag is given
// neither on the command line nor in the environment.
func (s *Set) List(p *[]string, name string, def []string, usage string) {
	s.registered(name)
	l := &List{target: p, def: def}
	*p = append([]string(nil), def...)
	s.fs.Var(l, name, usage+" (repeatable, or comma-separated)")
	s.lists[name] = l
}

// Parse parses args, then fills every flag not given on the command line from
// its environment variable, then reads secret files. flag.ErrHelp is returned
// as is after printing usage.
func (s *Set) Parse(args []string, getenv func(string) string) error {
	if err := s.fs.Parse(args); err != nil {
		return err
	}
	if s.fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q: every setting is a --flag", s.fs.Arg(0))
	}
	given := map[string]bool{}
	s.fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	s.explicit = given
	var errs []error
	s.fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] {
			return
		}
		v, ok := lookup(getenv, EnvName(f.Name))
		if !ok {
			return
		}
		if l, isList := s.lists[f.Name]; isList {
			l.reset()
		}
		if err := s.fs.Set(f.Name, v); err != nil {
			errs = append(errs, fmt.Errorf("%s=%q: %w", EnvName(f.Name), v, err))
		}
		given[f.Name] = true
	})
	names := make([]string, 0, len(s.files))
	for n := range s.files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		file := *s.files[name]
		if file == "" {
			continue
		}
		if *s.secrets[name] != "" {
			errs = append(errs, fmt.Errorf("--%s and --%s-file are both set: give one", name, name))
			continue
		}
		b, err := os.ReadFile(file)
		if err != nil {
			errs = append(errs, fmt.Errorf("--%s-file: %w", name, err))
			continue
		}
		*s.secrets[name] = strings.TrimRight(string(b), "\r\n")
		given[name] = true
	}
	return errors.Join(errs...)
}

// Files registers the repeatable flag naming the files of the layer between
// the environment and the defaults (see Fill); --help then says the order.
func (s *Set) Files(p *[]string, name, usage string) {
	s.List(p, name, nil, usage)
	s.fileLayer = name
}

// Explicit reports whether flag name was given on the command line or in the
// environment (after Parse).
func (s *Set) Explicit(name string) bool { return s.explicit[name] }

// Fill sets flag name from the file layer, after Parse, unless it is Explicit:
// a repeatable flag gets every value, replacing its default. from names where
// the values come from, for the error of a value that does not parse.
func (s *Set) Fill(name, from string, values ...string) error {
	if s.Explicit(name) || len(values) == 0 {
		return nil
	}
	if l, isList := s.lists[name]; isList {
		l.reset()
	}
	for _, v := range values {
		if err := s.fs.Set(name, v); err != nil {
			return fmt.Errorf("--%s from %s: %w", name, from, err)
		}
	}
	return nil
}

func lookup(getenv func(string) string, name string) (string, bool) {
	if getenv == nil {
		return os.LookupEnv(name)
	}
	v := getenv(name)
	return v, v != ""
}

// List is a repeatable, comma-separated string flag.
type List struct {
	target *[]string
	def    []string
	set    bool
}

func (l *List) reset() { l.set = false }

// String implements flag.Value.
func (l *List) String() string {
	if l == nil || l.target == nil {
		return ""
	}
	return strings.Join(*l.target, ",")
}

// Set implements flag.Value: the first Set replaces the default, later ones append.
func (l *List) Set(v string) error {
	if !l.set {
		*l.target = nil
		l.set = true
	}
	for _, part := range splitList(v) {
		*l.target = append(*l.target, part)
	}
	return nil
}

// splitList splits on commas, except inside an AMQP transport URL's host list
// that follows "rabbit://", which is itself comma-separated: a value starting
// with rabbit:// is kept whole.
func splitList(v string) []string {
	v = strings.TrimSpace(v)
	if v == "" {
		return nil
	}
	if strings.HasPrefix(v, "rabbit://") || strings.HasPrefix(v, "kombu+") {
		return []string{v}
	}
	var out []string
	for _, p := range strings.Split(v, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// Seconds registers a duration flag that also accepts a bare number of
// seconds, as OpenStack configuration files give durations ("300" or "5m").
// A negative value is rejected.
func (s *Set) Seconds(p *time.Duration, name string, def time.Duration, usage string) {
	s.registered(name)
	*p = def
	s.fs.Var((*seconds)(p), name, usage+" (seconds, or a duration such as 5m)")
}

type seconds time.Duration

func (d *seconds) String() string {
	if d == nil {
		return ""
	}
	return time.Duration(*d).String()
}

func (d *seconds) Set(v string) error {
	v = strings.TrimSpace(v)
	if n, err := strconv.ParseFloat(v, 64); err == nil {
		if n < 0 {
			return negative(v)
		}
		*d = seconds(time.Duration(n * float64(time.Second)))
		return nil
	}
	x, err := time.ParseDuration(v)
	if err != nil {
		return fmt.Errorf("%q is neither a number of seconds nor a duration", v)
	}
	if x < 0 {
		return negative(v)
	}
	*d = seconds(x)
	return nil
}

// Durations registers a repeatable list of durations ("10s,30s,1m"). A
// negative duration is rejected.
func (s *Set) Durations(p *[]time.Duration, name string, def []time.Duration, usage string) {
	s.registered(name)
	*p = append([]time.Duration(nil), def...)
	s.fs.Var(&durations{target: p}, name, usage+" (comma-separated durations)")
}

type durations struct {
	target *[]time.Duration
	set    bool
}

func (d *durations) String() string {
	if d == nil || d.target == nil {
		return ""
	}
	parts := make([]string, len(*d.target))
	for i, x := range *d.target {
		parts[i] = x.String()
	}
	return strings.Join(parts, ",")
}

func (d *durations) Set(v string) error {
	if !d.set {
		*d.target = nil
		d.set = true
	}
	for _, part := range splitList(v) {
		x, err := time.ParseDuration(part)
		if err != nil {
			return err
		}
		if x < 0 {
			return negative(part)
		}
		*d.target = append(*d.target, x)
	}
	return nil
}
