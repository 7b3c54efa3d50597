"""The `fastmerge` command line: one subcommand per job.

Exit codes: 0 done; 2 a problem with the inputs or options (fastmerge.errors.FastmergeError: one line
on stderr naming the file/tensor and the fix); 130 interrupted (Ctrl-C or SIGTERM: partial outputs
are removed); anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys

from ..errors import FastmergeError
from . import bench, demo, eval, info, merge, spec


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's convention for bad input: one line on stderr, exit 2 (argparse's own
    prints its whole usage first). Subcommand parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastmerge", description="Align and merge neural networks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    info.add_parser(sub)
    demo.add_parser(sub)
    bench.add_parser(sub)
    merge.add_parser(sub)
    eval.add_parser(sub)
    spec.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    # SIGTERM unwinds like Ctrl-C, so writers remove their temporary files on the way out
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.run(args) or 0)
    except FastmergeError as exc:
        message = as_flags(" ".join(str(exc).split()))  # one line, whatever a library underneath wrote
        print(f"fastmerge {args.command}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastmerge {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


# The library's errors name its Python arguments (as `name=value`, or a bare name); on the command
# line the same thing is a flag.
ARGUMENT_FLAGS = {"overwrite=True": "--overwrite", "spec_file=": "--spec ", "base=": "--base ", "method=": "--method ",
                  "repair_mode=": "--repair ", "device=": "--device ", "dtype=": "--dtype ", "build_model": "--model",
                  "model_kwargs": "--model-kwargs"}
# only whole words that start the message or follow a space or "(": never inside a path, a quoted
# name or a longer identifier; a bare name must not run on into a longer word or a file name
_ARGUMENT = re.compile(r"(?:^|(?<=[\s(]))(" + "|".join(re.escape(k) if k.endswith("=") else re.escape(k) + r"(?![\w.])"
                                                    for k in ARGUMENT_FLAGS) + ")")


def as_flags(message: str) -> str:
    """`message` with the library's argument names replaced by the command line's flags."""
    return _ARGUMENT.sub(lambda m: ARGUMENT_FLAGS[m.group(1)], message)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
