#!/usr/bin/env bash
# What a new user's debug build costs: a fresh crate (default dev profile,
# nothing tuned) depending on a chopsticks checkout, connecting to five
# local hosts through the shell bootstrap and calling one function on each.
# Prints the program's size, the median wall time of five runs cold (empty
# caches: the program is hashed and uploaded) and warm (caches filled), and
# the agent cache's size after several builds. BENCHMARKS.md quotes it.
# With PROFILE_LINES=1 the crate also optimises the hashing crates in its
# dev profile, as the README suggests.
#
#   scripts/debug-build.sh [CHECKOUT ...]     (default: this checkout)
#   PROFILE_LINES=1 scripts/debug-build.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${TMPDIR:-/tmp}/chopsticks-debug-build
mkdir -p "$work"
[ $# -gt 0 ] || set -- "$repo"

median() { sort -n | awk '{ a[NR] = $1 } END { printf "%.3f", a[int((NR + 1) / 2)] }'; }
seconds() {
  local start end
  start=$(date +%s%N); "$@" >/dev/null; end=$(date +%s%N)
  awk -v ns=$((end - start)) 'BEGIN { printf "%.3f\n", ns / 1e9 }'
}

for checkout in "$@"; do
  checkout=$(cd "$checkout" && pwd)
  name=$(git -C "$checkout" rev-parse --short HEAD)$(git -C "$checkout" diff --quiet HEAD || echo +)
  crate=$work/fleet-$(echo "$checkout" | md5sum | cut -c1-8)
  mkdir -p "$crate/src"
  cat > "$crate/Cargo.toml" <<TOML
[package]
name = "fleet"
version = "0.1.0"
edition = "2024"

[dependencies]
chopsticks = { path = "$checkout" }
tokio = { version = "1", features = ["macros", "rt-multi-thread"] }

[workspace]
TOML
  if [ -n "${PROFILE_LINES:-}" ]; then
    crate=$crate-tuned
    mkdir -p "$crate/src"
    sed 's/^\[workspace\]$/[workspace]\n\n[profile.dev.package.sha2]\nopt-level = 3\n\n[profile.dev.package.blake3]\nopt-level = 3/' \
      "${crate%-tuned}/Cargo.toml" > "$crate/Cargo.toml"
    name=$name-tuned
  fi
  cat > "$crate/src/main.rs" <<'RUST'
use chopsticks::{Local, Tunnel};

const BUILD: &str = "build 0";

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default() + BUILD
}

#[tokio::main]
async fn main() -> chopsticks::Result<()> {
    let hosts: Vec<Tunnel> = (0..5)
        .map(|index| Tunnel::new(Local::named(format!("host{index}")).shell_bootstrap(true)))
        .collect();
    let (a, b, c, d, e) = tokio::join!(
        hosts[0].call(kernel, ()),
        hosts[1].call(kernel, ()),
        hosts[2].call(kernel, ()),
        hosts[3].call(kernel, ()),
        hosts[4].call(kernel, ()),
    );
    for answer in [a, b, c, d, e] {
        answer?;
    }
    Ok(())
}
RUST
  cache=$work/cache-$name
  run() { XDG_CACHE_HOME=$cache "$crate/target/debug/fleet"; }
  build() { (cd "$crate" && cargo build --quiet 2>/dev/null); }
  sed -i "s/\"build [0-9]*\"/\"build 0\"/" "$crate/src/main.rs"
  build
  cold=$(for _ in 1 2 3 4 5; do rm -rf "$cache"; seconds run; done | median)
  warm=$(for _ in 1 2 3 4 5; do seconds run; done | median)
  size=$(stat -c %s "$crate/target/debug/fleet")
  # Four more builds, each a different program: the cache keeps what it keeps.
  for build_number in 1 2 3 4; do
    sed -i "s/\"build [0-9]*\"/\"build $build_number\"/" "$crate/src/main.rs"
    build
    run
  done
  cached=$(du -sb "$cache/chopsticks" | cut -f1)
  agents=$(ls "$cache/chopsticks" | grep -c '^agent-' || true)
  printf '%s: debug program %d MB; 5 hosts cold %s s, warm %s s; cache after 5 builds: %d agents, %d MB\n' \
    "$name" $((size / 1000000)) "$cold" "$warm" "$agents" $((cached / 1000000))
  rm -rf "$cache"
done
