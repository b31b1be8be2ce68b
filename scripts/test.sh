#!/usr/bin/env bash
# The project's test command (README and .ci/run): set up the peers, check formatting
# and lints, run every test against SQLite and a real PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets 2>&1
