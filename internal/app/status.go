package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/keystone-fanout/keystone-fanout/internal/natsconn"
	"github.com/keystone-fanout/keystone-fanout/internal/stream"
	"github.com/keystone-fanout/keystone-fanout/regionagent"
)

// StatusOptions configures `keystone-fanout status`.
type StatusOptions struct {
	NATS natsconn.Options
	// JetStreamDomain (--js-domain) is the stream's JetStream domain, when
	// reached through a leaf node; empty: the server's own.
	JetStreamDomain string
	Stream          string // default stream.DefaultName
	// CheckpointBucket is the agents' --checkpoint-bucket (default
	// keystone-fanout-agents); a missing bucket shows as no checkpoints.
	CheckpointBucket string
	JSON             bool // print JSON instead of a table
	// Check, when not nil, judges the status (--check): RunStatus then
	// prints a one-line verdict first and returns a *CheckError unless
	// everything is OK.
	Check *CheckOptions
}

// CheckOptions are the thresholds of `status --check`.
type CheckOptions struct {
	// Regions (--expect-regions) must each have a consumer: one without is
	// CRITICAL ("not seen"). Empty: only the regions found are judged.
	Regions []string
	// WarnLag (--warn-lag, default 30s) and MaxLag (--max-lag, default 2m):
	// a region whose oldest unacknowledged event is older is WARNING, or
	// CRITICAL. An agent acknowledges an event after its second pass
	// (--second-pass-delay, 2 s), so a healthy region lags a few seconds.
	WarnLag, MaxLag time.Duration
}

// Defaults of CheckOptions.
const (
	DefaultWarnLag = 30 * time.Second
	DefaultMaxLag  = 2 * time.Minute
)

// Validate checks the thresholds.
func (c *CheckOptions) Validate() error {
	var errs []error
	if c.WarnLag > c.MaxLag {
		errs = append(errs, fmt.Errorf("--warn-lag %s is above --max-lag %s: give a warning threshold at or below the critical one", c.WarnLag, c.MaxLag))
	}
	for _, r := range c.Regions {
		if !stream.ValidRegionName(r) {
			errs = append(errs, fmt.Errorf("--expect-regions: %q is not a region name: 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-', as the agents' --region", r))
		}
	}
	return errors.Join(errs...)
}

// CheckState is the verdict of `status --check`, and its exit status: the
// codes of a Nagios (monitoring) plugin.
type CheckState int

const (
	CheckOK       CheckState = 0
	CheckWarning  CheckState = 1
	CheckCritical CheckState = 2
	// CheckUnknown: the check could not be made (bad flags, NATS not
	// answering).
	CheckUnknown CheckState = 3
)

func (s CheckState) String() string {
	switch s {
	case CheckOK:
		return "OK"
	case CheckWarning:
		return "WARNING"
	case CheckCritical:
		return "CRITICAL"
	}
	return "UNKNOWN"
}

// MarshalText writes the state's name in JSON.
func (s CheckState) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads a state's name.
func (s *CheckState) UnmarshalText(b []byte) error {
	for _, c := range []CheckState{CheckOK, CheckWarning, CheckCritical, CheckUnknown} {
		if string(b) == c.String() {
			*s = c
			return nil
		}
	}
	return fmt.Errorf("check state %q: want OK, WARNING, CRITICAL or UNKNOWN", b)
}

// CheckError is RunStatus's error when a check is not OK; its verdict line
// was already printed.
type CheckError struct {
	State   CheckState
	Summary string
}

func (e *CheckError) Error() string { return e.State.String() + " - " + e.Summary }

// Status is what `keystone-fanout status` reports.
type Status struct {
	Stream    string         `json:"stream"`
	Messages  uint64         `json:"messages"`
	Bytes     uint64         `json:"bytes"`
	FirstSeq  uint64         `json:"first_seq"`
	LastSeq   uint64         `json:"last_seq"`
	FirstTime time.Time      `json:"first_time"`
	LastTime  time.Time      `json:"last_time"`
	Created   time.Time      `json:"created"`
	Replicas  int            `json:"replicas"`
	MaxAge    time.Duration  `json:"max_age_ns"`
	Consumers []RegionStatus `json:"consumers"`
	// Check is the verdict of --check.
	Check *CheckResult `json:"check,omitempty"`
}

// RegionStatus is one region: its durable consumer (the agent's position)
// and its checkpoint. A region with a checkpoint, or expected by --check,
// is listed even when it has no consumer.
type RegionStatus struct {
	Name string `json:"name"`
	// Consumer is false when the stream has no consumer of this name.
	Consumer    bool       `json:"consumer"`
	Pending     uint64     `json:"pending"`
	AckPending  int        `json:"ack_pending"`
	Redelivered int        `json:"redelivered"`
	AckFloor    uint64     `json:"ack_floor_stream_seq"`
	LastActive  *time.Time `json:"last_active,omitempty"`
	// Waiting is the consumer's pull requests waiting for events: an idle
	// agent always has one.
	Waiting int `json:"waiting_pulls"`
	// Lag is the age of the oldest event the region has not acknowledged
	// (on the NATS server's clock); 0 when it has acknowledged every event.
	Lag time.Duration `json:"lag_ns"`
	// Checkpoint is the region's record of how far it handled the stream
	// (nil: none, the agent runs with --no-checkpoint or never ran).
	Checkpoint *regionagent.Checkpoint `json:"checkpoint,omitempty"`
	// Gap is true when the stream no longer holds events this region has not
	// handled (by its consumer's ack floor or by its checkpoint): its agent
	// removes every token entry when it binds. GapReason says which.
	Gap       bool   `json:"gap"`
	GapReason string `json:"gap_reason,omitempty"`
	// Mirror is set when the consumer is the region's regional mirror's
	// source (stream.MirrorConsumerName, agent --mirror-from): its position is
	// the mirror's, and MirrorBound says whether the region's leaf follows it.
	Mirror      bool `json:"mirror,omitempty"`
	MirrorBound bool `json:"mirror_bound,omitempty"`
}

// CheckResult is the verdict of --check: the worst state of its problems.
type CheckResult struct {
	State    CheckState `json:"state"`
	Problems []Problem  `json:"problems,omitempty"`
}

// Problem is one finding of --check.
type Problem struct {
	Region string     `json:"region"`
	State  CheckState `json:"state"`
	Reason string     `json:"reason"`
}

// RunStatus prints the stream and every region to w. With o.Check it first
// prints the verdict line of a monitoring plugin and returns a *CheckError
// when the verdict is not OK.
func RunStatus(ctx context.Context, o StatusOptions, w io.Writer, log *slog.Logger) error {
	if o.Stream == "" {
		o.Stream = stream.DefaultName
	}
	if o.CheckpointBucket == "" {
		o.CheckpointBucket = regionagent.DefaultCheckpointBucket
	}
	js, closeNATS, err := oneShotJetStream(ctx, o.NATS, o.JetStreamDomain, "keystone-fanout-status", log)
	if err != nil {
		return err
	}
	defer closeNATS()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := readStatus(ctx, js, o.Stream, o.CheckpointBucket, log)
	if errors.Is(err, errNoStream) {
		err = fmt.Errorf("stream %q does not exist on the NATS server at %s: give the bridge's NATS with --nats-url (and its stream with --stream), or start a bridge there",
			o.Stream, natsconn.Redact(o.NATS.URL))
		if o.Check != nil {
			// No stream: no region gets anything. That is the finding, not
			// a failure to check.
			fmt.Fprintf(w, "KEYSTONE-FANOUT CRITICAL - %v\n", err)
			return &CheckError{State: CheckCritical, Summary: err.Error()}
		}
	}
	if err != nil {
		return err
	}
	if o.Check != nil {
		if len(st.Consumers) > 0 && slices.ContainsFunc(st.Consumers, func(r RegionStatus) bool { return r.Consumer && !r.Mirror && r.Waiting == 0 && r.AckPending == 0 }) {
			// A pull request is re-issued as it expires: read once more
			// before calling a region's agent away.
			time.Sleep(time.Second)
			if again, err := readStatus(ctx, js, o.Stream, o.CheckpointBucket, log); err == nil {
				st = again
			}
		}
		st.Check = judge(st, *o.Check)
	}
	if o.JSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if err := enc.Encode(st); err != nil {
			return err
		}
	} else {
		if st.Check != nil {
			fmt.Fprintln(w, verdictLine(st, *o.Check))
		}
		if err := printStatus(w, st); err != nil {
			return err
		}
	}
	if st.Check != nil && st.Check.State != CheckOK {
		return &CheckError{State: st.Check.State, Summary: summary(st.Check)}
	}
	return nil
}

// printStatus writes st as a heading and a table.
func printStatus(w io.Writer, st *Status) error {
	fmt.Fprintf(w, "stream %s: %d messages, %d bytes, sequences %d..%d, replicas %d, max age %s\n",
		st.Stream, st.Messages, st.Bytes, st.FirstSeq, st.LastSeq, st.Replicas, st.MaxAge)
	if !st.LastTime.IsZero() {
		fmt.Fprintf(w, "newest event %s ago\n", time.Since(st.LastTime).Round(time.Millisecond))
	}
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "REGION\tAGENT\tPENDING\tACK PENDING\tLAG\tACK FLOOR\tCHECKPOINT\tLAST ACTIVE\tREDELIVERED\tGAP")
	for _, c := range st.Consumers {
		agent, pending, ackPending, lag, floor, active, redelivered := "no consumer", "-", "-", "-", "-", "-", "-"
		if c.Consumer {
			agent = "waiting"
			if c.Waiting == 0 {
				agent = "busy or away"
				if c.AckPending == 0 {
					agent = "away"
				}
			}
			if c.Mirror {
				agent = "mirror"
				if !c.MirrorBound {
					agent = "mirror away"
				}
			}
			pending, ackPending, floor = fmt.Sprint(c.Pending), fmt.Sprint(c.AckPending), fmt.Sprint(c.AckFloor)
			lag, redelivered = c.Lag.Round(time.Millisecond).String(), fmt.Sprint(c.Redelivered)
			active = "never"
			if c.LastActive != nil {
				active = time.Since(*c.LastActive).Round(time.Second).String() + " ago"
			}
		}
		cp := "none"
		if c.Checkpoint != nil {
			cp = fmt.Sprintf("%d (%s ago)", c.Checkpoint.Seq, time.Since(c.Checkpoint.Updated).Round(time.Second))
		}
		gap := "no"
		if c.Gap {
			gap = "yes: " + c.GapReason
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", c.Name, agent, pending, ackPending, lag, floor, cp, active, redelivered, gap)
	}
	return tw.Flush()
}

// errNoStream is GetStatus's error when the stream does not exist.
var errNoStream = errors.New("has a bridge run against this NATS? (--stream)")

// GetStatus reads the stream's state, its consumers and the regions'
// checkpoints in the default checkpoint bucket.
func GetStatus(ctx context.Context, js jetstream.JetStream, stream string) (*Status, error) {
	return readStatus(ctx, js, stream, regionagent.DefaultCheckpointBucket, nil)
}

// readStatus reads the stream's state, its consumers and the regions'
// checkpoints in bucket. An unreadable checkpoint bucket is logged and shows
// as no checkpoints.
func readStatus(ctx context.Context, js jetstream.JetStream, stream, bucket string, log *slog.Logger) (*Status, error) {
	s, err := js.Stream(ctx, stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("stream %q does not exist: %w", stream, errNoStream)
	}
	if err != nil {
		return nil, fmt.Errorf("stream %q: %w", stream, err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("stream %q: %w", stream, err)
	}
	st := &Status{
		Stream: stream, Messages: info.State.Msgs, Bytes: info.State.Bytes,
		FirstSeq: info.State.FirstSeq, LastSeq: info.State.LastSeq,
		FirstTime: info.State.FirstTime, LastTime: info.State.LastTime, Created: info.Created,
		Replicas: info.Config.Replicas, MaxAge: info.Config.MaxAge,
	}
	now := info.TimeStamp // the server's clock, as the stored times
	if now.IsZero() {
		now = time.Now()
	}
	regions := map[string]*RegionStatus{}
	consumers := s.ListConsumers(ctx)
	for ci := range consumers.Info() {
		r := &RegionStatus{
			Name: ci.Name, Consumer: true, Pending: ci.NumPending, AckPending: ci.NumAckPending,
			Redelivered: ci.NumRedelivered, AckFloor: ci.AckFloor.Stream, LastActive: ci.AckFloor.Last,
			Waiting: ci.NumWaiting,
		}
		if region, ok := strings.CutSuffix(ci.Name, "_mirror"); ok && ci.Config.DeliverSubject == mirrorDeliverSubject(region) {
			// A regional mirror's source consumer names its region, unless
			// the region has its own consumer here too.
			r.Mirror, r.MirrorBound = true, ci.PushBound
			if _, taken := regions[region]; !taken {
				r.Name = region
			}
		}
		if info.State.FirstSeq > 1 && ci.AckFloor.Stream+1 < info.State.FirstSeq {
			r.Gap, r.GapReason = true, "the stream no longer holds events after the consumer's ack floor"
		}
		if ci.NumPending > 0 || ci.NumAckPending > 0 {
			lag, err := oldestUnacked(ctx, s, ci, info.State.FirstSeq, now)
			if err != nil {
				return nil, fmt.Errorf("region %s: %w", ci.Name, err)
			}
			r.Lag = lag
		}
		if prev, taken := regions[r.Name]; taken && prev.Mirror {
			prev.Name = prev.Name + "_mirror" // the region's own consumer takes its name
			regions[prev.Name] = prev
		}
		regions[r.Name] = r
	}
	if err := consumers.Err(); err != nil {
		return nil, fmt.Errorf("listing consumers of %q: %w", stream, err)
	}
	// An agent renews its pull request when the last one expires, a round
	// trip later: a consumer seen with none waiting is looked at again
	// before it is called unattached.
	var idle []*RegionStatus
	for _, r := range regions {
		if r.Consumer && !r.Mirror && r.Waiting == 0 && r.AckPending == 0 {
			idle = append(idle, r)
		}
	}
	waitingAgain(ctx, s, idle)
	cps, err := regionagent.ReadCheckpoints(ctx, js, bucket)
	if err != nil && log != nil {
		log.Warn("cannot read the regions' checkpoints", "bucket", bucket, "err", err)
	}
	for name, cp := range cps {
		r := regions[name]
		if r == nil {
			r = &RegionStatus{Name: name}
			regions[name] = r
		}
		r.Checkpoint = &cp
		switch {
		case r.Gap:
		case cp.Stream != stream || !cp.StreamCreated.Equal(info.Created):
			r.Gap, r.GapReason = true, "the checkpoint is of another stream (re-created, or another --stream)"
		case cp.Seq+1 < info.State.FirstSeq:
			r.Gap, r.GapReason = true, fmt.Sprintf("the stream no longer holds events after the checkpoint (%d; the stream starts at %d)", cp.Seq, info.State.FirstSeq)
		}
	}
	for _, r := range regions {
		st.Consumers = append(st.Consumers, *r)
	}
	slices.SortFunc(st.Consumers, func(a, b RegionStatus) int { return strings.Compare(a.Name, b.Name) })
	return st, nil
}

// waitingAgain reads again, up to three times 100 ms apart, the pull
// requests waiting on the consumers of regions, and sets each region's
// Waiting from the first read above 0. It takes at most about 300 ms plus
// the reads, however many regions.
func waitingAgain(ctx context.Context, s jetstream.Stream, regions []*RegionStatus) {
	for range 3 {
		if len(regions) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
		var still []*RegionStatus
		for _, r := range regions {
			c, err := s.Consumer(ctx, r.Name)
			if err != nil {
				continue
			}
			if n := c.CachedInfo().NumWaiting; n > 0 {
				r.Waiting = n
				continue
			}
			still = append(still, r)
		}
		regions = still
	}
}

// oldestUnacked is the age, at now, of the first event after ci's ack floor
// that the stream still holds and the consumer takes; 0 when there is none.
func oldestUnacked(ctx context.Context, s jetstream.Stream, ci *jetstream.ConsumerInfo, first uint64, now time.Time) (time.Duration, error) {
	filter := ">"
	if ci.Config.FilterSubject != "" {
		filter = ci.Config.FilterSubject
	} else if len(ci.Config.FilterSubjects) == 1 {
		filter = ci.Config.FilterSubjects[0]
	}
	m, err := s.GetMsg(ctx, max(ci.AckFloor.Stream+1, first), jetstream.WithGetMsgSubject(filter))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("reading its oldest unacknowledged event: %w", err)
	}
	return max(now.Sub(m.Time), 0), nil
}

// judge applies the thresholds of c to st.
func judge(st *Status, c CheckOptions) *CheckResult {
	res := &CheckResult{}
	add := func(region string, s CheckState, format string, args ...any) {
		res.Problems = append(res.Problems, Problem{Region: region, State: s, Reason: fmt.Sprintf(format, args...)})
		res.State = max(res.State, s)
	}
	seen := map[string]bool{}
	for _, r := range st.Consumers {
		seen[r.Name] = r.Consumer
	}
	for _, name := range c.Regions {
		if _, listed := seen[name]; !listed {
			add(name, CheckCritical, "not seen: no consumer and no checkpoint (its agent never ran against this stream)")
		}
	}
	for _, r := range st.Consumers {
		events := r.Pending + uint64(r.AckPending)
		switch {
		case !r.Consumer && (slices.Contains(c.Regions, r.Name) || len(c.Regions) == 0):
			add(r.Name, CheckCritical, "not seen: it has a checkpoint but no consumer (its agent is not running, or the consumer was deleted)")
		case !r.Consumer:
			// A checkpoint of a region not expected: left over.
		case r.Lag > c.MaxLag:
			add(r.Name, CheckCritical, "lags: its oldest unacknowledged event is %s old (%d events), above --max-lag %s", r.Lag.Round(time.Millisecond), events, c.MaxLag)
		case r.Lag > c.WarnLag:
			add(r.Name, CheckWarning, "lags: its oldest unacknowledged event is %s old (%d events), above --warn-lag %s", r.Lag.Round(time.Millisecond), events, c.WarnLag)
		}
		if r.Gap {
			add(r.Name, CheckCritical, "gap: %s; its agent removes every token entry when it binds", r.GapReason)
		}
		switch {
		case r.Mirror && !r.MirrorBound:
			add(r.Name, CheckWarning, "regional mirror not following: no leaf node reads its consumer (link down, or the mirror was deleted)")
		case r.Mirror:
		case r.Consumer && r.Waiting == 0 && r.AckPending == 0:
			add(r.Name, CheckWarning, "no agent attached: the consumer has no pull request waiting and nothing delivered")
		}
	}
	return res
}

// summary is the problems in one line, the worst first.
func summary(c *CheckResult) string {
	ps := slices.Clone(c.Problems)
	slices.SortStableFunc(ps, func(a, b Problem) int { return int(b.State) - int(a.State) })
	parts := make([]string, len(ps))
	for i, p := range ps {
		parts[i] = p.Region + ": " + p.Reason
	}
	return strings.Join(parts, "; ")
}

// verdictLine is the first line of a monitoring plugin's output: the state,
// a summary and performance data (each region's lag and unacknowledged
// events).
func verdictLine(st *Status, c CheckOptions) string {
	text := summary(st.Check)
	if text == "" {
		text = fmt.Sprintf("%d regions on stream %s, none lagging past %s", len(st.Consumers), st.Stream, c.WarnLag)
	}
	var perf []string
	for _, r := range st.Consumers {
		if !r.Consumer {
			continue
		}
		perf = append(perf,
			fmt.Sprintf("'%s_lag'=%.3fs;%g;%g;0", r.Name, r.Lag.Seconds(), c.WarnLag.Seconds(), c.MaxLag.Seconds()),
			fmt.Sprintf("'%s_unacked'=%d;;;0", r.Name, r.Pending+uint64(r.AckPending)))
	}
	line := "KEYSTONE-FANOUT " + st.Check.State.String() + " - " + text
	if len(perf) > 0 {
		line += " | " + strings.Join(perf, " ")
	}
	return line
}

// oneShotJetStream connects for a short command (status, sweep): the first
// connection is bounded by 5 s instead of a daemon's patience.
func oneShotJetStream(ctx context.Context, o natsconn.Options, domain, name string, log *slog.Logger) (jetstream.JetStream, func(), error) {
	o.ConnectTimeout = 5 * time.Second
	nc, err := natsconn.Connect(ctx, o, name, log, nil)
	if err != nil {
		return nil, nil, err
	}
	var js jetstream.JetStream
	if domain != "" {
		js, err = jetstream.NewWithDomain(nc, domain)
	} else {
		js, err = jetstream.New(nc)
	}
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return js, nc.Close, nil
}

// mirrorDeliverSubject is stream.MirrorDeliverSubject, for readStatus whose
// parameter hides the package.
var mirrorDeliverSubject = stream.MirrorDeliverSubject
