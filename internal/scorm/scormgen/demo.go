package scormgen

// Demo returns the demo set WriteDemo writes: six small courses of our own covering both
// SCORM versions, every 2004 edition and each manifest feature the parser reads.
func Demo() []Spec {
	return []Spec{
		introToSafety(),
		complianceBasics(),
		dataPrivacy(),
		leadership(),
		onboarding(),
		workplaceEthics(),
	}
}

// introToSafety is SCORM 1.2 with every 1.2 item extension, parameters and a shared asset.
func introToSafety() Spec {
	return Spec{
		Filename:   "intro-to-safety-scorm12.zip",
		Version:    Version12,
		Identifier: "com.cachecar.demo.intro-to-safety",
		Organizations: []Organization{{
			Identifier: "ORG-SAFETY",
			Title:      "Introduction to Workplace Safety",
			Items: []Item{
				{
					Identifier: "ITEM-WELCOME", Title: "Welcome and Safety Basics", Resource: "RES-WELCOME",
					MasteryScore: "80", MaxTimeAllowed: "0000:30:00", TimeLimitAction: "continue,no message",
					DataFromLMS: "lang=en;site=HQ",
				},
				{
					Identifier: "ITEM-HAZARDS", Title: "Spotting Hazards", Resource: "RES-HAZARDS",
					Parameters: "?scene=warehouse", MasteryScore: "70", Prerequisites: "ITEM-WELCOME",
					TimeLimitAction: "exit,message",
				},
				{Identifier: "ITEM-CHECKLIST", Title: "Daily Safety Checklist", Resource: "RES-CHECKLIST"},
			},
		}},
		Resources: []Resource{
			{
				Identifier: "RES-WELCOME", ScormType: "sco", Href: "welcome/index.html",
				Dependencies: []string{"RES-SHARED"},
			},
			{
				Identifier: "RES-HAZARDS", ScormType: "sco", Href: "hazards/index.html",
				Files:        []File{{Href: "hazards/index.html"}, {Href: "hazards/scenes.txt"}},
				Dependencies: []string{"RES-SHARED"},
			},
			{Identifier: "RES-CHECKLIST", ScormType: "asset", Href: "checklist.html"},
			{
				Identifier: "RES-SHARED", ScormType: "asset",
				Files: []File{{Href: "shared/style.css"}, {Href: "shared/runtime.js"}},
			},
		},
	}
}

// complianceBasics is SCORM 1.2 with nested items, a hidden item, a resources xml:base and
// fragment and query parameters.
func complianceBasics() Spec {
	return Spec{
		Filename:            "compliance-basics-scorm12.zip",
		Version:             Version12,
		Identifier:          "com.cachecar.demo.compliance-basics",
		DefaultOrganization: "ORG-COMPLIANCE",
		ResourcesXMLBase:    "content/",
		Organizations: []Organization{{
			Identifier: "ORG-COMPLIANCE",
			Title:      "Compliance Basics",
			Items: []Item{
				{
					Identifier: "MOD-1", Title: "Module 1: Policies",
					Children: []Item{
						{Identifier: "LES-1-1", Title: "Code of Conduct", Resource: "RES-CONDUCT", MasteryScore: "75.5"},
						{Identifier: "LES-1-2", Title: "Gifts and Hospitality", Resource: "RES-GIFTS", Parameters: "#section-2"},
					},
				},
				{
					Identifier: "MOD-2", Title: "Module 2: Reporting",
					Children: []Item{
						{Identifier: "LES-2-1", Title: "Speaking Up", Resource: "RES-SPEAKUP", Parameters: "&mode=review"},
						{Identifier: "LES-2-2", Title: "Facilitator Notes", Resource: "RES-NOTES", Hidden: true},
					},
				},
			},
		}},
		Resources: []Resource{
			{Identifier: "RES-CONDUCT", ScormType: "sco", Href: "conduct/index.html"},
			{Identifier: "RES-GIFTS", ScormType: "sco", Href: "gifts/index.html?lang=en"},
			{Identifier: "RES-SPEAKUP", ScormType: "sco", Href: "speakup/index.html"},
			{Identifier: "RES-NOTES", ScormType: "asset", Href: "notes/facilitator.html"},
		},
	}
}

// dataPrivacy is SCORM 2004 4th Edition with items nested three levels deep, xml:base on the
// manifest, <resources> and <resource>, sequencing (local and through the collection) and the
// element form of the completion threshold.
func dataPrivacy() Spec {
	return Spec{
		Filename:            "data-privacy-2004-4th.zip",
		Version:             Version2004Ed4,
		Identifier:          "com.cachecar.demo.data-privacy",
		DefaultOrganization: "ORG-PRIVACY",
		XMLBase:             "course/",
		ResourcesXMLBase:    "modules/",
		Organizations: []Organization{{
			Identifier: "ORG-PRIVACY",
			Title:      "Data Privacy Essentials",
			Sequencing: &Sequencing{ControlMode: &ControlMode{Choice: "true", Flow: "true"}},
			Items: []Item{
				{
					Identifier: "PART-1", Title: "Part 1: Foundations",
					Sequencing: &Sequencing{IDRef: "SEQ-LINEAR"},
					Children: []Item{
						{
							Identifier: "MOD-1-1", Title: "What Is Personal Data",
							Children: []Item{
								{
									Identifier: "LES-1-1-1", Title: "Identifiers and Attributes", Resource: "RES-IDENTIFIERS",
									CompletionThreshold: &CompletionThreshold{CompletedByMeasure: "true", MinProgressMeasure: "0.8", ProgressWeight: "0.5"},
								},
								{
									Identifier: "LES-1-1-2", Title: "Special Categories", Resource: "RES-CATEGORIES",
									Parameters: "topic=health", DataFromLMS: "region=EU",
								},
							},
						},
						{
							Identifier: "MOD-1-2", Title: "Lawful Processing", Resource: "RES-LAWFUL",
							TimeLimitAction: "exit,no message",
						},
					},
				},
				{
					Identifier: "PART-2", Title: "Part 2: In Practice",
					Sequencing: &Sequencing{IDRef: "SEQ-LINEAR", ControlMode: &ControlMode{Choice: "true", ChoiceExit: "false", Flow: "true"}},
					Children: []Item{
						{Identifier: "MOD-2-1", Title: "Handling a Breach", Resource: "RES-BREACH", Parameters: "#start"},
						{Identifier: "MOD-2-2", Title: "Glossary", Resource: "RES-GLOSSARY", Hidden: true},
					},
				},
			},
		}},
		Resources: []Resource{
			{Identifier: "RES-IDENTIFIERS", ScormType: "sco", XMLBase: "m1/", Href: "identifiers.html", Dependencies: []string{"RES-COMMON"}},
			{Identifier: "RES-CATEGORIES", ScormType: "sco", XMLBase: "m1/", Href: "categories.html?v=2", Dependencies: []string{"RES-COMMON"}},
			{Identifier: "RES-LAWFUL", ScormType: "sco", XMLBase: "m2", Href: "lawful.html"},
			{Identifier: "RES-BREACH", ScormType: "sco", XMLBase: "m3/", Href: "../m3/breach.html"},
			{Identifier: "RES-GLOSSARY", ScormType: "asset", Href: "glossary.html"},
			{Identifier: "RES-COMMON", ScormType: "asset", XMLBase: "common/", Files: []File{{Href: "privacy.css"}}},
		},
		SequencingCollection: []Sequencing{
			{ID: "SEQ-LINEAR", ControlMode: &ControlMode{Choice: "false", Flow: "true", ForwardOnly: "true"}},
		},
	}
}

// leadership is SCORM 2004 3rd Edition with the text form of the completion threshold, a time
// limit action, data from the LMS and a chain of dependencies.
func leadership() Spec {
	return Spec{
		Filename:   "leadership-2004-3rd.zip",
		Version:    Version2004Ed3,
		Identifier: "com.cachecar.demo.leadership",
		Organizations: []Organization{{
			Identifier: "ORG-LEAD",
			Title:      "Leading Teams",
			Items: []Item{
				{Identifier: "LEAD-1", Title: "Setting Direction", Resource: "RES-DIRECTION", CompletionThresholdText: "0.75"},
				{
					Identifier: "LEAD-2", Title: "Giving Feedback", Resource: "RES-FEEDBACK",
					TimeLimitAction: "continue,message", DataFromLMS: "cohort=2024-spring",
				},
				{Identifier: "LEAD-3", Title: "Further Reading", Resource: "RES-READING"},
			},
		}},
		Resources: []Resource{
			{Identifier: "RES-DIRECTION", ScormType: "sco", Href: "direction/index.html", Dependencies: []string{"RES-THEME"}},
			{Identifier: "RES-FEEDBACK", ScormType: "sco", Href: "feedback/index.html", Dependencies: []string{"RES-THEME", "RES-SCRIPTS"}},
			{Identifier: "RES-READING", ScormType: "asset", Href: "reading.html"},
			{Identifier: "RES-THEME", ScormType: "asset", Files: []File{{Href: "theme/lead.css"}}, Dependencies: []string{"RES-SCRIPTS"}},
			{Identifier: "RES-SCRIPTS", ScormType: "asset", Files: []File{{Href: "theme/lead.js"}}},
		},
	}
}

// onboarding is SCORM 2004 4th Edition with two organizations (the default is the second),
// forward-only sequencing, defaults for the completion threshold and an external resource
// under an absolute xml:base.
func onboarding() Spec {
	return Spec{
		Filename:            "onboarding-2004-4th.zip",
		Version:             Version2004Ed4,
		Identifier:          "com.cachecar.demo.onboarding",
		DefaultOrganization: "ORG-EMPLOYEE",
		Organizations: []Organization{
			{
				Identifier: "ORG-MANAGER",
				Title:      "Onboarding: Manager Guide",
				Items: []Item{
					{Identifier: "MGR-1", Title: "Preparing the First Week", Resource: "RES-MGR"},
				},
			},
			{
				Identifier: "ORG-EMPLOYEE",
				Title:      "Onboarding: Your First Week",
				Sequencing: &Sequencing{ControlMode: &ControlMode{Flow: "true", ForwardOnly: "true"}},
				Items: []Item{
					{Identifier: "EMP-1", Title: "Welcome Aboard", Resource: "RES-WELCOME", CompletionThreshold: &CompletionThreshold{}},
					{Identifier: "EMP-2", Title: "Office Tour", Resource: "RES-TOUR", Parameters: "?start=lobby"},
					{Identifier: "EMP-3", Title: "Tools and Accounts", Resource: "RES-TOOLS", CompletionThreshold: &CompletionThreshold{MinProgressMeasure: "0.6"}},
				},
			},
		},
		Resources: []Resource{
			{Identifier: "RES-MGR", ScormType: "asset", Href: "manager/guide.html"},
			{Identifier: "RES-WELCOME", ScormType: "sco", Href: "welcome.html"},
			{Identifier: "RES-TOUR", ScormType: "asset", XMLBase: "https://media.example.com/onboarding/", Href: "tour.html"},
			{Identifier: "RES-TOOLS", ScormType: "sco", Href: "tools.html"},
		},
	}
}

// workplaceEthics is SCORM 2004 2nd Edition ("CAM 1.3"), the smallest package of the set.
func workplaceEthics() Spec {
	return Spec{
		Filename:   "workplace-ethics-2004-2nd.zip",
		Version:    Version2004Ed2,
		Identifier: "com.cachecar.demo.workplace-ethics",
		Organizations: []Organization{{
			Identifier: "ORG-ETHICS",
			Title:      "Workplace Ethics",
			Items: []Item{
				{Identifier: "ETH-1", Title: "Everyday Dilemmas", Resource: "RES-ETHICS"},
			},
		}},
		Resources: []Resource{
			{Identifier: "RES-ETHICS", ScormType: "sco", Href: "ethics.html"},
		},
	}
}
