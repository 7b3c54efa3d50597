"""How far training moved each conv/linear weight of the cached BatchNorm CNNs (the bench's) from
its initialisation, ||W - W0|| / ||W0|| per layer: weight matching compares trained weights, and
where they are mostly the (random, independent) initial weights it matches noise.

    .venv/bin/python benchmarks/weight_drift.py
"""

from __future__ import annotations

import torch

from fastmerge.datasets import load_dataset
from fastmerge.zoo.training import cnn_config, make_model, trained_model

MODELS = (("vgg_bn", 32, 8), ("resnet20", 16, 8), ("resnet20", 64, 5))  # (arch, hidden, epochs) as the bench's


def main() -> int:
    split = load_dataset("mnist5k")
    for arch, hidden, epochs in MODELS:
        config = cnn_config("mnist5k", arch, hidden, epochs)
        torch.manual_seed(0)  # train() seeds the initialisation the same way
        initial = make_model(config, split.x_fit.shape[1]).state_dict()
        trained = trained_model(config, split, 0).state_dict()
        drift = sorted(float((trained[k] - w0).norm() / w0.norm()) for k, w0 in initial.items() if w0.dim() >= 2)
        print(f"{arch} hidden {hidden}: {len(drift)} conv/linear weights, ||W - W0|| / ||W0|| median "
              f"{drift[len(drift) // 2]:.2f}, min {drift[0]:.2f}, max {drift[-1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
