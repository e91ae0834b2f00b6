#!/usr/bin/env bash
# Runs the criterion benches unpinned and pinned to one CPU, plus the memory bench,
# and keeps their output under target/bench/. BENCHMARKS.md quotes these files.
#
#   scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench
mkdir -p "$out"
cargo bench --no-run --benches >/dev/null 2>&1
args=(--warm-up-time 2 --measurement-time 5)
cargo bench --bench calls -- "${args[@]}" 2>&1 | tee "$out/calls-unpinned.txt"
taskset -c 0 cargo bench --bench calls -- "${args[@]}" 2>&1 | tee "$out/calls-pinned.txt"
cargo bench --bench memory 2>&1 | tee "$out/memory.txt"
