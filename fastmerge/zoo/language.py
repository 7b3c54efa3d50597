"""Small byte-level language models trained on the Python standard library's source text
(fastmerge.datasets.load_text), cached like the other zoo models: the transformers that the
alignment tests and the bench merge.

A LLaMA-style (RMSNorm, RoPE, SwiGLU) or GPT-2-style (LayerNorm, learned positions, GELU; untied
head) decoder over 256 byte tokens, trained with AdamW, a short warm-up and a cosine decay:
the zoo's own modules ("llama", "gpt2") or the Hugging Face classes ("hf_llama", "hf_gpt2": saved
with `save_pretrained` and `byte_tokenizer()` they are checkpoint folders the CLI merges).
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

LM_ARCHS = ("llama", "gpt2", "hf_llama", "hf_gpt2")
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
    if config.arch in ("hf_llama", "hf_gpt2"):
        return _hf_lm(config)
    raise InvalidArgumentError(f"unknown language model architecture {config.arch!r}; use one of {LM_ARCHS}")


def _hf_lm(config: LMConfig) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise InvalidArgumentError(f"{config.arch} needs the transformers package (pip install transformers)") from None
    if config.arch == "hf_llama":
        hf = transformers.LlamaConfig(vocab_size=256, hidden_size=config.dim, intermediate_size=4 * config.dim,
                                      num_hidden_layers=config.depth, num_attention_heads=config.heads,
                                      num_key_value_heads=config.heads, max_position_embeddings=config.block,
                                      tie_word_embeddings=False, use_cache=False)
    else:
        hf = transformers.GPT2Config(vocab_size=256, n_embd=config.dim, n_layer=config.depth, n_head=config.heads,
                                     n_positions=config.block, tie_word_embeddings=False, use_cache=False,
                                     bos_token_id=None, eos_token_id=None)
    return transformers.AutoModelForCausalLM.from_config(hf)


def byte_tokenizer():
    """A Hugging Face tokenizer whose token ids are the text's UTF-8 bytes (what the zoo's LMs
    read): byte-level BPE without merges, over GPT-2's printable map of the 256 bytes."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


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
        out = model(x)
        logits = out if isinstance(out, torch.Tensor) else out.logits  # a Hugging Face model's output
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
