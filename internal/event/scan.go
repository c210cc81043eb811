package event

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"strconv"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// This file is a small JSON scanner for Decode. It validates JSON exactly as
// encoding/json does (RFC 8259 grammar, at most maxNestingDepth nested
// arrays and objects), skips what Decode does not read without allocating,
// and reports the raw bytes of the strings Decode wants. Its results must be
// those of the encoding/json-based reference implementation
// (reference_test.go); FuzzDecodeMatchesReference checks that.

// maxNestingDepth is encoding/json's limit on nested arrays and objects.
const maxNestingDepth = 10000

// syntaxError is an input that is not JSON.
type syntaxError struct {
	msg string
	off int
}

func (e *syntaxError) Error() string { return fmt.Sprintf("%s at offset %d", e.msg, e.off) }

// scanner reads one JSON document. After the first syntax error, err is set
// and every method returns false.
type scanner struct {
	data  []byte
	pos   int
	depth int
	err   *syntaxError
	// overflow is set when skipValue(true) met a number that does not fit a
	// float64: encoding/json fails to decode such a number into an
	// interface{} value (and goes on, returning the error at the end).
	overflow bool
}

func (s *scanner) fail(msg string) bool {
	if s.err == nil {
		s.err = &syntaxError{msg: msg, off: s.pos}
	}
	s.pos = len(s.data) // stop
	return false
}

func (s *scanner) failChar(context string) bool {
	if s.pos >= len(s.data) {
		return s.fail("unexpected end of JSON input")
	}
	return s.fail(fmt.Sprintf("invalid character %s %s", quoteChar(s.data[s.pos]), context))
}

func quoteChar(c byte) string {
	if c == '\'' {
		return `'\''`
	}
	if c == '"' {
		return `'"'`
	}
	return strconv.QuoteRune(rune(c))
}

func (s *scanner) skipWS() {
	for s.pos < len(s.data) {
		switch s.data[s.pos] {
		case ' ', '\t', '\r', '\n':
			s.pos++
		default:
			return
		}
	}
}

// peek returns the next byte, or 0 at the end.
func (s *scanner) peek() byte {
	if s.pos < len(s.data) {
		return s.data[s.pos]
	}
	return 0
}

// atEnd skips white space and reports whether the document ends there.
func (s *scanner) atEnd() bool {
	s.skipWS()
	if s.err != nil {
		return false
	}
	if s.pos < len(s.data) {
		return s.failChar("after top-level value")
	}
	return true
}

const (
	swarLo = 0x0101010101010101
	swarHi = 0x8080808080808080
)

// stringSpecial marks the bytes a string scan must stop at: '"', '\\' and
// the control characters JSON does not allow unescaped.
var stringSpecial = func() (t [256]bool) {
	for c := range 0x20 {
		t[c] = true
	}
	t['"'], t['\\'] = true, true
	return t
}()

// jstr is a JSON string as it appears in the input: raw is what lies between
// the quotes, esc says whether it holds escapes. set is false for a value
// that is absent, null or not a string.
type jstr struct {
	raw []byte
	esc bool
	set bool
}

// String returns the string's value.
func (j jstr) String() string {
	if !j.esc {
		return string(j.raw)
	}
	var buf [128]byte
	return string(appendUnquoted(buf[:0], j.raw))
}

// equal reports whether the string's value is lit.
func (j jstr) equal(lit string) bool {
	if !j.esc {
		return string(j.raw) == lit
	}
	if len(j.raw) < len(lit) {
		return false // an escape only makes the value shorter than its text
	}
	var buf [128]byte
	return string(appendUnquoted(buf[:0], j.raw)) == lit
}

// skipPlain returns the index of the first byte at or after i that is
// special inside a JSON string ('"', '\\' or below 0x20), or len(d). It
// tests 8 bytes at a time: each test flags the lowest special byte of the
// word exactly (higher flags may be spurious, but come after it).
func skipPlain(d []byte, i int) int {
	for i+8 <= len(d) {
		w := binary.LittleEndian.Uint64(d[i:])
		q := w ^ (swarLo * '"')
		b := w ^ (swarLo * '\\')
		m := ((q - swarLo) &^ q) | ((b - swarLo) &^ b) | ((w - swarLo*0x20) &^ w)
		m &= swarHi
		if m != 0 {
			return i + bits.TrailingZeros64(m)/8
		}
		i += 8
	}
	for i < len(d) && !stringSpecial[d[i]] {
		i++
	}
	return i
}

// scanString reads the string at s.pos (its opening quote).
func (s *scanner) scanString() (jstr, bool) {
	d := s.data
	i := s.pos + 1
	start := i
	esc := false
	for {
		i = skipPlain(d, i)
		if i >= len(d) {
			s.pos = i
			return jstr{}, s.fail("unexpected end of JSON input")
		}
		switch c := d[i]; c {
		case '"':
			s.pos = i + 1
			return jstr{raw: d[start:i], esc: esc, set: true}, true
		case '\\':
			esc = true
			if i+1 >= len(d) {
				s.pos = i + 1
				return jstr{}, s.fail("unexpected end of JSON input")
			}
			switch d[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				for k := i + 2; k < i+6; k++ {
					if k >= len(d) {
						s.pos = k
						return jstr{}, s.fail("unexpected end of JSON input")
					}
					if hexVal(d[k]) < 0 {
						s.pos = k
						return jstr{}, s.failChar("in \\u hexadecimal character escape")
					}
				}
				i += 6
			default:
				s.pos = i + 1
				return jstr{}, s.failChar("in string escape code")
			}
		default:
			s.pos = i
			return jstr{}, s.failChar("in string literal")
		}
	}
}

// scanStringInto reads the string at s.pos (its opening quote) like
// scanString and appends its value to dst, in one pass.
func (s *scanner) scanStringInto(dst []byte) ([]byte, bool) {
	d := s.data
	start := s.pos
	i := s.pos + 1
	run := i // start of the bytes not yet copied
	for {
		i = skipPlain(d, i)
		if i >= len(d) {
			s.pos = i
			return dst, s.fail("unexpected end of JSON input")
		}
		switch c := d[i]; c {
		case '"':
			s.pos = i + 1
			return append(dst, d[run:i]...), true
		case '\\':
			dst = append(dst, d[run:i]...)
			if i+1 >= len(d) {
				s.pos = i + 1
				return dst, s.fail("unexpected end of JSON input")
			}
			switch e := d[i+1]; e {
			case '"', '\\', '/':
				dst = append(dst, e)
				i += 2
			case 'b':
				dst = append(dst, '\b')
				i += 2
			case 'f':
				dst = append(dst, '\f')
				i += 2
			case 'n':
				dst = append(dst, '\n')
				i += 2
			case 'r':
				dst = append(dst, '\r')
				i += 2
			case 't':
				dst = append(dst, '\t')
				i += 2
			case 'u':
				r := hex4(d[i+2 : min(i+6, len(d))])
				if r < 0 {
					// Not four hex digits: scan again for the error.
					s.pos = start
					_, ok := s.scanString()
					return dst, ok
				}
				i += 6
				if utf16.IsSurrogate(r) {
					// A pair, or U+FFFD as encoding/json decodes it.
					pair := unicode.ReplacementChar
					if i+1 < len(d) && d[i] == '\\' && d[i+1] == 'u' {
						if r2 := hex4(d[i+2 : min(i+6, len(d))]); r2 >= 0 {
							if pair = utf16.DecodeRune(r, r2); pair != unicode.ReplacementChar {
								i += 6
							}
						}
					}
					r = pair
				}
				dst = utf8.AppendRune(dst, r)
			default:
				s.pos = i + 1
				return dst, s.failChar("in string escape code")
			}
			run = i
		default:
			s.pos = i
			return dst, s.failChar("in string literal")
		}
	}
}

func hexVal(c byte) rune {
	switch {
	case '0' <= c && c <= '9':
		return rune(c - '0')
	case 'a' <= c && c <= 'f':
		return rune(c - 'a' + 10)
	case 'A' <= c && c <= 'F':
		return rune(c - 'A' + 10)
	}
	return -1
}

// hex4 reads the 4 hexadecimal digits of a \u escape at b[0:4]; -1 when
// they are not.
func hex4(b []byte) rune {
	if len(b) < 4 {
		return -1
	}
	var r rune
	for _, c := range b[:4] {
		v := hexVal(c)
		if v < 0 {
			return -1
		}
		r = r<<4 | v
	}
	return r
}

// appendUnquoted appends the value of a valid JSON string's raw text (what
// lies between its quotes) to dst, as encoding/json unquotes it: a lone or
// mismatched UTF-16 surrogate escape becomes U+FFFD.
func appendUnquoted(dst, raw []byte) []byte {
	for i := 0; i < len(raw); {
		c := raw[i]
		if c != '\\' {
			j := i + 1
			for j < len(raw) && raw[j] != '\\' {
				j++
			}
			dst = append(dst, raw[i:j]...)
			i = j
			continue
		}
		if i+1 >= len(raw) {
			return dst // not valid JSON: cannot happen after scanString
		}
		switch e := raw[i+1]; e {
		case 'b':
			dst = append(dst, '\b')
		case 'f':
			dst = append(dst, '\f')
		case 'n':
			dst = append(dst, '\n')
		case 'r':
			dst = append(dst, '\r')
		case 't':
			dst = append(dst, '\t')
		case 'u':
			r := hex4(raw[i+2:])
			i += 6
			if utf16.IsSurrogate(r) {
				if i+1 < len(raw) && raw[i] == '\\' && raw[i+1] == 'u' {
					if dec := utf16.DecodeRune(r, hex4(raw[i+2:])); dec != unicode.ReplacementChar {
						dst = utf8.AppendRune(dst, dec)
						i += 6
						continue
					}
				}
				r = unicode.ReplacementChar
			}
			dst = utf8.AppendRune(dst, r)
			continue
		default: // '"', '\\', '/'
			dst = append(dst, e)
		}
		i += 2
	}
	return dst
}

// scanNumber reads the number at s.pos and returns its text.
func (s *scanner) scanNumber() ([]byte, bool) {
	d := s.data
	start := s.pos
	i := s.pos
	if d[i] == '-' {
		i++
	}
	switch {
	case i >= len(d):
		s.pos = i
		return nil, s.fail("unexpected end of JSON input")
	case d[i] == '0':
		i++
	case '1' <= d[i] && d[i] <= '9':
		for i++; i < len(d) && '0' <= d[i] && d[i] <= '9'; i++ {
		}
	default:
		s.pos = i
		return nil, s.failChar("in numeric literal")
	}
	if i < len(d) && d[i] == '.' {
		i++
		if i >= len(d) || d[i] < '0' || d[i] > '9' {
			s.pos = i
			return nil, s.failChar("after decimal point in numeric literal")
		}
		for i++; i < len(d) && '0' <= d[i] && d[i] <= '9'; i++ {
		}
	}
	if i < len(d) && (d[i] == 'e' || d[i] == 'E') {
		i++
		if i < len(d) && (d[i] == '+' || d[i] == '-') {
			i++
		}
		if i >= len(d) || d[i] < '0' || d[i] > '9' {
			s.pos = i
			return nil, s.failChar("in exponent of numeric literal")
		}
		for i++; i < len(d) && '0' <= d[i] && d[i] <= '9'; i++ {
		}
	}
	s.pos = i
	return d[start:i], true
}

// overflowsFloat64 reports whether strconv.ParseFloat fails on the valid JSON
// number num, as encoding/json's decoding into interface{} does.
func overflowsFloat64(num []byte) bool {
	intDigits, fraction, exponent := 0, false, false
	for _, c := range num {
		switch {
		case c == 'e' || c == 'E':
			exponent = true
		case c == '.':
			fraction = true // the digits after the point do not count
		case '0' <= c && c <= '9' && !fraction:
			intDigits++
		}
	}
	if !exponent && intDigits <= 308 {
		return false // below 1e308 < math.MaxFloat64
	}
	_, err := strconv.ParseFloat(string(num), 64)
	return err != nil
}

func (s *scanner) literal(lit string) bool {
	d := s.data
	for k := 0; k < len(lit); k++ {
		if s.pos >= len(d) {
			return s.fail("unexpected end of JSON input")
		}
		if d[s.pos] != lit[k] {
			return s.failChar("in literal " + lit + " (expecting " + quoteChar(lit[k]) + ")")
		}
		s.pos++
	}
	return true
}

// skipValue validates and skips the value at s.pos. With checkFloat, it sets
// s.overflow for a number that encoding/json could not decode into an
// interface{} value.
func (s *scanner) skipValue(checkFloat bool) bool {
	if s.pos >= len(s.data) {
		return s.fail("unexpected end of JSON input")
	}
	switch c := s.data[s.pos]; c {
	case '"':
		_, ok := s.scanString()
		return ok
	case '{':
		return s.skipObject(checkFloat)
	case '[':
		return s.skipArray(checkFloat)
	case 't':
		return s.literal("true")
	case 'f':
		return s.literal("false")
	case 'n':
		return s.literal("null")
	case '-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9':
		num, ok := s.scanNumber()
		if ok && checkFloat && overflowsFloat64(num) {
			s.overflow = true
		}
		return ok
	}
	return s.failChar("looking for beginning of value")
}

func (s *scanner) enter() bool {
	s.pos++
	s.depth++
	if s.depth > maxNestingDepth {
		return s.fail("exceeded max depth")
	}
	return true
}

func (s *scanner) skipArray(checkFloat bool) bool {
	if !s.enter() {
		return false
	}
	s.skipWS()
	if s.peek() == ']' {
		s.pos++
		s.depth--
		return true
	}
	for {
		if !s.skipValue(checkFloat) {
			return false
		}
		s.skipWS()
		switch s.peek() {
		case ',':
			s.pos++
			s.skipWS()
		case ']':
			s.pos++
			s.depth--
			return true
		default:
			return s.failChar("after array element")
		}
	}
}

func (s *scanner) skipObject(checkFloat bool) bool {
	return s.object(func(jstr) bool { return s.skipValue(checkFloat) })
}

// object reads the object at s.pos ('{'), calling value for each member with
// its key, s.pos at the member's value; value must read the value.
func (s *scanner) object(value func(key jstr) bool) bool {
	if !s.enter() {
		return false
	}
	s.skipWS()
	if s.peek() == '}' {
		s.pos++
		s.depth--
		return true
	}
	for {
		if s.peek() != '"' {
			return s.failChar("looking for beginning of object key string")
		}
		key, ok := s.scanString()
		if !ok {
			return false
		}
		s.skipWS()
		if s.peek() != ':' {
			return s.failChar("after object key")
		}
		s.pos++
		s.skipWS()
		if !value(key) {
			return false
		}
		s.skipWS()
		switch s.peek() {
		case ',':
			s.pos++
			s.skipWS()
		case '}':
			s.pos++
			s.depth--
			return true
		default:
			return s.failChar("after object key:value pair")
		}
	}
}

// anyString reads a value that encoding/json would decode into an
// interface{}: a string is returned; any other value yields an unset jstr,
// and bad is set when encoding/json would fail on it.
func (s *scanner) anyString(bad *bool) (jstr, bool) {
	if s.peek() == '"' {
		return s.scanString()
	}
	s.overflow = false
	ok := s.skipValue(true)
	if s.overflow {
		*bad = true
	}
	return jstr{}, ok
}

// keyIs reports whether the object key matches the field name as
// encoding/json matches them: exactly, or else equal under Unicode simple
// case folding. name is ASCII.
func keyIs(key jstr, name string) bool {
	raw := key.raw
	if key.esc {
		var buf [64]byte
		raw = appendUnquoted(buf[:0], raw)
	}
	if string(raw) == name {
		return true
	}
	j := 0
	for i := 0; i < len(raw); {
		c := raw[i]
		var f rune
		if c < utf8.RuneSelf {
			f = rune(upperASCII(c))
			i++
		} else {
			r, n := utf8.DecodeRune(raw[i:])
			f = foldRune(r)
			i += n
		}
		if j >= len(name) || f != rune(upperASCII(name[j])) {
			return false
		}
		j++
	}
	return j == len(name)
}

func upperASCII(c byte) byte {
	if 'a' <= c && c <= 'z' {
		return c - ('a' - 'A')
	}
	return c
}

// foldRune returns the smallest rune of r's simple case folding orbit, as
// encoding/json folds names.
func foldRune(r rune) rune {
	for {
		r2 := unicode.SimpleFold(r)
		if r2 <= r {
			return r2
		}
		r = r2
	}
}
