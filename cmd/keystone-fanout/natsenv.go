package main

import (
	"fmt"
	"slices"

	"github.com/keystone-fanout/keystone-fanout/internal/config"
	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
)

// natsAuthFlags and natsTLSFlags are taken from a nats CLI context as a
// whole, or not at all: one of them given as a flag or in the environment
// keeps the context's out, so that credentials are never mixed.
var (
	natsAuthFlags = []string{"nats-creds-file", "nats-nkey-file", "nats-user", "nats-password", "nats-token"}
	natsTLSFlags  = []string{"nats-tls-ca", "nats-tls-cert", "nats-tls-key"}
)

// natsCLIDefaults fills the NATS flags of status and sweep that were given
// neither on the command line nor in the KEYSTONE_FANOUT_* environment the
// way the nats command does: --nats-url from NATS_URL, then the rest (and the
// URL, without NATS_URL) from the selected nats CLI context
// (natsconn.LoadCLIContext), before the flags' defaults. It returns a note
// saying which context was used, or "".
func natsCLIDefaults(s *config.Set, getenv func(string) string) (string, error) {
	envURL := getenv("NATS_URL")
	if envURL != "" {
		if err := s.Fill("nats-url", "NATS_URL", envURL); err != nil {
			return "", err
		}
	}
	c, err := natsconn.LoadCLIContext(getenv)
	if err != nil || c == nil {
		return "", err
	}
	from := fmt.Sprintf("nats context %q", c.Name)
	fill := func(name, v string) error {
		if v == "" {
			return nil
		}
		return s.Fill(name, from, v)
	}
	var errs error
	add := func(err error) {
		if err != nil && errs == nil {
			errs = err
		}
	}
	if envURL == "" {
		add(fill("nats-url", c.URL))
	}
	add(fill("nats-inbox-prefix", c.InboxPrefix))
	add(fill("js-domain", c.JetStreamDomain))
	if !slices.ContainsFunc(natsAuthFlags, s.Explicit) {
		add(fill("nats-creds-file", c.Creds))
		add(fill("nats-nkey-file", c.NKey))
		add(fill("nats-user", c.User))
		add(fill("nats-password", c.Password))
		add(fill("nats-token", c.Token))
	}
	if !slices.ContainsFunc(natsTLSFlags, s.Explicit) {
		add(fill("nats-tls-ca", c.CA))
		add(fill("nats-tls-cert", c.Cert))
		add(fill("nats-tls-key", c.Key))
	}
	return from, errs
}
