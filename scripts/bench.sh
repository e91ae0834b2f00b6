#!/usr/bin/env bash
# Runs the criterion benches unpinned and pinned to one CPU, the memory bench and
# the latency-under-bulk bench (unpinned and pinned),
# and keeps their output under target/bench/. BENCHMARKS.md quotes these files.
# The call benches run on the local transport and over ssh to the test kit's
# loopback sshd (openssh-server, which scripts/test.sh installs).
#
#   scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench
mkdir -p "$out"
cargo bench --features ssh --no-run --benches >/dev/null 2>&1
args=(--warm-up-time 2 --measurement-time 5)
cargo bench --features ssh --bench calls -- "${args[@]}" 2>&1 | tee "$out/calls-unpinned.txt"
taskset -c 0 cargo bench --features ssh --bench calls -- "${args[@]}" 2>&1 | tee "$out/calls-pinned.txt"
cargo bench --bench memory 2>&1 | tee "$out/memory.txt"
cargo bench --features ssh --bench latency -- ssh 2>&1 | tee "$out/latency-unpinned.txt"
taskset -c 0 cargo bench --features ssh --bench latency -- ssh 2>&1 | tee "$out/latency-pinned.txt"
