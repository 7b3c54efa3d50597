"""Small byte-level language models trained on the Python standard library's source text
(fastmerge.datasets.load_text), cached like the other zoo models: the transformers that the
alignment tests and the bench merge.

A LLaMA-style (RMSNorm, RoPE, SwiGLU) or GPT-2-style (LayerNorm, learned positions, GELU; untied
head) decoder over 256 byte tokens, trained with AdamW, a short warm-up and a cosine decay.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..datasets import TextSplit, text_windows
from ..errors import InvalidArgumentError
from .models import gpt2, llama
from .training import cached_model

LM_ARCHS = ("llama", "gpt2")
RECIPE_VERSION = 1  # part of the cache key: bump when the data or the training loop changes


@dataclass(frozen=True)
class LMConfig:
    arch: str = "llama"
    dim: int = 64
    depth: int = 2
    heads: int = 4
    block: int = 64
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    text: str = "stdlib"


def make_lm(config: LMConfig) -> nn.Module:
    if config.arch == "llama":
        return llama(vocab_size=256, dim=config.dim, depth=config.depth, heads=config.heads, kv_heads=config.heads,
                     hidden_dim=4 * config.dim, max_seq_len=config.block)
    if config.arch == "gpt2":
        return gpt2(vocab_size=256, block_size=config.block, dim=config.dim, depth=config.depth, heads=config.heads,
                    tie_embeddings=False)
    raise InvalidArgumentError(f"unknown language model architecture {config.arch!r}; use one of {LM_ARCHS}")


def train_lm(config: LMConfig, text: TextSplit, seed: int) -> nn.Module:
    """AdamW on random windows of the fit text, from initialisation `seed` (window order seeded too)."""
    torch.manual_seed(seed)
    model = make_lm(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    warmup = max(1, config.steps // 20)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    model.train()
    for x, y in text_windows(text.fit, config.block, config.batch_size, config.steps, seed=seed):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
    return model.eval()


def trained_lm(config: LMConfig, text: TextSplit, seed: int) -> nn.Module:
    """Trains, or loads the cached model of the same configuration, text and seed."""
    stem = f"{config.text}-{config.arch}{config.dim}x{config.depth}-s{seed}"
    fields = {**asdict(config), "seed": seed, "recipe": RECIPE_VERSION, "text_tokens": len(text.fit)}
    return cached_model(stem, fields, lambda: make_lm(config), lambda: train_lm(config, text, seed))
