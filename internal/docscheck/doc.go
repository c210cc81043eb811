// Package docscheck holds the tests that keep docs/ in step with the code:
// the files and functions docs/ARCHITECTURE.md names must exist.
package docscheck
