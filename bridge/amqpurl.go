package bridge

import (
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"

	amqp "github.com/rabbitmq/amqp091-go"
)

// ParseAMQPURLs turns the values of --amqp-url into the list of broker URLs
// the bridge tries in turn, in order, each a URL that amqp091 accepts.
//
// Each value may hold several URLs separated by commas, and each URL may be:
//
//   - amqp://user:pass@host:port/vhost or amqps://... (one broker);
//   - oslo.messaging's transport_url form, rabbit://user:pass@host1:5672,user:pass@host2:5672/vhost,
//     which names several brokers sharing one vhost and query: it yields one
//     amqp:// URL per host, in the order given. A host without credentials
//     gets none (the broker default, guest), as in oslo.messaging.
//
// A query parameter ssl=1 (also true, yes, on) turns the URL into amqps://;
// ssl=0 (false, no, off) keeps amqp://. Other query parameters are kept for
// amqp091 (heartbeat, connection_timeout, auth_mechanism, cacertfile, ...).
// Reserved characters in a user name or password ('@', ':', '/', ',', ...)
// must be percent-encoded. Exact duplicates are dropped.
//
// Errors name the flag and the value that is wrong, never a password.
func ParseAMQPURLs(values []string) ([]string, error) {
	var out []string
	for _, v := range values {
		items, err := splitURLList(v)
		if err != nil {
			return nil, err
		}
		for _, item := range items {
			urls, err := parseAMQPURL(item)
			if err != nil {
				return nil, err
			}
			for _, u := range urls {
				if !slices.Contains(out, u) {
					out = append(out, u)
				}
			}
		}
	}
	if len(out) == 0 {
		return nil, errors.New("--amqp-url: no broker URL given: set it to Keystone's transport_url, " +
			"for example rabbit://user:pass@rabbit1:5672,user:pass@rabbit2:5672/ or amqp://user:pass@host:5672/")
	}
	return out, nil
}

// splitURLList splits one flag value on commas. A piece without "://" does not
// start a URL: it is another host of the rabbit:// URL before it.
func splitURLList(v string) ([]string, error) {
	var items []string
	for _, piece := range strings.Split(v, ",") {
		piece = strings.TrimSpace(piece)
		if strings.Contains(piece, "://") {
			items = append(items, piece)
			continue
		}
		if fixed, ok := schemeTypo(piece); ok {
			return nil, fmt.Errorf("--amqp-url: %q: the scheme lacks its \"://\": write %s",
				redactURL(piece), redactURL(fixed))
		}
		if len(items) == 0 {
			if piece == "" {
				continue
			}
			return nil, fmt.Errorf("--amqp-url: %q has no scheme: write amqp://%s/ (or amqps://, rabbit://)",
				redactURL(piece), redactURL(piece))
		}
		// Keep empty pieces: "rabbit://h1,,h2/" is an error parseAMQPURL reports.
		items[len(items)-1] += "," + piece
	}
	return items, nil
}

// schemeTypo recognises a supported scheme whose "://" is misspelt
// ("amqp//h/", "amqp:/h/") and returns the piece with it written right. A
// host named like a scheme ("amqp:5672") is not one.
func schemeTypo(piece string) (string, bool) {
	for _, scheme := range []string{"amqps", "amqp", "rabbit"} {
		if len(piece) <= len(scheme) || !strings.EqualFold(piece[:len(scheme)], scheme) {
			continue
		}
		rest := piece[len(scheme):]
		if !strings.HasPrefix(rest, "//") && !strings.HasPrefix(rest, ":/") {
			continue
		}
		return strings.ToLower(scheme) + "://" + strings.TrimLeft(rest, ":/"), true
	}
	return "", false
}

var (
	sslOn  = []string{"1", "true", "yes", "on"}
	sslOff = []string{"0", "false", "no", "off"}
)

// parseAMQPURL expands one URL, possibly with several comma-separated hosts.
func parseAMQPURL(raw string) ([]string, error) {
	scheme, rest, _ := strings.Cut(raw, "://")
	scheme = strings.ToLower(scheme)
	switch scheme {
	case "amqp", "amqps", "rabbit":
	default:
		return nil, fmt.Errorf("--amqp-url %q: scheme %q is not supported: use amqp://, amqps:// or oslo.messaging's rabbit://",
			redactURL(raw), scheme)
	}
	if strings.ContainsAny(raw, " \t\r\n") {
		return nil, fmt.Errorf("--amqp-url %q: contains white space; percent-encode it (%%20)", redactURL(raw))
	}
	netloc := rest
	tail := ""
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		netloc, tail = rest[:i], rest[i:]
	}
	if unencodedUserinfo(netloc, tail) {
		return nil, fmt.Errorf("--amqp-url %q: a user name or password holds an unencoded '/', '?' or '#' (read as the start of the path, query or fragment): percent-encode it (%%2F, %%3F, %%23)",
			redactURL(raw))
	}
	// The path and query are shared by every host.
	t, err := url.Parse("amqp://host" + tail)
	if err != nil {
		return nil, fmt.Errorf("--amqp-url %q: %v", redactURL(raw), unwrapURLError(err))
	}
	if t.Fragment != "" {
		return nil, fmt.Errorf("--amqp-url %q: unexpected fragment (#...); percent-encode '#' in passwords (%%23)", redactURL(raw))
	}
	q := t.Query()
	if q.Has("ssl") {
		v := strings.ToLower(q.Get("ssl"))
		switch {
		case slices.Contains(sslOn, v):
			if scheme == "amqp" || scheme == "rabbit" {
				scheme = "amqps"
			}
		case slices.Contains(sslOff, v):
			if scheme == "amqps" {
				return nil, fmt.Errorf("--amqp-url %q: amqps:// with ssl=%s: drop ssl=%s or use amqp://", redactURL(raw), v, v)
			}
		default:
			return nil, fmt.Errorf("--amqp-url %q: ssl=%q: want 1/true/yes/on or 0/false/no/off", redactURL(raw), v)
		}
		q.Del("ssl")
	}
	if scheme == "rabbit" {
		scheme = "amqp"
	}
	suffix := t.EscapedPath()
	if len(q) > 0 {
		suffix += "?" + q.Encode()
	}

	hosts := strings.Split(netloc, ",")
	if len(hosts) > 1 && slices.Contains(hosts, "") {
		return nil, fmt.Errorf("--amqp-url %q: empty host in the comma-separated host list", redactURL(raw))
	}
	var out []string
	for _, h := range hosts {
		// Kept as written (not re-encoded), so that parsing the result again
		// gives the same URLs.
		u := scheme + "://" + h + suffix
		if _, err := url.Parse(u); err != nil {
			return nil, fmt.Errorf("--amqp-url %q: host %q: %v", redactURL(raw), hostOf(h), unwrapURLError(err))
		}
		if _, err := amqp.ParseURI(u); err != nil {
			return nil, fmt.Errorf("--amqp-url %q: host %q: %v", redactURL(raw), hostOf(h), unwrapURLError(err))
		}
		out = append(out, u)
	}
	return out, nil
}

func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// hostOf is the host[:port] of "user:pass@host:port", without the
// credentials.
func hostOf(h string) string {
	return h[strings.LastIndex(h, "@")+1:]
}

// redactURL hides the passwords of a URL (possibly with several hosts) for
// logs and error messages.
func redactURL(raw string) string {
	scheme, rest, found := strings.Cut(raw, "://")
	if !found {
		return redactPiece(raw)
	}
	netloc := rest
	tail := ""
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		netloc, tail = rest[:i], rest[i:]
	}
	hosts := strings.Split(netloc, ",")
	for i, h := range hosts {
		hosts[i] = redactPiece(h)
	}
	if unencodedUserinfo(netloc, tail) {
		// A password with an unencoded '/', '?' or '#' ends the host list
		// early: hide the last host up to the last '@'.
		hosts[len(hosts)-1] = "xxxxx" + tail[strings.LastIndex(tail, "@"):]
		tail = ""
	}
	return scheme + "://" + strings.Join(hosts, ",") + tail
}

// unencodedUserinfo reports whether the last host of netloc has no '@' but
// the rest of the URL has one: the user name or password of that host holds
// an unencoded '/', '?' or '#', which ended the host list early.
func unencodedUserinfo(netloc, tail string) bool {
	last := netloc[strings.LastIndex(netloc, ",")+1:]
	return !strings.Contains(last, "@") && strings.Contains(tail, "@")
}

// redactPiece hides the password in "user:pass@host".
func redactPiece(h string) string {
	at := strings.LastIndex(h, "@")
	if at < 0 {
		return h
	}
	user, _, hasPass := strings.Cut(h[:at], ":")
	if !hasPass {
		return h
	}
	return user + ":xxxxx" + h[at:]
}

// withPassword returns u with its password replaced by pw, keeping the user
// name (guest when the URL has none).
func withPassword(u, pw string) (string, error) {
	parsed, err := url.Parse(u)
	if err != nil {
		return "", err
	}
	user := "guest"
	if parsed.User != nil {
		user = parsed.User.Username()
	}
	scheme, rest, _ := strings.Cut(u, "://")
	if at := strings.LastIndex(strings.SplitN(rest, "/", 2)[0], "@"); at >= 0 {
		rest = rest[at+1:]
	}
	return scheme + "://" + escapeUserinfo(user) + ":" + escapeUserinfo(pw) + "@" + rest, nil
}

// escapeUserinfo percent-encodes everything but unreserved characters, so
// that a user name or password never holds a separator (',', ':', '@', ...).
func escapeUserinfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-._~", c) >= 0 {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}
