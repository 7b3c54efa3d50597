"""Checkpoint merges at disk speed with bounded memory (issue 6).

Generates LLaMA-like bfloat16 checkpoints (~1.5 GB each: 13 layers, d=2048, MLP 5504, vocab 32000;
FASTMERGE_BENCH_LAYERS changes the size), then times, each in a fresh process (peak RSS is per
process; growth = peak minus the resident size just before the merge): a linear merge of two, TIES and DARE of three (with a base), against the IO floor of
reading both inputs and writing one output with plain file copies (with and without the fsync that
fastmerge's atomic writes end with). Every output is written fresh (no old file to unlink).
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from fastmerge.io import ShardedWriter

LAYERS = int(os.environ.get("FASTMERGE_BENCH_LAYERS", "13"))
DIM, HIDDEN, VOCAB = 2048, 5504, 32000


def llama_layout():
    plan = [("model.embed_tokens.weight", (VOCAB, DIM))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        plan += [(p + "input_layernorm.weight", (DIM,)), (p + "post_attention_layernorm.weight", (DIM,))]
        plan += [(p + f"self_attn.{n}_proj.weight", (DIM, DIM)) for n in "qkvo"]
        plan += [(p + "mlp.gate_proj.weight", (HIDDEN, DIM)), (p + "mlp.up_proj.weight", (HIDDEN, DIM)),
                 (p + "mlp.down_proj.weight", (DIM, HIDDEN))]
    plan += [("model.norm.weight", (DIM,)), ("lm_head.weight", (VOCAB, DIM))]
    return plan


def make_checkpoint(path, seed, base=None):
    """Random weights (seed), or a fine-tune of the checkpoint made with seed `base`: the same
    tensors plus a small delta. Tensor i of a base comes from its own seed, so fine-tunes can
    regenerate it without reading the file."""
    gen = torch.Generator().manual_seed(seed)
    plan = [(n, s, torch.bfloat16) for n, s in llama_layout()]
    with ShardedWriter(str(path), plan, max_shard_bytes=2 * 10**9) as w:
        for i, (name, shape, dtype) in enumerate(plan):
            origin = seed if base is None else base
            t = torch.randn(shape, generator=torch.Generator().manual_seed(origin * 100003 + i)) * 0.02
            if base is not None:
                t += torch.randn(shape, generator=gen) * 0.002
            w.write(name, t.to(dtype))


RUN = """
import json, sys, time
from fastmerge.merging.checkpoints import merge_checkpoints
from fastmerge.merging.same_init import SameInitOptions
models, out, method, base = json.loads(sys.argv[1])
import os
def peak_kib():  # VmHWM: this image's high-water mark (ru_maxrss inherits the forking parent's RSS)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024  # resident now (KiB)
t = time.perf_counter()
merge_checkpoints(models, out, SameInitOptions(method, density=0.5), base=base, overwrite=True, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "rss_before_mb": before / 1024,
                  "peak_mb": peak_kib() / 1024}))
"""


def fresh_output(out):
    """Every timed step writes a new file (no old one to unlink) with no earlier writeback pending."""
    if os.path.exists(out):
        os.remove(out)
    os.sync()


def run_merge(models, out, method, base=None):
    fresh_output(out)
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps([models, out, method, base])],
                          capture_output=True, text=True, timeout=3600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def io_floor(a, b, out, durable=False):
    """Seconds to read both inputs and write an output of the same size with plain file copies;
    durable: and fsync the output, as fastmerge does before renaming its output into place (a
    merge that crashes or loses power then leaves the old file or the whole new one)."""
    fresh_output(out)  # not timed, as for the merges
    start = time.perf_counter()
    shutil.copyfile(a, out)  # read one input, write an output of the same size
    with open(b, "rb") as f:  # read the other
        while f.read(64 << 20):
            pass
    if durable:
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    paths = {"base": root / "base.safetensors"}
    make_checkpoint(paths["base"], 0)
    for k in range(3):
        paths[k] = root / f"tune{k}.safetensors"
        make_checkpoint(paths[k], k + 1, base=0)
    yield root, {k: str(v) for k, v in paths.items()}
    shutil.rmtree(root)


def test_checkpoint_merges(benchmark, files):
    root, p = files
    size = os.path.getsize(p[0])
    io_floor(p[0], p[1], str(root / "warm.bin"))  # both sides read from a warm page cache
    floor = min(io_floor(p[0], p[1], str(root / "copy.bin")) for _ in range(2))
    durable_floor = min(io_floor(p[0], p[1], str(root / "copy.bin"), durable=True) for _ in range(2))
    linear = min((run_merge([p[0], p[1]], str(root / "linear.safetensors"), "linear") for _ in range(2)),
                 key=lambda r: r["seconds"])
    ties = run_merge([p[0], p[1], p[2]], str(root / "ties.safetensors"), "ties", p["base"])
    dare = run_merge([p[0], p[1], p[2]], str(root / "dare.safetensors"), "dare", p["base"])

    def growth(r):
        return r["peak_mb"] - r["rss_before_mb"]

    lines = ["", f"Checkpoint merges, LLaMA-like bfloat16 checkpoints of {size / 1e9:.2f} GB ({LAYERS} layers), "
             f"page cache warm:",
             "| merge | seconds | vs IO floor / linear | peak RSS growth | of the input size |", "|---|---|---|---|---|",
             f"| IO floor: copy one input, read the other | {floor:.2f} | | | |",
             f"| IO floor, durable: the same and fsync the copy | {durable_floor:.2f} | | | |",
             f"| linear, 2 models, vs the floor without fsync | {linear['seconds']:.2f} | "
             f"{linear['seconds'] / floor:.2f}x | | |"]
    for name, r, ref, n in (("linear, 2 models, vs the durable floor", linear, durable_floor, 2),
                            ("TIES, 3 models + base", ties, linear["seconds"], 4),
                            ("DARE, 3 models + base", dare, linear["seconds"], 4)):
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['seconds'] / ref:.2f}x | {growth(r):.0f} MB | "
                     f"{100 * growth(r) * 1e6 / (n * size):.1f} % |")
    lines.append("Targets: linear within 1.5x of the IO floor (compared with the durable floor: fastmerge fsyncs "
                 "its output) and RSS growth under 25 % of the input size; "
                 "TIES and DARE within 2x of the linear merge, same memory bound.")
    benchmark.extra_info["report"] = lines
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
