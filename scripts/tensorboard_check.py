#!/usr/bin/env python3
"""Reads an rlft run's TensorBoard event files with TensorBoard's own reader and checks every
scalar against metrics.jsonl (issue 16). Needs `pip install tensorboard`.

usage: scripts/tensorboard_check.py OUTPUT_DIR      (a run with training.report_to = ["tensorboard"])
Prints the tags and the number of points; exits 1 on a mismatch."""
import json
import math
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

out = sys.argv[1]
acc = EventAccumulator(f"{out}/runs", size_guidance={"scalars": 0})
acc.Reload()
tags = acc.Tags()["scalars"]
points = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags}
want = {}
for line in open(f"{out}/metrics.jsonl"):
    r = json.loads(line)
    if not isinstance(r.get("step"), int):
        continue
    for k, v in r.items():
        if k == "step" or isinstance(v, str) or v is None:
            continue
        want.setdefault(k, []).append((r["step"], float(v)))
bad = 0
for k, pts in want.items():
    got = points.get(k, [])
    ok = len(got) == len(pts) and all(
        s == t and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-30) for (s, a), (t, b) in zip(got, pts))
    if not ok:
        bad += 1
        print(f"MISMATCH {k}: tensorboard {got[:3]}… vs metrics.jsonl {pts[:3]}…")
print(f"{len(tags)} tags, {sum(len(p) for p in points.values())} points; "
      f"{len(want)} metrics checked, {bad} mismatched")
sys.exit(1 if bad else 0)
