package revoke

import (
	"context"
	"errors"
	"time"
)

// Probe steps, as CheckAccess reports them.
const (
	StepAuthenticate = "authenticate"
	StepList         = "list revocation events"
)

// Access is what CheckAccess found.
type Access struct {
	// Events is how many revocation events of the last minute Keystone listed.
	Events int
	// IssuedAt is the issued_at of the token Keystone gave (its own clock,
	// to the second), between Sent and Received by this host's clock.
	IssuedAt, Sent, Received time.Time
}

// CheckAccess does once what the poller does at start, for
// `keystone-fanout doctor`: it authenticates with o's credentials and lists
// the revocation events of the last minute, publishing nothing. On error it
// returns the step that failed (HTTPStatus tells Keystone's answer).
func CheckAccess(ctx context.Context, o Options) (a Access, step string, err error) {
	o.setDefaults()
	c, err := newKeystoneClient(&o, nil)
	if err != nil {
		return a, StepAuthenticate, err
	}
	if err := c.authenticate(ctx); err != nil {
		return a, StepAuthenticate, err
	}
	a.IssuedAt, a.Sent, a.Received = c.issuedAt, c.authSent, c.authDone
	evs, err := c.listEvents(ctx, o.Now().Add(-time.Minute))
	if err != nil {
		return a, StepList, err
	}
	a.Events = len(evs)
	return a, "", nil
}

// HTTPStatus is the HTTP status Keystone answered in an error of
// CheckAccess, 0 when the error is not such an answer.
func HTTPStatus(err error) int {
	var he *httpStatusError
	if errors.As(err, &he) {
		return he.status
	}
	return 0
}
