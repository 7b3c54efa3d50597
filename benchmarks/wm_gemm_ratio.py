"""Weight matching of two GPT-2-medium-shaped checkpoints from files, against the time its matrix
products need: the products are counted (a wrapper around the cost accumulation: 2 C x numel per
member, 2 (C d) x numel for members of nested head groups; only those computed: a group whose
inputs did not change since its last visit reuses its assignment and computes none) and the
float32 GEMM rate of this machine is measured on a stream-member-shaped product in the same process.

    .venv/bin/python benchmarks/wm_gemm_ratio.py [--depth 24] [--work DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

import fastmerge.alignment.weight_matching as wm
from fastmerge import zoo
from fastmerge.merging.checkpoints import merge_checkpoints
from fastmerge.merging.same_init import SameInitOptions
from fastmerge.spec import save_spec, trace_spec
from fastmerge.spec.transforms import apply_permutations
from fastmerge.stages import record_stages, stage_summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="fastmerge-wm-")
    shape = dict(dim=1024, depth=args.depth, heads=16)
    torch.manual_seed(0)
    spec = trace_spec(zoo.gpt2(vocab_size=64, block_size=16, **shape), (torch.zeros(1, 8, dtype=torch.long),))
    save_spec(spec, os.path.join(work, "spec.yaml"))
    state = {k: v.detach().clone() for k, v in zoo.gpt2(vocab_size=50257, block_size=1024, **shape).state_dict().items()}
    save_file(state, os.path.join(work, "a.safetensors"))
    save_file(apply_permutations(spec, state, spec.random_permutations(torch.Generator().manual_seed(1))),
              os.path.join(work, "b.safetensors"))
    del state

    flops = [0.0]
    accumulate = wm._add_member_cost

    def counted(m, target, moved, nested, cost, inner):
        key = (m.tensor, m.axis, m.offset)
        covered = target.numel() * math.prod(m.grid(target.shape[m.axis])) / target.shape[m.axis]
        nests = [d for d, dms in nested if key in dms]
        flops[0] += 2 * cost.shape[-1] * covered * (1 if not nests else sum(d.size for d in nests))
        return accumulate(m, target, moved, nested, cost, inner)

    wm._add_member_cost = counted
    out = os.path.join(work, "merged.safetensors")
    start = time.perf_counter()
    with record_stages() as times:
        merge_checkpoints([os.path.join(work, "a.safetensors"), os.path.join(work, "b.safetensors")], out,
                          SameInitOptions("linear"), align="weight_matching", spec_file=os.path.join(work, "spec.yaml"),
                          progress=False, overwrite=True)
    total = time.perf_counter() - start
    a, b = torch.randn(1024, 50257), torch.randn(50257, 1024)
    a @ b
    reps, t = 5, time.perf_counter()
    for _ in range(reps):
        a @ b
    rate = 2 * 1024 * 50257 * 1024 * reps / (time.perf_counter() - t)
    needed = flops[0] / rate
    print(f"total {total:.1f} s; {stage_summary(times)}")
    print(f"products {flops[0] / 1e12:.2f} TFLOP at {rate / 1e9:.0f} GFLOP/s: {needed:.1f} s; "
          f"total / products = {total / needed:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
