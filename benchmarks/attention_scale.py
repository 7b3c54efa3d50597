"""A measurement, not a method: how much of a one-shot transformer merge's loss is the attention
temperature? Averaging two models' query and key weights shrinks each head's attention logits
(q . k of averaged, imperfectly matched heads), so the merged heads attend more uniformly than
either parent. Here each merged head's query rows are rescaled so that its logits' standard
deviation (over a batch of the fit data, causal positions only for LMs) equals the parents' mean,
block by block (each block measured after the corrections before it), and the merge is scored again.

The zoo's ViT on MNIST-5k (benchmarks/vit_mnist.py's models, nn.MultiheadAttention) and the zoo's
stdlib GPT-2 / LLaMA (fastmerge.bench.language's models; LLaMA's logits after RoPE, which a scalar
per head commutes with).

    .venv/bin/python benchmarks/attention_scale.py vit|gpt2|llama
"""

from __future__ import annotations

import copy
import math
import sys
import warnings

import torch
from torch import nn

from fastmerge.datasets import load_dataset, load_text, text_windows
from fastmerge.eval.metrics import accuracy, evaluate
from fastmerge.merging.api import merge
from fastmerge.zoo.language import LMConfig, trained_lm
from fastmerge.zoo.models import CausalSelfAttention, LlamaAttention, apply_rotary_pos_emb
from fastmerge.zoo.training import model_inputs, trained_model

ATTENTION = (nn.MultiheadAttention, CausalSelfAttention, LlamaAttention)


def _queries_keys(module, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, T, d) queries and keys of one attention call."""
    x = args[0]
    B, T, C = x.shape
    if isinstance(module, nn.MultiheadAttention):
        H, W, b = module.num_heads, module.in_proj_weight, module.in_proj_bias
        q, k = x @ W[:C].T + b[:C], x @ W[C:2 * C].T + b[C:2 * C]
    elif isinstance(module, CausalSelfAttention):
        H = module.n_head
        q, k, _ = module.c_attn(x).split(C, dim=2)
    else:
        H = module.num_heads
        q, k = module.q_proj(x), module.k_proj(x)
    q = q.view(B, T, H, -1).transpose(1, 2)
    k = k.view(B, T, k.shape[-1] // q.shape[-1], -1).transpose(1, 2)
    if isinstance(module, LlamaAttention):
        q, k = apply_rotary_pos_emb(q, k, args[1], args[2])
    return q, k


@torch.no_grad()
def logit_scales(model: nn.Module, x: torch.Tensor, causal: bool) -> list[torch.Tensor]:
    """Per attention module, each head's standard deviation of its attention logits on `x`."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, a: calls.append(_queries_keys(m, a)))
             for m in model.modules() if isinstance(m, ATTENTION)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    scales = []
    for q, k in calls:
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        keep = torch.ones(logits.shape[-2:], dtype=torch.bool)
        logits = logits[:, :, torch.tril(keep) if causal else keep]  # (B, H, pairs)
        scales.append(logits.transpose(0, 1).reshape(logits.shape[1], -1).std(1))
    return scales


@torch.no_grad()
def _scale_queries(module, s: torch.Tensor) -> None:
    if isinstance(module, nn.MultiheadAttention):
        C = module.embed_dim
        rows = s.repeat_interleave(C // module.num_heads)
        module.in_proj_weight[:C] *= rows[:, None]
        module.in_proj_bias[:C] *= rows
    elif isinstance(module, CausalSelfAttention):
        C = module.n_embd
        rows = s.repeat_interleave(C // module.n_head)
        module.c_attn.weight[:C] *= rows[:, None]
        module.c_attn.bias[:C] *= rows
    else:
        module.q_proj.weight *= s.repeat_interleave(module.head_dim)[:, None]


def rescaled(merged: nn.Module, parents, x: torch.Tensor, causal: bool) -> nn.Module:
    targets = [logit_scales(p, x, causal) for p in parents]
    fixed = copy.deepcopy(merged)
    modules = [m for m in fixed.modules() if isinstance(m, ATTENTION)]
    for i, module in enumerate(modules):
        current = logit_scales(fixed, x, causal)[i]
        _scale_queries(module, sum(t[i] for t in targets) / len(targets) / current)
    return fixed


def main() -> int:
    warnings.simplefilter("ignore")
    arch = sys.argv[1] if len(sys.argv) > 1 else "vit"
    if arch == "vit":
        sys.path.insert(0, "benchmarks")
        from vit_mnist import CONFIG
        split = load_dataset("mnist5k")
        models = [trained_model(CONFIG, split, s) for s in (0, 1)]
        data = [(model_inputs(CONFIG, split.x_fit[i:i + 256]), split.y_fit[i:i + 256]) for i in range(0, 2048, 256)]
        x, causal = model_inputs(CONFIG, split.x_fit[:1024]), False
        xt, yt = model_inputs(CONFIG, split.x_test), split.y_test
        score, unit = (lambda m: accuracy(m, xt, yt)), "test %"
    else:
        config = LMConfig(arch=arch)
        text = load_text(config.text)
        models = [trained_lm(config, text, s) for s in (0, 1)]
        data = text_windows(text.fit, config.block, 32, 16, seed=10_000)
        test = text_windows(text.test, config.block, 64, 16)
        x, causal = torch.cat([b[0] for b in data[:4]]), True
        score, unit = (lambda m: evaluate(m, test).loss), "test loss/byte"
    def scale_range(model) -> str:
        scales = torch.cat(logit_scales(model, x, causal))
        return f"{float(scales.min()):.2f}-{float(scales.max()):.2f}"

    print(f"| {arch}: {unit} | merged | attention logits rescaled | logit std per head, merged (parents: "
          f"{', '.join(scale_range(m) for m in models)}) |\n|---|---|---|---|")
    for method, options in (("permute", {}), ("weight_matching", {}), ("cca", {"reg": 0.3})):
        merged = merge(models, method, data=data, progress=False, **options)
        print(f"| {method} | {score(merged):.4g} | {score(rescaled(merged, models, x, causal)):.4g} | "
              f"{scale_range(merged)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
