#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, then runs every check and test.
#
#   scripts/test.sh
#
# Needs: cargo (stable), root or sudo for apt-get when a prerequisite is missing.
# The sudo tests create a throwaway user, so they need root; under CI=true a
# missing prerequisite fails the run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v sudo >/dev/null 2>&1 || missing+=(sudo)
command -v setsid >/dev/null 2>&1 || missing+=(util-linux)
command -v useradd >/dev/null 2>&1 || missing+=(passwd)
command -v sha256sum >/dev/null 2>&1 || missing+=(coreutils)
if ((${#missing[@]})); then
  echo "installing test prerequisites: ${missing[*]}"
  as_root=()
  [ "$(id -u)" = 0 ] || as_root=(sudo)
  "${as_root[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
cargo run --quiet --example quickstart
cargo run --quiet --example custom_transport
# The decoder fuzz targets (proptest) run this many cases each.
export CHOPSTICKS_FUZZ_CASES="${CHOPSTICKS_FUZZ_CASES:-20000}"
cargo test --workspace --all-features
