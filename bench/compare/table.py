"""Renders the JSON results of bench/compare/run.sh as Markdown tables."""
import json
import os
import sys

OURS = ["chopsticks-rs", "chopsticks-rs-libssh2"]
PEERS = ["chopsticks", "mitogen", "execnet"]
LIBRARIES = OURS + PEERS
# (field, label, better: "low" or "high", format)
ROWS = [
    ("trivial_us_median", "trivial call, median (µs)", "low", "{:.1f}"),
    ("trivial_us_p99", "trivial call, p99 (µs)", "low", "{:.1f}"),
    ("calls_per_s", "calls/s on one connection", "high", "{:,.0f}"),
    ("arg64_mb_s", "64 MiB argument (MB/s)", "high", "{:.0f}"),
    ("put_mb_s", "256 MiB file put (MB/s)", "high", "{:.0f}"),
    ("fetch_mb_s", "256 MiB file fetch (MB/s)", "high", "{:.0f}"),
    ("put_unsynced_mb_s", "256 MiB put, ours `.sync(false)` (MB/s)", "high", "{:.0f}"),
    ("fetch_unsynced_mb_s", "256 MiB fetch, ours `.sync(false)` (MB/s)", "high", "{:.0f}"),
    ("connect_first_call_ms", "connect + first call (ms)", "low", "{:.1f}"),
    ("fanout20_s", "20 hosts connect + call (s)", "low", "{:.3f}"),
]


def load(directory, pinning, transport):
    results = {}
    for library in LIBRARIES:
        path = os.path.join(directory, f"{pinning}-{transport}-{library}.json")
        try:
            with open(path) as handle:
                results[library] = json.load(handle)
        except (OSError, ValueError):
            results[library] = {"error": "no result"}
    # The peers never sync what they write: their unsynced figure is their only one.
    for library in PEERS:
        for field in ("put", "fetch"):
            value = results[library].get(f"{field}_mb_s")
            if value is not None:
                results[library].setdefault(f"{field}_unsynced_mb_s", value)
    # execnet's fastest way to make a trivial call is a message on an open
    # channel, not a new remote_exec: count whichever is faster for it.
    execnet = results["execnet"]
    for field in ("trivial_us_median", "trivial_us_p99"):
        channel = execnet.get(field.replace("trivial_", "trivial_channel_"))
        if isinstance(channel, (int, float)) and (
            not isinstance(execnet.get(field), (int, float)) or channel < execnet[field]
        ):
            execnet[field] = channel
            execnet["notes_trivial"] = "trivial call timed over an open channel (faster than remote_exec)"
    return results


def ratio(ours, best, better):
    if ours is None or best is None or ours == 0 or best == 0:
        return "–"
    value = best / ours if better == "low" else ours / best
    return f"{value:.1f}×"


def table(directory, pinning, transport):
    results = load(directory, pinning, transport)
    # libssh2 (`NativeSsh`) runs over ssh only.
    ours = [library for library in OURS if "error" not in results[library]] or OURS[:1]
    shown = ours + PEERS
    lines = [f"### {transport}, {pinning}", ""]
    ratios = " | ".join(f"{library} vs best peer" for library in ours)
    lines.append("| workload | " + " | ".join(shown) + f" | {ratios} |")
    lines.append("|---" * (len(shown) + 1 + len(ours)) + "|")
    for field, label, better, form in ROWS:
        cells = []
        values = {}
        for library in shown:
            value = results[library].get(field)
            values[library] = value
            cells.append(form.format(value) if isinstance(value, (int, float)) else "–")
        peers = [values[l] for l in PEERS if isinstance(values[l], (int, float))]
        best = (min(peers) if better == "low" else max(peers)) if peers else None
        compared = " | ".join(ratio(values[library], best, better) for library in ours)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {compared} |")
    notes = []
    for library in shown:
        result = results[library]
        for key in ("calls_mode", "transfer_method", "notes_trivial", "error"):
            if result.get(key):
                notes.append(f"- {library} {key}: {result[key]}")
    lines.append("")
    lines.extend(notes)
    lines.append("")
    return "\n".join(lines)


def main():
    directory = sys.argv[1]
    print("## One-run comparison (bench/compare/run.sh)\n")
    for pinning in ("unpinned", "pinned"):
        for transport in ("local", "ssh"):
            print(table(directory, pinning, transport))


if __name__ == "__main__":
    main()
