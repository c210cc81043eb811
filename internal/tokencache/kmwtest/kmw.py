"""Write and read token cache entries exactly as keystonemiddleware 10.1 does.

Run by Debian's /usr/bin/python3 (see kmwtest.go). Requests are JSON lines
on stdin, one answer per line on stdout:

  {"op": "write", "entries": [{"token_id": "...", "body": {"token": {...}}}]}
    -> {"written": [{"token_id", "key", "server", "stored"}]}
  {"op": "read", "token_ids": ["..."]}
    -> {"read": [{"token_id", "found", "data"}]}

The first line configures the cache:

  {"servers": ["127.0.0.1:11211"], "strategy": "None"|"MAC"|"ENCRYPT",
   "secret": "...", "cache_time": 300,
   "client": "python-memcache"|"python-binary-memcached", "tls_ca": "..."}

"client" python-binary-memcached stores through oslo.cache's
BMemcacheClientPool, as keystonemiddleware releases newer than Debian's do
when memcache_tls_enabled or memcache_sasl_enabled is set; "tls_ca" then
turns TLS on with that CA.
"""
import contextlib
import json
import logging
import ssl
import sys

from keystoneclient import access
from keystonemiddleware.auth_token import _cache


def make_cache(cfg):
    log = logging.getLogger("kmwtest")
    # The arguments AuthProtocol._token_cache_factory passes with the
    # default [keystone_authtoken] options.
    kwargs = dict(
        cache_time=cfg.get("cache_time", 300),
        env_cache_name=None,
        memcached_servers=cfg["servers"],
        use_advanced_pool=True,
        dead_retry=300,
        maxsize=10,
        unused_timeout=60,
        conn_get_timeout=10,
        socket_timeout=3,
    )
    strategy = cfg.get("strategy") or "None"
    if strategy.lower() != "none":
        cache = _cache.SecureTokenCache(log, strategy, cfg["secret"], **kwargs)
    else:
        cache = _cache.TokenCache(log, **kwargs)
    cache.initialize({})
    if cfg.get("client") == "python-binary-memcached":
        cache._cache_pool = _BinaryPool(cfg)
    return cache


class _BinaryPool(object):
    """The pool newer keystonemiddleware releases build with tls_enabled."""

    def __init__(self, cfg):
        from oslo_cache import _bmemcache_pool
        tls_context = None
        if cfg.get("tls_ca"):
            tls_context = ssl.create_default_context(cafile=cfg["tls_ca"])
        self._pool = _bmemcache_pool.BMemcacheClientPool(
            cfg["servers"],
            {"username": None, "password": None, "tls_context": tls_context},
            maxsize=10, unused_timeout=60, conn_get_timeout=10)

    @contextlib.contextmanager
    def reserve(self):
        with self._pool.acquire() as client:
            yield client


def server_for(cache, key):
    """The server python-memcache picks for key (what set() used)."""
    if isinstance(cache._cache_pool, _BinaryPool):
        return "*"  # python-binary-memcached writes to every server
    with cache._cache_pool.reserve() as client:
        server, _ = client._get_server(client._encode_key(key))
        if server is None:
            return ""
        host, port = server.address
        return "%s:%d" % (host, port)


def write(cache, entries):
    out = []
    for e in entries:
        token_id = e["token_id"]
        # What _V3RequestStrategy.verify_token returns and
        # AuthProtocol.fetch_token hands to the cache.
        auth_ref = access.AccessInfo.factory(auth_token=token_id, body=e["body"])
        cache.set(token_id, {"token": auth_ref})
        key, _ = cache._get_cache_key(token_id)
        out.append({
            "token_id": token_id,
            "key": key,
            "server": server_for(cache, key),
            "stored": cache.get(token_id) is not None,
        })
    return {"written": out}


def read(cache, token_ids):
    out = []
    for token_id in token_ids:
        data = cache.get(token_id)
        out.append({"token_id": token_id, "found": data is not None, "data": data})
    return {"read": out}


def main():
    cfg = json.loads(sys.stdin.readline())
    cache = make_cache(cfg)
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            if req["op"] == "write":
                resp = write(cache, req["entries"])
            elif req["op"] == "read":
                resp = read(cache, req["token_ids"])
            else:
                resp = {"error": "unknown op %r" % req["op"]}
        except Exception as exc:  # report, keep serving
            resp = {"error": "%s: %s" % (type(exc).__name__, exc)}
        sys.stdout.write(json.dumps(resp) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
