// Package doctor checks a keystone-fanout deployment before it goes live, with
// the options the bridge or an agent would run with, and explains each finding
// with its fix (`keystone-fanout doctor bridge|agent`).
//
// It only reads, or asks for what it needs in ways that change nothing:
// passive declarations on RabbitMQ; JetStream requests that the server
// refuses after checking the permission (a stream create whose name does not
// match its subject, a publish that expects another stream, a key-value update
// at a revision that cannot match); memcached's version, stats, one crawl and
// a sample of values; one Keystone authentication and one listing of the
// last minute's revocation events.
//
// A finding at LevelFail is blocking: the component would not work, or would
// leave stale entries. Everything else is advice.
package doctor

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"
)

// Level is how much a finding matters.
type Level string

const (
	LevelOK   Level = "ok"
	LevelInfo Level = "info"
	LevelWarn Level = "warn"
	// LevelFail is blocking: the component cannot do its work as configured.
	LevelFail Level = "fail"
)

// Finding is one result of a check.
type Finding struct {
	// Check names the check: "rabbitmq.connect", "nats.permissions",
	// "memcached.crawl", "strategy", "keystone.access", "clock", ...
	Check string `json:"check"`
	// Target is what was checked (a broker, a server, a stream), without
	// credentials.
	Target string `json:"target,omitempty"`
	Level  Level  `json:"level"`
	// Summary says what was found in one line; Detail what it means; Fix
	// what to do (empty when nothing needs doing).
	Summary string `json:"summary"`
	Detail  string `json:"detail,omitempty"`
	Fix     string `json:"fix,omitempty"`
}

// Report is the findings of one run.
type Report struct {
	Component string    `json:"component"`
	Findings  []Finding `json:"findings"`
	// Blocking counts the findings at LevelFail.
	Blocking int `json:"blocking"`
	Warnings int `json:"warnings"`
	// Took is how long the checks took.
	Took time.Duration `json:"took_ns"`
}

func (r *Report) add(f Finding) {
	r.Findings = append(r.Findings, f)
	switch f.Level {
	case LevelFail:
		r.Blocking++
	case LevelWarn:
		r.Warnings++
	}
}

// WriteJSON writes the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// WriteText writes the report for a person: one block per finding.
func (r *Report) WriteText(w io.Writer) error {
	var b strings.Builder
	for _, f := range r.Findings {
		fmt.Fprintf(&b, "%-4s  %s", strings.ToUpper(string(f.Level)), f.Check)
		if f.Target != "" {
			fmt.Fprintf(&b, "  %s", f.Target)
		}
		b.WriteString("\n")
		wrap(&b, f.Summary)
		if f.Detail != "" {
			wrap(&b, f.Detail)
		}
		if f.Fix != "" {
			wrap(&b, "fix: "+f.Fix)
		}
	}
	verdict := "ready"
	if r.Blocking > 0 {
		verdict = "NOT ready"
	}
	fmt.Fprintf(&b, "\n%s %s: %d findings, %d blocking, %d warnings (%s)\n",
		r.Component, verdict, len(r.Findings), r.Blocking, r.Warnings, r.Took.Round(time.Millisecond))
	_, err := io.WriteString(w, b.String())
	return err
}

// wrap writes text indented by six spaces, in lines of at most 100
// characters where words allow.
func wrap(b *strings.Builder, text string) {
	const indent, width = "      ", 100
	line := indent
	for _, w := range strings.Fields(text) {
		if len(line) > len(indent) && len(line)+1+len(w) > width {
			b.WriteString(line + "\n")
			line = indent
		}
		if len(line) > len(indent) {
			line += " "
		}
		line += w
	}
	b.WriteString(line + "\n")
}
