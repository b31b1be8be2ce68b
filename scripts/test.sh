#!/usr/bin/env bash
# The project's test command (README and .ci/run): set up the peers, check formatting
# and lints, run every test against SQLite and a real PostgreSQL. Every test binary runs
# even when one fails; the failures are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-setup.sh
# cargo-deb for tests/package.rs, which builds, installs and purges the Debian package.
bash scripts/package.sh --setup
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --all-targets --no-fail-fast 2>&1 | tee "$log" || status=$?
if [ "$status" != 0 ]; then
    echo
    echo "test.sh: these tests failed:"
    grep -E '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/    \1/' || true
    grep -E '^error: .*(target|test).* failed' -A50 "$log" | grep -E '^\s+--' || true
    exit "$status"
fi
