"""Two zoo ViTs (width 64, 2 blocks, 4 heads, 4x4 patches; nn.MultiheadAttention) trained on
MNIST-5k from seeds 0 and 1 (AdamW, one-cycle; cached), merged by every alignment method and by NP Merge
(on the labels alone, and with half its loss on the parents' ensemble).
Validation accuracy picks nothing here but is printed next to the test accuracy.

    .venv/bin/python benchmarks/vit_mnist.py
"""

from __future__ import annotations

import time
import warnings

import fastmerge
from fastmerge.datasets import load_dataset
from fastmerge.eval.metrics import accuracy, ensemble_accuracy
from fastmerge.zoo.training import TrainConfig, model_inputs, trained_model

CONFIG = TrainConfig(dataset="mnist5k", arch="vit", hidden=64, depth=2, epochs=40, lr=2e-3, batch_size=64,
                     weight_decay=0.05, optimizer="adamw")
ROWS = (("direct average", "average", {}), ("weight matching", "weight_matching", {}), ("permute", "permute", {}),
        ("ZipIt", "zipit", {}), ("CCA, stream permuted", "cca", {"reg": 0.3, "residual": "permute"}),
        ("CCA, orthogonal stream", "cca", {"reg": 0.3}))


def main() -> int:
    warnings.simplefilter("ignore")  # fallbacks (query/key dims: weight matching) are expected
    split = load_dataset("mnist5k")
    models = [trained_model(CONFIG, split, seed) for seed in (0, 1)]
    xv, yv = model_inputs(CONFIG, split.x_val), split.y_val
    xt, yt = model_inputs(CONFIG, split.x_test), split.y_test
    print("| model | val % | test % | seconds |\n|---|---|---|---|")
    for i, m in enumerate(models):
        print(f"| parent {i} | {accuracy(m, xv, yv):.1f} | {accuracy(m, xt, yt):.1f} | |")
    print(f"| ensemble | {ensemble_accuracy(models, xv, yv):.1f} | {ensemble_accuracy(models, xt, yt):.1f} | |")
    stats_data = [(model_inputs(CONFIG, split.x_fit[i:i + 256]), split.y_fit[i:i + 256]) for i in range(0, 2048, 256)]
    for label, method, options in ROWS:
        start = time.perf_counter()
        merged = fastmerge.merge(models, method, data=stats_data, progress=False, **options)
        seconds = time.perf_counter() - start
        print(f"| {label} | {accuracy(merged, xv, yv):.1f} | {accuracy(merged, xt, yt):.1f} | {seconds:.1f} |")
    fit = [(model_inputs(CONFIG, split.x_fit[i:i + 128]), split.y_fit[i:i + 128]) for i in range(0, len(split.x_fit), 128)]
    for distill in (0.0, 0.5):  # the labels alone; half the loss on the parents' ensemble
        for align in ("cca", "permute"):
            start = time.perf_counter()
            merged = fastmerge.merge(models, "np_merge", align_method=align, data=fit, val_data=[(xv, yv)],
                                     progress=False, np_options={"steps": 300, "lr": 0.05, "distill": distill})
            seconds = time.perf_counter() - start
            print(f"| NP Merge after {align} (300 steps, distill {distill}) | {accuracy(merged, xv, yv):.1f} | "
                  f"{accuracy(merged, xt, yt):.1f} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
