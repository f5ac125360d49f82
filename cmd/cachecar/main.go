// Command cachecar is a caching sidecar for PostgreSQL reads.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/cachecar/cachecar/configs"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// configs.Getenv tells a variable set to the empty string from an unset one.
	err := run(ctx, os.Args[1:], configs.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(exitCode(err, os.Stderr))
}
