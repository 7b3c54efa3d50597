"""`fastmerge info`: versions, compiled backends, threads, and why the engine is not in use if it isn't."""

from __future__ import annotations

import argparse

import torch

from .. import _ext
from .._version import __version__


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show versions, compiled backends and threads")
    p.set_defaults(run=run)


def report() -> list[str]:
    lines = [f"fastmerge {__version__}", f"torch {torch.__version__}"]
    if _ext.load():
        build = _ext.build_info()
        cuda = "yes" if build.get("cuda") == "1" else "no (not compiled)"
        if build.get("cuda") == "1" and not torch.cuda.is_available():
            cuda = "compiled, but no GPU is visible"
        lines += [
            f"compiled library: {_ext.library_path()} (built against torch {build.get('torch_compiled', '?')}, "
            f"compiler {build.get('compiler', '?')})",
            f"backends: CPU yes, CUDA {cuda}",
            f"OpenMP: {'version ' + build['openmp'] if build.get('openmp', '0') != '0' else 'no'}",
        ]
    else:
        lines += [
            f"compiled library: unavailable ({_ext.unavailable_reason()})",
            "backends: none compiled; ops use the pure-torch reference implementations",
        ]
    lines.append(f"threads: {torch.get_num_threads()} (torch intra-op, used by the CPU kernels)")
    return lines


def run(args: argparse.Namespace) -> int:
    print("\n".join(report()))
    return 0
