#!/usr/bin/env bash
# Installs and starts what the tests need, on a fresh Debian machine or this one:
# a PostgreSQL server on 127.0.0.1:5432 that trusts local connections, PgBouncer (tests
# start their own), and the device peers nobody on this project wrote: OpenSSH sshd,
# busybox telnetd, radclient, and a Python venv (.venv-peers) with pyrad, librouteros
# and fake-switches.
# Idempotent: does nothing that is already done. Needs root (or sudo) for installs.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        $SUDO apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "test-setup: installing PostgreSQL from Debian packages"
    apt_install postgresql postgresql-client
fi

if ! pg_ready; then
    version=$(ls /etc/postgresql | sort -V | tail -1)
    hba="/etc/postgresql/$version/main/pg_hba.conf"
    # A fresh Debian cluster asks for passwords on TCP; the tests connect as postgres
    # over loopback without one, as on this project's machines.
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
        $SUDO sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    fi
    echo "test-setup: starting PostgreSQL $version"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 30); do
        pg_ready && break
        sleep 1
    done
fi
pg_ready || { echo "test-setup: PostgreSQL is not answering on 127.0.0.1:5432" >&2; exit 1; }
psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE test"
echo "test-setup: PostgreSQL ready on 127.0.0.1:5432"

# Device peers. sshd is run by the tests themselves on loopback ports; the package's
# install step creates the privilege-separation user it needs.
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx telnetd || need+=(busybox-static)
command -v radclient >/dev/null 2>&1 || need+=(freeradius-utils)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-venv)
# PgBouncer sits between nasd and PostgreSQL in tests/pgbouncer.rs; each test starts its
# own on a free port, so no system PgBouncer is started or configured here.
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
# tests/reconcile_ipset.rs reads and changes kernel ipsets of its own (as root).
command -v ipset >/dev/null 2>&1 || [ -x /usr/sbin/ipset ] || need+=(ipset)
if [ ${#need[@]} -gt 0 ]; then
    echo "test-setup: installing ${need[*]}"
    apt_install "${need[@]}"
fi
mkdir -p /run/sshd
# The SSH tests log in as this user, whose shell is /bin/sh: root's bash would read
# ~/.bashrc for every command sshd runs (Debian's bash does so under sshd).
id nasdpeer >/dev/null 2>&1 || $SUDO useradd --system --shell /bin/sh --home-dir /var/lib/nasdpeer nasdpeer
# sshd complains on stderr (into every answer) when the home directory is missing.
$SUDO usermod -d /var/lib/nasdpeer nasdpeer
$SUDO mkdir -p /var/lib/nasdpeer
$SUDO chown nasdpeer: /var/lib/nasdpeer
# A locked account ('!' password) is refused by sshd even for key logins; '*' is
# "no password" without the lock.
$SUDO usermod -p '*' nasdpeer
# sshd runs every command through the user's login shell, and root's bash reads
# ~/.bashrc, which on these machines runs `pyenv init`: a stale pyenv rehash lock (left
# by an interrupted pip) makes that wait 60 s per command and the SSH tests time out.
lock="$HOME/.pyenv/shims/.pyenv-shim"
if [ -e "$lock" ] && [ -n "$(find "$lock" -mmin +5 2>/dev/null)" ]; then
    echo "test-setup: removing a stale pyenv lock $lock"
    rm -f "$lock"
fi

venv=".venv-peers"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import pyrad, librouteros, fake_switches, twisted' 2>/dev/null; then
    echo "test-setup: building $venv (pyrad, librouteros, fake-switches)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q pyrad==2.6.0 librouteros==4.2.2
    "$venv/bin/pip" install -q --no-deps fake-switches==1.5.0
    "$venv/bin/pip" install -q 'twisted[conch]' netaddr lxml tftpy
fi
echo "test-setup: device peers ready (sshd, busybox telnetd, radclient, $venv)"
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "4.32.5"; then
    echo "test-setup: installing schemathesis into $venv (fuzzing of the HTTP API)"
    "$venv/bin/pip" install -q schemathesis==4.32.5
fi

# The operator console's browser tests (tests/console_ui.rs) drive Debian's Chromium in
# headless mode through its chromedriver; both come from Debian's packages (no browser
# download). Each test starts its own chromedriver on a free loopback port.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    echo "test-setup: installing chromium and chromium-driver (console browser tests)"
    apt_install chromium chromium-driver
fi
echo "test-setup: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium missing'), chromedriver at /usr/bin/chromedriver"

# [billing] tests (tests/billing.rs): a MariaDB server on 127.0.0.1:3306 with root and an
# empty password over TCP, and mariadb-install-db / mariadbd for the private servers the
# tests start and kill themselves (the shared server is never stopped by a test).
if ! command -v mariadbd >/dev/null 2>&1; then
    echo "test-setup: installing mariadb-server (billing database tests)"
    apt_install mariadb-server mariadb-client
fi
if ! mysql -h 127.0.0.1 -P 3306 -u root -e 'SELECT 1' >/dev/null 2>&1; then
    $SUDO service mariadb start >/dev/null 2>&1 || ($SUDO mysqld_safe >/dev/null 2>&1 &)
    for _ in $(seq 1 30); do
        $SUDO mysqladmin -u root ping >/dev/null 2>&1 && break
        sleep 1
    done
    # Debian's root logs in through the unix socket only: give it the empty password
    # over TCP as well (test machines only).
    $SUDO mysql -u root -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); \
        CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); \
        GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; FLUSH PRIVILEGES" || true
fi
echo "test-setup: mariadb $(mysql -h 127.0.0.1 -P 3306 -u root -N -e 'SELECT VERSION()' 2>/dev/null || echo 'not reachable') on 127.0.0.1:3306"
