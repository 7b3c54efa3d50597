"""Two Hugging Face language models trained here from different seeds (byte-level LLaMA or GPT-2
on the Python standard library's source text, fastmerge.zoo.language), saved as checkpoint
folders with a byte tokenizer, merged by the `fastmerge merge` command line on a text corpus, and
every output loaded back with transformers and scored on the held-out test files.

    .venv/bin/python benchmarks/hf_lm_cli.py [--arch hf_llama|hf_gpt2] [--work DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from fastmerge.datasets import load_text, text_windows  # noqa: E402
from fastmerge.eval.metrics import ensemble, evaluate  # noqa: E402
from fastmerge.zoo.language import LMConfig, byte_tokenizer, trained_lm  # noqa: E402

RUNS = (  # (row, command-line flags after the two folders)
    ("direct average (linear)", ["--method", "linear"]),
    ("weight matching (--spec auto)", ["--align", "weight_matching", "--spec", "auto"]),
    ("permute", ["--align", "permute", "--data", "{corpus}"]),
    ("CCA (orthogonal stream)", ["--align", "cca", "--data", "{corpus}"]),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("hf_llama", "hf_gpt2"), default="hf_llama")
    parser.add_argument("--work", default=None, help="folder for the checkpoints and merges (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="fastmerge-hf-lm-")
    config = LMConfig(arch=args.arch)
    text = load_text()
    tokenizer = byte_tokenizer()
    folders = []
    for seed in (0, 1):
        model = trained_lm(config, text, seed)
        folder = os.path.join(work, f"{args.arch}-s{seed}")
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    corpus = os.path.join(work, "corpus.txt")
    with open(corpus, "wb") as f:  # statistics from the fit files (never the test files)
        f.write(bytes(text.fit[:400_000].tolist()))
    test = text_windows(text.test, config.block, 64, 16)
    parents = [transformers.AutoModelForCausalLM.from_pretrained(f).eval() for f in folders]
    rows = [(f"parent {i}", evaluate(m, test).loss, None) for i, m in enumerate(parents)]
    rows.append(("ensemble (mean probabilities)", ensemble(parents, test).loss, None))
    fastmerge_cli = [sys.executable, "-m", "fastmerge"]
    for label, flags in RUNS:
        out = os.path.join(work, f"merged-{len(rows)}")
        command = [*fastmerge_cli, "merge", *folders, "-o", out, "--overwrite", "--quiet", "--seq-len",
                   str(config.block), "--batch-size", "32", "--max-batches", "16"]
        command += [flag.format(corpus=corpus) for flag in flags]
        if "--data" not in flags:
            command = [c for c in command if c not in ("--seq-len", "--batch-size", "--max-batches", str(config.block),
                                                       "32", "16")]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            print(f"{label}: exit {done.returncode}: {done.stderr.strip()[-400:]}", file=sys.stderr)
            return 1
        merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        rows.append((label, evaluate(merged, test).loss, seconds))
    print(f"{args.arch}: {config.dim} wide, {config.depth} layers, {config.steps} steps; test files of the Python "
          f"{sys.version.split()[0]} standard library; torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| model | test loss/byte | test perplexity | CLI wall time (s) |\n|---|---|---|---|")
    for label, loss, seconds in rows:
        print(f"| {label} | {loss:.4f} | {math.exp(loss):.3f} | {'' if seconds is None else f'{seconds:.1f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
