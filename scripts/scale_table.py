#!/usr/bin/env python3
"""The table of scripts/side_by_side_scale.sh from its JSON lines (standard library only).
Usage: scripts/scale_table.py FILE [FILE ...]; a later line for the same row and side replaces an earlier one.
W5 rows compare seconds per step (ratio = rlft's time / PyTorch's: below 1 is faster), W6 rows new tokens
per second (ratio = rlft's speed / PyTorch's: above 1 is faster)."""
import json
import sys

rows = {}
for path in sys.argv[1:]:
    for line in open(path):
        v = json.loads(line)
        rows.setdefault(v["row"], {})[v["impl"]] = v


def ok(v):
    return v is not None and "skipped" not in v


def cell(v, key):
    if v is None:
        return "–"
    if not ok(v):
        return f"skipped ({v['skipped']})"
    x = v[key]
    steps = len(v.get("steps_s", []))
    return (f"{x:.2f}" if key == "seconds_per_step" else f"{x:.1f}") + (f" (n={steps})" if steps else "")


def rss(v):
    return f"{v['peak_rss_mb'] / 1024:.2f} GB" if ok(v) else "–"


def estimate(v):
    """rlft's memory estimate (train/memory.rs) against its measured peak, W5 only."""
    if not ok(v) or v.get("memory_estimate_mb") is None:
        return "–"
    e = v["memory_estimate_mb"]
    return f"{e / 1024:.2f} GB ({(e / v['peak_rss_mb'] - 1) * 100:+.0f}%)"


def other(v):
    return f"{v['other_procs_cpu_cores']:.2f}" if ok(v) and v.get("other_procs_cpu_cores") is not None else "–"


print("| row | rlft | PyTorch | rlft / PyTorch | peak RSS rlft | peak RSS PyTorch | RSS ratio | rlft's estimate (vs its peak) | other CPU (cores) |")
print("|---|---|---|---|---|---|---|---|---|")
for name, r in rows.items():
    a, b = r.get("rlft"), r.get("pytorch")
    w5 = name.startswith("W5")
    key, unit = ("seconds_per_step", "s/step") if w5 else ("tokens_per_s", "new tokens/s")
    both = ok(a) and ok(b)
    ratio = f"{a[key] / b[key]:.2f}× {'time' if w5 else 'speed'}" if both else "–"
    rr = f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}" if both else "–"
    print(f"| {name} ({unit}) | {cell(a, key)} | {cell(b, key)} | {ratio} | {rss(a)} | {rss(b)} | {rr} | {estimate(a)} | {other(a)} / {other(b)} |")
