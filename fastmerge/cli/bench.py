"""`fastmerge bench`: time each engine op against its baseline and print the ratio table; with
--report, also measure merge quality over methods x models x seed sets and the pipeline workloads,
and write the generated block of benchmarks/RESULTS.md with its PNG charts (quality.png, speed.png)."""

from __future__ import annotations

import argparse
import sys

from .. import _ext, bench
from ..bench.report import run_report
from .info import report


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the engine ops against their baselines")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (best is kept)")
    p.add_argument("--report", nargs="?", const="benchmarks/RESULTS.md", metavar="PATH",
                   help="write the report block (quality + speed) into PATH (default benchmarks/RESULTS.md) and "
                        "the charts next to it; full: digits and MNIST-5k, 3 seed sets of 4 models (long)")
    p.add_argument("--seed-sets", type=int, help="--report: seed sets for the quality tables (default 3, quick 1)")
    p.add_argument("--settings", choices=("all", "mlp", "cnn", "wide"), default="all",
                   help="--report: which quality tables: MLPs (digits, MNIST-5k), BatchNorm CNNs (VGG-BN, ResNet-20 x1 "
                        "on MNIST-5k), wide (ResNet-20 x4: hours on 2 cores) or all (default)")
    p.add_argument("--no-speed", action="store_true", help="--report: merge quality only, no timings")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.report:
        path = run_report(args.report, quick=args.quick, repeats=args.repeats, seed_sets=args.seed_sets,
                          settings=args.settings, speed=not args.no_speed,
                          progress=lambda name: print(f"  timing {name} ...", file=sys.stderr, flush=True))
        charts = " and ".join(c for c, wanted in (("quality.png", True), ("speed.png", not args.no_speed)) if wanted)
        print(f"wrote {path} (and {charts} next to it)")
        return 0
    print("\n".join(report()))
    if not _ext.load():
        print("note: timing the pure-torch fallbacks, not the compiled engine", file=sys.stderr)
    size = "quick (small sizes)" if args.quick else "full (the sizes of benchmarks/RESULTS.md)"
    print(f"\nop benchmarks, {size}; ratio > 1 means fastmerge is faster than the baseline\n")
    results = bench.run(bench.standard(quick=args.quick), repeats=args.repeats,
                        progress=lambda name: print(f"  timing {name} ...", file=sys.stderr, flush=True))
    print(bench.format_table(results))
    return 0
