package main

import (
	"errors"
	"strings"
	"testing"
)

func TestParseAnswer(t *testing.T) {
	const cl = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-cache: HIT\r\nContent-Length: 5\r\n\r\nhello"
	const chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Cache: MISS\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n"
	tests := []struct {
		name    string
		in      string
		want    answer
		n       int // 0: incomplete; -1: all of in
		wantErr bool
	}{
		{name: "content-length", in: cl + "HTTP/1.1 ...next", want: answer{200, "HIT", true}, n: len(cl)},
		{name: "body incomplete", in: cl[:len(cl)-1]},
		{name: "headers incomplete", in: "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"},
		{name: "chunked", in: chunked, want: answer{200, "MISS", true}, n: -1},
		{name: "chunked incomplete", in: chunked[:len(chunked)-2]},
		{name: "chunk incomplete", in: chunked[:len(chunked)-20]},
		{name: "204 without length", in: "HTTP/1.1 204 No Content\r\n\r\n", want: answer{204, "", true}, n: -1},
		{name: "interim then answer", in: "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
			want: answer{404, "", true}, n: -1},
		{name: "connection close", in: "HTTP/1.1 503 Unavailable\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno",
			want: answer{503, "", false}, n: -1},
		{name: "HTTP/1.0 keep-alive", in: "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
			want: answer{200, "", true}, n: -1},
		{name: "HTTP/1.0 default close", in: "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", want: answer{200, "", false}, n: -1},
		{name: "no length", in: "HTTP/1.1 200 OK\r\n\r\nbody", wantErr: true},
		{name: "bad status line", in: "HTTP/2 200\r\n\r\n", wantErr: true},
		{name: "bad content-length", in: "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", wantErr: true},
		{name: "bad chunk size", in: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", wantErr: true},
		{name: "headers too long", in: "HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", maxHead), wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, n, err := parseAnswer([]byte(tt.in), []byte("X-Cache"))
			if tt.wantErr {
				if err == nil {
					t.Fatalf("parseAnswer: no error, want one (answer %+v, n %d)", a, n)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseAnswer: %v", err)
			}
			if tt.n == -1 {
				tt.n = len(tt.in)
			}
			if n != tt.n {
				t.Fatalf("n = %d, want %d", n, tt.n)
			}
			if n > 0 && a != tt.want {
				t.Fatalf("answer = %+v, want %+v", a, tt.want)
			}
		})
	}
}

func TestParseAnswerNoLengthIsErrNoLength(t *testing.T) {
	_, _, err := parseAnswer([]byte("HTTP/1.1 200 OK\r\nX-Cache: HIT\r\n\r\n"), []byte("X-Cache"))
	if !errors.Is(err, errNoLength) {
		t.Fatalf("err = %v, want errNoLength", err)
	}
}
