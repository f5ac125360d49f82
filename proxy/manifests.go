package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"

	"github.com/cachecar/cachecar/cachepolicy"
	"github.com/cachecar/cachecar/internal/scorm"
)

// FileReader reads through the cache with a caller's loader; *cachepolicy.Resolver is the real one.
type FileReader interface {
	GetFunc(ctx context.Context, p *cachepolicy.Policy, vals []string, load cachepolicy.LoadFunc) (cachepolicy.Result, error)
}

// Manifests configures GET /v1/manifests/{filename}.
type Manifests struct {
	// Dir holds the SCORM packages. Files are opened through os.Root, so no name and no symlink
	// inside Dir can reach a file outside it.
	Dir string
	// Policy renders "scorm:manifest:{filename}:{mtime}" and holds the TTL; it has no SQL.
	Policy *cachepolicy.Policy
	// Limits bound the parse of one package.
	Limits scorm.Options
	// Reader caches the parses.
	Reader FileReader
}

// filenameRE is what a package name may look like: it becomes part of a key and a path, so no
// separators, no leading dot, no NUL, nothing but a plain name ending in .zip.
var filenameRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,195}\.zip$`)

// verdictPrefix starts a cached "invalid package" verdict; a parsed manifest never starts so.
var verdictPrefix = []byte(`{"error":`)

type manifestRoute struct {
	cfg  *Manifests
	mu   sync.Mutex
	root *os.Root // opened on first use, so that a directory created after start-up works
}

func (m *manifestRoute) openRoot() (*os.Root, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.root == nil {
		r, err := os.OpenRoot(m.cfg.Dir)
		if err != nil {
			return nil, err
		}
		m.root = r
	}
	return m.root, nil
}

// manifest serves a parsed SCORM manifest. A package that fails to parse answers 422, and that
// verdict is cached under the same key as a result would be, so a bad package is parsed once per
// version of the file, not on every request.
func (s *Server) manifest() http.Handler {
	m := &manifestRoute{cfg: s.opts.Manifests}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := query(r, nil); err != nil {
			writeError(w, r, s, err)
			return
		}
		name := r.PathValue("filename")
		if !filenameRE.MatchString(name) || strings.Contains(name, "..") {
			writeError(w, r, s, badRequest("bad_filename",
				"filename must be a plain file name ending in .zip: letters, digits, '.', '_' and '-', not starting with a dot, no '..', no path"))
			return
		}
		root, err := m.openRoot()
		if err != nil {
			s.log.Error().Err(err).Msg("manifests directory unavailable")
			writeJSONError(w, http.StatusServiceUnavailable, "manifests_unavailable", "the manifests directory is not available")
			return
		}
		fi, err := root.Stat(name)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			writeJSONError(w, http.StatusNotFound, "not_found", "no such package")
			return
		case err != nil:
			// os.Root refuses names and symlinks that lead outside the directory.
			writeError(w, r, s, badRequest("bad_filename", "filename does not resolve to a file inside the manifests directory"))
			return
		case !fi.Mode().IsRegular():
			writeJSONError(w, http.StatusNotFound, "not_found", "no such package")
			return
		}
		vals := []string{name, strconv.FormatInt(fi.ModTime().Unix(), 10)}
		res, err := m.cfg.Reader.GetFunc(r.Context(), m.cfg.Policy, vals, func(ctx context.Context) ([]byte, error) {
			return parsePackage(root, name, m.cfg.Limits)
		})
		if err != nil {
			writeError(w, r, s, err)
			return
		}
		if bytes.HasPrefix(res.Body, verdictPrefix) {
			h := w.Header()
			setCacheHeaders(h, res)
			h.Set("Age", strconv.FormatInt(max(int64(res.Age.Seconds()), 0), 10))
			h.Set("Content-Type", "application/json")
			h.Set("Content-Length", strconv.Itoa(len(res.Body)))
			w.WriteHeader(http.StatusUnprocessableEntity)
			w.Write(res.Body)
			return
		}
		writeResult(w, r, res.Body, res, true)
	})
}

// parsePackage opens name inside root (its own handle: a single-flight load outlives the request
// that started it) and returns the manifest's JSON, or the JSON of an invalid-package verdict.
func parsePackage(root *os.Root, name string, limits scorm.Options) ([]byte, error) {
	f, err := root.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	man, err := scorm.ParseZip(f, fi.Size(), limits)
	if errors.Is(err, scorm.ErrInvalidPackage) {
		return json.Marshal(errorBody{errorDetail{Code: "invalid_package", Message: err.Error()}})
	}
	if err != nil {
		return nil, err
	}
	return json.Marshal(man)
}
