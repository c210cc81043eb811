package memcache

import (
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/hashicorp/go-multierror"
)

// Cluster is the memcached server list of one region. It hashes nothing:
// keystonemiddleware's python-memcache picks a server by its own CRC32 hash
// and rehashes while a server is marked dead, so an entry may sit on any
// server of the list, and every operation of keystone-fanout goes to every
// server (see Each).
type Cluster struct {
	servers []*Server
}

// New validates opts and returns a Cluster. It does not connect: connections
// are made on first use and kept in a small pool per server.
func New(opts Options) (*Cluster, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	o := opts.withDefaults()
	addrs, _ := ParseServers(o.Servers)  // checked by Validate
	tlsFiles, _ := o.TLS.reloader(o.Log) // checked by Validate
	c := &Cluster{}
	for _, a := range addrs {
		p := newPool(a, tlsFiles, o)
		c.servers = append(c.servers, &Server{addr: a, p: p, io: o.IOTimeout, mc: newKeyClient(a, p.tlsConfig, o)})
	}
	return c, nil
}

// Servers returns the servers in configured order.
func (c *Cluster) Servers() []*Server { return c.servers }

// Close closes idle connections; operations on this package's own
// connections fail with ErrClosed after it.
func (c *Cluster) Close() error {
	for _, s := range c.servers {
		s.p.close()
		s.mc.Close()
	}
	return nil
}

// Each runs fn for every server concurrently and waits for all of them. The
// result is nil when every call succeeded, otherwise a *multierror.Error with
// one entry per failed server; entries that are not already a *ServerError
// are wrapped in one naming the server (op "each").
func (c *Cluster) Each(ctx context.Context, fn func(ctx context.Context, s *Server) error) error {
	errs := make([]error, len(c.servers))
	var wg sync.WaitGroup
	for i, s := range c.servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() {
				if r := recover(); r != nil {
					errs[i] = &ServerError{Server: s.addr.Spec, Op: "each", Err: fmt.Errorf("panic: %v", r)}
				}
			}()
			if err := fn(ctx, s); err != nil {
				if _, ok := errorsIsServer(err); !ok {
					err = &ServerError{Server: s.addr.Spec, Op: "each", Err: err}
				}
				errs[i] = err
			}
		}()
	}
	wg.Wait()
	var merr *multierror.Error
	for _, err := range errs {
		if err != nil {
			merr = multierror.Append(merr, err)
		}
	}
	if merr != nil {
		merr.ErrorFormat = OneLine
	}
	return merr.ErrorOrNil()
}

// OneLine is the ErrorFormat of the *multierror.Error values of this package
// and its callers: the errors joined with "; " on one line (multierror's
// default puts "N errors occurred:" and one "\t* " line per error, which a
// log record would carry as embedded newlines).
func OneLine(errs []error) string {
	if len(errs) == 1 {
		return errs[0].Error()
	}
	parts := make([]string, len(errs))
	for i, err := range errs {
		parts[i] = err.Error()
	}
	return fmt.Sprintf("%d errors: %s", len(errs), strings.Join(parts, "; "))
}

// Ping checks every server with "version" (Server.Ping). The error names
// each server that did not answer.
func (c *Cluster) Ping(ctx context.Context) error {
	return c.Each(ctx, func(ctx context.Context, s *Server) error { return s.Ping(ctx) })
}

// FlushAll runs flush_all on every server.
func (c *Cluster) FlushAll(ctx context.Context) error {
	return c.Each(ctx, func(ctx context.Context, s *Server) error { return s.FlushAll(ctx) })
}

// Delete deletes keys from every server and returns how many of them were
// present, summed over the servers.
func (c *Cluster) Delete(ctx context.Context, keys []string) (int, error) {
	var mu sync.Mutex
	n := 0
	err := c.Each(ctx, func(ctx context.Context, s *Server) error {
		found, err := s.Delete(ctx, keys)
		k := 0
		for _, f := range found {
			if f {
				k++
			}
		}
		mu.Lock()
		n += k
		mu.Unlock()
		return err
	})
	return n, err
}
