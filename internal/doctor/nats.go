package doctor

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
)

// natsSession is doctor's own NATS connection: it records the permission
// violations the server reports, which is how a refused operation shows.
type natsSession struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	api     string // "$JS.API." or "$JS.<domain>.API."
	timeout time.Duration

	mu         sync.Mutex
	violations []string
}

// connectNATS connects and checks JetStream; nil when that failed (the
// findings say why).
func connectNATS(ctx context.Context, o natsconn.Options, domain string, timeout time.Duration, r *Report) *natsSession {
	s := &natsSession{timeout: timeout, api: "$JS.API."}
	if domain != "" {
		s.api = "$JS." + domain + ".API."
	}
	target := natsconn.Redact(o.URL)
	opts, err := natsconn.Security(o, nil)
	if err != nil {
		r.add(Finding{Check: "nats.connect", Target: target, Level: LevelFail, Summary: err.Error()})
		return nil
	}
	opts = append(opts, nats.Name("keystone-fanout-doctor"), nats.Timeout(timeout), nats.MaxReconnects(0),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) {
				s.mu.Lock()
				s.violations = append(s.violations, err.Error())
				s.mu.Unlock()
			}
		}))
	nc, err := nats.Connect(o.URL, opts...)
	if err != nil {
		f := Finding{Check: "nats.connect", Target: target, Level: LevelFail, Summary: "cannot connect: " + err.Error()}
		var unknownCA x509.UnknownAuthorityError
		switch {
		case errors.Is(err, nats.ErrAuthorization) || strings.Contains(err.Error(), "authorization violation") ||
			strings.Contains(err.Error(), "authentication"):
			f.Detail = "The server refused the credentials."
			f.Fix = "check --nats-creds-file, --nats-nkey-file, --nats-user with --nats-password-file, or --nats-token-file"
		case errors.As(err, &unknownCA):
			f.Fix = "give the CA of the NATS servers' certificates with --nats-tls-ca"
		case errors.Is(err, nats.ErrSecureConnRequired):
			f.Fix = "the server requires TLS: use tls:// URLs and --nats-tls-ca"
		default:
			f.Fix = "check --nats-url and that firewalls let this host reach it"
		}
		r.add(f)
		return nil
	}
	s.nc = nc
	r.add(Finding{Check: "nats.connect", Target: target, Level: LevelOK,
		Summary: fmt.Sprintf("connected to %s (NATS %s, server %s)", nc.ConnectedUrlRedacted(), nc.ConnectedServerVersion(), nc.ConnectedServerName())})
	if domain != "" {
		s.js, err = jetstream.NewWithDomain(nc, domain)
	} else {
		s.js, err = jetstream.New(nc)
	}
	if err != nil {
		r.add(Finding{Check: "nats.jetstream", Level: LevelFail, Summary: err.Error()})
		nc.Close()
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	mark := s.mark()
	ai, err := s.js.AccountInfo(cctx)
	if err != nil {
		f := Finding{Check: "nats.jetstream", Level: LevelFail, Summary: "JetStream does not answer: " + err.Error()}
		switch {
		case errors.Is(err, jetstream.ErrJetStreamNotEnabled), errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount):
			f.Fix = "enable JetStream on the NATS servers (jetstream {} in their configuration) and for this account"
		case s.denied(mark, "_INBOX") != "":
			f.Summary = "this user may not subscribe to its reply subjects: " + s.denied(mark, "_INBOX")
			f.Fix = "allow subscribe to _INBOX.> for this user"
		case s.denied(mark, "INFO") != "":
			f.Summary = "this user may not ask JetStream for its account information: " + s.denied(mark, "INFO")
			f.Fix = "allow publish to " + s.api + "INFO"
		default:
			if domain != "" {
				f.Fix = "check --js-domain"
			}
		}
		r.add(f)
		nc.Close()
		return nil
	}
	r.add(Finding{Check: "nats.jetstream", Level: LevelOK,
		Summary: fmt.Sprintf("JetStream answers: %d stream(s), %s of file storage used", ai.Streams, bytesHuman(ai.Store))})
	return s
}

func (s *natsSession) close() { s.nc.Close() }

// mark is the number of violations seen so far.
func (s *natsSession) mark() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.violations)
}

// denied returns a violation reported since mark that mentions subject.
func (s *natsSession) denied(mark int, subject string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, v := range s.violations[mark:] {
		if strings.Contains(v, subject) {
			return v
		}
	}
	return ""
}

// op is one operation a component needs, tried in a way that changes nothing.
type op struct {
	name    string // for people: "create the stream"
	subject string // the subject whose permission it needs (a part of it, to recognise the violation)
	allow   string // what to allow, when subject is only a part
	// try sends it; it returns nil when the server answered (whatever it
	// said), so that the permission was granted.
	try func(ctx context.Context) error
}

// tryOps runs the operations and reports which the account may do.
func (s *natsSession) tryOps(ctx context.Context, ops []op, untested string, r *Report) {
	var allowed, denied, unknown []string
	var subjects []string
	for _, o := range ops {
		mark := s.mark()
		err := s.try(ctx, o, mark)
		_ = s.nc.FlushTimeout(s.timeout) // a violation is reported before the flush's PONG
		switch {
		case s.denied(mark, o.subject) != "":
			denied = append(denied, o.name)
			if o.allow != "" {
				subjects = append(subjects, o.allow)
			} else {
				subjects = append(subjects, o.subject)
			}
		case err != nil:
			unknown = append(unknown, fmt.Sprintf("%s (%v)", o.name, err))
		default:
			allowed = append(allowed, o.name)
		}
	}
	f := Finding{Check: "nats.permissions", Level: LevelOK}
	if len(allowed) > 0 {
		f.Summary = "allowed: " + strings.Join(allowed, ", ")
	}
	if len(unknown) > 0 {
		f.Level = LevelWarn
		f.Detail = "No answer, and no permission violation reported, for: " + strings.Join(unknown, "; ") + ". "
	}
	if len(denied) > 0 {
		f.Level = LevelFail
		f.Summary = "denied: " + strings.Join(denied, ", ")
		if len(allowed) > 0 {
			f.Summary += "; allowed: " + strings.Join(allowed, ", ")
		}
		f.Fix = "allow publish to " + strings.Join(subjects, ", ") + " for this user in the NATS server's or account's permissions"
	}
	f.Detail += untested
	f.Detail = strings.TrimSpace(f.Detail)
	r.add(f)
}

// try runs one operation until it is answered, or until the server reports
// it refused (a refused request is otherwise only answered by the timeout).
func (s *natsSession) try(ctx context.Context, o op, mark int) error {
	cctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- o.try(cctx) }()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-done:
			return err
		case <-tick.C:
			if s.denied(mark, o.subject) != "" {
				cancel()
				return <-done
			}
		}
	}
}

// request sends a JetStream API request: any answer, error or not, shows
// that the permission was granted.
func (s *natsSession) request(subject string, body any) func(context.Context) error {
	return func(ctx context.Context) error {
		var b []byte
		if body != nil {
			b, _ = json.Marshal(body)
		}
		_, err := s.nc.RequestWithContext(ctx, subject, b)
		return err
	}
}

// mismatch is a name no stream or consumer of keystone-fanout has: requests
// using it are refused after the permission check.
const mismatch = "-doctor-check"

// streamOps are the bridge's operations on the stream: look it up, create or
// update it, publish to it.
func (s *natsSession) streamOps(stream, prefix string) []op {
	return []op{
		{name: "look up the stream", subject: s.api + "STREAM.INFO." + stream, try: func(ctx context.Context) error {
			_, err := s.js.Stream(ctx, stream)
			if errors.Is(err, jetstream.ErrStreamNotFound) {
				return nil
			}
			return err
		}},
		{name: "create the stream", subject: s.api + "STREAM.CREATE." + stream,
			try: s.request(s.api+"STREAM.CREATE."+stream, map[string]any{"name": stream + mismatch})},
		{name: "update the stream", subject: s.api + "STREAM.UPDATE." + stream,
			try: s.request(s.api+"STREAM.UPDATE."+stream, map[string]any{"name": stream + mismatch})},
		{name: "publish to " + prefix + ".>", subject: prefix + ".doctor", allow: prefix + ".>", try: func(ctx context.Context) error {
			m := nats.NewMsg(prefix + ".doctor")
			m.Header.Set(jetstream.ExpectedStreamHeader, stream+mismatch)
			_, err := s.js.PublishMsg(ctx, m)
			var ae *jetstream.APIError
			if errors.As(err, &ae) || errors.Is(err, jetstream.ErrNoStreamResponse) {
				return nil // refused for the expected stream, or no stream yet
			}
			return err
		}},
	}
}

// kvOps are the operations on one key of a key-value bucket: read it and
// write it (at a revision that cannot match, so nothing is written), and
// create the bucket when it does not exist.
func (s *natsSession) kvOps(ctx context.Context, bucket, key string) []op {
	cctx, cancel := context.WithTimeout(ctx, s.timeout)
	kv, err := s.js.KeyValue(cctx, bucket)
	cancel()
	stream := "KV_" + bucket
	if err != nil {
		return []op{{name: "create bucket " + bucket, subject: s.api + "STREAM.CREATE." + stream,
			try: s.request(s.api+"STREAM.CREATE."+stream, map[string]any{"name": stream + mismatch})}}
	}
	return []op{
		{name: "read " + bucket + "/" + key, subject: "KV_" + bucket,
			allow: s.api + "DIRECT.GET." + stream + ".> (or " + s.api + "STREAM.MSG.GET." + stream + ")", try: func(ctx context.Context) error {
				_, err := kv.Get(ctx, key)
				if errors.Is(err, jetstream.ErrKeyNotFound) {
					return nil
				}
				return err
			}},
		{name: "write " + bucket + "/" + key, subject: "$KV." + bucket + "." + key, try: func(ctx context.Context) error {
			_, err := kv.Update(ctx, key, []byte("doctor"), 1<<62)
			var ae *jetstream.APIError
			if errors.As(err, &ae) || errors.Is(err, jetstream.ErrKeyExists) {
				return nil // refused for the revision: the permission is there
			}
			return err
		}},
	}
}

// consumerOps are the agent's operations on its durable consumer.
func (s *natsSession) consumerOps(ctx context.Context, stream, region string) ([]op, string) {
	info := op{name: "look up consumer " + region, subject: s.api + "CONSUMER.INFO." + stream + "." + region,
		try: s.request(s.api+"CONSUMER.INFO."+stream+"."+region, nil)}
	create := op{name: "create consumer " + region, subject: s.api + "CONSUMER.CREATE." + stream + "." + region,
		try: s.request(s.api+"CONSUMER.CREATE."+stream+"."+region, map[string]any{
			"stream_name": stream, "config": map[string]any{"durable_name": region + mismatch, "ack_policy": "explicit"}})}
	ops := []op{info, create}
	cctx, cancel := context.WithTimeout(ctx, s.timeout)
	_, err := s.js.Consumer(cctx, stream, region)
	cancel()
	next := s.api + "CONSUMER.MSG.NEXT." + stream + "." + region
	untested := "Acknowledging (publish to $JS.ACK." + stream + "." + region + ".>) cannot be tried without acknowledging an event; "
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		// No consumer: a pull request is answered by nobody and takes nothing.
		ops = append(ops, op{name: "pull events", subject: next, try: func(ctx context.Context) error {
			_, err := s.nc.RequestWithContext(ctx, next, []byte(`{"batch":1,"no_wait":true}`))
			if errors.Is(err, nats.ErrNoResponders) {
				return nil
			}
			return err
		}})
	} else {
		untested += "nor pulling (publish to " + next + ") without taking an event from the region's agent; "
	}
	return ops, untested + "a refusal there shows in the agent's log."
}

// checkStream reports the stream's state and its fitness for the events.
func (s *natsSession) checkStream(ctx context.Context, stream, prefix string, mustExist bool, r *Report) *jetstream.StreamInfo {
	cctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	st, err := s.js.Stream(cctx, stream)
	f := Finding{Check: "nats.stream", Target: stream}
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound) && !mustExist:
		f.Level, f.Summary = LevelInfo, "does not exist yet: the bridge creates it at start"
		r.add(f)
		return nil
	case errors.Is(err, jetstream.ErrStreamNotFound):
		f.Level, f.Summary = LevelFail, "does not exist"
		f.Detail = "The bridge creates the stream; the agent waits for it."
		f.Fix = "start the bridge against this NATS first, or give the bridge's --stream, --nats-url (and --js-domain through a leaf node)"
		r.add(f)
		return nil
	case err != nil:
		f.Level, f.Summary = LevelFail, "cannot be read: "+err.Error()
		r.add(f)
		return nil
	}
	si := st.CachedInfo()
	c := si.Config
	f.Level = LevelOK
	f.Summary = fmt.Sprintf("%d event(s), max age %s, %d replica(s)", si.State.Msgs, c.MaxAge, c.Replicas)
	if !si.State.LastTime.IsZero() {
		f.Summary += fmt.Sprintf(", newest %s ago", time.Since(si.State.LastTime).Round(time.Second))
	}
	switch {
	case c.Storage != jetstream.FileStorage:
		f.Level, f.Detail = LevelFail, "It keeps events in memory: a NATS restart loses them."
		f.Fix = "recreate it with file storage (delete it; the bridge creates it again)"
	case c.Retention != jetstream.LimitsPolicy:
		f.Level, f.Detail = LevelFail, fmt.Sprintf("Its retention is %s: every region must see every event.", c.Retention)
		f.Fix = "recreate it with limits retention (delete it; the bridge creates it again)"
	case prefix != "" && !covers(c.Subjects, prefix):
		f.Level, f.Detail = LevelWarn, fmt.Sprintf("It does not hold %s.>: the bridge adds that subject at start.", prefix)
	}
	r.add(f)
	return si
}

func covers(subjects []string, prefix string) bool {
	for _, s := range subjects {
		if s == prefix+".>" || s == ">" {
			return true
		}
	}
	return false
}

// clockNATS compares the NATS server's clock with this host's.
func clockNATS(si *jetstream.StreamInfo, sent, got time.Time, r *Report) {
	if si == nil || si.TimeStamp.IsZero() {
		return
	}
	// The server stamped its answer between sent and got: compare with the
	// middle, allowing half the round trip.
	skew := si.TimeStamp.Sub(sent.Add(got.Sub(sent) / 2))
	f := Finding{Check: "clock", Target: "NATS server", Level: LevelOK,
		Summary: fmt.Sprintf("the NATS server's clock is %s %s this host's", skewText(skew), aheadBehind(skew))}
	if skew.Abs() < time.Second+got.Sub(sent)/2 {
		f.Summary = "the NATS server's clock and this host's agree within a second"
	}
	if skew.Abs() > 2*time.Second {
		f.Level = LevelInfo
		f.Detail = "The agent measures its replay window with the server's clock, so this does not matter to it; latencies measured from the stream's timestamps are off by as much."
	}
	r.add(f)
}

// checkEmbedded checks what the embedded NATS server needs: its data
// directory.
func checkEmbedded(dataDir string, r *Report) {
	f := Finding{Check: "nats.embedded", Target: dataDir}
	if err := os.MkdirAll(dataDir, 0o750); err != nil {
		f.Level, f.Summary, f.Fix = LevelFail, "the data directory cannot be created: "+err.Error(), "give --data-dir a directory this user can write"
		r.add(f)
		return
	}
	probe, err := os.CreateTemp(dataDir, ".doctor-*")
	if err != nil {
		f.Level, f.Summary, f.Fix = LevelFail, "the data directory is not writable: "+err.Error(), "give --data-dir a directory this user can write"
		r.add(f)
		return
	}
	probe.Close()
	os.Remove(probe.Name())
	f.Level = LevelOK
	f.Summary = "no --nats-url: the bridge runs an embedded NATS server with its stream in " + filepath.Clean(dataDir)
	f.Detail = "Agents in other regions reach it through --nats-listen (TLS and credentials then come from a NATS configuration of your own)."
	r.add(f)
}

func bytesHuman(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func skewText(d time.Duration) string {
	if d < 0 {
		d = -d
	}
	return d.Round(10 * time.Millisecond).String()
}

func aheadBehind(d time.Duration) string {
	if d < 0 {
		return "behind"
	}
	return "ahead of"
}
