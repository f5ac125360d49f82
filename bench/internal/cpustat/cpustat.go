// Package cpustat reads the machine's CPU time from /proc/stat (Linux), for the load
// generators' "CPU busy during the run" figures.
package cpustat

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Times is the machine's CPU time so far, in clock ticks: all of it, and idle plus iowait.
type Times struct{ Total, Idle uint64 }

// Read reads the first line of /proc/stat, as bench/run.sh's cpu_busy does.
func Read() (Times, error) {
	var t Times
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return t, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 6 || f[0] != "cpu" {
		return t, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	for i, v := range f[1:] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return t, fmt.Errorf("/proc/stat: %w", err)
		}
		t.Total += n
		if i == 3 || i == 4 { // idle, iowait
			t.Idle += n
		}
	}
	return t, nil
}

// BusyPercent is the share of CPU time between before and after that was not idle, as a whole
// percentage, and false when no time passed.
func BusyPercent(before, after Times) (string, bool) {
	total := after.Total - before.Total
	if total == 0 {
		return "", false
	}
	return fmt.Sprintf("%.0f", 100*float64(total-(after.Idle-before.Idle))/float64(total)), true
}
