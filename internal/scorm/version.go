package scorm

import "strings"

// detectVersion decides the SCORM version of a manifest.
//
// The <schemaversion> text decides when it is one of the values the specifications define:
// "1.2", "CAM 1.3" (2004 2nd Edition), "2004 3rd Edition", "2004 4th Edition" (compared
// without regard to case or repeated spaces). Otherwise the ADL namespaces decide: the SCORM
// 1.2 adlcp namespace means 1.2; the SCORM 2004 adlcp (or sequencing, navigation) namespaces
// mean 2004, with the edition read loosely from schemaversion ("4th", "3rd", "2nd" or "1.3")
// and the 4th Edition when schemaversion says nothing usable, as it is the one current
// players implement and its runtime is backward compatible. Anything else is unknown.
func detectVersion(schemaVersion string, namespaces map[string]bool) string {
	sv := strings.ToLower(strings.Join(strings.Fields(schemaVersion), " "))
	switch sv {
	case "1.2":
		return Version12
	case "cam 1.3":
		return Version2004Ed2
	case "2004 3rd edition":
		return Version2004Ed3
	case "2004 4th edition":
		return Version2004Ed4
	}
	switch {
	case namespaces[nsADLCP12]:
		return Version12
	case namespaces[nsADLCP2004], namespaces[nsIMSSS], namespaces[nsADLSEQ], namespaces[nsADLNAV]:
		switch {
		case strings.Contains(sv, "4th"):
			return Version2004Ed4
		case strings.Contains(sv, "3rd"):
			return Version2004Ed3
		case strings.Contains(sv, "2nd"), strings.Contains(sv, "1.3"):
			return Version2004Ed2
		}
		return Version2004Ed4
	}
	return VersionUnknown
}
