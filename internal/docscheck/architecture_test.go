package docscheck

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// root is the repository, from this package's directory.
const root = "../.."

var (
	// A table row of a step: | n | `file` | `Func`, `Type.Method` | text |
	stepRow = regexp.MustCompile("^\\|\\s*\\d+\\s*\\|\\s*`([^`]+)`\\s*\\|([^|]*)\\|")
	quoted  = regexp.MustCompile("`([^`]+)`")
	goFile  = regexp.MustCompile("`([a-z0-9_/]+\\.go)`")
)

// TestArchitectureNamesExist: every file docs/ARCHITECTURE.md names exists,
// and every function of a step's Functions column is declared in that
// step's file (Name for a function, Type.Method for a method).
func TestArchitectureNamesExist(t *testing.T) {
	doc, err := os.ReadFile(filepath.Join(root, "docs", "ARCHITECTURE.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range goFile.FindAllStringSubmatch(string(doc), -1) {
		if _, err := os.Stat(filepath.Join(root, m[1])); err != nil {
			t.Errorf("docs/ARCHITECTURE.md names %s: %v", m[1], err)
		}
	}
	steps := 0
	for _, line := range strings.Split(string(doc), "\n") {
		m := stepRow.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		steps++
		file := m[1]
		decls, err := declared(filepath.Join(root, file))
		if err != nil {
			t.Errorf("step %q: %v", line, err)
			continue
		}
		names := quoted.FindAllStringSubmatch(m[2], -1)
		if len(names) == 0 {
			t.Errorf("step of %s names no function", file)
		}
		for _, n := range names {
			if !decls[n[1]] {
				t.Errorf("docs/ARCHITECTURE.md: %s does not declare %s", file, n[1])
			}
		}
	}
	if steps < 10 {
		t.Fatalf("docs/ARCHITECTURE.md: %d steps found, want the whole path", steps)
	}
}

// declared lists the functions ("Name") and methods ("Type.Method") of a Go
// file.
func declared(path string) (map[string]bool, error) {
	f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.SkipObjectResolution)
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, d := range f.Decls {
		fn, ok := d.(*ast.FuncDecl)
		if !ok {
			continue
		}
		name := fn.Name.Name
		if fn.Recv != nil && len(fn.Recv.List) == 1 {
			typ := fn.Recv.List[0].Type
			if star, ok := typ.(*ast.StarExpr); ok {
				typ = star.X
			}
			if id, ok := typ.(*ast.Ident); ok {
				name = id.Name + "." + name
			}
		}
		out[name] = true
	}
	return out, nil
}
