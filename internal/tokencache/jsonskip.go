package tokencache

import "bytes"

// withoutCatalog returns {"token":{...}} with the token object's members
// copied from data except "catalog", which is most of a validation's bytes
// and which no rule reads: skipping it here, bracket-counting, is several
// times faster than letting encoding/json scan it. ok is false when data is
// not an object with a "token" object member as expected; the caller then
// decodes data as it is.
func withoutCatalog(data, buf []byte) (out []byte, ok bool) {
	i := skipWS(data, 0)
	if i >= len(data) || data[i] != '{' {
		return nil, false
	}
	var tokStart, tokEnd int
	found := false
	ok = eachMember(data, i, func(key []byte, vStart, vEnd int) bool {
		if string(key) == `"token"` {
			tokStart, tokEnd, found = vStart, vEnd, true
		}
		return true
	})
	if !ok || !found || data[tokStart] != '{' {
		return nil, false
	}
	out = append(buf[:0], `{"token":{`...)
	first := true
	ok = eachMember(data[:tokEnd], tokStart, func(key []byte, vStart, vEnd int) bool {
		if string(key) == `"catalog"` {
			return true
		}
		if !first {
			out = append(out, ',')
		}
		first = false
		out = append(out, key...)
		out = append(out, ':')
		out = append(out, data[vStart:vEnd]...)
		return true
	})
	if !ok {
		return nil, false
	}
	return append(out, "}}"...), true
}

// eachMember calls fn for each member of the object starting at data[i]
// ('{') with the raw key (quotes included) and the value's range. It
// reports false on malformed input.
func eachMember(data []byte, i int, fn func(key []byte, vStart, vEnd int) bool) bool {
	i = skipWS(data, i+1)
	if i < len(data) && data[i] == '}' {
		return true
	}
	for i < len(data) {
		if data[i] != '"' {
			return false
		}
		kEnd := skipString(data, i)
		if kEnd < 0 {
			return false
		}
		key := data[i:kEnd]
		i = skipWS(data, kEnd)
		if i >= len(data) || data[i] != ':' {
			return false
		}
		i = skipWS(data, i+1)
		vEnd := skipValue(data, i)
		if vEnd < 0 || !fn(key, i, vEnd) {
			return false
		}
		i = skipWS(data, vEnd)
		if i >= len(data) {
			return false
		}
		switch data[i] {
		case ',':
			i = skipWS(data, i+1)
		case '}':
			return true
		default:
			return false
		}
	}
	return false
}

func skipWS(data []byte, i int) int {
	for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r') {
		i++
	}
	return i
}

// skipString returns the index after the string starting at data[i] ('"'),
// or -1.
func skipString(data []byte, i int) int {
	j := i + 1
	for {
		k := bytes.IndexByte(data[j:], '"')
		if k < 0 {
			return -1
		}
		q := j + k
		// An even number of backslashes before the quote: it ends the string.
		n := 0
		for b := q - 1; b > i && data[b] == '\\'; b-- {
			n++
		}
		if n%2 == 0 {
			return q + 1
		}
		j = q + 1
	}
}

// skipValue returns the index after the value starting at data[i], or -1.
func skipValue(data []byte, i int) int {
	if i >= len(data) {
		return -1
	}
	switch data[i] {
	case '"':
		return skipString(data, i)
	case '{', '[':
		depth := 0
		for j := i; j < len(data); j++ {
			switch data[j] {
			case '"':
				e := skipString(data, j)
				if e < 0 {
					return -1
				}
				j = e - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return j + 1
				}
			}
		}
		return -1
	}
	j := i
	for j < len(data) {
		switch data[j] {
		case ',', '}', ']', ' ', '\t', '\n', '\r':
			if j == i {
				return -1
			}
			return j
		}
		j++
	}
	if j == i {
		return -1
	}
	return j
}
