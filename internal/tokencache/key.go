package tokencache

import (
	"encoding/base64"
	"encoding/hex"
)

// KeyKind says which memcache_security_strategy wrote a key.
type KeyKind uint8

const (
	// KeyNone is a strategy None key: "tokens/" + 64 lowercase hex digits
	// (SHA-256 of the token).
	KeyNone KeyKind = 1
	// KeySecure is a MAC or ENCRYPT key: "tokens/b'" + base64 of 16 bytes
	// + "'" (the Python repr of the bytes key). The two strategies use the
	// same key shape; only the value tells them apart.
	KeySecure KeyKind = 2
)

const (
	keyPrefix       = "tokens/"
	securePrefix    = "tokens/b'"
	noneKeyLen      = len(keyPrefix) + 64        // 71
	secureKeyLen    = len(securePrefix) + 24 + 1 // 34
	secureRawLen    = 16
	noneRawLen      = 32
	binKeyLen       = 1 + noneRawLen
	secureB64Length = 24
)

// binKey is a token key in binary form: kind, then the 32 (None) or 16
// (MAC/ENCRYPT) bytes the key encodes. It converts back to the exact key.
type binKey [binKeyLen]byte

// IsTokenKey reports whether key has the exact shape of a keystonemiddleware
// 10.1 token cache key: "tokens/" + 64 lowercase hex digits, or
// "tokens/b'<24 characters of base64 of 16 bytes>'". keystone-fanout never
// touches any other key.
func IsTokenKey(key string) bool {
	_, ok := parseKey([]byte(key))
	return ok
}

// KindOf returns the kind of a token key, or 0 for any other key.
func KindOf(key string) KeyKind {
	k, ok := parseKey([]byte(key))
	if !ok {
		return 0
	}
	return KeyKind(k[0])
}

// lowerHex maps '0'-'9' and 'a'-'f' to their values, every other byte to 0xff.
var lowerHex = func() (t [256]byte) {
	for i := range t {
		t[i] = 0xff
	}
	for c := '0'; c <= '9'; c++ {
		t[c] = byte(c - '0')
	}
	for c := 'a'; c <= 'f'; c++ {
		t[c] = byte(c-'a') + 10
	}
	return t
}()

func parseKey(key []byte) (binKey, bool) {
	var k binKey
	switch len(key) {
	case noneKeyLen:
		if string(key[:len(keyPrefix)]) != keyPrefix {
			return k, false
		}
		h := key[len(keyPrefix):]
		for i := 0; i < noneRawLen; i++ {
			hi, lo := lowerHex[h[2*i]], lowerHex[h[2*i+1]]
			if hi|lo > 0x0f {
				return k, false // hexdigest() is lowercase; anything else is not ours
			}
			k[1+i] = hi<<4 | lo
		}
		k[0] = byte(KeyNone)
		return k, true
	case secureKeyLen:
		if string(key[:len(securePrefix)]) != securePrefix || key[len(key)-1] != '\'' {
			return k, false
		}
		b := key[len(securePrefix) : len(key)-1]
		n, err := base64.StdEncoding.Strict().Decode(k[1:], b)
		if err != nil || n != secureRawLen {
			return k, false
		}
		// Only the canonical encoding round-trips to the same key.
		var re [secureB64Length]byte
		base64.StdEncoding.Encode(re[:], k[1:1+secureRawLen])
		if string(re[:]) != string(b) {
			return k, false
		}
		k[0] = byte(KeySecure)
		return k, true
	}
	return k, false
}

// kind returns the key's kind.
func (k *binKey) kind() KeyKind { return KeyKind(k[0]) }

// String rebuilds the memcached key.
func (k *binKey) String() string {
	switch k.kind() {
	case KeyNone:
		var b [noneKeyLen]byte
		copy(b[:], keyPrefix)
		hex.Encode(b[len(keyPrefix):], k[1:])
		return string(b[:])
	case KeySecure:
		var b [secureKeyLen]byte
		copy(b[:], securePrefix)
		base64.StdEncoding.Encode(b[len(securePrefix):], k[1:1+secureRawLen])
		b[len(b)-1] = '\''
		return string(b[:])
	}
	return ""
}
