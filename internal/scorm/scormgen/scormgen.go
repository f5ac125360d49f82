// Package scormgen generates small, deterministic SCORM zips of our own: the demo courses and test fixtures.
package scormgen

import (
	"archive/zip"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"
)

// Versions a Spec may ask for.
const (
	Version12      = "1.2"
	Version2004Ed2 = "2004 2nd Edition"
	Version2004Ed3 = "2004 3rd Edition"
	Version2004Ed4 = "2004 4th Edition"
)

// Spec describes one package. Strings are written as they are (escaped); an empty optional
// string leaves its element or attribute out, so fixtures can exercise parser defaults.
type Spec struct {
	// Filename is the zip's name in the demo directory; Build does not use it.
	Filename string
	// Version is one of the Version constants; it picks namespaces, schemaversion and the
	// spelling of the adlcp extensions.
	Version string
	// Identifier is the manifest's identifier attribute.
	Identifier string
	// XMLBase is the xml:base of <manifest>.
	XMLBase string
	// ResourcesXMLBase is the xml:base of <resources>.
	ResourcesXMLBase string
	// DefaultOrganization is the default attribute of <organizations>; empty leaves it out.
	DefaultOrganization string
	// Organizations are written in order.
	Organizations []Organization
	// Resources are written in order; their files go into the zip.
	Resources []Resource
	// SequencingCollection is the imsss:sequencingCollection (SCORM 2004); each entry needs
	// an ID.
	SequencingCollection []Sequencing
	// Manifest, when set, is written verbatim as imsmanifest.xml instead of the generated
	// one (the resources' files are still written), for fixtures the generator cannot
	// express.
	Manifest []byte
}

// Organization is one <organization>.
type Organization struct {
	// Identifier is the identifier attribute.
	Identifier string
	// Title is the text of <title>.
	Title string
	// Items are the top-level items.
	Items []Item
	// Sequencing is the organization's imsss:sequencing (SCORM 2004).
	Sequencing *Sequencing
}

// Item is one <item>, with its children.
type Item struct {
	// Identifier is the identifier attribute.
	Identifier string
	// Title is the text of <title>.
	Title string
	// Resource is the identifierref attribute.
	Resource string
	// Parameters is the parameters attribute.
	Parameters string
	// Hidden writes isvisible="false".
	Hidden bool

	// MasteryScore is adlcp:masteryscore (SCORM 1.2 only).
	MasteryScore string
	// MaxTimeAllowed is adlcp:maxtimeallowed (SCORM 1.2 only).
	MaxTimeAllowed string
	// Prerequisites is adlcp:prerequisites (SCORM 1.2 only).
	Prerequisites string
	// TimeLimitAction is adlcp:timelimitaction (1.2) or adlcp:timeLimitAction (2004).
	TimeLimitAction string
	// DataFromLMS is adlcp:datafromlms (1.2) or adlcp:dataFromLMS (2004).
	DataFromLMS string

	// CompletionThreshold writes the 4th Edition element form (SCORM 2004 only).
	CompletionThreshold *CompletionThreshold
	// CompletionThresholdText writes the 3rd Edition text form (SCORM 2004 only).
	CompletionThresholdText string
	// Sequencing is the item's imsss:sequencing (SCORM 2004 only).
	Sequencing *Sequencing

	// Children are the nested items.
	Children []Item
}

// CompletionThreshold holds the attributes of adlcp:completionThreshold; empty ones are left out.
type CompletionThreshold struct {
	// CompletedByMeasure is the completedByMeasure attribute.
	CompletedByMeasure string
	// MinProgressMeasure is the minProgressMeasure attribute.
	MinProgressMeasure string
	// ProgressWeight is the progressWeight attribute.
	ProgressWeight string
}

// Sequencing is an imsss:sequencing element: ID inside a sequencing collection, IDRef on an
// item or organization.
type Sequencing struct {
	// ID is the ID attribute, for entries of a sequencing collection.
	ID string
	// IDRef is the IDRef attribute, naming a sequencing collection entry.
	IDRef string
	// ControlMode is the imsss:controlMode child, if not nil.
	ControlMode *ControlMode
}

// ControlMode holds the attributes of imsss:controlMode ("true", "false"); empty ones are left out.
type ControlMode struct {
	// Choice is the choice attribute.
	Choice string
	// ChoiceExit is the choiceExit attribute.
	ChoiceExit string
	// Flow is the flow attribute.
	Flow string
	// ForwardOnly is the forwardOnly attribute.
	ForwardOnly string
}

// Resource is one <resource>.
type Resource struct {
	// Identifier is the identifier attribute.
	Identifier string
	// Type defaults to "webcontent".
	Type string
	// ScormType is "sco" or "asset" (empty leaves the attribute out).
	ScormType string
	// Href is the href attribute, the entry point; its file is always in the zip.
	Href string
	// XMLBase is the xml:base attribute.
	XMLBase string
	// Files become <file> elements and zip entries. The Href file (without query or fragment)
	// is listed first unless Files names it.
	Files []File
	// Dependencies are the identifierref attributes of <dependency> elements.
	Dependencies []string
}

// File is a file of a resource: Href as the manifest writes it, relative to the resource's
// xml:base chain. Files under an absolute base or with an absolute href are listed but not
// put in the zip (they live elsewhere).
type File struct {
	// Href is the href attribute.
	Href string
	// Content is the file's bytes; nil generates a small page fitting the extension.
	Content []byte
}

// modTime is the modification time of every zip entry, so that builds are byte for byte
// reproducible.
func modTime() time.Time { return time.Date(2024, 1, 1, 9, 0, 0, 0, time.UTC) }

// Build returns the zip of the package s describes.
func Build(s Spec) ([]byte, error) {
	manifest := s.Manifest
	if manifest == nil {
		var err error
		if manifest, err = writeManifest(s); err != nil {
			return nil, fmt.Errorf("build %s: %w", s.Identifier, err)
		}
	}
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	if err := addEntry(zw, "imsmanifest.xml", manifest); err != nil {
		return nil, err
	}
	seen := map[string]bool{"imsmanifest.xml": true}
	titles := itemTitles(s)
	for _, r := range s.Resources {
		for _, f := range resourceFiles(r) {
			name, inZip, err := zipPath(s, r, f.Href)
			if err != nil {
				return nil, fmt.Errorf("build %s: resource %s: %w", s.Identifier, r.Identifier, err)
			}
			if !inZip || seen[name] {
				continue
			}
			seen[name] = true
			content := f.Content
			if content == nil {
				content = generatedFile(s, r, name, titles[r.Identifier])
			}
			if err := addEntry(zw, name, content); err != nil {
				return nil, err
			}
		}
	}
	if err := zw.Close(); err != nil {
		return nil, fmt.Errorf("build %s: close zip: %w", s.Identifier, err)
	}
	return buf.Bytes(), nil
}

// addEntry writes one deflated entry with the fixed modification time.
func addEntry(zw *zip.Writer, name string, content []byte) error {
	w, err := zw.CreateHeader(&zip.FileHeader{Name: name, Method: zip.Deflate, Modified: modTime()})
	if err != nil {
		return fmt.Errorf("add %s: %w", name, err)
	}
	if _, err := w.Write(content); err != nil {
		return fmt.Errorf("add %s: %w", name, err)
	}
	return nil
}

// resourceFiles returns the resource's files with its href first when Files does not list it.
func resourceFiles(r Resource) []File {
	files := r.Files
	if r.Href == "" {
		return files
	}
	href, _, _ := strings.Cut(r.Href, "?")
	href, _, _ = strings.Cut(href, "#")
	for _, f := range files {
		if f.Href == href {
			return files
		}
	}
	return append([]File{{Href: href}}, files...)
}

// zipPath returns where a file of resource r goes in the zip: the xml:base chain joined with
// href. inZip is false when the chain or the href is an absolute URL or path. The generator
// only writes directory bases, so plain path joining is its whole resolution rule.
func zipPath(s Spec, r Resource, href string) (name string, inZip bool, err error) {
	parts := []string{s.XMLBase, s.ResourcesXMLBase, r.XMLBase, href}
	for i := len(parts) - 1; i >= 0; i-- {
		if strings.Contains(parts[i], ":") || strings.HasPrefix(parts[i], "/") {
			return "", false, nil
		}
	}
	name = path.Join(parts...)
	if name == "." || !filepath.IsLocal(name) || strings.Contains(name, `\`) {
		return "", false, fmt.Errorf("file %q is outside the package", href)
	}
	return name, true, nil
}

// itemTitles maps each resource to the title of the first item that launches it.
func itemTitles(s Spec) map[string]string {
	titles := make(map[string]string)
	var walk func([]Item)
	walk = func(items []Item) {
		for _, it := range items {
			if _, ok := titles[it.Resource]; !ok && it.Resource != "" {
				titles[it.Resource] = it.Title
			}
			walk(it.Children)
		}
	}
	for _, o := range s.Organizations {
		walk(o.Items)
	}
	return titles
}

// WriteDemo writes the demo packages (see Demo) into dir, creating it, and returns their file
// names. A file whose content is already right is left alone, so re-runs keep modification
// times (and the manifest cache keys built from them) stable. Files are replaced by rename,
// so a reader never sees half a zip.
func WriteDemo(dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("write demo: %w", err)
	}
	var names []string
	for _, s := range Demo() {
		if s.Filename == "" || filepath.Base(s.Filename) != s.Filename {
			return nil, fmt.Errorf("write demo: file name %q is not a bare name", s.Filename)
		}
		b, err := Build(s)
		if err != nil {
			return nil, fmt.Errorf("write demo: %w", err)
		}
		if err := writeIfChanged(filepath.Join(dir, s.Filename), b); err != nil {
			return nil, fmt.Errorf("write demo %s: %w", s.Filename, err)
		}
		names = append(names, s.Filename)
	}
	return names, nil
}

// writeIfChanged writes b to name through a temporary file and a rename, unless name already
// holds exactly b.
func writeIfChanged(name string, b []byte) error {
	old, err := os.ReadFile(name)
	if err == nil && bytes.Equal(old, b) {
		return nil
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(name), ".scormgen-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // fails harmlessly once renamed
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), name)
}
