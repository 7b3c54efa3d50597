"""`fastmerge bench`: time each engine op against its baseline and print the ratio table."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the engine ops against their baselines")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few seconds")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (best is kept)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .. import _ext, bench
    from .info import report

    print("\n".join(report()))
    if not _ext.load():
        print("note: timing the pure-torch fallbacks, not the compiled engine", file=sys.stderr)
    size = "quick (small sizes)" if args.quick else "full (the sizes of benchmarks/RESULTS.md)"
    print(f"\nop benchmarks, {size}; ratio > 1 means fastmerge is faster than the baseline\n")
    results = bench.run(bench.standard(quick=args.quick), repeats=args.repeats,
                        progress=lambda name: print(f"  timing {name} ...", file=sys.stderr, flush=True))
    print(bench.format_table(results))
    return 0
