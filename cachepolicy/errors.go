package cachepolicy

import "errors"

// Errors a read can end with. The read API maps each to one HTTP status in one place.
var (
	// ErrNotFound: the loader found no row (404).
	ErrNotFound = errors.New("not found")
	// ErrUnavailable: PostgreSQL could not be reached and nothing usable was cached (503).
	ErrUnavailable = errors.New("database unavailable")
	// ErrTimeout: the load did not finish within the query timeout (504).
	ErrTimeout = errors.New("database timeout")
	// ErrOverloaded: the bulkhead of database loads is full (503 with Retry-After).
	ErrOverloaded = errors.New("too many database loads at once")
	// ErrClosed: the resolver was closed (a shutdown past its timeout) while the load ran; it
	// says nothing about the database (503).
	ErrClosed = errors.New("shutting down: load cancelled")
)

// InputError is a bad request: an id or parameter that fails its rule (400).
type InputError struct {
	Code    string
	Message string
}

func (e *InputError) Error() string { return e.Message }
