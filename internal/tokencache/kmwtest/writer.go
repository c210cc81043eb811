package kmwtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"time"

	"github.com/keystone-fanout/keystone-fanout/internal/memcache"
)

// NoneKey is the middleware's key for tokenID with strategy None:
// "tokens/" + hex SHA-256 of the token.
func NoneKey(tokenID string) string {
	sum := sha256.Sum256([]byte(tokenID))
	return "tokens/" + hex.EncodeToString(sum[:])
}

// NoneValue is the value the middleware stores for a body made by Gen with
// strategy None: json.dumps of {"token": AccessInfoV3}, i.e. the body's token
// object followed by "version" and "auth_token".
func NoneValue(tokenID string, body []byte) []byte {
	trimmed := bytes.TrimSpace(body)
	if !bytes.HasSuffix(trimmed, []byte("}}")) {
		panic("kmwtest: NoneValue needs a body made by Gen")
	}
	var b bytes.Buffer
	b.Grow(len(trimmed) + len(tokenID) + 40)
	b.Write(trimmed[:len(trimmed)-2])
	b.WriteString(`, "version": "v3", "auth_token": `)
	writeString(&b, tokenID)
	b.WriteString("}}")
	return b.Bytes()
}

// ServerFor returns the index of the server python-memcache picks for key
// among n servers when none is marked dead:
// ((crc32(key) >> 16) & 0x7fff or 1) % n.
func ServerFor(key string, n int) int {
	h := (crc32.ChecksumIEEE([]byte(key)) >> 16) & 0x7fff
	if h == 0 {
		h = 1
	}
	return int(h) % n
}

// WriteNone stores entries on server in the strategy-None format, as fast as
// memcached takes them (pipelined sets, flags 0, TTL ttl): for benchmarks that
// need many entries. Placement is the caller's choice.
func WriteNone(ctx context.Context, server *memcache.Server, entries []Entry, ttl time.Duration) error {
	const batch = 256
	items := make([]memcache.Item, 0, batch)
	for i, e := range entries {
		items = append(items, memcache.Item{Key: NoneKey(e.TokenID), Value: NoneValue(e.TokenID, e.Body)})
		if len(items) == batch || i == len(entries)-1 {
			if err := server.Set(ctx, items, ttl); err != nil {
				return fmt.Errorf("kmwtest: writing entries: %w", err)
			}
			items = items[:0]
		}
	}
	return nil
}
