// Package scorm parses the imsmanifest.xml of SCORM 1.2 and 2004 packages into a JSON-ready Manifest.
package scorm

import (
	"errors"
	"fmt"
	"unicode/utf8"
)

// ErrInvalidPackage is wrapped by every error caused by the content of a package: a file that
// is not a zip, a missing or oversized imsmanifest.xml, malformed or hostile XML, or a manifest
// that breaks the SCORM rules. The messages name the problem, never a file system path, so
// callers can show them to the client (the HTTP layer answers 422 with them).
var ErrInvalidPackage = errors.New("invalid SCORM package")

// invalidError is an ErrInvalidPackage with a specific message. Its text is the message alone
// ("scorm: item \"a\" references missing resource \"b\""), without the sentinel's text appended,
// so that it reads well when shown to a client.
type invalidError struct{ msg string }

func (e *invalidError) Error() string { return "scorm: " + e.msg }

func (e *invalidError) Unwrap() error { return ErrInvalidPackage }

// invalidf returns an error wrapping ErrInvalidPackage with a formatted message.
func invalidf(format string, args ...any) error {
	return &invalidError{msg: fmt.Sprintf(format, args...)}
}

// maxQuoted bounds how much of a value taken from the package goes into an error message.
const maxQuoted = 64

// q quotes a value from the package for an error message, shortened to maxQuoted runes so a
// hostile package cannot make the message huge.
func q(s string) string {
	if utf8.RuneCountInString(s) > maxQuoted {
		r := []rune(s)
		s = string(r[:maxQuoted]) + "..."
	}
	return fmt.Sprintf("%q", s)
}

// Default limits used when the corresponding Options field is zero or negative.
const (
	DefaultMaxManifestBytes = 4 << 20
	DefaultMaxEntries       = 10000
)

// Options bounds the work done on one package. Zero values mean the defaults.
type Options struct {
	// MaxManifestBytes is the limit on the uncompressed size of imsmanifest.xml, whatever
	// size the zip declares. Zero or negative means DefaultMaxManifestBytes (4 MiB).
	MaxManifestBytes int64
	// MaxEntries is the limit on the number of entries in the zip's central directory. It is
	// checked before the directory is loaded, so a hostile entry count costs no memory. The
	// central directory may also take at most MaxEntries KiB. Zero or negative means
	// DefaultMaxEntries (10000).
	MaxEntries int
}

// withDefaults returns o with zero or negative fields replaced by the defaults.
func (o Options) withDefaults() Options {
	if o.MaxManifestBytes <= 0 {
		o.MaxManifestBytes = DefaultMaxManifestBytes
	}
	if o.MaxEntries <= 0 {
		o.MaxEntries = DefaultMaxEntries
	}
	return o
}

// Version values reported in Manifest.Version.
const (
	Version12      = "1.2"
	Version2004Ed2 = "2004 2nd Edition"
	Version2004Ed3 = "2004 3rd Edition"
	Version2004Ed4 = "2004 4th Edition"
	VersionUnknown = "unknown"
)

// Manifest is the parsed imsmanifest.xml of a package, shaped for the JSON response.
type Manifest struct {
	// Version is one of the Version constants, decided from SchemaVersion and, failing that,
	// from the ADL namespaces the manifest uses.
	Version string `json:"version"`
	// Schema is the raw text of <metadata><schema> ("ADL SCORM"), or empty.
	Schema string `json:"schema"`
	// SchemaVersion is the raw text of <metadata><schemaversion>, or empty.
	SchemaVersion string `json:"schema_version"`
	// Identifier is the manifest's identifier attribute.
	Identifier string `json:"identifier"`
	// Title is the default organization's title or, when that is empty, the title in the
	// manifest's inline LOM metadata.
	Title string `json:"title"`
	// XMLBase is the raw xml:base of the <manifest> element.
	XMLBase string `json:"xml_base,omitempty"`
	// ResourcesXMLBase is the raw xml:base of the <resources> element.
	ResourcesXMLBase string `json:"resources_xml_base,omitempty"`
	// DefaultOrganization is the identifier of the default organization: the default
	// attribute of <organizations>, or the first organization when it is absent.
	DefaultOrganization string `json:"default_organization"`
	// Organizations lists every organization in document order.
	Organizations []Organization `json:"organizations"`
	// Resources lists every resource in document order.
	Resources []Resource `json:"resources"`
}

// Organization is one <organization>: a tree of items.
type Organization struct {
	// Identifier is the organization's identifier attribute.
	Identifier string `json:"identifier"`
	// Title is the text of the organization's <title>, white space collapsed.
	Title string `json:"title"`
	// Sequencing is the organization's effective IMS SS sequencing (SCORM 2004), if any.
	Sequencing *Sequencing `json:"sequencing,omitempty"`
	// Items are the top-level items, each with its children.
	Items []Item `json:"items"`
}

// Item is one <item> of an organization.
type Item struct {
	// Identifier is the item's identifier attribute.
	Identifier string `json:"identifier"`
	// Title is the text of the item's <title>, white space collapsed.
	Title string `json:"title"`
	// Visible is the isvisible attribute; true when absent.
	Visible bool `json:"visible"`
	// Resource is the identifierref attribute: the identifier of the resource the item
	// launches. Empty for items that only group other items.
	Resource string `json:"resource,omitempty"`
	// Parameters is the raw parameters attribute.
	Parameters string `json:"parameters,omitempty"`
	// LaunchURL is the URL to launch, relative to the package root unless an xml:base or the
	// href is an absolute URL: the xml:base chain, the resource's href, then Parameters (the
	// rules are in launch.go). Empty when the item has no resource or the resource has no href.
	LaunchURL string `json:"launch_url,omitempty"`

	// MasteryScore is adlcp:masteryscore (SCORM 1.2), a number from 0 to 100.
	MasteryScore *float64 `json:"mastery_score,omitempty"`
	// MaxTimeAllowed is the raw adlcp:maxtimeallowed (SCORM 1.2).
	MaxTimeAllowed string `json:"max_time_allowed,omitempty"`
	// TimeLimitAction is the raw adlcp:timelimitaction (1.2) or adlcp:timeLimitAction (2004).
	TimeLimitAction string `json:"time_limit_action,omitempty"`
	// DataFromLMS is adlcp:datafromlms (1.2) or adlcp:dataFromLMS (2004).
	DataFromLMS string `json:"data_from_lms,omitempty"`
	// Prerequisites is the raw adlcp:prerequisites script (SCORM 1.2).
	Prerequisites string `json:"prerequisites,omitempty"`
	// CompletionThreshold is adlcp:completionThreshold (SCORM 2004).
	CompletionThreshold *CompletionThreshold `json:"completion_threshold,omitempty"`
	// Sequencing is the item's effective IMS SS sequencing (SCORM 2004), if any.
	Sequencing *Sequencing `json:"sequencing,omitempty"`

	// Children are the nested items, in document order; empty for a leaf.
	Children []Item `json:"children"`
}

// CompletionThreshold is adlcp:completionThreshold (SCORM 2004). The 4th Edition element form
// carries the three attributes (defaults false, 1.0, 1.0). The 3rd Edition text form
// (<adlcp:completionThreshold>0.8</adlcp:completionThreshold>) is reported as
// CompletedByMeasure true, MinProgressMeasure the text and ProgressWeight 1: in the 3rd
// Edition a threshold, when present, always decides completion from the progress measure,
// which is what completedByMeasure true means in the 4th.
type CompletionThreshold struct {
	// CompletedByMeasure tells whether completion is decided by progress measure.
	CompletedByMeasure bool `json:"completed_by_measure"`
	// MinProgressMeasure is the progress measure, from 0 to 1, at which the item is complete.
	MinProgressMeasure float64 `json:"min_progress_measure"`
	// ProgressWeight is the weight, from 0 to 1, of the item's progress in its parent's.
	ProgressWeight float64 `json:"progress_weight"`
}

// Sequencing is the part of an imsss:sequencing element the parser reports.
type Sequencing struct {
	// IDRef is the IDRef attribute naming an entry of imsss:sequencingCollection whose
	// content applies unless the element overrides it.
	IDRef string `json:"id_ref,omitempty"`
	// ControlMode is the effective imsss:controlMode: the element's own, else the one of the
	// collection entry named by IDRef. Nil when neither has one.
	ControlMode *ControlMode `json:"control_mode,omitempty"`
}

// ControlMode is imsss:controlMode. When the element is present its absent attributes take
// the IMS SS defaults: choice, choiceExit and both useCurrentAttempt* true; flow and
// forwardOnly false.
type ControlMode struct {
	// Choice is the choice attribute.
	Choice bool `json:"choice"`
	// ChoiceExit is the choiceExit attribute.
	ChoiceExit bool `json:"choice_exit"`
	// Flow is the flow attribute.
	Flow bool `json:"flow"`
	// ForwardOnly is the forwardOnly attribute.
	ForwardOnly bool `json:"forward_only"`
	// UseCurrentAttemptObjectiveInfo is the useCurrentAttemptObjectiveInfo attribute.
	UseCurrentAttemptObjectiveInfo bool `json:"use_current_attempt_objective_info"`
	// UseCurrentAttemptProgressInfo is the useCurrentAttemptProgressInfo attribute.
	UseCurrentAttemptProgressInfo bool `json:"use_current_attempt_progress_info"`
}

// Resource is one <resource>.
type Resource struct {
	// Identifier is the resource's identifier attribute.
	Identifier string `json:"identifier"`
	// Type is the type attribute, normally "webcontent".
	Type string `json:"type"`
	// ScormType is "sco" or "asset", from adlcp:scormtype (1.2) or adlcp:scormType (2004);
	// empty when the attribute is absent.
	ScormType string `json:"scorm_type"`
	// Href is the raw href attribute: the entry point, relative to the xml:base chain.
	Href string `json:"href,omitempty"`
	// XMLBase is the raw xml:base of the <resource> element.
	XMLBase string `json:"xml_base,omitempty"`
	// LaunchURL is Href resolved against the xml:base chain (without any item parameters).
	LaunchURL string `json:"launch_url,omitempty"`
	// Files are the href attributes of the <file> elements, as written.
	Files []string `json:"files"`
	// Dependencies are the identifierref attributes of the <dependency> elements.
	Dependencies []string `json:"dependencies"`
}

// Parse parses the bytes of an imsmanifest.xml. Every error it returns wraps ErrInvalidPackage.
// Parse does not bound the input's size, its caller does (ParseZip reads at most
// Options.MaxManifestBytes); nesting depth and element count are bounded here.
func Parse(xmlBytes []byte) (*Manifest, error) {
	root, err := readTree(xmlBytes)
	if err != nil {
		return nil, err
	}
	return buildManifest(root)
}
