#!/usr/bin/env bash
# Installs and starts what the tests need, on a fresh Debian machine or this one:
# a PostgreSQL server on 127.0.0.1:5432 that trusts local connections.
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
