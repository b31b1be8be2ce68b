#!/usr/bin/env bash
# Builds the Debian package target/debian/nasd_<version>-1_<arch>.deb with cargo-deb
# (installed from crates.io when missing): the release binary, the man pages and the
# bash/zsh completions generated from its clap definitions (`nasd generate`, into
# target/assets), then `cargo deb` with [package.metadata.deb] of Cargo.toml.
#
#   bash scripts/package.sh                   # release build, then the package
#   bash scripts/package.sh --binary FILE     # package FILE as the binary, no build, fast
#                                             # compression, into target/debian-staged
#                                             # (tests/package.rs gives the debug binary
#                                             # cargo test built)
#   bash scripts/package.sh --setup           # only install cargo-deb
#
# Install: dpkg -i target/debian/nasd_*.deb (README.md, "Install").
set -euo pipefail
cd "$(dirname "$0")/.."

binary=
setup_only=no
while [ $# -gt 0 ]; do
    case "$1" in
    --binary) binary=$2; shift 2 ;;
    --setup) setup_only=yes; shift ;;
    *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

# A known cargo-deb (the Cargo.toml metadata and the flags below are checked with it);
# --locked: the dependency versions it was released with.
cargo_deb_version=3.8.0
if [ "$(cargo deb --version 2>/dev/null | awk '{print $NF}')" != "$cargo_deb_version" ]; then
    echo "package.sh: installing cargo-deb $cargo_deb_version from crates.io" >&2
    cargo install cargo-deb --version "$cargo_deb_version" --locked --quiet
fi
[ "$setup_only" = yes ] && exit 0

target_dir=${CARGO_TARGET_DIR:-target}
if [ -z "$binary" ]; then
    cargo build --locked --release --bin nasd
    bin=$target_dir/release/nasd
    # The binary stripped; its debug info (line tables, for backtraces) goes to
    # nasd-dbgsym_<version>_<arch>.ddeb beside the package.
    deb_args=(--profile release --dbgsym)
else
    # cargo-deb reads the binary of the profile it is given (its target/release assets
    # map to target/<profile>): a profile name of our own, holding a copy of FILE.
    if [ ! -x "$binary" ]; then
        echo "package.sh: $binary is not an executable" >&2
        exit 1
    fi
    bin=$target_dir/deb-staged/nasd
    mkdir -p "$target_dir/deb-staged"
    cp "$binary" "$bin"
    # Its own output directory: a release package in target/debian stays as it is.
    deb_args=(--profile deb-staged --fast --output "$target_dir/debian-staged")
fi

# cargo-deb's assets name target/assets/... (Cargo.toml), whatever the target dir.
assets=target/assets
rm -rf "$assets"
"$bin" generate man "$assets/man" >/dev/null
gzip -9n "$assets"/man/*.1
"$bin" generate bash "$assets/completions" >/dev/null
"$bin" generate zsh "$assets/completions" >/dev/null

# cargo-deb prints the path of each package it wrote (the .ddeb too with --dbgsym).
deb=$(cargo deb --no-build "${deb_args[@]}" | grep '\.deb$')
if [ -n "$binary" ]; then
    rm -f "$bin" # the staged copy of a (large, debug) binary
fi
echo "$deb"
