#!/bin/sh
# install-deps.sh installs what internal/keystonetest needs to run a real
# Keystone in tests: Debian's keystone 22 package (which brings python3-keystone
# and python3-pymysql), served by Debian's uwsgi (uwsgi-core and the python3
# plugin), and the MariaDB client. MariaDB itself is expected on
# 127.0.0.1:3306 (root, empty password); when mariadb-server is not installed
# this script installs it and starts mariadbd.
#
# Idempotent and non-interactive: run it as root, as often as you like. It
# keeps Debian's maintainer scripts from starting any service (policy-rc.d
# answering 101 while installing) and from configuring a database
# (debconf preseeding), so nothing listens on Keystone's port 5000 afterwards:
# the tests start their own Keystone on a free port.
set -eu

PKGS="keystone python3-keystone python3-pymysql uwsgi-core uwsgi-plugin-python3 mariadb-client"

if [ "$(id -u)" != 0 ]; then
	echo "install-deps.sh: must run as root (apt-get install)" >&2
	exit 1
fi

missing=""
for p in $PKGS; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing="$missing $p"
	fi
done
need_mariadb=no
if ! dpkg-query -W -f='${Status}' mariadb-server 2>/dev/null | grep -q 'install ok installed'; then
	need_mariadb=yes
	missing="$missing mariadb-server"
fi

if [ -n "$missing" ]; then
	echo "install-deps.sh: installing:$missing"
	export DEBIAN_FRONTEND=noninteractive

	# Keystone's postinst would otherwise ask for (or, non-interactively,
	# silently skip) a database, an admin tenant and an endpoint; say no to
	# all of them so that it only installs files.
	debconf-set-selections <<'EOF'
keystone keystone/configure_db boolean false
keystone keystone/dbconfig-install boolean false
keystone keystone/dbconfig-upgrade boolean false
keystone keystone/dbconfig-remove boolean false
keystone keystone/create-admin-tenant boolean false
keystone keystone/register-endpoint boolean false
EOF

	# Forbid starting services while installing, unless a policy already
	# exists (containers often ship one that does the same).
	own_policy=no
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		own_policy=yes
		printf '#!/bin/sh\n# written by keystone-fanout install-deps.sh while installing\nexit 101\n' >/usr/sbin/policy-rc.d
		chmod 755 /usr/sbin/policy-rc.d
		trap 'rm -f /usr/sbin/policy-rc.d' EXIT INT TERM
	fi

	apt_get() {
		apt-get -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef \
			-o Dpkg::Options::=--force-confold -y -q "$@"
	}
	# Refresh the package lists when they are missing or older than a day.
	if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages' -mtime -1 2>/dev/null | head -n 1)" ]; then
		apt_get update
	fi
	# shellcheck disable=SC2086
	if ! apt_get install --no-install-recommends $missing; then
		# Stale package lists (files gone from the mirror): refresh, retry once.
		apt_get update
		apt_get install --no-install-recommends $missing
	fi

	if [ "$own_policy" = yes ]; then
		rm -f /usr/sbin/policy-rc.d
		trap - EXIT INT TERM
	fi
fi

# A packaged Keystone that already runs here is someone else's service: leave
# it alone. The tests need nothing from it (nor from /etc/keystone): each
# starts its own Keystone on a free port with its own configuration and keys.

# MariaDB: start it when this script installed it or it is not answering.
if ! mariadb -h 127.0.0.1 -P 3306 -u root -e 'SELECT 1' >/dev/null 2>&1; then
	if [ "$need_mariadb" = yes ] || ! pgrep -x mariadbd >/dev/null 2>&1; then
		install -d -o mysql -g mysql /run/mysqld
		start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
	fi
	i=0
	until mariadb -h 127.0.0.1 -P 3306 -u root -e 'SELECT 1' >/dev/null 2>&1; do
		i=$((i + 1))
		if [ $i -ge 60 ]; then
			echo "install-deps.sh: MariaDB does not answer on 127.0.0.1:3306 as root without a password" >&2
			exit 1
		fi
		sleep 1
	done
fi

for f in /usr/bin/keystone-manage /usr/bin/keystone-wsgi-public /usr/bin/uwsgi_python3 /usr/bin/uwsgi; do
	if [ ! -x "$f" ]; then
		echo "install-deps.sh: $f missing after installation" >&2
		exit 1
	fi
done
/usr/bin/python3 -c 'import keystone, pymysql' || {
	echo "install-deps.sh: Debian's /usr/bin/python3 cannot import keystone and pymysql" >&2
	exit 1
}
echo "install-deps.sh: keystone $(dpkg-query -W -f='${Version}' keystone), uwsgi $(dpkg-query -W -f='${Version}' uwsgi-core) ready"
