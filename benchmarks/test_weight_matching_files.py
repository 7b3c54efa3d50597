"""Weight matching of two GPT-2-medium-shaped checkpoints from files (issue 6): total time and peak
memory of `merge_checkpoints(..., align="weight_matching", spec_file=YAML)` in a fresh process.

The second checkpoint is a random permutation of the first (every group: residual stream, heads,
head dims, MLP units), so the merge must give back the first model exactly: the benchmark checks
that too. Target: peak memory growth under 2x one model.
"""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from fastmerge import zoo
from fastmerge.spec import save_spec, trace_spec
from fastmerge.spec.transforms import apply_permutations

MEDIUM = dict(dim=1024, depth=24, heads=16)

RUN = """
import json, os, sys, time
from fastmerge.merging.checkpoints import merge_checkpoints
from fastmerge.merging.same_init import SameInitOptions
a, b, spec, out = json.loads(sys.argv[1])
def peak_kib():  # VmHWM: this image's high-water mark (ru_maxrss inherits the forking parent's RSS)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
t = time.perf_counter()
merge_checkpoints([a, b], out, SameInitOptions("linear"), align="weight_matching", spec_file=spec, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "rss_before_mb": before / 1024,
                  "peak_mb": peak_kib() / 1024}))
"""


def test_weight_matching_gpt2_medium_from_files(benchmark, tmp_path):
    torch.manual_seed(0)
    # the spec of the architecture: traced on the same widths with a tiny vocabulary (group sizes
    # are the widths; the vocabulary axis is never permuted)
    small = zoo.gpt2(vocab_size=64, block_size=16, **MEDIUM)
    spec = trace_spec(small, (torch.zeros(1, 8, dtype=torch.long),))
    del small
    save_spec(spec, tmp_path / "gpt2-medium.spec.yaml")
    model = zoo.gpt2(vocab_size=50257, block_size=1024, **MEDIUM)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # with the causal-mask buffers
    del model
    size = sum(v.numel() * v.element_size() for v in state.values())
    perms = spec.random_permutations(torch.Generator().manual_seed(1))
    save_file(state, str(tmp_path / "a.safetensors"))
    save_file(apply_permutations(spec, state, perms), str(tmp_path / "b.safetensors"))
    out = tmp_path / "merged.safetensors"
    args = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), str(tmp_path / "gpt2-medium.spec.yaml"),
            str(out)]
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps(args)], capture_output=True, text=True,
                          timeout=3600, check=True)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    merged = load_file(str(out))
    exact = all(torch.allclose(merged[k], v, atol=1e-6) for k, v in state.items())
    growth = r["peak_mb"] - r["rss_before_mb"]
    benchmark.extra_info["report"] = [
        "", f"Weight matching from files, two GPT-2-medium-shaped float32 checkpoints ({size / 1e9:.2f} GB each, "
        f"24 layers, d=1024), the second a permuted copy of the first:",
        "| what | value |", "|---|---|",
        f"| total time (open, match, permute, merge, write) | {r['seconds']:.1f} s |",
        f"| peak RSS growth | {growth:.0f} MB = {growth * 1e6 / size:.2f}x one model (target < 2x: "
        f"{'met' if growth * 1e6 < 2 * size else 'MISSED'}) |",
        f"| merged model equals the first (permutation recovered) | {exact} |"]
    assert exact
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
