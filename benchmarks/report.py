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
    return t_base / t_ours


def table(data: dict) -> str:
    sides = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        sides[info["workload"]][info["side"]] = (bench["stats"]["min"], info)
    lines = ["| workload | fastmerge (s) | baseline | baseline (s) | ratio | target |", "|---|---|---|---|---|---|"]
    for name, pair in sides.items():
        if set(pair) != {"fastmerge", "baseline"}:
            continue
        (t_ours, info), (t_base, _) = pair["fastmerge"], pair["baseline"]
        r = ratio(info, t_ours, t_base)
        kind = "bandwidth" if info["ratio_kind"] == "bandwidth" else "speed"
        target = info.get("target")
        verdict = "" if target is None else (" (met)" if r >= target else " (MISSED)")
        lines.append(f"| {name} | {t_ours:.4f} | {info['baseline_name']} | {t_base:.4f} | {r:.2f}x {kind}{verdict} | "
                     f"{'>= ' + str(target) if target is not None else 'report'} |")
    machine = data.get("machine_info", {})
    cpu = machine.get("cpu", {}).get("brand_raw", "?")
    header = f"machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores; {data.get('datetime', '')}"
    return header + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table(json.load(f)))
