package revoke

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/stream"
)

// Defaults of Options.
const (
	DefaultDomain         = "Default"
	DefaultPollInterval   = 250 * time.Millisecond
	DefaultOverlap        = 30 * time.Second
	DefaultRequestTimeout = 10 * time.Second
	DefaultMaxBackoff     = 30 * time.Second
	DefaultBucket         = "keystone-fanout-revoke"
	DefaultKey            = "position"
	DefaultReauthBefore   = 5 * time.Minute
	DefaultStream         = "KEYSTONE"
	DefaultLeaseTTL       = 2 * time.Second
	// MinLeaseTTL is the shortest lease TTL Validate accepts.
	MinLeaseTTL = 500 * time.Millisecond
	// MinPollInterval is the shortest poll interval Validate accepts.
	MinPollInterval = 100 * time.Millisecond
	// MinOverlap is the shortest overlap Validate accepts.
	MinOverlap = time.Second
)

// Options configures a Poller. The bridge fills it from its flags; every field
// names the flag it comes from, and Validate's errors name the flag to fix.
//
// Authenticate either with a password (Username, Password or PasswordFile,
// Project) or with an application credential (AppCredID, AppCredSecret or
// AppCredSecretFile). The user needs a role that Keystone's policy
// identity:list_revoke_events accepts: by default "admin" or "service" on the
// project it is scoped to (see docs/REVOCATION.md).
type Options struct {
	// URL is Keystone's v3 endpoint, e.g. "http://keystone:5000/v3"
	// (--keystone-url). Required.
	URL string

	// Username (--keystone-username), in UserDomain (--keystone-user-domain,
	// a domain name, default "Default"), authenticates with a password.
	Username   string
	UserDomain string
	// Password is the password itself (the bridge reads
	// --keystone-password-file into it), or PasswordFile names a file holding
	// it, read at every authentication so that it can be rotated in place;
	// trailing newlines are removed. Exactly one is required with Username.
	Password     string
	PasswordFile string
	// Project (--keystone-project, a name) in ProjectDomain
	// (--keystone-project-domain, a domain name, default "Default") is the
	// scope of the token. Required with Username.
	Project       string
	ProjectDomain string

	// AppCredID (--keystone-app-cred-id) authenticates with an application
	// credential instead; its secret is AppCredSecret, or is read from
	// AppCredSecretFile (--keystone-app-cred-secret-file) at every
	// authentication.
	AppCredID         string
	AppCredSecret     string
	AppCredSecretFile string

	// CAFile (--keystone-ca-file) is a PEM bundle of the CAs that Keystone's
	// certificate is checked against, instead of the system's. Only with https.
	CAFile string

	// PollInterval (--revocation-poll-interval) is the time from the start of
	// one successful poll to the next. Default 250 ms (a change Keystone
	// announces nowhere, such as DELETE /v3/auth/tokens, waits half of it on
	// average; one poll costs Keystone about 10 ms of CPU with its cache on,
	// and only the lease holder polls), at least 100 ms.
	PollInterval time.Duration
	// Overlap is how far before the newest revoked_at already published each
	// poll asks again ("since" = position - Overlap). Keystone stores revoked_at
	// to the second and several Keystone nodes commit events out of order; an
	// event that becomes visible later than Overlap after its revoked_at would
	// be missed, so Overlap must exceed Keystone's clock skew plus its longest
	// transaction. Events seen twice are recognised by their id and published
	// once. Default 30 s, at least 1 s.
	Overlap time.Duration
	// RequestTimeout bounds each request to Keystone and each publish. Default
	// 10 s.
	RequestTimeout time.Duration
	// MaxBackoff caps the wait between attempts after errors; the wait starts
	// at PollInterval and doubles. Default 30 s.
	MaxBackoff time.Duration
	// ReauthBefore is how long before its token expires the poller
	// authenticates again. It is capped at half the token's lifetime. Default
	// 5 min.
	ReauthBefore time.Duration

	// SubjectPrefix is the first token of the subjects events are published on
	// (stream.Subject: "<prefix>.revocation"). Default
	// stream.DefaultSubjectPrefix; the bridge sets its --subject-prefix.
	SubjectPrefix string
	// Bucket and Key name the JetStream key-value entry holding the poller's
	// position; replicas of the bridge share it. Default
	// "keystone-fanout-revoke" and "position". The bucket is created when
	// missing, with BucketReplicas replicas (default 1; the bridge sets its
	// --stream-replicas, so that the lease survives a node as the stream does).
	Bucket         string
	Key            string
	BucketReplicas int

	// Stream is the stream the events go to (--stream, default "KEYSTONE").
	// The lease holder also follows its notifications: each one makes it poll
	// at once (see FollowUps) and then publish an event.KindPolled event.
	Stream string
	// LeaseTTL (--revocation-lease-ttl, default 2 s) is how long the lease
	// holder may go without renewing before another replica takes over; a
	// holder that stops cleanly hands over at once. At least 500 ms.
	LeaseTTL time.Duration
	// Holder names this replica in the lease. Default: host name and pid.
	Holder string
	// FollowUps are the extra polls after a notification, counted from the
	// poll it caused, for revocation events Keystone records just after it
	// sends the notification. Default 100 ms, 300 ms and 1 s; empty non-nil:
	// none.
	FollowUps []time.Duration

	// Now returns the current time; tests replace it. Default time.Now.
	Now func() time.Time
}

func (o *Options) setDefaults() {
	if o.UserDomain == "" {
		o.UserDomain = DefaultDomain
	}
	if o.ProjectDomain == "" {
		o.ProjectDomain = DefaultDomain
	}
	if o.PollInterval == 0 {
		o.PollInterval = DefaultPollInterval
	}
	if o.Overlap == 0 {
		o.Overlap = DefaultOverlap
	}
	if o.RequestTimeout == 0 {
		o.RequestTimeout = DefaultRequestTimeout
	}
	if o.MaxBackoff == 0 {
		o.MaxBackoff = DefaultMaxBackoff
	}
	if o.ReauthBefore == 0 {
		o.ReauthBefore = DefaultReauthBefore
	}
	if o.SubjectPrefix == "" {
		o.SubjectPrefix = stream.DefaultSubjectPrefix
	}
	if o.Bucket == "" {
		o.Bucket = DefaultBucket
	}
	if o.Key == "" {
		o.Key = DefaultKey
	}
	if o.BucketReplicas == 0 {
		o.BucketReplicas = 1
	}
	if o.Stream == "" {
		o.Stream = DefaultStream
	}
	if o.LeaseTTL == 0 {
		o.LeaseTTL = DefaultLeaseTTL
	}
	if o.Holder == "" {
		host, _ := os.Hostname()
		o.Holder = fmt.Sprintf("%s/%d", host, os.Getpid())
	}
	if o.FollowUps == nil {
		o.FollowUps = []time.Duration{100 * time.Millisecond, 300 * time.Millisecond, time.Second}
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// Validate fills zero fields with their defaults and checks the options
// without connecting to anything. It reads PasswordFile, AppCredSecretFile and
// CAFile to check that they are usable. Every error names the flag to fix.
func (o *Options) Validate() error {
	o.setDefaults()
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	u, err := url.Parse(o.URL)
	switch {
	case o.URL == "":
		add("--keystone-url is required: Keystone's v3 endpoint, e.g. http://keystone:5000/v3")
	case err != nil:
		add("--keystone-url %q: %v", o.URL, err)
	case u.Scheme != "http" && u.Scheme != "https":
		add("--keystone-url %q: scheme must be http or https", o.URL)
	case u.Host == "":
		add("--keystone-url %q: no host", o.URL)
	case !strings.HasSuffix(strings.TrimRight(u.Path, "/"), "/v3"):
		add("--keystone-url %q: give the v3 endpoint, ending in /v3 (e.g. %s://%s/v3)", o.URL, u.Scheme, u.Host)
	case u.RawQuery != "" || u.Fragment != "":
		add("--keystone-url %q: remove the query or fragment", o.URL)
	}

	password := o.Username != ""
	appCred := o.AppCredID != ""
	switch {
	case password && appCred:
		add("--keystone-username and --keystone-app-cred-id are both set: choose password or application credential authentication")
	case !password && !appCred:
		add("no Keystone credentials: set --keystone-username with --keystone-password-file and --keystone-project, or --keystone-app-cred-id with --keystone-app-cred-secret-file")
	case password:
		if o.Password != "" && o.PasswordFile != "" {
			add("the Keystone password is given twice: use --keystone-password-file only")
		} else if o.Password == "" && o.PasswordFile == "" {
			add("--keystone-password-file is required with --keystone-username")
		} else if o.PasswordFile != "" {
			if _, err := readSecret(o.PasswordFile); err != nil {
				add("--keystone-password-file: %v", err)
			}
		}
		if o.Project == "" {
			add("--keystone-project is required with --keystone-username: listing revocation events needs a project-scoped token with the admin or service role")
		}
	case appCred:
		if o.AppCredSecret != "" && o.AppCredSecretFile != "" {
			add("the application credential secret is given twice: use --keystone-app-cred-secret-file only")
		} else if o.AppCredSecret == "" && o.AppCredSecretFile == "" {
			add("--keystone-app-cred-secret-file is required with --keystone-app-cred-id")
		} else if o.AppCredSecretFile != "" {
			if _, err := readSecret(o.AppCredSecretFile); err != nil {
				add("--keystone-app-cred-secret-file: %v", err)
			}
		}
		if o.Project != "" {
			add("--keystone-project is not used with --keystone-app-cred-id (an application credential is scoped already): remove it")
		}
	}
	if !password && o.PasswordFile != "" {
		add("--keystone-password-file is set without --keystone-username")
	}
	if !appCred && o.AppCredSecretFile != "" {
		add("--keystone-app-cred-secret-file is set without --keystone-app-cred-id")
	}

	if o.CAFile != "" {
		if u != nil && u.Scheme == "http" {
			add("--keystone-ca-file is set but --keystone-url is http: use https or remove the CA file")
		}
		if _, err := keystoneTLS(o.CAFile); err != nil {
			errs = append(errs, err)
		}
	}

	if o.PollInterval < MinPollInterval {
		add("--revocation-poll-interval %s: must be at least %s", o.PollInterval, MinPollInterval)
	}
	if o.Overlap < MinOverlap {
		add("revocation overlap %s: must be at least %s (Keystone stores revoked_at to the second and lists only events after \"since\")", o.Overlap, MinOverlap)
	}
	if o.RequestTimeout < 0 || o.MaxBackoff < 0 || o.ReauthBefore < 0 {
		add("revocation timeouts must not be negative")
	}
	if err := stream.CheckSubjectPrefix(o.SubjectPrefix); err != nil {
		errs = append(errs, err)
	}
	if strings.ContainsAny(o.Bucket, " \t\r\n*>.") {
		add("position bucket %q: not a valid key-value bucket name", o.Bucket)
	}
	if o.LeaseTTL < MinLeaseTTL {
		add("--revocation-lease-ttl %s: must be at least %s", o.LeaseTTL, MinLeaseTTL)
	}
	for _, d := range o.FollowUps {
		if d <= 0 {
			add("revocation follow-up poll %s: must be positive", d)
		}
	}
	if o.BucketReplicas < 1 || o.BucketReplicas > 5 {
		add("position bucket replicas %d: must be 1 to 5", o.BucketReplicas)
	}
	return errors.Join(errs...)
}

// readSecret reads a secret from a file, without trailing newlines.
func readSecret(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	s := strings.TrimRight(string(b), "\r\n")
	if s == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return s, nil
}
