"""How close fastmerge's and mergekit's merges are (run by benchmarks/vs_mergekit.sh).

For each method: tensors compared, how many are bit-equal, and the worst relative Frobenius
difference of the task vectors (merge - base; for linear, of the merged weights). DARE's random
masks differ between the tools by design, so only its expected value is comparable. ties_compat is
fastmerge's TIES with --mergekit-compat, against mergekit's TIES.

    python benchmarks/compare_outputs.py WORKDIR [METHOD ...]
"""

import glob
import sys

import torch
from safetensors import safe_open


def tensor_files(path: str) -> dict:
    files = [path] if path.endswith(".safetensors") else sorted(glob.glob(f"{path}/*.safetensors"))
    found = {}
    for f in files:
        with safe_open(f, "pt") as h:
            found.update({k: f for k in h.keys()})
    return found


def load(files: dict, name: str) -> torch.Tensor:
    with safe_open(files[name], "pt") as h:
        return h.get_tensor(name).double()


def main(work: str, methods: list[str]) -> None:
    base = tensor_files(f"{work}/base/model.safetensors")
    for method in methods:
        ours = tensor_files(f"{work}/fm_{method}")
        theirs = tensor_files(f"{work}/mk_{method.removesuffix('_compat')}")
        common = [n for n in ours if n in theirs]
        equal, worst = 0, 0.0
        for name in common:
            x, y = load(ours, name), load(theirs, name)
            equal += int(torch.equal(x, y))
            if method != "linear" and name in base and x.shape == load(base, name).shape:
                b = load(base, name)
                x, y = x - b, y - b
            worst = max(worst, float((x - y).norm() / y.norm().clamp_min(1e-30)))
        what = "merged weights" if method == "linear" else "task vectors"
        print(f"{method}: {len(common)} tensors compared ({len(ours)} / {len(theirs)} written), bit-equal {equal}, "
              f"worst relative difference of the {what} {worst:.2e}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["linear", "ties", "ties_compat", "dare"])
