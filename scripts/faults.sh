#!/usr/bin/env bash
# Runs the fault tests (killed controllers, agents and sshd sessions,
# partitions in network namespaces, frozen ends, protocol violations,
# containers of killed controllers, timed-out large results) and prints the
# figures they measured: time to error, time until the agent is gone, what
# was left behind. BENCHMARKS.md quotes its output (target/bench/faults.txt).
# Needs what scripts/test.sh installs (sshd, iproute2, iptables, Docker).
#
#   scripts/faults.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bench
mkdir -p "$out"
CI=true cargo test --all-features --test tests -- --nocapture --test-threads=1 \
    controller_killed:: partition:: heartbeat::a_frozen heartbeat::an_agent_whose_controller_froze protocol::a_protocol_violation \
    docker::a_container_whose_controller_was_killed files::a_killed_agent_mid_put \
    memory::a_timed_out 2>&1 | grep -oE 'FIGURE .*|test result.*' | sed 's/^FIGURE //' | tee "$out/faults.txt"
