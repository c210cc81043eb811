package main

import (
	"context"
	"errors"
	"io"
)

func runAgent(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	return errors.New("not yet")
}

func runAllInOne(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) error {
	return errors.New("not yet")
}
