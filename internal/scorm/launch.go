package scorm

import "strings"

// Launch URLs follow the SCORM CAM (2004 4th Edition, section 3.4.1.x, which SCORM 1.2
// packages follow as well):
//
//  1. The xml:base attributes of <manifest>, <resources> and <resource> form a chain: each
//     one is resolved against the one outside it, as XML Base says (RFC 3986 reference
//     resolution). A base that is an absolute URL ("https://cdn.example.com/course/") resets
//     the chain; a path-absolute one ("/courses/") keeps only the outer scheme and host.
//  2. Every xml:base is taken as a directory: a missing trailing "/" is added. XML Base would
//     drop a last segment without one ("content" + "index.html" = "index.html"), but in a
//     package a base only ever names a folder, and authors regularly leave the slash out.
//     Any query or fragment on a base is dropped.
//  3. The resource's href is resolved against the chain. Dot segments are removed; in a
//     relative result a ".." that climbs above the package root is kept (not silently
//     clamped) so whoever serves the file can see and refuse it.
//  4. The item's parameters attribute is appended: leading "?" and "&" are stripped; a value
//     starting with "#" is a fragment, appended as is unless the URL already has one; any
//     other value is joined with "&" when the URL already has a query, else with "?". The
//     query goes before an existing fragment (the CAM appends blindly, which would put it
//     inside the fragment).
//
// Nothing is percent-encoded or decoded: hrefs are passed through as the package wrote them.

// resolveBase returns the chain of xml:base values, outermost first, resolved into one base.
func resolveBase(bases ...string) string {
	out := ""
	for _, b := range bases {
		if b == "" {
			continue
		}
		p, _ := splitSuffix(b)
		if !strings.HasSuffix(p, "/") {
			p += "/"
		}
		out = resolveRef(out, p)
	}
	return out
}

// resolveRef resolves the reference ref against base (RFC 3986 section 5.2), where base may
// itself be relative. Any query or fragment of base is ignored.
func resolveRef(base, ref string) string {
	if ref == "" {
		return base
	}
	if hasScheme(ref) {
		return ref
	}
	scheme, authority, basePath := splitURL(base)
	if strings.HasPrefix(ref, "//") {
		if scheme == "" {
			return ref
		}
		return scheme + ":" + ref
	}
	prefix := ""
	if scheme != "" {
		prefix = scheme + ":"
	}
	if authority != "" || strings.HasPrefix(base[len(prefix):], "//") {
		prefix += "//" + authority
	}
	refPath, suffix := splitSuffix(ref)
	rooted := prefix != "" // an absolute base: ".." stops at its root, as RFC 3986 says
	switch {
	case refPath == "":
		return prefix + basePath + suffix
	case strings.HasPrefix(refPath, "/"):
		return prefix + removeDotSegments(refPath, true) + suffix
	}
	dir := basePath[:strings.LastIndex(basePath, "/")+1]
	if dir == "" && authority != "" {
		dir = "/"
	}
	return prefix + removeDotSegments(dir+refPath, rooted) + suffix
}

// hasScheme tells whether s starts with a URI scheme ("http:", "mailto:").
func hasScheme(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z':
		case i > 0 && ('0' <= c && c <= '9' || c == '+' || c == '-' || c == '.'):
		case i > 0 && c == ':':
			return true
		default:
			return false
		}
	}
	return false
}

// splitURL splits u into scheme, authority and path, dropping any query and fragment.
func splitURL(u string) (scheme, authority, path string) {
	u, _ = splitSuffix(u)
	if hasScheme(u) {
		i := strings.IndexByte(u, ':')
		scheme, u = u[:i], u[i+1:]
	}
	if rest, ok := strings.CutPrefix(u, "//"); ok {
		i := strings.IndexByte(rest, '/')
		if i < 0 {
			return scheme, rest, ""
		}
		return scheme, rest[:i], rest[i:]
	}
	return scheme, "", u
}

// splitSuffix splits u before its query or fragment, whichever comes first.
func splitSuffix(u string) (path, suffix string) {
	if i := strings.IndexAny(u, "?#"); i >= 0 {
		return u[:i], u[i:]
	}
	return u, ""
}

// removeDotSegments removes "." and ".." segments from p. A ".." that would climb above the
// start is dropped when rooted and kept otherwise. A trailing "/" (or a trailing "." or "..",
// which name a directory) is kept.
func removeDotSegments(p string, rooted bool) string {
	leading := strings.HasPrefix(p, "/")
	segs := strings.Split(strings.TrimPrefix(p, "/"), "/")
	out := make([]string, 0, len(segs))
	for i, s := range segs {
		last := i == len(segs)-1
		switch s {
		case ".":
			if last {
				out = append(out, "")
			}
		case "..":
			if n := len(out); n > 0 && out[n-1] != ".." {
				out = out[:n-1]
			} else if !rooted && !leading {
				out = append(out, "..")
			}
			if last {
				out = append(out, "")
			}
		default:
			out = append(out, s)
		}
	}
	r := strings.Join(out, "/")
	if leading {
		r = "/" + r
	}
	return r
}

// appendParameters appends an item's parameters attribute to a launch URL (rule 4 above).
func appendParameters(u, params string) string {
	p := strings.TrimLeft(params, "?&")
	if p == "" {
		return u
	}
	if p[0] == '#' {
		if strings.Contains(u, "#") {
			return u
		}
		return u + p
	}
	head, frag := u, ""
	if i := strings.IndexByte(u, '#'); i >= 0 {
		head, frag = u[:i], u[i:]
	}
	switch {
	case strings.HasSuffix(head, "?") || strings.HasSuffix(head, "&"):
		return head + p + frag
	case strings.Contains(head, "?"):
		return head + "&" + p + frag
	default:
		return head + "?" + p + frag
	}
}
