#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, then runs every check and test.
#
#   scripts/test.sh
#
# Needs: cargo (stable), root or sudo for apt-get when a prerequisite is missing.
# The sudo tests create a throwaway user and the full-disk tests mount a
# tmpfs, so they need root; the ssh tests start a real sshd (openssh-server);
# the libssh2 backend builds against OpenSSL; the partition tests put an sshd
# in a network namespace (iproute2) and cut it off (iptables); the docker tests need a running
# Docker Engine (installed and started here if missing). Under CI=true a missing
# prerequisite fails the run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v sudo >/dev/null 2>&1 || missing+=(sudo)
command -v doas >/dev/null 2>&1 || missing+=(doas)
command -v setsid >/dev/null 2>&1 || missing+=(util-linux)
command -v useradd >/dev/null 2>&1 || missing+=(passwd)
command -v sha256sum >/dev/null 2>&1 || missing+=(coreutils)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
[ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
if ((${#missing[@]})); then
  echo "installing test prerequisites: ${missing[*]}"
  as_root=()
  [ "$(id -u)" = 0 ] || as_root=(sudo)
  "${as_root[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The docker tests need a running Engine; start one if this machine has none.
if ! docker info >/dev/null 2>&1; then
  as_root=()
  [ "$(id -u)" = 0 ] || as_root=(sudo)
  if ! command -v dockerd >/dev/null 2>&1; then
    echo "installing docker.io for the docker tests"
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq docker.io >/dev/null
  fi
  echo "starting dockerd (log: /tmp/chopsticks-dockerd.log)"
  "${as_root[@]}" sh -c 'nohup dockerd >/tmp/chopsticks-dockerd.log 2>&1 &'
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /tmp/chopsticks-dockerd.log"; exit 1; }
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features -- -D warnings
cargo run --quiet --example quickstart
cargo run --quiet --example custom_transport
# Two builds of one program, for the test that calls registered functions in
# another build (tests/other_build.rs): the example plain and with a variant.
mkdir -p target/other-builds
cargo build --quiet --example other_build
cp target/debug/examples/other_build target/other-builds/plain
cargo build --quiet --example other_build --features example-variant
cp target/debug/examples/other_build target/other-builds/variant
# The decoder fuzz targets (proptest) run this many cases each.
export CHOPSTICKS_FUZZ_CASES="${CHOPSTICKS_FUZZ_CASES:-20000}"
cargo test --workspace --all-features
