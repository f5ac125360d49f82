//go:build !linux

package main

import (
	"context"
	"errors"
)

// runLoad needs epoll (see loop_linux.go).
func runLoad(ctx context.Context, o options, reqs [][]byte, rng func(n int) int) (*result, error) {
	return nil, errors.New("bench/rate runs on Linux only (epoll)")
}
