#!/usr/bin/env bash
# One run of the five workloads for chopsticks (this crate) and its Python
# peers chopsticks 1.0, mitogen and execnet, over a local subprocess and over
# ssh to a loopback sshd (ours through both the OpenSSH client and libssh2),
# once unpinned and once with every process pinned to CPU 0. Writes target/compare/results.md (the tables) and the raw JSON.
#
#   bench/compare/run.sh            # full sizes (about 10 minutes)
#   bench/compare/run.sh --quick    # small sizes, to check the set-up
#
# The peers are installed from PyPI into a throwaway virtualenv
# (target/compare/venv); nothing outside target/ is changed, except that the
# ssh part creates the test kit's login user when run as root.
set -euo pipefail
cd "$(dirname "$0")/../.."
quick=()
[ "${1:-}" = "--quick" ] && quick=(--quick)
out=target/compare
mkdir -p "$out"
venv=$out/venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q chopsticks==1.0 mitogen==0.3.54 execnet==2.1.2

cargo bench --features full --bench compare --no-run
ours=$(cargo bench --features full --bench compare --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "compare" and m.get("executable"):
        print(m["executable"])')

# A loopback sshd with 20 aliases, kept alive while this script runs.
fifo=$(mktemp -u)
mkfifo "$fifo"
"$ours" sshd 20 < "$fifo" > "$out/sshd.txt" &
sshd_pid=$!
exec 9>"$fifo"
rm -f "$fifo"
trap 'exec 9>&-; wait "$sshd_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  grep -q '^ready' "$out/sshd.txt" 2>/dev/null && break
  sleep 0.1
done
grep -q '^ready' "$out/sshd.txt" || { echo "the sshd fixture did not start"; cat "$out/sshd.txt"; exit 1; }
config=$(sed -n 's/^config //p' "$out/sshd.txt")
native=(native
  --port "$(sed -n 's/^port //p' "$out/sshd.txt")"
  --user "$(sed -n 's/^user //p' "$out/sshd.txt")"
  --key "$(sed -n 's/^key //p' "$out/sshd.txt")"
  --known-hosts "$(sed -n 's/^known_hosts //p' "$out/sshd.txt")")
sshd=$(sed -n 's/^pid //p' "$out/sshd.txt")
all_cpus=$(taskset -p "$sshd" | sed 's/.*: //')
hosts=()
while read -r alias; do hosts+=(--ssh-host "$alias"); done < <(sed -n 's/^alias //p' "$out/sshd.txt")

for pinning in unpinned pinned; do
  pin=()
  if [ "$pinning" = pinned ]; then
    pin=(taskset -c 0)
    # sshd's per-connection processes inherit the listener's CPU set.
    taskset -p -c 0 "$sshd" >/dev/null
  else
    taskset -p "$all_cpus" "$sshd" >/dev/null
  fi
  for transport in local ssh; do
    args=("$transport")
    [ "$transport" = ssh ] && args+=(--ssh-config "$config" "${hosts[@]}")
    echo "== $pinning $transport: chopsticks-rs" >&2
    "${pin[@]}" "$ours" "${args[@]}" "${quick[@]}" > "$out/$pinning-$transport-chopsticks-rs.json"
    if [ "$transport" = ssh ]; then
      echo "== $pinning $transport: chopsticks-rs through libssh2 (NativeSsh)" >&2
      if ! "${pin[@]}" "$ours" "${native[@]}" "${quick[@]}" > "$out/$pinning-ssh-chopsticks-rs-libssh2.json"; then
        echo '{"library": "chopsticks-rs-libssh2", "transport": "ssh", "error": "the run failed; see the log above"}' \
          > "$out/$pinning-ssh-chopsticks-rs-libssh2.json"
      fi
    fi
    for library in chopsticks mitogen execnet; do
      echo "== $pinning $transport: $library" >&2
      if ! "${pin[@]}" "$venv/bin/python" bench/compare/peers.py "$library" "${args[@]}" "${quick[@]}" \
        > "$out/$pinning-$transport-$library.json"; then
        echo "{\"library\": \"$library\", \"transport\": \"$transport\", \"error\": \"the run failed; see the log above\"}" \
          > "$out/$pinning-$transport-$library.json"
      fi
    done
  done
done
python3 bench/compare/table.py "$out" > "$out/results.md"
cat "$out/results.md"
