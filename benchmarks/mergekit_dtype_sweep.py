"""Every shared merge method through mergekit 0.1.5 and `fastmerge merge`, for each pairing of a
config's `dtype` with the checkpoints' stored dtype: the largest difference of the two outputs in
ulps of the dtype the merge is computed in (the config's dtype), by default and with
--mergekit-compat. A sweep, not a test (tests/io/test_mergekit_conformance.py asserts the bounds).

    .venv/bin/python benchmarks/mergekit_dtype_sweep.py [WORKDIR]

Needs mergekit and transformers (the test extra); builds small LLaMA checkpoints in WORKDIR
(default a temporary folder).
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from fastmerge.cli import main
from fastmerge.io import Checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the tests' helpers
from tests.helpers import llama_family  # noqa: E402

TASK = "base_model: ROOT/base\nmodels:\n  - model: ROOT/a\n    parameters: {weight: 1.0, density: 0.5}\n" \
       "  - model: ROOT/b\n    parameters: {weight: 0.5, density: 0.5}\n"
PLAIN = "models:\n  - model: ROOT/a\n    parameters: {weight: 1.0}\n  - model: ROOT/b\n    parameters: {weight: 0.5}\n"
CONFIGS = {
    "linear": PLAIN,
    "task_arithmetic": TASK.replace(", density: 0.5", ""),
    "ties": TASK,
    "breadcrumbs": TASK.replace("0.5}", "0.8}"),
    "slerp": "base_model: ROOT/a\nmodels:\n  - model: ROOT/a\n  - model: ROOT/b\nparameters: {t: 0.3}\n",
    "model_stock": "base_model: ROOT/base\nmodels:\n  - model: ROOT/a\n  - model: ROOT/b\n",
    "nuslerp": PLAIN,
    "multislerp": PLAIN,
    "karcher": "models:\n  - model: ROOT/a\n  - model: ROOT/b\n",
    "sce": "base_model: ROOT/base\nmodels:\n  - model: ROOT/a\n  - model: ROOT/b\n  - model: ROOT/c\n"
           "parameters: {select_topk: 0.5}\n",
    "nearswap": "base_model: ROOT/a\nmodels:\n  - model: ROOT/a\n  - model: ROOT/b\nparameters: {t: 0.01}\n",
    "ram": "base_model: ROOT/base\nmodels:\n  - model: ROOT/a\n  - model: ROOT/b\n",
    "passthrough": "slices:\n  - sources: [{model: ROOT/a, layer_range: [0, 2], parameters: {scale: 0.7}}]\n"
                   "  - sources: [{model: ROOT/b, layer_range: [1, 4]}]\n",
}
PAIRINGS = [("float32", "bfloat16"), ("float32", "float16"), ("float16", "bfloat16"), ("bfloat16", "float16"),
            ("bfloat16", "float32")]  # (config dtype, stored dtype)


def ulps(theirs: Path, ours: Path, dtype: torch.dtype) -> float:
    a, b = Checkpoint(str(theirs)), Checkpoint(str(ours))
    if sorted(a.keys()) != sorted(b.keys()):
        return float("inf")
    worst = 0.0
    for key in a.keys():
        x, y = a[key].double(), b[key].double()
        scale = torch.finfo(dtype).eps * max(float(x.abs().max()), 1e-30)
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


def main_sweep(work: Path) -> None:
    llama_family(work / "family", layers=4)
    print("| method | config dtype / stored | default (ulps) | --mergekit-compat (ulps) |")
    print("|---|---|---|---|")
    for method, body in CONFIGS.items():
        for dtype, stored in PAIRINGS:
            text = f"merge_method: {method}\n{body}dtype: {dtype}\n".replace("ROOT", str(work / "family" / stored))
            case = work / f"{method}-{dtype}-{stored}"
            case.mkdir(parents=True, exist_ok=True)
            (case / "c.yml").write_text(text)
            run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(case / "mergekit"),
                      options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0))
            cells = []
            for flags in ((), ("--mergekit-compat",)):
                out = case / f"fastmerge{len(flags)}"
                with contextlib.redirect_stderr(io.StringIO()):  # the notes on deliberate differences
                    rc = main(["merge", "--config", str(case / "c.yml"), "-o", str(out), "--quiet", "--overwrite",
                               *flags])
                cells.append(f"{ulps(case / 'mergekit', out, getattr(torch, dtype)):.2f}" if rc == 0 else f"rc {rc}")
            print(f"| {method} | {dtype} / {stored} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main_sweep(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as folder:
            main_sweep(Path(folder))
