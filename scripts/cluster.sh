#!/usr/bin/env bash
# The cluster chaos test (tests/cluster.rs) built in release: three `nasd run` daemons
# on one private PostgreSQL cluster and twelve simulated NAS, while a daemon is killed
# with SIGKILL, a fourth joins and leaves with SIGTERM, PostgreSQL is restarted and a
# daemon is frozen with SIGSTOP; the SIGKILL part also through PgBouncer in transaction
# mode; events/s with 1, 2 and 3 daemons. Prints the figures at the end.
#
#   bash scripts/cluster.sh          # short form, the one CI runs (in debug) as a test
#   bash scripts/cluster.sh long     # 10 kills, two join/leave rounds, two restarts,
#                                    # two freezes, larger backlogs
#
# Extra arguments go to the test binary, e.g. `bash scripts/cluster.sh long chaos`.
# NASD_CLUSTER_SEED repeats a run's random choices; NASD_CLUSTER_KEEP=1 keeps the work
# directories (daemon logs and journals, device records); NASD_CLUSTER_LOG sets the
# daemons' NASD_LOG.
set -euo pipefail
cd "$(dirname "$0")/.."
form=${1:-short}
case "$form" in
    short | long) ;;
    *)
        echo "usage: scripts/cluster.sh [short|long] [test name filter]" >&2
        exit 64
        ;;
esac
shift || true
bash scripts/test-setup.sh >/dev/null
figures=$(mktemp)
trap 'rm -f "$figures"' EXIT
status=0
NASD_CLUSTER=$form NASD_CLUSTER_FIGURES=$figures \
    cargo test --release --test cluster -- --nocapture --test-threads=1 "$@" || status=$?
pg=$(ls /usr/lib/postgresql | sort -V | tail -1)
echo
echo "Cluster chaos, $form form, $(date -u +%Y-%m-%d): $(nproc) cores ($(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)), PostgreSQL $pg, release build"
echo
cat "$figures"
exit "$status"
