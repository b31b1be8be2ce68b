#!/usr/bin/env bash
# The fault harness (tests/fault.rs) built in release: the real daemon on a private
# PostgreSQL cluster against simulated and real devices, while it is killed with
# SIGKILL, PostgreSQL is restarted, its connections are terminated and a NAS goes down.
# Prints the figures table (markdown) at the end.
#
#   bash scripts/fault.sh          # short form, the one CI runs (in debug) as a test
#   bash scripts/fault.sh long     # >= 20 kills during 20,000 events, 3 restarts,
#                                  # a NAS down for 3 minutes (about 15 minutes)
#
# Extra arguments go to the test binary, e.g. `bash scripts/fault.sh short kill_9`.
# NASD_FAULT_SEED repeats a run's random choices; NASD_FAULT_KEEP=1 keeps the work
# directories (daemon log, device records).
set -euo pipefail
cd "$(dirname "$0")/.."
form=${1:-short}
case "$form" in
    short | long) ;;
    *)
        echo "usage: scripts/fault.sh [short|long] [test name filter]" >&2
        exit 64
        ;;
esac
shift || true
bash scripts/test-setup.sh >/dev/null
figures=$(mktemp)
trap 'rm -f "$figures"' EXIT
status=0
NASD_FAULT=$form NASD_FAULT_FIGURES=$figures \
    cargo test --release --test fault -- --nocapture --test-threads=1 "$@" || status=$?
pg=$(ls /usr/lib/postgresql | sort -V | tail -1)
echo
echo "Fault harness, $form form, $(date -u +%Y-%m-%d): $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), PostgreSQL $pg, release build"
echo
cat "$figures"
if grep -q "NOT MET" "$figures"; then
    echo
    echo "fault: a timing target was not met (see the table)" >&2
    [ "$status" = 0 ] && status=3
fi
exit "$status"
