package testutil

import (
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// Metric returns the value of the counter or gauge name gathered from g,
// from its first series whose labels include the given name/value pairs; a
// histogram gives its sample count. 0 when there is none.
func Metric(g prometheus.Gatherer, name string, labels ...string) float64 {
	m := series(g, name, labels)
	switch {
	case m == nil:
		return 0
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Histogram != nil:
		return float64(m.Histogram.GetSampleCount())
	}
	return 0
}

// HistogramSum returns the sum of the observations of histogram name
// gathered from g, from its first series whose labels include the given
// name/value pairs; 0 when there is none.
func HistogramSum(g prometheus.Gatherer, name string, labels ...string) float64 {
	if m := series(g, name, labels); m != nil && m.Histogram != nil {
		return m.Histogram.GetSampleSum()
	}
	return 0
}

// series is the first series of name whose labels include pairs; nil if none.
func series(g prometheus.Gatherer, name string, pairs []string) *dto.Metric {
	mfs, err := g.Gather()
	if err != nil {
		return nil
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if hasLabels(m, pairs) {
				return m
			}
		}
	}
	return nil
}

func hasLabels(m *dto.Metric, pairs []string) bool {
	for i := 0; i+1 < len(pairs); i += 2 {
		found := false
		for _, l := range m.GetLabel() {
			if l.GetName() == pairs[i] && l.GetValue() == pairs[i+1] {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}
