//go:build tools

// Package deps pins the module requirements before the code that uses them lands.
package deps

import (
	_ "github.com/bradfitz/gomemcache/memcache"
	_ "github.com/hashicorp/go-multierror"
	_ "github.com/nats-io/nats-server/v2/server"
	_ "github.com/nats-io/nats.go/jetstream"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/prometheus/client_golang/prometheus/promhttp"
	_ "github.com/rabbitmq/amqp091-go"
	_ "golang.org/x/sync/errgroup"
)
