package memcache

// ParseMetaLine exposes parseMetaLine to the tests.
var ParseMetaLine = parseMetaLine
