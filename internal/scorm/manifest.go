package scorm

import (
	"math"
	"strconv"
	"strings"
)

// Identifiers: the CP schemas type them xs:ID, unique across the whole document. Packages in
// the wild often give an item and its resource the same identifier, so uniqueness is checked
// per kind only: two organizations, two items (in any organization) or two resources with the
// same identifier are an error, because references to them (default, identifierref, runtime
// data keyed by item) would be ambiguous. Identifiers are trimmed (xs:ID collapses white space).

// builder carries the state of one tree-to-Manifest conversion.
type builder struct {
	resources    map[string]Resource
	subManifests map[string]bool
	items        map[string]bool
	sequencing   map[string]*element // imsss:sequencingCollection entries by ID
	launchable   bool                // some item references a resource with an href
}

// buildManifest checks the tree against the SCORM rules and converts it into a Manifest.
func buildManifest(t *tree) (*Manifest, error) {
	root := t.root
	if root.name.Local != "manifest" || !isCP(root.name) {
		return nil, invalidf("root element is <%s> in namespace %s, want an IMS content packaging <manifest>",
			shorten(root.name.Local), q(root.name.Space))
	}
	m := &Manifest{
		Identifier:    root.attrValue("identifier"),
		XMLBase:       root.xmlBase(),
		Organizations: []Organization{},
		Resources:     []Resource{},
	}
	if md := root.cpChild("metadata"); md != nil {
		m.Schema = md.cpChild("schema").textValue()
		m.SchemaVersion = md.cpChild("schemaversion").textValue()
	}
	m.Version = detectVersion(m.SchemaVersion, t.namespaces)

	orgsEl := root.cpChild("organizations")
	orgEls := orgsEl.cpChildren("organization")
	if len(orgEls) == 0 {
		return nil, invalidf("manifest has no organizations")
	}

	b := &builder{
		resources:    make(map[string]Resource),
		subManifests: make(map[string]bool),
		items:        make(map[string]bool),
		sequencing:   make(map[string]*element),
	}
	for _, sub := range root.cpChildren("manifest") {
		b.subManifests[sub.attrValue("identifier")] = true
	}
	if err := b.readSequencingCollection(root); err != nil {
		return nil, err
	}

	resourcesEl := root.cpChild("resources")
	m.ResourcesXMLBase = resourcesEl.xmlBase()
	for _, el := range resourcesEl.cpChildren("resource") {
		r, err := readResource(el, resolveBase(m.XMLBase, m.ResourcesXMLBase, el.xmlBase()))
		if err != nil {
			return nil, err
		}
		if _, dup := b.resources[r.Identifier]; dup {
			return nil, invalidf("duplicate resource identifier %s", q(r.Identifier))
		}
		m.Resources = append(m.Resources, r)
		b.resources[r.Identifier] = r
	}
	for _, r := range m.Resources {
		for _, dep := range r.Dependencies {
			if _, ok := b.resources[dep]; !ok {
				return nil, invalidf("resource %s depends on missing resource %s", q(r.Identifier), q(dep))
			}
		}
	}

	orgIDs := make(map[string]bool)
	for _, el := range orgEls {
		id := el.attrValue("identifier")
		if id == "" {
			return nil, invalidf("an organization has no identifier")
		}
		if orgIDs[id] {
			return nil, invalidf("duplicate organization identifier %s", q(id))
		}
		orgIDs[id] = true
		org := Organization{Identifier: id, Title: el.cpChild("title").titleValue()}
		var err error
		if org.Sequencing, err = b.readSequencing(el.child(nsIMSSS, "sequencing"), "organization "+q(id)); err != nil {
			return nil, err
		}
		if org.Items, err = b.readItems(el, id); err != nil {
			return nil, err
		}
		m.Organizations = append(m.Organizations, org)
	}

	m.DefaultOrganization = orgsEl.attrValue("default")
	if m.DefaultOrganization == "" {
		m.DefaultOrganization = m.Organizations[0].Identifier
	}
	if !orgIDs[m.DefaultOrganization] {
		return nil, invalidf("default organization %s does not exist", q(m.DefaultOrganization))
	}
	for _, org := range m.Organizations {
		if org.Identifier == m.DefaultOrganization {
			m.Title = org.Title
		}
	}
	if m.Title == "" {
		m.Title = lomTitle(root.cpChild("metadata"))
	}
	if !b.launchable {
		return nil, invalidf("manifest has no launchable resource")
	}
	return m, nil
}

// readResource converts one <resource>; base is its resolved xml:base chain.
func readResource(el *element, base string) (Resource, error) {
	r := Resource{
		Identifier:   el.attrValue("identifier"),
		Type:         el.attrValue("type"),
		Href:         el.attrValue("href"),
		XMLBase:      el.xmlBase(),
		Files:        []string{},
		Dependencies: []string{},
	}
	if r.Identifier == "" {
		return r, invalidf("a resource has no identifier")
	}
	// SCORM 1.2 spells the attribute scormtype, SCORM 2004 scormType; both spellings are
	// accepted in either adlcp namespace, since packages mix them up.
	for _, ns := range []string{nsADLCP2004, nsADLCP12} {
		for _, local := range []string{"scormType", "scormtype"} {
			if v, ok := el.attrNS(ns, local); ok && r.ScormType == "" {
				r.ScormType = strings.ToLower(strings.TrimSpace(v))
				if r.ScormType != "sco" && r.ScormType != "asset" {
					return r, invalidf("resource %s has invalid adlcp:scormType %s, want sco or asset", q(r.Identifier), q(v))
				}
			}
		}
	}
	if r.Href != "" {
		r.LaunchURL = resolveRef(base, r.Href)
	}
	for _, f := range el.cpChildren("file") {
		if href := f.attrValue("href"); href != "" {
			r.Files = append(r.Files, href)
		}
	}
	for _, d := range el.cpChildren("dependency") {
		if ref := d.attrValue("identifierref"); ref != "" {
			r.Dependencies = append(r.Dependencies, ref)
		}
	}
	return r, nil
}

// readItems converts the <item> children of parent, an organization or an item.
func (b *builder) readItems(parent *element, org string) ([]Item, error) {
	items := []Item{}
	for _, el := range parent.cpChildren("item") {
		it, err := b.readItem(el, org)
		if err != nil {
			return nil, err
		}
		items = append(items, it)
	}
	return items, nil
}

// readItem converts one <item> and, recursively, its children. The recursion is bounded by
// maxDepth, enforced while reading the tree.
func (b *builder) readItem(el *element, org string) (Item, error) {
	it := Item{
		Identifier: el.attrValue("identifier"),
		Title:      el.cpChild("title").titleValue(),
		Visible:    true,
		Resource:   el.attrValue("identifierref"),
		Parameters: el.attrValue("parameters"),
	}
	if it.Identifier == "" {
		return it, invalidf("an item in organization %s has no identifier", q(org))
	}
	if b.items[it.Identifier] {
		return it, invalidf("duplicate item identifier %s", q(it.Identifier))
	}
	b.items[it.Identifier] = true
	label := "item " + q(it.Identifier)

	if v, ok := el.attr("isvisible"); ok {
		vis, err := parseBool(v)
		if err != nil {
			return it, invalidf("%s has invalid isvisible %s, want true or false", label, q(v))
		}
		it.Visible = vis
	}

	if it.Resource != "" {
		res, ok := b.resources[it.Resource]
		switch {
		case !ok && b.subManifests[it.Resource]:
			return it, invalidf("%s references sub-manifest %s; sub-manifests are not supported", label, q(it.Resource))
		case !ok:
			return it, invalidf("%s references missing resource %s", label, q(it.Resource))
		case res.LaunchURL != "":
			it.LaunchURL = appendParameters(res.LaunchURL, it.Parameters)
			b.launchable = true
		}
	}

	// SCORM 1.2 extensions (adlcp_rootv1p2).
	if text := el.child(nsADLCP12, "masteryscore").textValue(); text != "" {
		v, err := parseNumber(text, 100)
		if err != nil {
			return it, invalidf("%s has invalid adlcp:masteryscore %s, want a number from 0 to 100", label, q(text))
		}
		it.MasteryScore = &v
	}
	it.MaxTimeAllowed = el.child(nsADLCP12, "maxtimeallowed").textValue()
	it.TimeLimitAction = el.child(nsADLCP12, "timelimitaction").textValue()
	it.DataFromLMS = el.child(nsADLCP12, "datafromlms").textValue()
	it.Prerequisites = el.child(nsADLCP12, "prerequisites").textValue()

	// SCORM 2004 extensions (adlcp_v1p3, imsss); they win over 1.2 ones in a mixed manifest.
	if v := el.child(nsADLCP2004, "timeLimitAction").textValue(); v != "" {
		it.TimeLimitAction = v
	}
	if v := el.child(nsADLCP2004, "dataFromLMS").textValue(); v != "" {
		it.DataFromLMS = v
	}
	if ct := el.child(nsADLCP2004, "completionThreshold"); ct != nil {
		var err error
		if it.CompletionThreshold, err = readCompletionThreshold(ct, label); err != nil {
			return it, err
		}
	}
	var err error
	if it.Sequencing, err = b.readSequencing(el.child(nsIMSSS, "sequencing"), label); err != nil {
		return it, err
	}

	if it.Children, err = b.readItems(el, org); err != nil {
		return it, err
	}
	return it, nil
}

// readCompletionThreshold converts adlcp:completionThreshold in either of its forms (see
// CompletionThreshold).
func readCompletionThreshold(el *element, label string) (*CompletionThreshold, error) {
	ct := &CompletionThreshold{MinProgressMeasure: 1, ProgressWeight: 1}
	_, hasCBM := el.attr("completedByMeasure")
	_, hasMPM := el.attr("minProgressMeasure")
	_, hasPW := el.attr("progressWeight")
	if text := el.textValue(); text != "" && !hasCBM && !hasMPM && !hasPW {
		v, err := parseNumber(text, 1)
		if err != nil {
			return nil, invalidf("%s has invalid adlcp:completionThreshold %s, want a number from 0 to 1", label, q(text))
		}
		ct.CompletedByMeasure = true
		ct.MinProgressMeasure = v
		return ct, nil
	}
	if v, ok := el.attr("completedByMeasure"); ok {
		cbm, err := parseBool(v)
		if err != nil {
			return nil, invalidf("%s has invalid adlcp:completionThreshold completedByMeasure %s, want true or false", label, q(v))
		}
		ct.CompletedByMeasure = cbm
	}
	for _, f := range []struct {
		name string
		dst  *float64
	}{{"minProgressMeasure", &ct.MinProgressMeasure}, {"progressWeight", &ct.ProgressWeight}} {
		if v, ok := el.attr(f.name); ok {
			n, err := parseNumber(v, 1)
			if err != nil {
				return nil, invalidf("%s has invalid adlcp:completionThreshold %s %s, want a number from 0 to 1", label, f.name, q(v))
			}
			*f.dst = n
		}
	}
	return ct, nil
}

// readSequencingCollection indexes the entries of the manifest's imsss:sequencingCollection.
func (b *builder) readSequencingCollection(root *element) error {
	coll := root.child(nsIMSSS, "sequencingCollection")
	if coll == nil {
		return nil
	}
	for _, s := range coll.kids {
		if s.name.Space != nsIMSSS || s.name.Local != "sequencing" {
			continue
		}
		id := s.attrValue("ID")
		if id == "" {
			return invalidf("an imsss:sequencingCollection entry has no ID")
		}
		if b.sequencing[id] != nil {
			return invalidf("duplicate imsss:sequencing ID %s in imsss:sequencingCollection", q(id))
		}
		b.sequencing[id] = s
	}
	return nil
}

// readSequencing converts the imsss:sequencing of an item or organization (nil if absent). An
// IDRef names a sequencingCollection entry; the element's own controlMode, if any, overrides
// the entry's, as IMS SS says of local elements.
func (b *builder) readSequencing(el *element, label string) (*Sequencing, error) {
	if el == nil {
		return nil, nil
	}
	s := &Sequencing{IDRef: el.attrValue("IDRef")}
	cm := el.child(nsIMSSS, "controlMode")
	if s.IDRef != "" {
		ref := b.sequencing[s.IDRef]
		if ref == nil {
			return nil, invalidf("%s references missing imsss:sequencing %s", label, q(s.IDRef))
		}
		if cm == nil {
			cm = ref.child(nsIMSSS, "controlMode")
		}
	}
	if cm != nil {
		s.ControlMode = &ControlMode{
			Choice:                         true,
			ChoiceExit:                     true,
			UseCurrentAttemptObjectiveInfo: true,
			UseCurrentAttemptProgressInfo:  true,
		}
		for _, f := range []struct {
			name string
			dst  *bool
		}{
			{"choice", &s.ControlMode.Choice},
			{"choiceExit", &s.ControlMode.ChoiceExit},
			{"flow", &s.ControlMode.Flow},
			{"forwardOnly", &s.ControlMode.ForwardOnly},
			{"useCurrentAttemptObjectiveInfo", &s.ControlMode.UseCurrentAttemptObjectiveInfo},
			{"useCurrentAttemptProgressInfo", &s.ControlMode.UseCurrentAttemptProgressInfo},
		} {
			if v, ok := cm.attr(f.name); ok {
				bv, err := parseBool(v)
				if err != nil {
					return nil, invalidf("%s has invalid imsss:controlMode %s %s, want true or false", label, f.name, q(v))
				}
				*f.dst = bv
			}
		}
	}
	if s.IDRef == "" && s.ControlMode == nil {
		return nil, nil
	}
	return s, nil
}

// lomTitle returns the title of the inline LOM in the manifest's <metadata>
// (lom/general/title/string in LOM, .../langstring in IMS MD 1.2), or "". LOM elements are
// matched by local name because the two LOM bindings use different namespaces.
func lomTitle(md *element) string {
	title := md.childLocal("lom").childLocal("general").childLocal("title")
	if s := title.childLocal("string").titleValue(); s != "" {
		return s
	}
	return title.childLocal("langstring").titleValue()
}

// parseBool parses an xs:boolean.
func parseBool(s string) (bool, error) {
	switch strings.TrimSpace(s) {
	case "true", "1":
		return true, nil
	case "false", "0":
		return false, nil
	}
	return false, strconv.ErrSyntax
}

// parseNumber parses a decimal from 0 to limit. NaN and infinities are refused: they are not
// xs:decimal, and encoding/json could not marshal them.
func parseNumber(s string, limit float64) (float64, error) {
	v, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil || math.IsNaN(v) || v < 0 || v > limit {
		return 0, strconv.ErrSyntax
	}
	return v, nil
}
