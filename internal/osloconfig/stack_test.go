package osloconfig

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// python is Debian's interpreter, which has oslo.config (python3-oslo.config).
const python = "/usr/bin/python3"

// reference reads paths with oslo.config itself (testdata/oslo_reference.py):
// every option the files set, as a single- and as a multi-valued option.
type reference struct {
	Single map[string]map[string]any `json:"single"`
	Multi  map[string]map[string]any `json:"multi"`
}

func readReference(t *testing.T, paths []string) reference {
	t.Helper()
	if _, err := os.Stat(python); err != nil {
		t.Fatalf("%s with python3-oslo.config is required: %v", python, err)
	}
	out, err := exec.Command(python, append([]string{"testdata/oslo_reference.py"}, paths...)...).Output()
	if err != nil {
		msg := ""
		if ee, ok := err.(*exec.ExitError); ok {
			msg = string(ee.Stderr)
		}
		t.Fatalf("oslo.config reference: %v\n%s", err, msg)
	}
	var ref reference
	if err := json.Unmarshal(out, &ref); err != nil {
		t.Fatalf("oslo.config reference: %v\n%s", err, out)
	}
	return ref
}

// TestReadsLikeOsloConfig reads each set of files with Stack and with
// oslo.config and compares the value of every option they set, substitutions
// included.
func TestReadsLikeOsloConfig(t *testing.T) {
	for _, tc := range []struct {
		name  string
		paths []string
	}{
		{"oslo.config syntax", []string{"testdata/syntax.conf"}},
		{"kolla-ansible keystone.conf", []string{"testdata/kolla-ansible/keystone.conf"}},
		{"kolla-ansible nova.conf", []string{"testdata/kolla-ansible/nova.conf"}},
		{"openstack-helm keystone.conf", []string{"testdata/openstack-helm/keystone.conf"}},
		{"openstack-helm nova.conf and nova.conf.d", []string{"testdata/openstack-helm/nova.conf", "testdata/openstack-helm/nova.conf.d"}},
		{"later file overrides earlier", []string{"testdata/kolla-ansible/nova.conf", "testdata/openstack-helm/nova.conf"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ref := readReference(t, tc.paths)
			s, err := Load(tc.paths)
			if err != nil {
				t.Fatal(err)
			}
			compared := 0
			for section, opts := range ref.Single {
				for option, want := range opts {
					v, ok, err := s.Get(section, option)
					if m, isErr := want.(map[string]any); isErr {
						if err == nil {
							t.Errorf("[%s] %s: oslo.config fails (%v), Stack gave %q", section, option, m["error"], v.Text)
						}
						continue
					}
					if err != nil || !ok || v.Text != want {
						t.Errorf("[%s] %s = %q (ok %v, err %v), oslo.config reads %q", section, option, v.Text, ok, err, want)
					}
					compared++
					all, err := s.All(section, option)
					if err != nil || strings.Contains(rawText(s, section, option), "$") {
						continue // every option registered as multi-valued substitutes lists: compare plain values only
					}
					var got []string
					for _, a := range all {
						got = append(got, a.Text)
					}
					var wantAll []string
					for _, w := range ref.Multi[section][option].([]any) {
						wantAll = append(wantAll, w.(string))
					}
					if !slices.Equal(got, wantAll) {
						t.Errorf("[%s] %s: all values %q, oslo.config reads %q", section, option, got, wantAll)
					}
				}
			}
			if compared < 5 {
				t.Fatalf("only %d options compared", compared)
			}
		})
	}
}

// rawText is the last value of an option as written, before substitution.
func rawText(s *Stack, section, option string) string {
	vals := s.raw(name{section, option})
	if len(vals) == 0 {
		return ""
	}
	return vals[len(vals)-1].Text
}

func TestSubstitutionErrors(t *testing.T) {
	for _, tc := range []struct {
		name, conf, want string
	}{
		{"unset option", "[DEFAULT]\ntransport_url = rabbit://u:$pw@h/\n",
			"[DEFAULT] transport_url: refers to $pw, which these files do not set: write the value out in full, or escape a literal '$' as '$$'"},
		{"DEFAULT as a group", "[DEFAULT]\nh = x\n[a]\nb = ${DEFAULT.h}\n",
			"[a] b: oslo.config cannot refer to [DEFAULT] as ${DEFAULT.h}: write $h"},
		{"loop", "[DEFAULT]\na = $b\nb = $a\n", "its $-substitutions refer to each other in a loop"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := stackOf(t, tc.conf)
			sec, opt := "DEFAULT", "transport_url"
			switch tc.name {
			case "DEFAULT as a group":
				sec, opt = "a", "b"
			case "loop":
				opt = "a"
			}
			_, _, err := s.Get(sec, opt)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestLoadErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.conf")
	if err := os.WriteFile(bad, []byte("[DEFAULT]\nno delimiter here\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		paths []string
		want  string
	}{
		{"missing file", []string{filepath.Join(dir, "absent.conf")}, "absent.conf: no such file"},
		{"not an oslo.config file", []string{bad}, "bad.conf: not an oslo.config file"},
		{"empty directory", []string{t.TempDir()}, "no *.conf file there"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Load(tc.paths)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "--oslo-config") {
				t.Fatalf("error %v, want --oslo-config ... %q", err, tc.want)
			}
		})
	}
}

// stackOf loads one file holding conf; it is named keystone.conf.
func stackOf(t *testing.T, conf string) *Stack {
	t.Helper()
	p := filepath.Join(t.TempDir(), "keystone.conf")
	if err := os.WriteFile(p, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Load([]string{p})
	if err != nil {
		t.Fatal(err)
	}
	return s
}
