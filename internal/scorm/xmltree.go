package scorm

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"strings"
	"unicode/utf8"
)

// Namespaces the parser knows. Elements and qualified attributes are matched by namespace URI
// and local name, never by prefix: any prefix, or none (a default namespace), is fine.
const (
	nsCP12      = "http://www.imsproject.org/xsd/imscp_rootv1p1p2" // IMS CP 1.1.2, SCORM 1.2
	nsCP2004    = "http://www.imsglobal.org/xsd/imscp_v1p1"        // IMS CP 1.1.4, SCORM 2004
	nsADLCP12   = "http://www.adlnet.org/xsd/adlcp_rootv1p2"
	nsADLCP2004 = "http://www.adlnet.org/xsd/adlcp_v1p3"
	nsIMSSS     = "http://www.imsglobal.org/xsd/imsss"
	nsADLSEQ    = "http://www.adlnet.org/xsd/adlseq_v1p3"
	nsADLNAV    = "http://www.adlnet.org/xsd/adlnav_v1p3"
	nsXML       = "http://www.w3.org/XML/1998/namespace" // what encoding/xml gives the xml: prefix
)

// Limits on the XML itself, on top of the byte limit the caller applies.
const (
	// maxDepth bounds element nesting, so a hostile manifest cannot make the tree walk (which
	// recurses over items) deep. 128 leaves room for more than 100 levels of items.
	maxDepth = 128
	// maxElements bounds the elements kept in memory (about 300 bytes each, with what
	// encoding/xml allocates for them: 100000 elements peak near 35 MB of heap). Elements in
	// namespaces the parser does not read (metadata extensions, LOM in resources) are skipped
	// and do not count. Large real manifests list a few thousand files.
	maxElements = 100000
	// maxSyntaxMessage bounds the part of an encoding/xml error copied into our message: it may
	// quote element names of any length.
	maxSyntaxMessage = 200
)

// element is a node of the reduced document tree: only the elements the parser reads.
type element struct {
	name  xml.Name
	attrs []xml.Attr
	kids  []*element
	text  []byte // character data directly inside the element
}

// tree is a parsed imsmanifest.xml.
type tree struct {
	root *element
	// namespaces holds every namespace URI declared or used anywhere in the document; the
	// version fallback looks for the ADL ones.
	namespaces map[string]bool
}

// frame is one open element while reading; el is nil when the element is being skipped.
type frame struct {
	el     *element
	inMeta bool // inside the manifest's own <metadata>, where everything is kept (inline LOM)
}

// readTree reads xmlBytes into a tree, rejecting DTDs, entity declarations, unsupported
// encodings, excessive nesting and more than one root element.
func readTree(xmlBytes []byte) (*tree, error) {
	if bytes.HasPrefix(xmlBytes, []byte{0xFE, 0xFF}) || bytes.HasPrefix(xmlBytes, []byte{0xFF, 0xFE}) {
		return nil, invalidf("imsmanifest.xml is UTF-16 encoded; use UTF-8")
	}
	// encoding/xml would return a UTF-8 byte order mark as text before the root.
	xmlBytes = bytes.TrimPrefix(xmlBytes, []byte("\xef\xbb\xbf"))
	d := xml.NewDecoder(bytes.NewReader(xmlBytes))
	d.Strict = true
	d.CharsetReader = charsetReader
	t := &tree{namespaces: make(map[string]bool)}
	var stack []frame
	kept := 0
	rootClosed := false
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, xmlError(err)
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			if rootClosed {
				return nil, invalidf("malformed XML: more than one root element")
			}
			if len(stack) >= maxDepth {
				return nil, invalidf("XML nesting is deeper than %d levels", maxDepth)
			}
			t.noteNamespaces(tok)
			f := frame{}
			switch {
			case len(stack) == 0:
				f.el = &element{name: tok.Name, attrs: tok.Attr}
				t.root = f.el
			case stack[len(stack)-1].el != nil:
				parent := stack[len(stack)-1]
				f.inMeta = parent.inMeta || (len(stack) == 1 && isCP(tok.Name) && tok.Name.Local == "metadata")
				if f.inMeta || knownNamespace(tok.Name.Space) {
					f.el = &element{name: tok.Name, attrs: tok.Attr}
					parent.el.kids = append(parent.el.kids, f.el)
				}
			}
			if f.el != nil {
				kept++
				if kept > maxElements {
					return nil, invalidf("manifest has more than %d elements", maxElements)
				}
			}
			stack = append(stack, f)
		case xml.EndElement:
			// encoding/xml (Strict) guarantees start and end elements match.
			stack = stack[:len(stack)-1]
			if len(stack) == 0 {
				rootClosed = true
			}
		case xml.CharData:
			if len(stack) == 0 {
				if len(bytes.TrimSpace(tok)) > 0 {
					return nil, invalidf("malformed XML: text outside the root element")
				}
				continue
			}
			if top := stack[len(stack)-1]; top.el != nil {
				top.el.text = append(top.el.text, tok...)
			}
		case xml.Directive:
			// A DOCTYPE naming an external DTD is harmless (encoding/xml never fetches it) and
			// is ignored. An internal subset can declare entities (billion laughs) and any
			// other directive is a declaration outside a DTD: both are refused.
			s := strings.TrimSpace(string(tok))
			if t.root != nil || !strings.HasPrefix(s, "DOCTYPE") || strings.ContainsAny(s, "[<") {
				return nil, invalidf("DTD and entity declarations are not allowed")
			}
		}
	}
	if t.root == nil {
		return nil, invalidf("imsmanifest.xml has no root element")
	}
	return t, nil
}

// noteNamespaces records the namespaces an element declares and uses.
func (t *tree) noteNamespaces(se xml.StartElement) {
	t.namespaces[se.Name.Space] = true
	for _, a := range se.Attr {
		switch {
		case a.Name.Space == "xmlns", a.Name.Space == "" && a.Name.Local == "xmlns":
			t.namespaces[a.Value] = true
		case a.Name.Space != "":
			t.namespaces[a.Name.Space] = true
		}
	}
}

// xmlError turns a decoder error into an ErrInvalidPackage error.
func xmlError(err error) error {
	var ie *invalidError
	if errors.As(err, &ie) { // from charsetReader
		return ie
	}
	var se *xml.SyntaxError
	if errors.As(err, &se) {
		return invalidf("malformed XML on line %d: %s", se.Line, shorten(se.Msg))
	}
	return invalidf("malformed XML: %s", shorten(strings.TrimPrefix(err.Error(), "xml: ")))
}

// shorten cuts s to about maxSyntaxMessage bytes on a rune boundary.
func shorten(s string) string {
	if len(s) <= maxSyntaxMessage {
		return s
	}
	cut := maxSyntaxMessage
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "..."
}

// knownNamespace tells whether elements in namespace space are kept in the tree.
func knownNamespace(space string) bool {
	switch space {
	case "", nsCP12, nsCP2004, nsADLCP12, nsADLCP2004, nsIMSSS:
		return true
	}
	return false
}

// isCP tells whether n is in an IMS CP namespace. Unqualified elements count as CP elements,
// so manifests written without any namespace are read too.
func isCP(n xml.Name) bool {
	return n.Space == "" || n.Space == nsCP12 || n.Space == nsCP2004
}

// cpChild returns the first CP child element named local, or nil.
func (e *element) cpChild(local string) *element {
	if e == nil {
		return nil
	}
	for _, k := range e.kids {
		if k.name.Local == local && isCP(k.name) {
			return k
		}
	}
	return nil
}

// cpChildren returns the CP child elements named local.
func (e *element) cpChildren(local string) []*element {
	if e == nil {
		return nil
	}
	var out []*element
	for _, k := range e.kids {
		if k.name.Local == local && isCP(k.name) {
			out = append(out, k)
		}
	}
	return out
}

// child returns the first child element in namespace space named local, or nil.
func (e *element) child(space, local string) *element {
	if e == nil {
		return nil
	}
	for _, k := range e.kids {
		if k.name.Space == space && k.name.Local == local {
			return k
		}
	}
	return nil
}

// childLocal returns the first child element named local in any namespace, or nil. Only used
// for inline LOM metadata, whose namespace differs between LOM bindings.
func (e *element) childLocal(local string) *element {
	if e == nil {
		return nil
	}
	for _, k := range e.kids {
		if k.name.Local == local {
			return k
		}
	}
	return nil
}

// attr returns the attribute named local without a namespace (as the CP schemas declare
// theirs), accepting a CP-qualified one too, and whether it is present.
func (e *element) attr(local string) (string, bool) {
	if e == nil {
		return "", false
	}
	for _, a := range e.attrs {
		if a.Name.Local == local && isCP(a.Name) {
			return a.Value, true
		}
	}
	return "", false
}

// attrValue returns the trimmed value of the unqualified attribute local, or "".
func (e *element) attrValue(local string) string {
	v, _ := e.attr(local)
	return strings.TrimSpace(v)
}

// attrNS returns the attribute in namespace space named local, and whether it is present.
func (e *element) attrNS(space, local string) (string, bool) {
	if e == nil {
		return "", false
	}
	for _, a := range e.attrs {
		if a.Name.Space == space && a.Name.Local == local {
			return a.Value, true
		}
	}
	return "", false
}

// xmlBase returns the trimmed xml:base attribute of e, or "".
func (e *element) xmlBase() string {
	v, _ := e.attrNS(nsXML, "base")
	return strings.TrimSpace(v)
}

// textValue returns e's character data with surrounding white space removed; "" for nil.
func (e *element) textValue() string {
	if e == nil {
		return ""
	}
	return string(bytes.TrimSpace(e.text))
}

// titleValue returns e's character data with runs of white space collapsed to one space, as
// titles are display text that authoring tools often wrap over several lines; "" for nil.
func (e *element) titleValue() string {
	if e == nil {
		return ""
	}
	return strings.Join(strings.Fields(string(e.text)), " ")
}
