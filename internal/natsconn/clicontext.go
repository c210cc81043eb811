package natsconn

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// CLIContext is the part of a nats command-line tool context that a
// connection uses: the JSON file <config>/nats/context/<name>.json that
// `nats context save` writes. The file names (creds, nkey, cert, key, ca) have
// a leading "~" expanded to the home directory, as the nats command does.
type CLIContext struct {
	// Name is the context's name, or the path it was read from.
	Name string `json:"-"`

	URL             string `json:"url"`
	Token           string `json:"token"`
	User            string `json:"user"`
	Password        string `json:"password"`
	Creds           string `json:"creds"`
	NKey            string `json:"nkey"`
	Cert            string `json:"cert"`
	Key             string `json:"key"`
	CA              string `json:"ca"`
	InboxPrefix     string `json:"inbox_prefix"`
	JetStreamDomain string `json:"jetstream_domain"`
}

// LoadCLIContext loads the context the nats command would use: the one
// NATS_CONTEXT names (a name, or the path of a .json file), else the one
// selected in <config>/nats/context.txt, where <config> is $XDG_CONFIG_HOME or
// $HOME/.config. getenv reads those variables. It returns nil and no error
// when no context is selected; a selected context that cannot be read or
// parsed is an error naming the file.
func LoadCLIContext(getenv func(string) string) (*CLIContext, error) {
	home := getenv("HOME")
	dir := getenv("XDG_CONFIG_HOME")
	if dir == "" {
		if home == "" {
			return nil, nil // no home: no context, as for a service account
		}
		dir = filepath.Join(home, ".config")
	}
	dir = filepath.Join(dir, "nats")
	name, from := strings.TrimSpace(getenv("NATS_CONTEXT")), "NATS_CONTEXT"
	if name == "" {
		b, err := os.ReadFile(filepath.Join(dir, "context.txt"))
		if os.IsNotExist(err) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("nats context: %w", err)
		}
		if name = strings.TrimSpace(string(b)); name == "" {
			return nil, nil
		}
		from = filepath.Join(dir, "context.txt")
	}
	path := filepath.Join(dir, "context", name+".json")
	if strings.HasSuffix(name, ".json") && strings.ContainsRune(name, os.PathSeparator) {
		path = name
	} else if strings.ContainsAny(name, `/\`) || name == "." || name == ".." {
		return nil, fmt.Errorf("nats context %q (from %s): a context name has no path separator; give a name or the path of a .json file", name, from)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("nats context %q (from %s): %w", name, from, err)
	}
	c := &CLIContext{Name: name}
	if err := json.Unmarshal(b, c); err != nil {
		return nil, fmt.Errorf("nats context %q: %s: %w", name, path, err)
	}
	for _, p := range []*string{&c.Creds, &c.NKey, &c.Cert, &c.Key, &c.CA} {
		if home != "" && (*p == "~" || strings.HasPrefix(*p, "~/")) {
			*p = filepath.Join(home, strings.TrimPrefix(*p, "~"))
		}
	}
	return c, nil
}
