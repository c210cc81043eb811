package app

import (
	"runtime"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// TestBuildInfo: every process registry has keystone_fanout_build_info = 1
// with the version the command set, once however often it is asked for.
func TestBuildInfo(t *testing.T) {
	old := Version
	Version = "1.2.3-test"
	t.Cleanup(func() { Version = old })
	reg := registry(registry(prometheus.NewRegistry()))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "keystone_fanout_build_info" {
			continue
		}
		if len(mf.Metric) != 1 || mf.Metric[0].GetGauge().GetValue() != 1 {
			t.Fatalf("keystone_fanout_build_info: %v, want one series of value 1", mf.Metric)
		}
		labels := map[string]string{}
		for _, l := range mf.Metric[0].Label {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["version"] != "1.2.3-test" || labels["goversion"] != runtime.Version() || labels["revision"] == "" {
			t.Fatalf("labels %v, want version 1.2.3-test, goversion %s and a revision", labels, runtime.Version())
		}
		return
	}
	t.Fatal("no keystone_fanout_build_info in the registry")
}
