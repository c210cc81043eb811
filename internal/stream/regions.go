package stream

import (
	"context"
	"fmt"
	"regexp"
	"sort"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
)

var regionPattern = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// ValidRegionName reports whether name can be a region's name (the agent's
// --region): 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'.
func ValidRegionName(name string) bool { return regionPattern.MatchString(name) }

// Regions names the regions that consume the stream name: one per durable
// consumer, a regional mirror's consumer (MirrorConsumerName) naming its
// region. Ephemeral consumers (the poller's, trace's) name none. It fails
// when the stream cannot be read or its consumers listed.
func Regions(ctx context.Context, js jetstream.JetStream, name string) ([]string, error) {
	s, err := js.Stream(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", name, err)
	}
	set := map[string]bool{}
	list := s.ListConsumers(ctx)
	for ci := range list.Info() {
		n := strings.TrimSuffix(ci.Config.Durable, "_mirror")
		if n != "" && ValidRegionName(n) {
			set[n] = true
		}
	}
	if err := list.Err(); err != nil {
		return nil, fmt.Errorf("listing the consumers of stream %s: %w", name, err)
	}
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	sort.Strings(out)
	return out, nil
}
