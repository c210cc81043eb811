package revoke

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/tlsconf"
)

// keystoneTLS is the TLS configuration towards Keystone: TLS 1.2 or later,
// certificates checked against caFile (--keystone-ca-file) when given, else
// the system roots.
func keystoneTLS(caFile string) (*tls.Config, error) {
	return tlsconf.Load(tlsconf.Files{CA: caFile}, keystoneFlags)
}

// maxBody bounds what the poller reads from one Keystone answer.
const maxBody = 64 << 20

// keystoneClient authenticates to Keystone and lists revocation events. It is
// used by one goroutine at a time.
type keystoneClient struct {
	o    *Options
	base string // URL without trailing slash
	http *http.Client

	// tls keeps --keystone-ca-file current; pool is the CA pool c.http's
	// transport was made with: a new one replaces the transport (its kept
	// connections close; new ones verify against the new bundle).
	tls  *tlsconf.Reloader
	pool *x509.CertPool

	token     string
	refreshAt time.Time // local time at which to authenticate again

	// issuedAt is the last token's issued_at, Keystone's clock between
	// authSent and authDone, this host's.
	issuedAt, authSent, authDone time.Time
}

// httpStatusError is an unexpected HTTP status from Keystone.
type httpStatusError struct {
	op     string
	status int
	body   string
}

func (e *httpStatusError) Error() string {
	msg := fmt.Sprintf("%s: Keystone answered HTTP %d", e.op, e.status)
	switch e.status {
	case http.StatusUnauthorized:
		msg += " (check the Keystone credentials)"
	case http.StatusForbidden:
		msg += " (the Keystone user needs a role allowed by policy identity:list_revoke_events: admin or service by default)"
	}
	if e.body != "" {
		msg += ": " + e.body
	}
	return msg
}

// newKeystoneClient makes the client; log (nil: slog.Default()) gets the
// messages about --keystone-ca-file re-read after it changed.
func newKeystoneClient(o *Options, log *slog.Logger) (*keystoneClient, error) {
	r, err := tlsconf.NewReloader(tlsconf.Files{CA: o.CAFile}, keystoneFlags, log)
	if err != nil {
		return nil, fmt.Errorf("revoke: %w", err)
	}
	c := &keystoneClient{o: o, base: strings.TrimRight(o.URL, "/"), tls: r}
	c.transport()
	return c, nil
}

// transport makes c.http anew when the CA bundle changed on disk (and the
// first time).
func (c *keystoneClient) transport() {
	pool := c.tls.RootCAs()
	if c.http != nil && pool == c.pool {
		return
	}
	if c.http != nil {
		c.http.CloseIdleConnections()
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 1
	tr.TLSClientConfig = c.tls.Config("")
	c.http, c.pool = &http.Client{Transport: tr, Timeout: c.o.RequestTimeout}, pool
}

// do sends req with the CA bundle on disk now.
func (c *keystoneClient) do(req *http.Request) (*http.Response, error) {
	c.transport()
	resp, err := c.http.Do(req)
	return resp, tlsconf.Explain(err, tlsconf.Files{CA: c.o.CAFile}, keystoneFlags)
}

var keystoneFlags = tlsconf.FlagNames{CA: "--keystone-ca-file"}

// tokenValid reports whether the cached token may still be used.
func (c *keystoneClient) tokenValid() bool {
	return c.token != "" && c.o.Now().Before(c.refreshAt)
}

// authenticate gets a new token (POST /v3/auth/tokens) and schedules its
// renewal ReauthBefore its expiry (at most half its lifetime), measured with
// Keystone's own issued_at and expires_at so that clock skew does not matter.
func (c *keystoneClient) authenticate(ctx context.Context) error {
	c.token = ""
	var identity map[string]any
	var scope map[string]any
	if c.o.AppCredID != "" {
		secret := c.o.AppCredSecret
		if c.o.AppCredSecretFile != "" {
			s, err := readSecret(c.o.AppCredSecretFile)
			if err != nil {
				return fmt.Errorf("reading --keystone-app-cred-secret-file: %w", err)
			}
			secret = s
		}
		identity = map[string]any{
			"methods":                []string{"application_credential"},
			"application_credential": map[string]any{"id": c.o.AppCredID, "secret": secret},
		}
	} else {
		password := c.o.Password
		if c.o.PasswordFile != "" {
			s, err := readSecret(c.o.PasswordFile)
			if err != nil {
				return fmt.Errorf("reading --keystone-password-file: %w", err)
			}
			password = s
		}
		identity = map[string]any{
			"methods": []string{"password"},
			"password": map[string]any{"user": map[string]any{
				"name": c.o.Username, "domain": map[string]any{"name": c.o.UserDomain}, "password": password,
			}},
		}
		scope = map[string]any{"project": map[string]any{
			"name": c.o.Project, "domain": map[string]any{"name": c.o.ProjectDomain},
		}}
	}
	auth := map[string]any{"identity": identity}
	if scope != nil {
		auth["scope"] = scope
	}
	body, _ := json.Marshal(map[string]any{"auth": auth})

	ctx, cancel := context.WithTimeout(ctx, c.o.RequestTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+"/auth/tokens?nocatalog", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json")
	// A POST is not retried by net/http on a connection the server closed
	// while idle: authenticate on a fresh one. It happens once per token.
	req.Close = true
	local := c.o.Now()
	resp, err := c.do(req)
	if err != nil {
		return fmt.Errorf("authenticating to Keystone: %w", err)
	}
	done := c.o.Now()
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return fmt.Errorf("authenticating to Keystone: reading answer: %w", err)
	}
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		return &httpStatusError{op: "authenticating to Keystone", status: resp.StatusCode, body: shorten(data)}
	}
	tok := resp.Header.Get("X-Subject-Token")
	if tok == "" {
		return errors.New("authenticating to Keystone: no X-Subject-Token in the answer")
	}
	var ans struct {
		Token struct {
			IssuedAt  string `json:"issued_at"`
			ExpiresAt string `json:"expires_at"`
		} `json:"token"`
	}
	if err := json.Unmarshal(data, &ans); err != nil {
		return fmt.Errorf("authenticating to Keystone: decoding answer: %w", err)
	}
	issued, err1 := parseTime(ans.Token.IssuedAt)
	expires, err2 := parseTime(ans.Token.ExpiresAt)
	lifetime := expires.Sub(issued)
	if err1 != nil || err2 != nil || lifetime <= 0 {
		// Unknown lifetime: use the token for one minute.
		lifetime = 2 * time.Minute
	}
	margin := min(c.o.ReauthBefore, lifetime/2)
	if err1 == nil {
		c.issuedAt, c.authSent, c.authDone = issued, local, done
	}
	c.token = tok
	c.refreshAt = local.Add(lifetime - margin)
	return nil
}

// keystoneEvent is one element of GET /v3/OS-REVOKE/events, each field kept
// as Keystone sent it.
type keystoneEvent map[string]json.RawMessage

// listEvents calls GET /v3/OS-REVOKE/events, with ?since= when since is not
// zero (Keystone answers the events with revoked_at strictly after it).
func (c *keystoneClient) listEvents(ctx context.Context, since time.Time) ([]keystoneEvent, error) {
	u := c.base + "/OS-REVOKE/events"
	if !since.IsZero() {
		u += "?" + url.Values{"since": {formatTime(since)}}.Encode()
	}
	ctx, cancel := context.WithTimeout(ctx, c.o.RequestTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("X-Auth-Token", c.token)
	resp, err := c.do(req)
	if err != nil {
		return nil, fmt.Errorf("listing revocation events: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return nil, fmt.Errorf("listing revocation events: reading answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, &httpStatusError{op: "listing revocation events", status: resp.StatusCode, body: shorten(data)}
	}
	var ans struct {
		Events *[]keystoneEvent `json:"events"`
	}
	if err := json.Unmarshal(data, &ans); err != nil {
		return nil, fmt.Errorf("listing revocation events: decoding answer: %w", err)
	}
	if ans.Events == nil {
		return nil, fmt.Errorf("listing revocation events: no \"events\" in the answer: %s", shorten(data))
	}
	return *ans.Events, nil
}

// Keystone writes times with utils.isotime: "2026-11-22T13:11:52.000000Z"
// (revoked_at, issued_before) or "2026-11-22T13:11:52Z" (expires_at), in UTC.
// Other ISO 8601 forms are accepted too; a time without a zone is UTC.
var timeLayouts = []string{
	time.RFC3339Nano, // also matches without fraction, with Z or an offset
	"2006-01-02T15:04:05.999999999",
	"2006-01-02 15:04:05.999999999Z07:00",
	"2006-01-02 15:04:05.999999999",
}

// parseTime parses a Keystone timestamp into UTC.
func parseTime(s string) (time.Time, error) {
	for _, l := range timeLayouts {
		if t, err := time.Parse(l, s); err == nil {
			return t.UTC(), nil
		}
	}
	return time.Time{}, fmt.Errorf("timestamp %q is not in a form Keystone writes (e.g. 2026-11-22T13:11:52.000000Z)", s)
}

// formatTime writes t the way Keystone writes revoked_at.
func formatTime(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05.000000Z") }

func shorten(b []byte) string {
	s := strings.TrimSpace(string(b))
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return s
}
