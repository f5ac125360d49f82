package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"
)

// rawConn is one keep-alive HTTP/1.1 connection for -load: requests are written as prepared
// bytes and answers parsed just enough to find their end (Content-Length, chunked, or the
// connection's close), the status and X-Session-Store. net/http's client spends markedly more
// CPU per request (two goroutines per connection and their hand-offs), and on 2 shared cores
// the load generator's CPU is taken from the server it measures. One request at a time:
// no pipelining.
type rawConn struct {
	addr   string
	conn   net.Conn
	r      *bufio.Reader
	opened int // connections dialled, the first one included
}

// maxHeaderLine bounds a status or header line (the reader's buffer).
const maxHeaderLine = 16 << 10

// do sends req (a complete request) and reads the whole answer. After an error or an answer
// that ends the connection, the next call dials again.
func (rc *rawConn) do(ctx context.Context, req []byte, timeout time.Duration) (status int, store string, err error) {
	if rc.conn == nil {
		d := net.Dialer{Timeout: timeout}
		c, err := d.DialContext(ctx, "tcp", rc.addr)
		if err != nil {
			return 0, "", err
		}
		rc.conn, rc.r = c, bufio.NewReaderSize(c, maxHeaderLine)
		rc.opened++
	}
	if err := rc.conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		rc.close()
		return 0, "", err
	}
	if _, err := rc.conn.Write(req); err != nil {
		rc.close()
		return 0, "", err
	}
	status, store, keep, err := readAnswer(rc.r)
	if err != nil || !keep {
		rc.close()
	}
	return status, store, err
}

func (rc *rawConn) close() {
	if rc.conn != nil {
		rc.conn.Close()
		rc.conn, rc.r = nil, nil
	}
}

// readAnswer reads one HTTP/1.x answer to a GET or PUT: its status, its X-Session-Store, and
// whether the connection stays open.
func readAnswer(r *bufio.Reader) (status int, store string, keep bool, err error) {
	for {
		line, err := readLine(r)
		if err != nil {
			return 0, "", false, fmt.Errorf("status line: %w", err)
		}
		// "HTTP/1.1 200 OK"
		if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
			return 0, "", false, fmt.Errorf("status line %q", line)
		}
		status, err = strconv.Atoi(string(line[9:12]))
		if err != nil {
			return 0, "", false, fmt.Errorf("status line %q", line)
		}
		keep = line[7] == '1' // HTTP/1.1 keeps the connection unless told otherwise
		length, chunked := int64(-1), false
		for {
			h, err := readLine(r)
			if err != nil {
				return 0, "", false, fmt.Errorf("header: %w", err)
			}
			if len(h) == 0 {
				break
			}
			name, value, ok := bytes.Cut(h, []byte(":"))
			if !ok {
				return 0, "", false, fmt.Errorf("header line %q", h)
			}
			value = bytes.TrimSpace(value)
			switch {
			case bytes.EqualFold(name, []byte("Content-Length")):
				if length, err = strconv.ParseInt(string(value), 10, 64); err != nil || length < 0 {
					return 0, "", false, fmt.Errorf("Content-Length %q", value)
				}
			case bytes.EqualFold(name, []byte("Transfer-Encoding")):
				chunked = bytes.EqualFold(value, []byte("chunked"))
			case bytes.EqualFold(name, []byte("Connection")):
				if bytes.EqualFold(value, []byte("close")) {
					keep = false
				} else if bytes.EqualFold(value, []byte("keep-alive")) {
					keep = true
				}
			case bytes.EqualFold(name, []byte("X-Session-Store")):
				store = string(value)
			}
		}
		if status >= 100 && status < 200 {
			continue // an interim answer: the real one follows
		}
		switch {
		case status == 204 || status == 304:
		case chunked:
			err = discardChunked(r)
		case length >= 0:
			_, err = r.Discard(int(length))
		default: // the body runs to the connection's end
			_, err = io.Copy(io.Discard, r)
			keep = false
		}
		if err != nil {
			return status, store, false, fmt.Errorf("body: %w", err)
		}
		return status, store, keep, nil
	}
}

// readLine returns one line without its CRLF; the slice is valid until the next read.
func readLine(r *bufio.Reader) ([]byte, error) {
	line, err := r.ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, fmt.Errorf("line longer than %d bytes", maxHeaderLine)
		}
		return nil, err
	}
	return bytes.TrimRight(line, "\r\n"), nil
}

func discardChunked(r *bufio.Reader) error {
	for {
		line, err := readLine(r)
		if err != nil {
			return err
		}
		size, _, _ := bytes.Cut(line, []byte(";"))
		n, err := strconv.ParseInt(string(bytes.TrimSpace(size)), 16, 64)
		if err != nil || n < 0 {
			return fmt.Errorf("chunk size %q", line)
		}
		if n == 0 {
			for { // trailer
				t, err := readLine(r)
				if err != nil {
					return err
				}
				if len(t) == 0 {
					return nil
				}
			}
		}
		if _, err := r.Discard(int(n)); err != nil {
			return err
		}
		if crlf, err := readLine(r); err != nil || len(crlf) != 0 {
			return fmt.Errorf("chunk end: %q, %v", crlf, err)
		}
	}
}

// buildRequest is a complete HTTP/1.1 request for path on host, with body (PUT, JSON) or
// without (GET).
func buildRequest(method, host, path string, body []byte) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: cachecar-bench-sessions\r\n", method, path, host)
	if body != nil {
		fmt.Fprintf(&b, "Content-Type: application/json\r\nContent-Length: %d\r\n", len(body))
	}
	b.WriteString("\r\n")
	b.Write(body)
	return b.Bytes()
}
