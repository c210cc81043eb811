#!/usr/bin/env bash
# Installs what keystone-fanout needs on one Debian (bookworm) machine, as root,
# and starts the services it uses. Idempotent: run it as often as you like.
#
#   deploy/dev/install.sh           RabbitMQ and memcached, to run the system
#   deploy/dev/install.sh --tests   also what the test suite needs: Debian's
#                                   keystonemiddleware (cache entries in tests are
#                                   written by its own code), a real Keystone, and
#                                   promtool (Debian's prometheus package, never
#                                   started) to check deploy/prometheus's rules,
#                                   and iproute2 and iptables for the end-to-end
#                                   tests' WAN regions
#
# A service that cannot be installed or does not come up is an error: the script
# exits non-zero and says which.
set -euo pipefail

tests=false
[ "${1:-}" = "--tests" ] && tests=true
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)

say() { echo "install: $*" >&2; }
die() { echo "install: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get and services need it)"
command -v go >/dev/null || die "Go 1.26 or newer is needed on PATH (go.mod says go 1.26)"

port_open() { timeout 1 bash -c "</dev/tcp/$1/$2" 2>/dev/null; }

wait_port() { # host port seconds what
  local i
  for ((i = 0; i < $3 * 2; i++)); do
    port_open "$1" "$2" && return 0
    sleep 0.5
  done
  die "$4 did not accept connections on $1:$2 within $3 s"
}

export DEBIAN_FRONTEND=noninteractive
# Debian's packages must not start services while they install: this script
# starts what it needs itself, the way it needs it.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi

packages=(memcached)
$tests && packages+=(python3-keystonemiddleware python3-memcache python3-oslo.cache python3-oslo.config prometheus
  iproute2 iptables) # e2e's WAN regions: network namespaces, veth pairs, packet loss and partitions
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! port_open 127.0.0.1 5672 && ! command -v rabbitmq-server >/dev/null; then
  missing+=(rabbitmq-server)
fi
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v memcached >/dev/null || die "memcached is not installed"

# RabbitMQ: use the broker on 127.0.0.1:5672 when it answers, else start Debian's.
if ! port_open 127.0.0.1 5672; then
  say "starting rabbitmq-server"
  rabbitmq-server -detached || true
  wait_port 127.0.0.1 5672 120 "RabbitMQ"
fi
if command -v rabbitmqctl >/dev/null; then
  timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || die "RabbitMQ did not finish starting (rabbitmqctl await_startup)"
fi
say "RabbitMQ answers on 127.0.0.1:5672"

if ! $tests; then
  # The system's own run uses a memcached on the default port, as a region's
  # services would; tests start their own on free ports instead.
  if ! port_open 127.0.0.1 11211; then
    say "starting memcached on 127.0.0.1:11211"
    memcached -d -u memcache -l 127.0.0.1 -p 11211 -m 256 || memcached -d -u root -l 127.0.0.1 -p 11211 -m 256
    wait_port 127.0.0.1 11211 10 "memcached"
  fi
  exit 0
fi

# The tests write cache entries with keystonemiddleware's own code through
# Debian's interpreter (the python3 first on PATH may be another one).
/usr/bin/python3 -c 'import keystonemiddleware.auth_token._cache, memcache' ||
  die "Debian's /usr/bin/python3 cannot import keystonemiddleware"
# The --oslo-config tests compare their reading of keystone.conf and nova.conf
# with oslo.config's own.
/usr/bin/python3 -c 'import oslo_config.cfg' ||
  die "Debian's /usr/bin/python3 cannot import oslo_config"

# promtool checks and unit-tests deploy/prometheus's alert rules. The package's
# Prometheus service is never started (policy-rc.d above); stop it should a
# machine without that guard have started it.
command -v promtool >/dev/null || die "promtool is not installed (Debian's prometheus package)"
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

# A real Keystone for the revocation tests.
if [ -x "$top/internal/keystonetest/install-deps.sh" ]; then
  "$top/internal/keystonetest/install-deps.sh" || die "the Keystone test dependencies (internal/keystonetest/install-deps.sh)"
fi
say "ready for the tests"
