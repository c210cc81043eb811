package main

import (
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"

	"github.com/keystone-fanout/keystone-fanout/internal/config"
	"github.com/keystone-fanout/keystone-fanout/internal/osloconfig"
)

// osloSide selects what --oslo-config is read for.
type osloSide int

const (
	bridgeSide osloSide = 1 << iota // keystone.conf: RabbitMQ, exchange, topics
	agentSide                       // a service's [keystone_authtoken]: memcached
)

// osloConfig is --oslo-config: the oslo.config files the deployment already
// has, filling the flags given neither on the command line nor in the
// environment.
type osloConfig struct {
	paths []string
	set   *config.Set
	// from records, for each flag filled from the files, where its value is.
	from map[string]osloconfig.Where
	// notes are what the files ask that keystone-fanout does differently.
	notes []osloconfig.Note
	// strategy is memcache_security_strategy, when the files set it.
	strategy string
}

const osloConfigUsage = "oslo.config file or directory of *.conf the deployment already has: keystone.conf for the bridge, " +
	"a service's file with [keystone_authtoken] (nova.conf) for the agent; later files override earlier ones"

func (o *osloConfig) register(s *config.Set) {
	o.set = s
	s.Files(&o.paths, "oslo-config", osloConfigUsage)
}

// apply reads the files for side and fills the flags. Its error joins every
// value that cannot be honoured, each naming file, section and option.
func (o *osloConfig) apply(side osloSide) error {
	if o == nil || len(o.paths) == 0 {
		return nil
	}
	st, err := osloconfig.Load(o.paths)
	if err != nil {
		return err
	}
	var got osloconfig.Settings
	if side&bridgeSide != 0 {
		got.Merge(osloconfig.Bridge(st))
	}
	if side&agentSide != 0 {
		got.Merge(osloconfig.Agent(st))
	}
	errs := slices.Clone(got.Errs)
	if o.from == nil {
		o.from = map[string]osloconfig.Where{}
	}
	for _, name := range got.FlagNames() {
		v := got.Flags[name]
		if o.set.Explicit(name) {
			continue
		}
		if v.Err != nil {
			errs = append(errs, v.Err)
			continue
		}
		if err := o.set.Fill(name, v.From.String(), v.Values...); err != nil {
			errs = append(errs, err)
			continue
		}
		o.from[name] = v.From
	}
	o.notes = append(o.notes, got.Notes...)
	if got.SecurityStrategy != "" {
		o.strategy = got.SecurityStrategy
	}
	return errors.Join(errs...)
}

// explain adds to a validation error where the values of the flags it names
// came from, when they came from --oslo-config.
func (o *osloConfig) explain(err error) error {
	if o == nil || err == nil || len(o.from) == 0 {
		return err
	}
	msg := err.Error()
	var origins []string
	for _, name := range sortedKeys(o.from) {
		if mentions(msg, "--"+name) {
			origins = append(origins, fmt.Sprintf("--%s is %s", name, o.from[name]))
		}
	}
	if len(origins) == 0 {
		return err
	}
	return fmt.Errorf("%w\n(from --oslo-config: %s)", err, strings.Join(origins, "; "))
}

// mentions reports whether msg names flag as a whole ("--amqp-url" is not in
// "--amqp-url-file").
func mentions(msg, flag string) bool {
	for i := 0; ; {
		j := strings.Index(msg[i:], flag)
		if j < 0 {
			return false
		}
		end := i + j + len(flag)
		if end == len(msg) || !strings.ContainsRune("abcdefghijklmnopqrstuvwxyz0123456789-", rune(msg[end])) {
			return true
		}
		i = end
	}
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// logNotes logs what the files ask that keystone-fanout does differently.
func (o *osloConfig) logNotes(log *slog.Logger) {
	if o == nil {
		return
	}
	for _, n := range o.notes {
		log.Info("--oslo-config: an option applies differently", "option", n.Where.String(), "note", n.Text)
	}
}

// noteTexts are the notes as "file [section] option: text".
func (o *osloConfig) noteTexts() []string {
	if o == nil {
		return nil
	}
	out := make([]string, len(o.notes))
	for i, n := range o.notes {
		out[i] = n.String()
	}
	return out
}
