package confirm

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// MetricsPrefix starts the name of every metric of this package.
const MetricsPrefix = "keystone_fanout_confirm_"

type metrics struct {
	everywhere    prometheus.Histogram
	regionSeconds *prometheus.HistogramVec
	unconfirmed   *prometheus.CounterVec
	untracked     prometheus.Counter
	rejected      prometheus.Counter
}

// Buckets from 5 ms to about 10 min: regions are milliseconds to a WAN
// round trip away, and a region cut off confirms when it is back.
var buckets = prometheus.ExponentialBuckets(0.005, 2, 18)

func newMetrics(reg prometheus.Registerer, pending, expected func() float64) (*metrics, error) {
	m := &metrics{
		everywhere: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: MetricsPrefix + "everywhere_seconds",
			Help: "Per event, from the stream storing it (NATS server clock) to the last expected region's receipt " +
				"saying its cache entries were gone (that region's clock).",
			Buckets: buckets,
		}),
		regionSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    MetricsPrefix + "region_seconds",
			Help:    "Per event and region, from the stream storing the event to the region's entries being gone.",
			Buckets: buckets,
		}, []string{"region"}),
		unconfirmed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: MetricsPrefix + "unconfirmed_total",
			Help: "Events an expected region sent no receipt for within --confirm-deadline, by region.",
		}, []string{"region"}),
		untracked: prometheus.NewCounter(prometheus.CounterOpts{
			Name: MetricsPrefix + "untracked_total",
			Help: "Events dropped unsettled because too many awaited a region (100,000).",
		}),
		rejected: prometheus.NewCounter(prometheus.CounterOpts{
			Name: MetricsPrefix + "rejected_total",
			Help: "Messages on the receipts' subjects that are not receipts of a known version; ignored.",
		}),
	}
	cs := []prometheus.Collector{m.everywhere, m.regionSeconds, m.unconfirmed, m.untracked, m.rejected,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: MetricsPrefix + "pending_events",
			Help: "Events some expected region has not confirmed yet.",
		}, pending),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: MetricsPrefix + "expected_regions",
			Help: "Regions every event must be confirmed by (--expect-regions, or the stream's consumers).",
		}, expected),
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				return nil, fmt.Errorf("confirm metrics: %w (one Collector per registry)", err)
			}
			return nil, fmt.Errorf("confirm metrics: %w", err)
		}
	}
	return m, nil
}
