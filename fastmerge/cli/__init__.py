"""The `fastmerge` command line: one subcommand per job.

Errors fastmerge raises on purpose (fastmerge.errors.FastmergeError) print one line on stderr and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import FastmergeError
from . import bench, demo, info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmerge", description="Align and merge neural networks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    info.add_parser(sub)
    demo.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.run(args) or 0)
    except FastmergeError as exc:
        print(f"fastmerge {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastmerge {args.command}: interrupted", file=sys.stderr)
        return 130
