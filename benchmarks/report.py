"""Turns a pytest-benchmark JSON file into the ratio table of benchmarks/RESULTS.md (printed).

    python benchmarks/report.py benchmarks/latest.json

Each ratio divides the baseline's by fastmerge's best (min) time of the same run, or for
bandwidth workloads compares bytes moved per second.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def ratio(info: dict, t_ours: float, t_base: float) -> float:
    if info["ratio_kind"] == "bandwidth":
        return (info["ours_bytes"] / t_ours) / (info["baseline_bytes"] / t_base)
    if info["ratio_kind"] == "overhead":
        return t_ours / t_base
    return t_base / t_ours


def table(data: dict) -> str:
    sides = defaultdict(dict)
    notes = []
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if "report" in info:  # a benchmark that reports its own lines
            notes += info["report"]
            continue
        sides[info["workload"]][info["side"]] = (bench["stats"]["min"], info)
    lines = ["| workload | fastmerge (s) | baseline | baseline (s) | ratio | target |", "|---|---|---|---|---|---|"]
    for name, pair in sides.items():
        if set(pair) != {"fastmerge", "baseline"}:
            continue
        (t_ours, info), (t_base, _) = pair["fastmerge"], pair["baseline"]
        r = ratio(info, t_ours, t_base)
        overhead = info["ratio_kind"] == "overhead"
        kind = {"bandwidth": "bandwidth", "overhead": "time"}.get(info["ratio_kind"], "speed")
        target = info.get("target")
        met = None if target is None else (r <= target if overhead else r >= target)
        verdict = "" if met is None else (" (met)" if met else " (MISSED)")
        bound = "<= " if overhead else ">= "
        lines.append(f"| {name} | {t_ours:.4f} | {info['baseline_name']} | {t_base:.4f} | {r:.2f}x {kind}{verdict} | "
                     f"{bound + str(target) if target is not None else 'report'} |")
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", "?")
    header = f"machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores; {data.get('datetime', '')}"
    out = header + "\n\n" + "\n".join(lines)
    if notes:
        out += "\n\n" + "\n".join(notes)
    return out


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table(json.load(f)))
