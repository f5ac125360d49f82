package scormgen

import (
	"encoding/xml"
	"fmt"
	"strings"
)

// Namespaces and schemaLocation values written into manifests.
const (
	nsCP12      = "http://www.imsproject.org/xsd/imscp_rootv1p1p2"
	nsCP2004    = "http://www.imsglobal.org/xsd/imscp_v1p1"
	nsADLCP12   = "http://www.adlnet.org/xsd/adlcp_rootv1p2"
	nsADLCP2004 = "http://www.adlnet.org/xsd/adlcp_v1p3"
	nsADLSEQ    = "http://www.adlnet.org/xsd/adlseq_v1p3"
	nsADLNAV    = "http://www.adlnet.org/xsd/adlnav_v1p3"
	nsIMSSS     = "http://www.imsglobal.org/xsd/imsss"
	nsXSI       = "http://www.w3.org/2001/XMLSchema-instance"
)

// manifestWriter accumulates the XML of one manifest.
type manifestWriter struct {
	b      strings.Builder
	is2004 bool
}

// writeManifest returns the imsmanifest.xml for s.
func writeManifest(s Spec) ([]byte, error) {
	w := &manifestWriter{}
	var schemaVersion string
	switch s.Version {
	case Version12:
		schemaVersion = "1.2"
	case Version2004Ed2:
		schemaVersion = "CAM 1.3"
	case Version2004Ed3, Version2004Ed4:
		schemaVersion = s.Version
	default:
		return nil, fmt.Errorf("unknown SCORM version %q", s.Version)
	}
	w.is2004 = s.Version != Version12
	if err := w.check(s); err != nil {
		return nil, err
	}

	w.line(0, `<?xml version="1.0" encoding="UTF-8"?>`)
	root := []string{"identifier", s.Identifier, "version", "1.0"}
	if w.is2004 {
		root = append(root, "xmlns", nsCP2004, "xmlns:adlcp", nsADLCP2004, "xmlns:adlseq", nsADLSEQ,
			"xmlns:adlnav", nsADLNAV, "xmlns:imsss", nsIMSSS, "xmlns:xsi", nsXSI,
			"xsi:schemaLocation", nsCP2004+" imscp_v1p1.xsd "+nsADLCP2004+" adlcp_v1p3.xsd "+
				nsADLSEQ+" adlseq_v1p3.xsd "+nsADLNAV+" adlnav_v1p3.xsd "+nsIMSSS+" imsss_v1p0.xsd")
	} else {
		root = append(root, "xmlns", nsCP12, "xmlns:adlcp", nsADLCP12, "xmlns:xsi", nsXSI,
			"xsi:schemaLocation", nsCP12+" imscp_rootv1p1p2.xsd "+nsADLCP12+" adlcp_rootv1p2.xsd")
	}
	root = append(root, "xml:base", s.XMLBase)
	w.open(0, "manifest", root...)
	w.open(1, "metadata")
	w.text(2, "schema", "ADL SCORM")
	w.text(2, "schemaversion", schemaVersion)
	w.close(1, "metadata")

	w.open(1, "organizations", "default", s.DefaultOrganization)
	for _, o := range s.Organizations {
		w.open(2, "organization", "identifier", o.Identifier)
		w.text(3, "title", o.Title)
		for _, it := range o.Items {
			w.item(3, it)
		}
		w.sequencing(3, o.Sequencing)
		w.close(2, "organization")
	}
	w.close(1, "organizations")

	w.open(1, "resources", "xml:base", s.ResourcesXMLBase)
	for _, r := range s.Resources {
		typ := r.Type
		if typ == "" {
			typ = "webcontent"
		}
		scormType := "adlcp:scormtype"
		if w.is2004 {
			scormType = "adlcp:scormType"
		}
		w.open(2, "resource", "identifier", r.Identifier, "type", typ, scormType, r.ScormType,
			"href", r.Href, "xml:base", r.XMLBase)
		for _, f := range resourceFiles(r) {
			w.empty(3, "file", "href", f.Href)
		}
		for _, d := range r.Dependencies {
			w.empty(3, "dependency", "identifierref", d)
		}
		w.close(2, "resource")
	}
	w.close(1, "resources")

	if len(s.SequencingCollection) > 0 {
		w.open(1, "imsss:sequencingCollection")
		for _, seq := range s.SequencingCollection {
			w.sequencing(2, &seq)
		}
		w.close(1, "imsss:sequencingCollection")
	}
	w.close(0, "manifest")
	return []byte(w.b.String()), nil
}

// check refuses extensions the spec's version does not have.
func (w *manifestWriter) check(s Spec) error {
	if w.is2004 {
		var err error
		walkItems(s, func(it Item) {
			if err == nil && (it.MasteryScore != "" || it.MaxTimeAllowed != "" || it.Prerequisites != "") {
				err = fmt.Errorf("item %q: mastery score, max time allowed and prerequisites are SCORM 1.2 only", it.Identifier)
			}
		})
		return err
	}
	if len(s.SequencingCollection) > 0 {
		return fmt.Errorf("sequencing needs SCORM 2004")
	}
	var err error
	for _, o := range s.Organizations {
		if o.Sequencing != nil && err == nil {
			err = fmt.Errorf("organization %q: sequencing needs SCORM 2004", o.Identifier)
		}
	}
	walkItems(s, func(it Item) {
		if err == nil && (it.CompletionThreshold != nil || it.CompletionThresholdText != "" || it.Sequencing != nil) {
			err = fmt.Errorf("item %q: completion threshold and sequencing need SCORM 2004", it.Identifier)
		}
	})
	return err
}

// walkItems calls f for every item of every organization, parents first.
func walkItems(s Spec, f func(Item)) {
	var walk func([]Item)
	walk = func(items []Item) {
		for _, it := range items {
			f(it)
			walk(it.Children)
		}
	}
	for _, o := range s.Organizations {
		walk(o.Items)
	}
}

// item writes an <item> and its children, with the extensions in the order the schemas want.
func (w *manifestWriter) item(depth int, it Item) {
	visible := ""
	if it.Hidden {
		visible = "false"
	}
	w.open(depth, "item", "identifier", it.Identifier, "identifierref", it.Resource,
		"isvisible", visible, "parameters", it.Parameters)
	w.text(depth+1, "title", it.Title)
	for _, c := range it.Children {
		w.item(depth+1, c)
	}
	d := depth + 1
	if w.is2004 {
		w.text(d, "adlcp:timeLimitAction", it.TimeLimitAction)
		w.text(d, "adlcp:dataFromLMS", it.DataFromLMS)
		w.text(d, "adlcp:completionThreshold", it.CompletionThresholdText)
		if ct := it.CompletionThreshold; ct != nil {
			w.empty(d, "adlcp:completionThreshold", "completedByMeasure", ct.CompletedByMeasure,
				"minProgressMeasure", ct.MinProgressMeasure, "progressWeight", ct.ProgressWeight)
		}
		w.sequencing(d, it.Sequencing)
	} else {
		w.text(d, "adlcp:prerequisites", it.Prerequisites)
		w.text(d, "adlcp:maxtimeallowed", it.MaxTimeAllowed)
		w.text(d, "adlcp:timelimitaction", it.TimeLimitAction)
		w.text(d, "adlcp:datafromlms", it.DataFromLMS)
		w.text(d, "adlcp:masteryscore", it.MasteryScore)
	}
	w.close(depth, "item")
}

// sequencing writes an imsss:sequencing element, if s is not nil.
func (w *manifestWriter) sequencing(depth int, s *Sequencing) {
	if s == nil {
		return
	}
	attrs := []string{"ID", s.ID, "IDRef", s.IDRef}
	if s.ControlMode == nil {
		w.empty(depth, "imsss:sequencing", attrs...)
		return
	}
	w.open(depth, "imsss:sequencing", attrs...)
	cm := s.ControlMode
	w.empty(depth+1, "imsss:controlMode", "choice", cm.Choice, "choiceExit", cm.ChoiceExit,
		"flow", cm.Flow, "forwardOnly", cm.ForwardOnly)
	w.close(depth, "imsss:sequencing")
}

// line writes one indented line.
func (w *manifestWriter) line(depth int, s string) {
	w.b.WriteString(strings.Repeat("  ", depth))
	w.b.WriteString(s)
	w.b.WriteByte('\n')
}

// tag returns a start tag; attrs are name, value pairs and empty values are left out.
func tag(name string, attrs []string, selfClose bool) string {
	var b strings.Builder
	b.WriteString("<" + name)
	for i := 0; i+1 < len(attrs); i += 2 {
		if attrs[i+1] == "" {
			continue
		}
		b.WriteString(" " + attrs[i] + `="` + escape(attrs[i+1]) + `"`)
	}
	if selfClose {
		b.WriteString("/")
	}
	b.WriteString(">")
	return b.String()
}

// open writes a start tag.
func (w *manifestWriter) open(depth int, name string, attrs ...string) {
	w.line(depth, tag(name, attrs, false))
}

// empty writes an empty element.
func (w *manifestWriter) empty(depth int, name string, attrs ...string) {
	w.line(depth, tag(name, attrs, true))
}

// close writes an end tag.
func (w *manifestWriter) close(depth int, name string) {
	w.line(depth, "</"+name+">")
}

// text writes an element holding text, unless the text is empty.
func (w *manifestWriter) text(depth int, name, text string) {
	if text == "" {
		return
	}
	w.line(depth, "<"+name+">"+escape(text)+"</"+name+">")
}

// escape escapes s for XML text and attribute values.
func escape(s string) string {
	var b strings.Builder
	_ = xml.EscapeText(&b, []byte(s)) // a strings.Builder never fails
	return b.String()
}
