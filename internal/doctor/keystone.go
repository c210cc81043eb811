package doctor

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/revoke"
	"github.com/keystone-fanout/keystone-fanout/internal/tlsconf"
)

// keystone checks the revocation poller's Keystone: reachable, its clock, the
// poller's credentials and the policy on listing revocation events.
func keystone(ctx context.Context, o *revoke.Options, timeout time.Duration, r *Report) {
	target := o.URL
	cfg, err := tlsconf.Load(tlsconf.Files{CA: o.CAFile}, tlsconf.FlagNames{CA: "--keystone-ca-file"})
	if err != nil {
		r.add(Finding{Check: "keystone.connect", Target: target, Level: LevelFail, Summary: err.Error()})
		return
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = cfg
	client := &http.Client{Transport: tr, Timeout: timeout}
	defer tr.CloseIdleConnections()
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(cctx, http.MethodGet, o.URL, nil)
	if err != nil {
		r.add(Finding{Check: "keystone.connect", Target: target, Level: LevelFail, Summary: err.Error(), Fix: "give --keystone-url as http(s)://HOST:PORT/v3"})
		return
	}
	req.Header.Set("Accept", "application/json")
	sent := time.Now()
	resp, err := client.Do(req)
	got := time.Now()
	if err != nil {
		f := Finding{Check: "keystone.connect", Target: target, Level: LevelFail, Summary: "cannot reach Keystone: " + err.Error(),
			Fix: "check --keystone-url and that firewalls let this host reach it"}
		var unknownCA x509.UnknownAuthorityError
		if errors.As(err, &unknownCA) {
			f.Fix = "give the CA of Keystone's certificate with --keystone-ca-file"
		}
		r.add(f)
		return
	}
	resp.Body.Close()
	f := Finding{Check: "keystone.connect", Target: target, Level: LevelOK, Summary: fmt.Sprintf("answers %s in %s", resp.Status, got.Sub(sent).Round(time.Millisecond))}
	if resp.StatusCode >= 400 {
		f.Level = LevelWarn
		f.Detail = "Keystone's v3 endpoint answers its version document to anyone; this URL may not be it."
		f.Fix = "give --keystone-url as Keystone's v3 endpoint, for example https://keystone:5000/v3"
	}
	r.add(f)

	access, step, err := revoke.CheckAccess(ctx, *o)
	switch {
	case !access.IssuedAt.IsZero():
		clockKeystone("its token's issued_at", access.IssuedAt, access.Sent, access.Received, r)
	case resp.Header.Get("Date") != "":
		date, derr := http.ParseTime(resp.Header.Get("Date"))
		if derr == nil {
			clockKeystone("its HTTP Date", date, sent, got, r)
		}
	default:
		r.add(Finding{Check: "clock", Target: "Keystone", Level: LevelInfo,
			Summary: "Keystone gave no timestamp (no token, no HTTP Date header): clock skew cannot be told"})
	}
	a := Finding{Check: "keystone.access", Target: target}
	switch status := revoke.HTTPStatus(err); {
	case err == nil:
		a.Level = LevelOK
		a.Summary = fmt.Sprintf("authenticated, and listed %d revocation event(s) of the last minute", access.Events)
	case step == revoke.StepAuthenticate && status == http.StatusUnauthorized:
		a.Level = LevelFail
		a.Summary = "Keystone refused the poller's credentials (HTTP 401)"
		a.Fix = "check --keystone-username, --keystone-password-file, --keystone-user-domain, --keystone-project (or the application credential)"
	case step == revoke.StepList && status == http.StatusForbidden:
		a.Level = LevelFail
		a.Summary = "Keystone's policy forbids this user to list revocation events (HTTP 403)"
		a.Detail = "The poller lists GET /v3/OS-REVOKE/events; policy identity:list_revoke_events allows the admin and service roles by default."
		a.Fix = "give the user the service role on --keystone-project (openstack role add --user USER --project PROJECT service)"
	default:
		a.Level = LevelFail
		a.Summary = step + ": " + err.Error()
	}
	r.add(a)
}

// clockKeystone compares a Keystone timestamp (whole seconds: its HTTP Date,
// or a token's issued_at), taken between sent and got by this host's clock,
// with this host's clock: only a difference beyond a second and the round
// trip tells.
func clockKeystone(source string, t, sent, got time.Time, r *Report) {
	mid := sent.Add(got.Sub(sent) / 2)
	// t is truncated to the second: compare with the middle of it.
	skew := t.Truncate(time.Second).Add(500 * time.Millisecond).Sub(mid)
	slack := 500*time.Millisecond + got.Sub(sent)/2
	f := Finding{Check: "clock", Target: "Keystone", Level: LevelOK}
	if skew.Abs() <= slack {
		f.Summary = fmt.Sprintf("Keystone's clock (%s) and this host's agree within %s", source, slack.Round(10*time.Millisecond))
		r.add(f)
		return
	}
	f.Summary = fmt.Sprintf("Keystone's clock (%s) is about %s %s this host's", source, skewText(skew), aheadBehind(skew))
	if skew.Abs() > 2*time.Second {
		f.Level = LevelWarn
		f.Detail = "Latencies measured from Keystone's own timestamps (the from=\"keystone\" latency histograms) are off by as much; " +
			"nothing else depends on it: the poller follows Keystone's clock, the agents the stream's."
		f.Fix = "run NTP (chrony) on Keystone's hosts and on this one"
	}
	r.add(f)
}
