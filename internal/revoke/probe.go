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

// CheckAccess does once what the poller does at start, for
// `keystone-fanout doctor`: it authenticates with o's credentials and lists
// the revocation events of the last minute, publishing nothing. It returns
// how many events Keystone listed, or the step that failed and its error
// (HTTPStatus tells Keystone's answer).
func CheckAccess(ctx context.Context, o Options) (events int, step string, err error) {
	o.setDefaults()
	c, err := newKeystoneClient(&o)
	if err != nil {
		return 0, StepAuthenticate, err
	}
	if err := c.authenticate(ctx); err != nil {
		return 0, StepAuthenticate, err
	}
	evs, err := c.listEvents(ctx, o.Now().Add(-time.Minute))
	if err != nil {
		return 0, StepList, err
	}
	return len(evs), "", nil
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
