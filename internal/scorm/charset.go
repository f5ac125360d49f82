package scorm

import (
	"bytes"
	"io"
	"strings"
	"unicode/utf8"
)

// charsetReader is the xml.Decoder CharsetReader: it is called for an encoding declaration
// other than UTF-8. US-ASCII and ISO-8859-1 are decoded as ISO-8859-1 (a superset of ASCII, so
// a mislabelled byte above 0x7F is read rather than refused), windows-1252 with its table
// for 0x80-0x9F; anything else is refused with a clear message. The input is already bounded
// by the caller, so it is converted in one go.
func charsetReader(label string, input io.Reader) (io.Reader, error) {
	// windows1252 maps bytes 0x80-0x9F of windows-1252 to Unicode; the five bytes the code
	// page leaves undefined map to the C1 control of the same value, as ISO-8859-1 would.
	windows1252 := [32]rune{
		0x20AC, 0x0081, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021,
		0x02C6, 0x2030, 0x0160, 0x2039, 0x0152, 0x008D, 0x017D, 0x008F,
		0x0090, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014,
		0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0x009D, 0x017E, 0x0178,
	}
	var table *[32]rune
	switch strings.ToLower(strings.TrimSpace(label)) {
	case "utf8":
		return input, nil
	case "us-ascii", "ascii", "iso-8859-1", "iso8859-1", "iso_8859-1", "latin1", "latin-1", "l1":
	case "windows-1252", "cp1252":
		table = &windows1252
	default:
		return nil, invalidf("unsupported XML encoding %s; use UTF-8", q(label))
	}
	in, err := io.ReadAll(input)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 0, len(in)+len(in)/2)
	for _, b := range in {
		r := rune(b)
		if table != nil && b >= 0x80 && b < 0xA0 {
			r = table[b-0x80]
		}
		out = utf8.AppendRune(out, r)
	}
	return bytes.NewReader(out), nil
}
