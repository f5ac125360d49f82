// Command scrape prints what bench/run.sh compares of a cachecar's health port, as one line:
// the lookup, in-process-hit and PostgreSQL-query counters of /metrics summed over their
// labels, the in-process tier's gauges, and the tier's configured size from /health/detailed:
//
//	SCRAPE lookups_hit=N lookups_miss=N ... tier_entries=N tier_bytes=N tier_max_bytes=N|n/a
//
// The script reads it before and after a load and subtracts.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/cachecar/cachecar/bench/internal/ccmetrics"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "scrape:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("scrape", flag.ContinueOnError)
	fs.SetOutput(stderr)
	health := fs.String("health", "", "base URL of cachecar's health port, e.g. http://127.0.0.1:8081")
	timeout := fs.Duration("timeout", 5*time.Second, "upper bound of both requests")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *health == "" || fs.NArg() > 0 {
		return fmt.Errorf("usage: scrape -health URL")
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	client := &http.Client{}
	snap, err := ccmetrics.Scrape(ctx, client, *health)
	if err != nil {
		return err
	}
	maxBytes := "n/a" // no tier section: no shared cache
	if t, ok, err := ccmetrics.TierConfig(ctx, client, *health); err != nil {
		return err
	} else if ok {
		maxBytes = strconv.FormatUint(t.MaxBytes, 10)
	}
	fmt.Fprintf(stdout, "SCRAPE %s tier_max_bytes=%s\n", snap.Fields(), maxBytes)
	return nil
}
