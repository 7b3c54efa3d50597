"""NP Merge on the bench's BatchNorm CNNs alone: the rows "NP Merge after permute / CCA" of
`fastmerge bench --report --settings cnn` (fastmerge.demo.run_demo with the same seed sets, disjoint
pairs and 4 models, the demo's NP Merge settings), without the other methods' hour.

    .venv/bin/python benchmarks/np_merge_cnn.py [--arch resnet20|vgg_bn] [--seed-sets 3]
"""

from __future__ import annotations

import argparse
import statistics

from fastmerge.demo import NP_MERGE_ALIGNMENTS, run_demo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("resnet20", "vgg_bn"), default="resnet20")
    parser.add_argument("--seed-sets", type=int, default=3)
    args = parser.parse_args()
    hidden = 16 if args.arch == "resnet20" else 32  # ResNet-20 x1, VGG-BN 16/32: the bench's cnn settings
    methods = tuple(f"np_merge:{a}" for a in NP_MERGE_ALIGNMENTS)
    results = []
    for k in range(args.seed_sets):
        r = run_demo("mnist5k", arch=args.arch, hidden=hidden, seeds=4, methods=methods, first_seed=4 * k,
                     pairing="disjoint", progress=False)
        results.append(r)
        print(f"seed set {k} ({r.seconds:.0f} s): ensembles 2 models {statistics.fmean(r.ensemble2):.2f}, "
              f"4 models {r.ensemble4:.2f}; " + ", ".join(
                  f"{m} {n} models {r.mean(m, n, False):.2f}" for m in methods for n in (2, 4)), flush=True)

    def spread(values):
        return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"

    print(f"| test % ({args.seed_sets} seed sets) | 2 models | 4 models |\n|---|---|---|")
    print(f"| ensemble | {spread([statistics.fmean(r.ensemble2) for r in results])} | "
          f"{spread([r.ensemble4 for r in results])} |")
    for m in methods:
        print(f"| {m} | {spread([r.mean(m, 2, False) for r in results])} | "
              f"{spread([r.mean(m, 4, False) for r in results])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
