package main

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
)

// maxHead bounds an answer's status line and headers: more without their end is an error.
const maxHead = 64 << 10

// errNoLength: an answer without Content-Length or chunked encoding ends only when the server
// closes the connection, which a keep-alive load cannot wait for.
var errNoLength = errors.New("answer has neither Content-Length nor chunked encoding")

// answer is what the load counts of one HTTP answer.
type answer struct {
	status int
	value  string // the counted header's value, "" when absent
	keep   bool   // the connection stays open after it
}

// parseAnswer parses the HTTP/1.x answer to a GET at the start of b, skipping interim (1xx)
// answers before it. It returns n = 0 and a nil error while b does not hold all of it yet,
// else the bytes it took, so that the next answer starts at b[n:]. header is the header whose
// value is returned (matched case-insensitively). The answer's body is not kept.
func parseAnswer(b []byte, header []byte) (a answer, n int, err error) {
	for {
		end := bytes.Index(b[n:], []byte("\r\n\r\n"))
		if end < 0 {
			if len(b)-n > maxHead {
				return a, 0, fmt.Errorf("no end of headers in %d bytes", len(b)-n)
			}
			return a, 0, nil
		}
		head := b[n : n+end]
		body := n + end + 4
		line, rest, _ := bytes.Cut(head, []byte("\r\n"))
		// "HTTP/1.1 200 OK"
		if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
			return a, 0, fmt.Errorf("status line %q", line)
		}
		a = answer{keep: line[7] == '1'} // HTTP/1.1 keeps the connection unless told otherwise
		if a.status, err = strconv.Atoi(string(line[9:12])); err != nil {
			return a, 0, fmt.Errorf("status line %q", line)
		}
		length, chunked := int64(-1), false
		for len(rest) > 0 {
			var h []byte
			h, rest, _ = bytes.Cut(rest, []byte("\r\n"))
			name, v, ok := bytes.Cut(h, []byte(":"))
			if !ok {
				return a, 0, fmt.Errorf("header line %q", h)
			}
			v = bytes.TrimSpace(v)
			switch {
			case bytes.EqualFold(name, []byte("Content-Length")):
				if length, err = strconv.ParseInt(string(v), 10, 64); err != nil || length < 0 {
					return a, 0, fmt.Errorf("Content-Length %q", v)
				}
			case bytes.EqualFold(name, []byte("Transfer-Encoding")):
				chunked = bytes.EqualFold(v, []byte("chunked"))
			case bytes.EqualFold(name, []byte("Connection")):
				if bytes.EqualFold(v, []byte("close")) {
					a.keep = false
				} else if bytes.EqualFold(v, []byte("keep-alive")) {
					a.keep = true
				}
			case len(header) > 0 && bytes.EqualFold(name, header):
				a.value = string(v)
			}
		}
		switch {
		case a.status >= 100 && a.status < 200:
			n = body // an interim answer: the real one follows
			continue
		case a.status == 204 || a.status == 304:
			return a, body, nil
		case chunked:
			m, err := chunkedEnd(b[body:])
			if err != nil || m == 0 {
				return a, 0, err
			}
			return a, body + m, nil
		case length >= 0:
			if int64(len(b)-body) < length {
				return a, 0, nil
			}
			return a, body + int(length), nil
		default:
			return a, 0, errNoLength
		}
	}
}

// chunkedEnd returns the length of the chunked body at the start of b, trailer included, or 0
// while b does not hold all of it.
func chunkedEnd(b []byte) (int, error) {
	n := 0
	for {
		eol := bytes.Index(b[n:], []byte("\r\n"))
		if eol < 0 {
			return 0, nil
		}
		size, _, _ := bytes.Cut(b[n:n+eol], []byte(";"))
		sz, err := strconv.ParseInt(string(bytes.TrimSpace(size)), 16, 64)
		if err != nil || sz < 0 {
			return 0, fmt.Errorf("chunk size %q", b[n:n+eol])
		}
		n += eol + 2
		if sz == 0 {
			for { // trailer lines, then an empty line
				eol := bytes.Index(b[n:], []byte("\r\n"))
				if eol < 0 {
					return 0, nil
				}
				n += eol + 2
				if eol == 0 {
					return n, nil
				}
			}
		}
		if int64(len(b)-n) < sz+2 {
			return 0, nil
		}
		n += int(sz)
		if !bytes.HasPrefix(b[n:], []byte("\r\n")) {
			return 0, fmt.Errorf("chunk of %d bytes not followed by CRLF", sz)
		}
		n += 2
	}
}
