package scorm_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"testing"

	"github.com/cachecar/cachecar/internal/scorm"
	"github.com/cachecar/cachecar/internal/scorm/scormgen"
)

// parseSpec builds the zip of s and parses it.
func parseSpec(t *testing.T, s scormgen.Spec) *scorm.Manifest {
	t.Helper()
	b, err := scormgen.Build(s)
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	m, err := scorm.ParseZip(bytes.NewReader(b), int64(len(b)), scorm.Options{})
	if err != nil {
		t.Fatalf("ParseZip: %v", err)
	}
	if _, err := json.Marshal(m); err != nil {
		t.Fatalf("json.Marshal: %v", err)
	}
	return m
}

// findItem returns the item with identifier id anywhere in m, without its children.
func findItem(t *testing.T, m *scorm.Manifest, id string) scorm.Item {
	t.Helper()
	var found *scorm.Item
	var walk func([]scorm.Item)
	walk = func(items []scorm.Item) {
		for i := range items {
			if items[i].Identifier == id {
				found = &items[i]
			}
			walk(items[i].Children)
		}
	}
	for _, o := range m.Organizations {
		walk(o.Items)
	}
	if found == nil {
		t.Fatalf("item %q not found", id)
	}
	it := *found
	it.Children = nil
	return it
}

// fixture is a package with one organization whose first item launches a SCO; tests modify it.
func fixture(version string) scormgen.Spec {
	return scormgen.Spec{
		Version:    version,
		Identifier: "MANIFEST-1",
		Organizations: []scormgen.Organization{{
			Identifier: "ORG-1",
			Title:      "Fixture Course",
			Items:      []scormgen.Item{{Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1"}},
		}},
		Resources: []scormgen.Resource{{Identifier: "RES-1", ScormType: "sco", Href: "lesson1/index.html"}},
	}
}

func ptr[T any](v T) *T { return &v }

func TestParseZipItemExtras(t *testing.T) {
	tests := []struct {
		name    string
		version string
		item    scormgen.Item
		want    scorm.Item
	}{
		{
			name:    "1.2 plain",
			version: scormgen.Version12,
			item:    scormgen.Item{Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1"},
			want:    scorm.Item{Identifier: "ITEM-1", Title: "Lesson 1", Visible: true, Resource: "RES-1", LaunchURL: "lesson1/index.html"},
		},
		{
			name:    "1.2 every extension",
			version: scormgen.Version12,
			item: scormgen.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1", MasteryScore: "85.5",
				MaxTimeAllowed: "0001:00:00", TimeLimitAction: "exit,message", DataFromLMS: "a=1&b=<2>",
				Prerequisites: "ITEM-0 & ITEM-2",
			},
			want: scorm.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Visible: true, Resource: "RES-1", LaunchURL: "lesson1/index.html",
				MasteryScore: ptr(85.5), MaxTimeAllowed: "0001:00:00", TimeLimitAction: "exit,message",
				DataFromLMS: "a=1&b=<2>", Prerequisites: "ITEM-0 & ITEM-2",
			},
		},
		{
			name:    "1.2 hidden with parameters",
			version: scormgen.Version12,
			item:    scormgen.Item{Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1", Hidden: true, Parameters: "?x=1"},
			want:    scorm.Item{Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1", Parameters: "?x=1", LaunchURL: "lesson1/index.html?x=1"},
		},
		{
			name:    "1.2 mastery score zero",
			version: scormgen.Version12,
			item:    scormgen.Item{Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1", MasteryScore: "0"},
			want:    scorm.Item{Identifier: "ITEM-1", Title: "Lesson 1", Visible: true, Resource: "RES-1", LaunchURL: "lesson1/index.html", MasteryScore: ptr(0.0)},
		},
		{
			name:    "2004 completion threshold element",
			version: scormgen.Version2004Ed4,
			item: scormgen.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1",
				CompletionThreshold: &scormgen.CompletionThreshold{CompletedByMeasure: "true", MinProgressMeasure: "0.25", ProgressWeight: "0.5"},
			},
			want: scorm.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Visible: true, Resource: "RES-1", LaunchURL: "lesson1/index.html",
				CompletionThreshold: &scorm.CompletionThreshold{CompletedByMeasure: true, MinProgressMeasure: 0.25, ProgressWeight: 0.5},
			},
		},
		{
			name:    "2004 completion threshold element defaults",
			version: scormgen.Version2004Ed4,
			item: scormgen.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1",
				CompletionThreshold: &scormgen.CompletionThreshold{},
			},
			want: scorm.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Visible: true, Resource: "RES-1", LaunchURL: "lesson1/index.html",
				CompletionThreshold: &scorm.CompletionThreshold{MinProgressMeasure: 1, ProgressWeight: 1},
			},
		},
		{
			name:    "2004 completion threshold text form",
			version: scormgen.Version2004Ed3,
			item:    scormgen.Item{Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1", CompletionThresholdText: "0.6"},
			want: scorm.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Visible: true, Resource: "RES-1", LaunchURL: "lesson1/index.html",
				CompletionThreshold: &scorm.CompletionThreshold{CompletedByMeasure: true, MinProgressMeasure: 0.6, ProgressWeight: 1},
			},
		},
		{
			name:    "2004 data from LMS and time limit action",
			version: scormgen.Version2004Ed4,
			item:    scormgen.Item{Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1", DataFromLMS: "level=2", TimeLimitAction: "continue,message"},
			want: scorm.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Visible: true, Resource: "RES-1", LaunchURL: "lesson1/index.html",
				DataFromLMS: "level=2", TimeLimitAction: "continue,message",
			},
		},
		{
			name:    "2004 control mode defaults",
			version: scormgen.Version2004Ed4,
			item: scormgen.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1",
				Sequencing: &scormgen.Sequencing{ControlMode: &scormgen.ControlMode{}},
			},
			want: scorm.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Visible: true, Resource: "RES-1", LaunchURL: "lesson1/index.html",
				Sequencing: &scorm.Sequencing{ControlMode: &scorm.ControlMode{
					Choice: true, ChoiceExit: true, UseCurrentAttemptObjectiveInfo: true, UseCurrentAttemptProgressInfo: true,
				}},
			},
		},
		{
			name:    "2004 control mode set",
			version: scormgen.Version2004Ed4,
			item: scormgen.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1",
				Sequencing: &scormgen.Sequencing{ControlMode: &scormgen.ControlMode{Choice: "false", ChoiceExit: "0", Flow: "true", ForwardOnly: "1"}},
			},
			want: scorm.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Visible: true, Resource: "RES-1", LaunchURL: "lesson1/index.html",
				Sequencing: &scorm.Sequencing{ControlMode: &scorm.ControlMode{
					Flow: true, ForwardOnly: true, UseCurrentAttemptObjectiveInfo: true, UseCurrentAttemptProgressInfo: true,
				}},
			},
		},
		{
			name:    "2004 sequencing from the collection",
			version: scormgen.Version2004Ed4,
			item: scormgen.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1",
				Sequencing: &scormgen.Sequencing{IDRef: "SEQ-1"},
			},
			want: scorm.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Visible: true, Resource: "RES-1", LaunchURL: "lesson1/index.html",
				Sequencing: &scorm.Sequencing{IDRef: "SEQ-1", ControlMode: &scorm.ControlMode{
					Choice: false, ChoiceExit: true, Flow: true, UseCurrentAttemptObjectiveInfo: true, UseCurrentAttemptProgressInfo: true,
				}},
			},
		},
		{
			name:    "2004 local control mode overrides the collection",
			version: scormgen.Version2004Ed4,
			item: scormgen.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Resource: "RES-1",
				Sequencing: &scormgen.Sequencing{IDRef: "SEQ-1", ControlMode: &scormgen.ControlMode{ForwardOnly: "true"}},
			},
			want: scorm.Item{
				Identifier: "ITEM-1", Title: "Lesson 1", Visible: true, Resource: "RES-1", LaunchURL: "lesson1/index.html",
				Sequencing: &scorm.Sequencing{IDRef: "SEQ-1", ControlMode: &scorm.ControlMode{
					Choice: true, ChoiceExit: true, ForwardOnly: true, UseCurrentAttemptObjectiveInfo: true, UseCurrentAttemptProgressInfo: true,
				}},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := fixture(tt.version)
			s.Organizations[0].Items = []scormgen.Item{tt.item}
			if tt.version != scormgen.Version12 {
				s.SequencingCollection = []scormgen.Sequencing{{ID: "SEQ-1", ControlMode: &scormgen.ControlMode{Choice: "false", Flow: "true"}}}
			}
			m := parseSpec(t, s)
			if got := findItem(t, m, tt.item.Identifier); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("item:\ngot  %s\nwant %s", jsonString(t, got), jsonString(t, tt.want))
			}
		})
	}
}

func TestParseZipVersions(t *testing.T) {
	tests := []struct {
		version       string
		schemaVersion string
	}{
		{scormgen.Version12, "1.2"},
		{scormgen.Version2004Ed2, "CAM 1.3"},
		{scormgen.Version2004Ed3, "2004 3rd Edition"},
		{scormgen.Version2004Ed4, "2004 4th Edition"},
	}
	for _, tt := range tests {
		t.Run(tt.version, func(t *testing.T) {
			m := parseSpec(t, fixture(tt.version))
			if m.Version != tt.version || m.SchemaVersion != tt.schemaVersion || m.Schema != "ADL SCORM" {
				t.Errorf("version, schema version, schema = %q, %q, %q; want %q, %q, \"ADL SCORM\"",
					m.Version, m.SchemaVersion, m.Schema, tt.version, tt.schemaVersion)
			}
			if m.Identifier != "MANIFEST-1" || m.Title != "Fixture Course" || m.DefaultOrganization != "ORG-1" {
				t.Errorf("identifier, title, default = %q, %q, %q", m.Identifier, m.Title, m.DefaultOrganization)
			}
			if len(m.Resources) != 1 || m.Resources[0].ScormType != "sco" {
				t.Errorf("resources = %+v, want one SCO", m.Resources)
			}
		})
	}
}

func TestParseZipStructure(t *testing.T) {
	tests := []struct {
		name   string
		edit   func(*scormgen.Spec)
		verify func(*testing.T, *scorm.Manifest)
	}{
		{
			name: "nested items three levels deep",
			edit: func(s *scormgen.Spec) {
				s.Organizations[0].Items = []scormgen.Item{{
					Identifier: "L1", Title: "Level 1",
					Children: []scormgen.Item{{
						Identifier: "L2", Title: "Level 2",
						Children: []scormgen.Item{
							{Identifier: "L3a", Title: "Level 3a", Resource: "RES-1"},
							{Identifier: "L3b", Title: "Level 3b", Resource: "RES-1", Parameters: "page=2"},
						},
					}},
				}}
			},
			verify: func(t *testing.T, m *scorm.Manifest) {
				items := m.Organizations[0].Items
				if len(items) != 1 || len(items[0].Children) != 1 || len(items[0].Children[0].Children) != 2 {
					t.Fatalf("tree shape wrong: %s", jsonString(t, items))
				}
				l3 := items[0].Children[0].Children
				if l3[0].LaunchURL != "lesson1/index.html" || l3[1].LaunchURL != "lesson1/index.html?page=2" {
					t.Errorf("launch URLs = %q, %q", l3[0].LaunchURL, l3[1].LaunchURL)
				}
				if items[0].Resource != "" || items[0].LaunchURL != "" || items[0].Children[0].Children[0].Children == nil {
					t.Errorf("grouping item or leaf wrong: %s", jsonString(t, items[0]))
				}
			},
		},
		{
			name: "assets, SCOs, files and dependencies",
			edit: func(s *scormgen.Spec) {
				s.Resources = append(s.Resources,
					scormgen.Resource{Identifier: "RES-ASSET", ScormType: "asset", Href: "a.html", Dependencies: []string{"RES-LIB"}},
					scormgen.Resource{Identifier: "RES-LIB", ScormType: "asset", Files: []scormgen.File{{Href: "lib/x.js"}, {Href: "lib/y.css"}}})
				s.Resources[0].Dependencies = []string{"RES-LIB", "RES-ASSET"}
			},
			verify: func(t *testing.T, m *scorm.Manifest) {
				want := []scorm.Resource{
					{Identifier: "RES-1", Type: "webcontent", ScormType: "sco", Href: "lesson1/index.html", LaunchURL: "lesson1/index.html",
						Files: []string{"lesson1/index.html"}, Dependencies: []string{"RES-LIB", "RES-ASSET"}},
					{Identifier: "RES-ASSET", Type: "webcontent", ScormType: "asset", Href: "a.html", LaunchURL: "a.html",
						Files: []string{"a.html"}, Dependencies: []string{"RES-LIB"}},
					{Identifier: "RES-LIB", Type: "webcontent", ScormType: "asset",
						Files: []string{"lib/x.js", "lib/y.css"}, Dependencies: []string{}},
				}
				if !reflect.DeepEqual(m.Resources, want) {
					t.Errorf("resources:\ngot  %s\nwant %s", jsonString(t, m.Resources), jsonString(t, want))
				}
			},
		},
		{
			name: "xml:base on manifest, resources and resource",
			edit: func(s *scormgen.Spec) {
				s.XMLBase = "pkg/"
				s.ResourcesXMLBase = "res"
				s.Resources[0].XMLBase = "r1/"
			},
			verify: func(t *testing.T, m *scorm.Manifest) {
				if got := findItem(t, m, "ITEM-1").LaunchURL; got != "pkg/res/r1/lesson1/index.html" {
					t.Errorf("launch URL = %q", got)
				}
				if m.XMLBase != "pkg/" || m.ResourcesXMLBase != "res" || m.Resources[0].XMLBase != "r1/" {
					t.Errorf("raw bases = %q, %q, %q", m.XMLBase, m.ResourcesXMLBase, m.Resources[0].XMLBase)
				}
			},
		},
		{
			name: "absolute xml:base resets the chain",
			edit: func(s *scormgen.Spec) {
				s.XMLBase = "pkg/"
				s.Resources[0].XMLBase = "https://cdn.example.com/c/"
			},
			verify: func(t *testing.T, m *scorm.Manifest) {
				if got := findItem(t, m, "ITEM-1").LaunchURL; got != "https://cdn.example.com/c/lesson1/index.html" {
					t.Errorf("launch URL = %q", got)
				}
			},
		},
		{
			name: "default organization and its title",
			edit: func(s *scormgen.Spec) {
				s.Organizations = append(s.Organizations, scormgen.Organization{
					Identifier: "ORG-2", Title: "Second",
					Items: []scormgen.Item{{Identifier: "ITEM-2", Title: "Other", Resource: "RES-1"}},
				})
				s.DefaultOrganization = "ORG-2"
			},
			verify: func(t *testing.T, m *scorm.Manifest) {
				if m.DefaultOrganization != "ORG-2" || m.Title != "Second" || len(m.Organizations) != 2 {
					t.Errorf("default, title, organizations = %q, %q, %d", m.DefaultOrganization, m.Title, len(m.Organizations))
				}
			},
		},
		{
			name: "organization sequencing",
			edit: func(s *scormgen.Spec) {
				s.Version = scormgen.Version2004Ed4
				s.Organizations[0].Sequencing = &scormgen.Sequencing{ControlMode: &scormgen.ControlMode{Choice: "false", Flow: "true"}}
			},
			verify: func(t *testing.T, m *scorm.Manifest) {
				want := &scorm.Sequencing{ControlMode: &scorm.ControlMode{
					ChoiceExit: true, Flow: true, UseCurrentAttemptObjectiveInfo: true, UseCurrentAttemptProgressInfo: true,
				}}
				if got := m.Organizations[0].Sequencing; !reflect.DeepEqual(got, want) {
					t.Errorf("sequencing = %s", jsonString(t, got))
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := fixture(scormgen.Version12)
			tt.edit(&s)
			tt.verify(t, parseSpec(t, s))
		})
	}
}

// jsonString renders v for failure messages.
func jsonString(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("json.Marshal: %v", err)
	}
	return string(b)
}

// mustInvalid fails unless err wraps ErrInvalidPackage with exactly the message want.
func mustInvalid(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want %q", want)
	}
	if !errors.Is(err, scorm.ErrInvalidPackage) {
		t.Errorf("error %q does not wrap ErrInvalidPackage", err)
	}
	if err.Error() != want {
		t.Errorf("error = %q\nwant    %q", err, want)
	}
}
