"""How close fastmerge's and mergekit's merges are to the exact value, for the methods where
fastmerge takes its coefficients from a float64 Gram matrix and mergekit rounds every intermediate
to the checkpoints' dtype (SLERP, Model Stock, NuSLERP, Multi-SLERP, Karcher; run after
benchmarks/vs_mergekit.sh, which writes both tools' outputs into WORKDIR).

The exact value: mergekit's formula evaluated in float64 on the same inputs (fastmerge's
--mergekit-compat functions, which the conformance tests hold bit-equal to mergekit's). Reported
per method: the relative Frobenius error of each tool's merged weights and of its task vectors
(merge - base), worst and median over the tensors, and how many tensors each tool has closer.

    python benchmarks/exactness_vs_mergekit.py WORKDIR [METHOD ...]
"""

from __future__ import annotations

import statistics
import sys

import torch

from compare_outputs import load, tensor_files
from fastmerge.merging.methods.karcher import karcher_tensor
from fastmerge.merging.methods.model_stock import model_stock_tensor
from fastmerge.merging.methods.multislerp import multislerp_tensor
from fastmerge.merging.methods.nuslerp import nuslerp_tensor
from fastmerge.merging.methods.slerp import slerp_tensor

# the configs of benchmarks/vs_mergekit.sh: the inputs and mergekit's formula in float64
EXACT = {
    "slerp": ("ab", lambda x, base: slerp_tensor(x[0], x[1], 0.3)),
    "model_stock": ("abc", lambda x, base: model_stock_tensor(x, base)),
    "nuslerp": ("ab", lambda x, base: nuslerp_tensor(0.5, x[0], x[1], flatten=True)),
    "multislerp": ("abc", lambda x, base: multislerp_tensor("", x, [1.0, 1.0, 1.0])),
    "karcher": ("abc", lambda x, base: karcher_tensor(list(x), [1 / 3] * 3)),
}


def _relative(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float((x - exact).norm() / exact.norm().clamp_min(1e-300))


def main(work: str, methods: list[str]) -> None:
    base_files = tensor_files(f"{work}/base/model.safetensors")
    for method in methods:
        names, formula = EXACT[method]
        inputs = [tensor_files(f"{work}/{m}/model.safetensors") for m in names]
        outputs = {tool: tensor_files(f"{work}/{prefix}_{method}") for tool, prefix in (("fastmerge", "fm"),
                                                                                          ("mergekit", "mk"))}
        errors = {(tool, what): [] for tool in outputs for what in ("weights", "task vectors")}
        closer = 0
        for name in sorted(base_files):
            base = load(base_files, name)
            exact = formula([load(f, name) for f in inputs], base)
            for tool, files in outputs.items():
                merged = load(files, name)
                errors[tool, "weights"].append(_relative(merged, exact))
                errors[tool, "task vectors"].append(_relative(merged - base, exact - base))
            closer += errors["fastmerge", "weights"][-1] <= errors["mergekit", "weights"][-1]
        for what in ("weights", "task vectors"):
            print(f"{method}, {what}: " + "; ".join(
                f"{tool} worst {max(errors[tool, what]):.2e}, median {statistics.median(errors[tool, what]):.2e}"
                for tool in outputs))
        print(f"{method}: fastmerge as close or closer on {closer} of {len(base_files)} tensors")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(EXACT))
