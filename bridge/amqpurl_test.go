package bridge

import (
	"strings"
	"testing"
)

// TestParseAMQPURLsSuggestsTheFix: the error says how to write the URL, and
// names the host without its credentials.
func TestParseAMQPURLsSuggestsTheFix(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    []string // substrings of the error
		notWant []string
	}{
		{name: "scheme without its colon", in: "amqp//guest:guest@host/",
			want: []string{"--amqp-url", `lacks its "://"`, "write amqp://guest:xxxxx@host/"}, notWant: []string{"amqp://amqp//"}},
		{name: "scheme with one slash", in: "amqp:/guest:guest@host/", want: []string{"write amqp://guest:xxxxx@host/"}},
		{name: "amqps without its colon", in: "amqps//u:p@host:5671/", want: []string{"write amqps://u:xxxxx@host:5671/"}},
		{name: "rabbit without its colon", in: "RABBIT//u:p@h1,u:p@h2/", want: []string{"write rabbit://u:xxxxx@h1"}},
		{name: "misspelt scheme after a good URL", in: "amqp://h1/,amqp//h2/", want: []string{"write amqp://h2/"}},
		{name: "no scheme at all", in: "u:p@host:5672", want: []string{"has no scheme", "write amqp://u:xxxxx@host:5672/"}},
		{name: "bad port names the host only", in: "amqp://guest:guest@host:port/",
			want: []string{`host "host:port"`}, notWant: []string{`host "guest`}},
		{name: "bad port of the second rabbit host", in: "rabbit://u:p@h1:5672,u:p@h2:x/",
			want: []string{`host "h2:x"`}, notWant: []string{`host "u:`}},
		{name: "unencoded '/' in a password", in: "amqp://u:a/b@h/", want: []string{"percent-encode it (%2F"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseAMQPURLs([]string{tt.in})
			if err == nil {
				t.Fatalf("ParseAMQPURLs(%q) = %q, want an error", tt.in, got)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\nwant it to contain %q", err, w)
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(err.Error(), w) {
					t.Errorf("error %q\nmust not contain %q", err, w)
				}
			}
		})
	}
}

// TestParseAMQPURLsNeverPrintsAPassword: whatever is wrong, the error holds
// no part of the password, even one with unencoded reserved characters.
func TestParseAMQPURLsNeverPrintsAPassword(t *testing.T) {
	tests := []struct {
		name, in, secret string
	}{
		{"missing colon", "amqp//guest:s3cret@host/", "s3cret"},
		{"bad port", "amqp://guest:s3cret@host:port/", "s3cret"},
		{"bad port, rabbit", "rabbit://u:s3cret@h1,u:s3cret@h2:port/", "s3cret"},
		{"unencoded '#' in the password", "amqp://u:s3c#ret@h/", "s3c"},
		{"unencoded '/' in the password", "amqp://u:s3c/ret@h/", "s3c"},
		{"unencoded '/' in the password, white space", "amqp://u:s3c/ret@h/v host", "s3c"},
		{"unencoded '?' in the password, bad ssl", "amqp://u:s3c?ret@h/?ssl=maybe", "s3c"},
		{"unencoded '/' in the second rabbit host's password", "rabbit://u:p@h1,u:s3c/ret@h2/", "s3c"},
		{"no scheme", "u:s3cret@host", "s3cret"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseAMQPURLs([]string{tt.in})
			if err == nil {
				t.Fatalf("ParseAMQPURLs(%q): no error", tt.in)
			}
			if strings.Contains(err.Error(), tt.secret) {
				t.Fatalf("error %q shows the password", err)
			}
		})
	}
}
