package scorm_test

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/cachecar/cachecar/internal/scorm"
)

const (
	nsCP12      = "http://www.imsproject.org/xsd/imscp_rootv1p1p2"
	nsCP2004    = "http://www.imsglobal.org/xsd/imscp_v1p1"
	nsADLCP12   = "http://www.adlnet.org/xsd/adlcp_rootv1p2"
	nsADLCP2004 = "http://www.adlnet.org/xsd/adlcp_v1p3"
	nsIMSSS     = "http://www.imsglobal.org/xsd/imsss"
)

// summary is the part of a Manifest the hand-written XML tests compare.
type summary struct {
	Version    string
	Title      string
	LaunchURLs []string // every item's, in document order
	ScormTypes []string // every resource's
	Mastery    []float64
	Visible    []bool
}

func summarize(m *scorm.Manifest) summary {
	s := summary{Version: m.Version, Title: m.Title}
	var walk func([]scorm.Item)
	walk = func(items []scorm.Item) {
		for _, it := range items {
			s.LaunchURLs = append(s.LaunchURLs, it.LaunchURL)
			s.Visible = append(s.Visible, it.Visible)
			if it.MasteryScore != nil {
				s.Mastery = append(s.Mastery, *it.MasteryScore)
			}
			walk(it.Children)
		}
	}
	for _, o := range m.Organizations {
		walk(o.Items)
	}
	for _, r := range m.Resources {
		s.ScormTypes = append(s.ScormTypes, r.ScormType)
	}
	return s
}

func TestParseNamespaces(t *testing.T) {
	tests := []struct {
		name string
		xml  string
		want summary
	}{
		{
			name: "1.2 default namespace, version from the adlcp namespace",
			xml: `<manifest identifier="M" xmlns="` + nsCP12 + `" xmlns:adlcp="` + nsADLCP12 + `">
  <organizations default="O"><organization identifier="O"><title>Course</title>
    <item identifier="I" identifierref="R"><title>One</title><adlcp:masteryscore>50</adlcp:masteryscore></item>
  </organization></organizations>
  <resources><resource identifier="R" type="webcontent" adlcp:scormtype="sco" href="a.html"/></resources>
</manifest>`,
			want: summary{Version: "1.2", Title: "Course", LaunchURLs: []string{"a.html"}, ScormTypes: []string{"sco"}, Mastery: []float64{50}, Visible: []bool{true}},
		},
		{
			name: "odd prefixes everywhere",
			xml: `<x:manifest identifier="M" xmlns:x="` + nsCP12 + `" xmlns:q="` + nsADLCP12 + `">
  <x:metadata><x:schema>ADL SCORM</x:schema><x:schemaversion>1.2</x:schemaversion></x:metadata>
  <x:organizations><x:organization identifier="O"><x:title>Course</x:title>
    <x:item identifier="I" identifierref="R" isvisible="false"><x:title>One</x:title><q:masteryscore> 75 </q:masteryscore></x:item>
  </x:organization></x:organizations>
  <x:resources><x:resource identifier="R" type="webcontent" q:scormtype="asset" href="a.html"/></x:resources>
</x:manifest>`,
			want: summary{Version: "1.2", Title: "Course", LaunchURLs: []string{"a.html"}, ScormTypes: []string{"asset"}, Mastery: []float64{75}, Visible: []bool{false}},
		},
		{
			name: "no namespace at all",
			xml: `<manifest identifier="M">
  <organizations><organization identifier="O"><title>Plain</title>
    <item identifier="I" identifierref="R"><title>One</title></item>
  </organization></organizations>
  <resources><resource identifier="R" type="webcontent" href="index.html"/></resources>
</manifest>`,
			want: summary{Version: "unknown", Title: "Plain", LaunchURLs: []string{"index.html"}, ScormTypes: []string{""}, Visible: []bool{true}},
		},
		{
			name: "2004 with renamed adlcp and imsss prefixes",
			xml: `<cp:manifest identifier="M" xmlns:cp="` + nsCP2004 + `" xmlns:scorm="` + nsADLCP2004 + `" xmlns:ss="` + nsIMSSS + `">
  <cp:metadata><cp:schemaversion>2004 3rd Edition</cp:schemaversion></cp:metadata>
  <cp:organizations><cp:organization identifier="O"><cp:title>Course</cp:title>
    <cp:item identifier="I" identifierref="R"><cp:title>One</cp:title><ss:sequencing><ss:controlMode flow="true"/></ss:sequencing></cp:item>
  </cp:organization></cp:organizations>
  <cp:resources><cp:resource identifier="R" type="webcontent" scorm:scormType="sco" href="a.html"/></cp:resources>
</cp:manifest>`,
			want: summary{Version: "2004 3rd Edition", Title: "Course", LaunchURLs: []string{"a.html"}, ScormTypes: []string{"sco"}, Visible: []bool{true}},
		},
		{
			name: "both scormtype spellings in both adlcp namespaces, any case of value",
			xml: `<manifest identifier="M" xmlns="` + nsCP2004 + `" xmlns:a="` + nsADLCP12 + `" xmlns:b="` + nsADLCP2004 + `">
  <organizations><organization identifier="O"><title>Course</title>
    <item identifier="I" identifierref="R1"><title>One</title></item>
  </organization></organizations>
  <resources>
    <resource identifier="R1" type="webcontent" a:scormtype="sco" href="1.html"/>
    <resource identifier="R2" type="webcontent" a:scormType="asset" href="2.html"/>
    <resource identifier="R3" type="webcontent" b:scormType="SCO" href="3.html"/>
    <resource identifier="R4" type="webcontent" b:scormtype=" Asset " href="4.html"/>
  </resources>
</manifest>`,
			want: summary{Version: "1.2", Title: "Course", LaunchURLs: []string{"1.html"}, ScormTypes: []string{"sco", "asset", "sco", "asset"}, Visible: []bool{true}},
		},
		{
			name: "an adlcp prefix bound to another namespace is not adlcp",
			xml: `<manifest identifier="M" xmlns="` + nsCP12 + `" xmlns:adlcp="http://example.com/not-adl">
  <organizations><organization identifier="O"><title>Course</title>
    <item identifier="I" identifierref="R"><title>One</title><adlcp:masteryscore>50</adlcp:masteryscore></item>
  </organization></organizations>
  <resources><resource identifier="R" type="webcontent" adlcp:scormtype="sco" href="a.html"/></resources>
</manifest>`,
			want: summary{Version: "unknown", Title: "Course", LaunchURLs: []string{"a.html"}, ScormTypes: []string{""}, Visible: []bool{true}},
		},
		{
			name: "items in a foreign namespace are ignored",
			xml: `<manifest identifier="M" xmlns="` + nsCP12 + `" xmlns:o="http://example.com/other">
  <organizations><organization identifier="O"><title>Course</title>
    <o:item identifier="X" identifierref="MISSING"><title>Foreign</title></o:item>
    <item identifier="I" identifierref="R"><title>One</title></item>
    <o:ext><item identifier="Y" identifierref="MISSING"/></o:ext>
  </organization></organizations>
  <resources><resource identifier="R" type="webcontent" href="a.html"/></resources>
</manifest>`,
			want: summary{Version: "unknown", Title: "Course", LaunchURLs: []string{"a.html"}, ScormTypes: []string{""}, Visible: []bool{true}},
		},
		{
			name: "title from inline LOM when the organization has none",
			xml: `<manifest identifier="M" xmlns="` + nsCP2004 + `" xmlns:adlcp="` + nsADLCP2004 + `">
  <metadata><schemaversion>CAM 1.3</schemaversion>
    <lom xmlns="http://ltsc.ieee.org/xsd/LOM"><general><title><string language="en">From LOM</string></title></general></lom>
  </metadata>
  <organizations><organization identifier="O">
    <item identifier="I" identifierref="R"><title>One</title></item>
  </organization></organizations>
  <resources><resource identifier="R" type="webcontent" adlcp:scormType="sco" href="a.html"/></resources>
</manifest>`,
			want: summary{Version: "2004 2nd Edition", Title: "From LOM", LaunchURLs: []string{"a.html"}, ScormTypes: []string{"sco"}, Visible: []bool{true}},
		},
		{
			name: "2004 namespace without schemaversion",
			xml: `<manifest identifier="M" xmlns="` + nsCP2004 + `" xmlns:adlcp="` + nsADLCP2004 + `">
  <organizations><organization identifier="O"><title>Course</title>
    <item identifier="I" identifierref="R"><title>One</title></item>
  </organization></organizations>
  <resources><resource identifier="R" type="webcontent" adlcp:scormType="sco" href="a.html"/></resources>
</manifest>`,
			want: summary{Version: "2004 4th Edition", Title: "Course", LaunchURLs: []string{"a.html"}, ScormTypes: []string{"sco"}, Visible: []bool{true}},
		},
		{
			name: "loose schemaversion spelling",
			xml: `<manifest identifier="M" xmlns="` + nsCP2004 + `" xmlns:adlcp="` + nsADLCP2004 + `">
  <metadata><schemaversion>SCORM 2004   3rd edition</schemaversion></metadata>
  <organizations><organization identifier="O"><title>Course</title>
    <item identifier="I" identifierref="R"><title>One</title></item>
  </organization></organizations>
  <resources><resource identifier="R" type="webcontent" adlcp:scormType="sco" href="a.html"/></resources>
</manifest>`,
			want: summary{Version: "2004 3rd Edition", Title: "Course", LaunchURLs: []string{"a.html"}, ScormTypes: []string{"sco"}, Visible: []bool{true}},
		},
		{
			name: "UTF-8 BOM, external DOCTYPE, comments and processing instructions",
			xml: "\xef\xbb\xbf" + `<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE manifest SYSTEM "manifest.dtd">
<!-- made by hand -->
<?authoring tool="none"?>
<manifest identifier="M"><organizations><organization identifier="O"><title>Caf&#233; &amp; Co</title>
  <item identifier="I" identifierref="R"><title>One</title></item></organization></organizations>
  <resources><resource identifier="R" href="a.html"/></resources></manifest>`,
			want: summary{Version: "unknown", Title: "Café & Co", LaunchURLs: []string{"a.html"}, ScormTypes: []string{""}, Visible: []bool{true}},
		},
		{
			name: "ISO-8859-1",
			xml: `<?xml version="1.0" encoding="ISO-8859-1"?>
<manifest identifier="M"><organizations><organization identifier="O"><title>Caf` + "\xe9" + `</title>
  <item identifier="I" identifierref="R"><title>One</title></item></organization></organizations>
  <resources><resource identifier="R" href="a.html"/></resources></manifest>`,
			want: summary{Version: "unknown", Title: "Café", LaunchURLs: []string{"a.html"}, ScormTypes: []string{""}, Visible: []bool{true}},
		},
		{
			name: "windows-1252",
			xml: `<?xml version="1.0" encoding="windows-1252"?>
<manifest identifier="M"><organizations><organization identifier="O"><title>` + "\x93Price\x94 \x80" + `5</title>
  <item identifier="I" identifierref="R"><title>One</title></item></organization></organizations>
  <resources><resource identifier="R" href="a.html"/></resources></manifest>`,
			want: summary{Version: "unknown", Title: "“Price” €5", LaunchURLs: []string{"a.html"}, ScormTypes: []string{""}, Visible: []bool{true}},
		},
		{
			name: "titles wrapped over lines",
			xml: `<manifest identifier="M"><organizations><organization identifier="O"><title>
    Safety   in the
    Workplace
  </title><item identifier="I" identifierref="R"/></organization></organizations>
  <resources><resource identifier="R" href="a.html"/></resources></manifest>`,
			want: summary{Version: "unknown", Title: "Safety in the Workplace", LaunchURLs: []string{"a.html"}, ScormTypes: []string{""}, Visible: []bool{true}},
		},
		{
			name: "isvisible spellings",
			xml: `<manifest identifier="M"><organizations><organization identifier="O"><title>Course</title>
  <item identifier="A" identifierref="R" isvisible="true"><title>A</title></item>
  <item identifier="B" identifierref="R" isvisible="0"><title>B</title></item>
  <item identifier="C" identifierref="R" isvisible=" 1 "><title>C</title></item>
  <item identifier="D" identifierref="R" isvisible="false"><title>D</title></item>
  </organization></organizations>
  <resources><resource identifier="R" href="a.html"/></resources></manifest>`,
			want: summary{Version: "unknown", Title: "Course", LaunchURLs: []string{"a.html", "a.html", "a.html", "a.html"}, ScormTypes: []string{""}, Visible: []bool{true, false, true, false}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := scorm.Parse([]byte(tt.xml))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if got := summarize(m); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got  %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

// launchManifest is a manifest with one item and one resource whose bases, href and
// parameters are set by the test (empty attributes are left out).
func launchManifest(manifestBase, resourcesBase, resourceBase, href, params string) string {
	attr := func(name, v string) string {
		if v == "" {
			return ""
		}
		return fmt.Sprintf(` %s="%s"`, name, strings.ReplaceAll(v, "&", "&amp;"))
	}
	return `<manifest identifier="M" xmlns="` + nsCP12 + `"` + attr("xml:base", manifestBase) + `>
  <organizations><organization identifier="O"><title>T</title>
    <item identifier="I" identifierref="R"` + attr("parameters", params) + `><title>I</title></item>
  </organization></organizations>
  <resources` + attr("xml:base", resourcesBase) + `><resource identifier="R" type="webcontent"` +
		attr("xml:base", resourceBase) + attr("href", href) + `/></resources>
</manifest>`
}

func TestParseLaunchURL(t *testing.T) {
	tests := []struct {
		name                  string
		manifest, resources   string
		resource, href, param string
		want                  string
	}{
		{name: "no bases", href: "index.html", want: "index.html"},
		{name: "three relative bases", manifest: "a/", resources: "b/", resource: "c/", href: "index.html", want: "a/b/c/index.html"},
		{name: "bases without trailing slash are folders", manifest: "a", resources: "b", resource: "c", href: "index.html", want: "a/b/c/index.html"},
		{name: "dot segments", manifest: "./a/", resources: "../b/", resource: "c/./d/", href: "../e/index.html", want: "b/c/e/index.html"},
		{name: "climbing above the root is kept", resource: "a/", href: "../../x.html", want: "../x.html"},
		{name: "absolute base resets", manifest: "a/", resources: "https://cdn.example.com/pkg/", resource: "r/", href: "i.html", want: "https://cdn.example.com/pkg/r/i.html"},
		{name: "absolute base then path-absolute base", manifest: "https://cdn.example.com/pkg/", resource: "/other/", href: "i.html", want: "https://cdn.example.com/other/i.html"},
		{name: "absolute base clamps dot segments", manifest: "https://cdn.example.com/pkg/", href: "../../i.html", want: "https://cdn.example.com/i.html"},
		{name: "host-only absolute base", manifest: "https://cdn.example.com", href: "i.html", want: "https://cdn.example.com/i.html"},
		{name: "absolute href ignores bases", manifest: "a/", resource: "b/", href: "https://example.org/x.html", want: "https://example.org/x.html"},
		{name: "path-absolute href", manifest: "a/", href: "/x.html", want: "/x.html"},
		{name: "scheme-relative href under an absolute base", manifest: "https://a.example.com/p/", href: "//b.example.com/x.html", want: "https://b.example.com/x.html"},
		{name: "query on a base is dropped", manifest: "a/?v=1", href: "x.html", want: "a/x.html"},
		{name: "href with query and fragment kept", resource: "r/", href: "x.html?a=1#top", want: "r/x.html?a=1#top"},
		{name: "parameters with question mark", href: "x.html", param: "?a=1&b=2", want: "x.html?a=1&b=2"},
		{name: "parameters without prefix", href: "x.html", param: "a=1", want: "x.html?a=1"},
		{name: "parameters joined to an existing query", href: "x.html?v=2", param: "?a=1", want: "x.html?v=2&a=1"},
		{name: "parameters with ampersand prefix", href: "x.html?v=2", param: "&&a=1", want: "x.html?v=2&a=1"},
		{name: "parameters after a trailing question mark", href: "x.html?", param: "a=1", want: "x.html?a=1"},
		{name: "fragment parameters", href: "x.html", param: "#part2", want: "x.html#part2"},
		{name: "fragment parameters after stripped question mark", href: "x.html?v=1", param: "?#part2", want: "x.html?v=1#part2"},
		{name: "fragment parameters ignored when href has one", href: "x.html#a", param: "#b", want: "x.html#a"},
		{name: "query parameters go before the fragment", href: "x.html#a", param: "p=1", want: "x.html?p=1#a"},
		{name: "empty parameters after stripping", href: "x.html", param: "?&", want: "x.html"},
		{name: "parameters with bases", manifest: "a/", resource: "b/", href: "x.html", param: "?lang=fr", want: "a/b/x.html?lang=fr"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := scorm.Parse([]byte(launchManifest(tt.manifest, tt.resources, tt.resource, tt.href, tt.param)))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if got := m.Organizations[0].Items[0].LaunchURL; got != tt.want {
				t.Errorf("launch URL = %q, want %q", got, tt.want)
			}
		})
	}
}

// validBody is the inside of a valid manifest, for error cases that break only the envelope.
const validBody = `<organizations><organization identifier="O"><title>T</title>
<item identifier="I" identifierref="R"><title>I</title></item></organization></organizations>
<resources><resource identifier="R" href="a.html"/></resources>`

// nested returns n items nested in each other.
func nested(n int) string {
	return strings.Repeat(`<item identifier="x">`, n) + strings.Repeat(`</item>`, n)
}

func TestParseErrors(t *testing.T) {
	orgs := func(items, resources string) string {
		return `<manifest identifier="M" xmlns="` + nsCP2004 + `" xmlns:adlcp="` + nsADLCP2004 + `" xmlns:a12="` + nsADLCP12 +
			`" xmlns:imsss="` + nsIMSSS + `"><organizations><organization identifier="O"><title>T</title>` + items +
			`</organization></organizations><resources>` + resources + `</resources></manifest>`
	}
	res := `<resource identifier="R" href="a.html"/>`
	tests := []struct {
		name string
		xml  string
		want string
	}{
		{"empty", "", "scorm: imsmanifest.xml has no root element"},
		{"only a comment", "<!-- x -->", "scorm: imsmanifest.xml has no root element"},
		{"not XML", "hello", "scorm: malformed XML: text outside the root element"},
		{"unclosed", "<manifest>", "scorm: malformed XML on line 1: unexpected EOF"},
		{"mismatched", "<manifest></resources>", "scorm: malformed XML on line 1: element <manifest> closed by </resources>"},
		{"undefined entity", "<manifest>&x;</manifest>", "scorm: malformed XML on line 1: invalid character entity &x;"},
		{"billion laughs", `<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]><manifest>&lol2;</manifest>`,
			"scorm: DTD and entity declarations are not allowed"},
		{"external entity", `<!DOCTYPE m [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><manifest>&xxe;</manifest>`,
			"scorm: DTD and entity declarations are not allowed"},
		{"bare entity declaration", `<!ENTITY x "y"><manifest/>`, "scorm: DTD and entity declarations are not allowed"},
		{"DOCTYPE inside the document", `<manifest><!DOCTYPE manifest></manifest>`, "scorm: DTD and entity declarations are not allowed"},
		{"too deep", `<manifest><organizations><organization identifier="O">` + nested(200) + `</organization></organizations></manifest>`,
			"scorm: XML nesting is deeper than 128 levels"},
		{"unsupported encoding", `<?xml version="1.0" encoding="EBCDIC-US"?><manifest/>`, `scorm: unsupported XML encoding "EBCDIC-US"; use UTF-8`},
		{"declared UTF-16", `<?xml version="1.0" encoding="UTF-16"?><manifest/>`, `scorm: unsupported XML encoding "UTF-16"; use UTF-8`},
		{"UTF-16 BOM", "\xff\xfe<\x00m\x00/\x00>\x00", "scorm: imsmanifest.xml is UTF-16 encoded; use UTF-8"},
		{"invalid UTF-8", "<manifest>\xff</manifest>", "scorm: malformed XML on line 1: invalid UTF-8"},
		{"XML 1.1", `<?xml version="1.1"?><manifest/>`, `scorm: malformed XML: unsupported version "1.1"; only version 1.0 is supported`},
		{"two roots", "<manifest/><manifest/>", "scorm: malformed XML: more than one root element"},
		{"text after root", "<manifest/>x", "scorm: malformed XML: text outside the root element"},
		{"wrong root", "<html/>", `scorm: root element is <html> in namespace "", want an IMS content packaging <manifest>`},
		{"wrong root namespace", `<manifest xmlns="http://example.com/x"/>`,
			`scorm: root element is <manifest> in namespace "http://example.com/x", want an IMS content packaging <manifest>`},
		{"no organizations element", `<manifest identifier="M"><resources>` + res + `</resources></manifest>`, "scorm: manifest has no organizations"},
		{"empty organizations", `<manifest identifier="M"><organizations/><resources>` + res + `</resources></manifest>`, "scorm: manifest has no organizations"},
		{"missing default organization", `<manifest><organizations default="NOPE"><organization identifier="O"><title>T</title>` +
			`<item identifier="I" identifierref="R"/></organization></organizations><resources>` + res + `</resources></manifest>`,
			`scorm: default organization "NOPE" does not exist`},
		{"missing resource", orgs(`<item identifier="item_3" identifierref="res_9"><title>x</title></item>`, res),
			`scorm: item "item_3" references missing resource "res_9"`},
		{"sub-manifest reference", `<manifest><organizations><organization identifier="O"><item identifier="I" identifierref="SUB"/></organization></organizations>` +
			`<resources/><manifest identifier="SUB"/></manifest>`, `scorm: item "I" references sub-manifest "SUB"; sub-manifests are not supported`},
		{"no launchable resource: no identifierref", orgs(`<item identifier="I"><title>x</title></item>`, res), "scorm: manifest has no launchable resource"},
		{"no launchable resource: no href", orgs(`<item identifier="I" identifierref="R"><title>x</title></item>`, `<resource identifier="R"/>`),
			"scorm: manifest has no launchable resource"},
		{"no resources element", `<manifest><organizations><organization identifier="O"><item identifier="I"/></organization></organizations></manifest>`,
			"scorm: manifest has no launchable resource"},
		{"duplicate resource", orgs(`<item identifier="I" identifierref="R"/>`, res+res), `scorm: duplicate resource identifier "R"`},
		{"duplicate item", orgs(`<item identifier="I" identifierref="R"/><item identifier="I" identifierref="R"/>`, res), `scorm: duplicate item identifier "I"`},
		{"duplicate nested item", orgs(`<item identifier="I"><item identifier="I" identifierref="R"/></item>`, res), `scorm: duplicate item identifier "I"`},
		{"duplicate organization", `<manifest><organizations><organization identifier="O"/><organization identifier="O"/></organizations></manifest>`,
			`scorm: duplicate organization identifier "O"`},
		{"organization without identifier", `<manifest><organizations><organization/></organizations></manifest>`, "scorm: an organization has no identifier"},
		{"item without identifier", orgs(`<item identifierref="R"/>`, res), `scorm: an item in organization "O" has no identifier`},
		{"resource without identifier", orgs(`<item identifier="I" identifierref="R"/>`, `<resource href="a.html"/>`), "scorm: a resource has no identifier"},
		{"missing dependency", orgs(`<item identifier="I" identifierref="R"/>`, `<resource identifier="R" href="a.html"><dependency identifierref="LIB"/></resource>`),
			`scorm: resource "R" depends on missing resource "LIB"`},
		{"invalid scorm type", orgs(`<item identifier="I" identifierref="R"/>`, `<resource identifier="R" adlcp:scormType="lesson" href="a.html"/>`),
			`scorm: resource "R" has invalid adlcp:scormType "lesson", want sco or asset`},
		{"invalid isvisible", orgs(`<item identifier="I" identifierref="R" isvisible="yes"/>`, res), `scorm: item "I" has invalid isvisible "yes", want true or false`},
		{"invalid mastery score", orgs(`<item identifier="I" identifierref="R"><a12:masteryscore>high</a12:masteryscore></item>`, res),
			`scorm: item "I" has invalid adlcp:masteryscore "high", want a number from 0 to 100`},
		{"NaN mastery score", orgs(`<item identifier="I" identifierref="R"><a12:masteryscore>NaN</a12:masteryscore></item>`, res),
			`scorm: item "I" has invalid adlcp:masteryscore "NaN", want a number from 0 to 100`},
		{"mastery score above 100", orgs(`<item identifier="I" identifierref="R"><a12:masteryscore>101</a12:masteryscore></item>`, res),
			`scorm: item "I" has invalid adlcp:masteryscore "101", want a number from 0 to 100`},
		{"completion threshold text above 1", orgs(`<item identifier="I" identifierref="R"><adlcp:completionThreshold>1.5</adlcp:completionThreshold></item>`, res),
			`scorm: item "I" has invalid adlcp:completionThreshold "1.5", want a number from 0 to 1`},
		{"completion threshold attribute", orgs(`<item identifier="I" identifierref="R"><adlcp:completionThreshold minProgressMeasure="most"/></item>`, res),
			`scorm: item "I" has invalid adlcp:completionThreshold minProgressMeasure "most", want a number from 0 to 1`},
		{"completion threshold boolean", orgs(`<item identifier="I" identifierref="R"><adlcp:completionThreshold completedByMeasure="yes"/></item>`, res),
			`scorm: item "I" has invalid adlcp:completionThreshold completedByMeasure "yes", want true or false`},
		{"control mode value", orgs(`<item identifier="I" identifierref="R"><imsss:sequencing><imsss:controlMode flow="maybe"/></imsss:sequencing></item>`, res),
			`scorm: item "I" has invalid imsss:controlMode flow "maybe", want true or false`},
		{"missing sequencing", orgs(`<item identifier="I" identifierref="R"><imsss:sequencing IDRef="SEQ-9"/></item>`, res),
			`scorm: item "I" references missing imsss:sequencing "SEQ-9"`},
		{"long identifiers are shortened", orgs(`<item identifier="I" identifierref="`+strings.Repeat("r", 100)+`"/>`, res),
			`scorm: item "I" references missing resource "` + strings.Repeat("r", 64) + `..."`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := scorm.Parse([]byte(tt.xml))
			if m != nil {
				t.Errorf("got a manifest with the error")
			}
			mustInvalid(t, err, tt.want)
		})
	}
}

func TestParseElementLimit(t *testing.T) {
	files := strings.Repeat(`<file href="f"/>`, 100001)
	_, err := scorm.Parse([]byte(`<manifest><organizations><organization identifier="O"><item identifier="I" identifierref="R"/></organization></organizations>` +
		`<resources><resource identifier="R" href="a.html">` + files + `</resource></resources></manifest>`))
	mustInvalid(t, err, "scorm: manifest has more than 100000 elements")
}

func TestParseSkipsForeignElementsInLimit(t *testing.T) {
	// 300000 elements in a foreign namespace are skipped, not kept, so they do not count.
	ext := `<x:ext xmlns:x="http://example.com/ext">` + strings.Repeat(`<x:e/>`, 300000) + `</x:ext>`
	m, err := scorm.Parse([]byte(`<manifest>` + ext + validBody + `</manifest>`))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if _, err := json.Marshal(m); err != nil {
		t.Fatal(err)
	}
}
