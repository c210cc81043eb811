package memcache

// ParseMetaLine, ParseKeyLine, ParseWatchLine and VersionAtLeast expose the
// parsers to the tests.
var (
	ParseMetaLine  = parseMetaLine
	ParseKeyLine   = parseKeyLine
	ParseWatchLine = parseWatchLine
	VersionAtLeast = versionAtLeast
)
