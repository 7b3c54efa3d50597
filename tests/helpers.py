"""Small shared helpers of the test suite."""

import os
import sys

import torch


def rel_fro(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error ||a - e|| / ||e|| in float64 (0 when both are zero)."""
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


def tie_values(kind: str, shape, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Values that stress selection by magnitude: "few distinct" (long runs of ties), "non-finite"
    (NaN and +-Inf among them), "signed zeros", or anything else for plain random values."""
    n = 1
    for size in ((shape,) if isinstance(shape, int) else shape):
        n *= size
    if kind == "few distinct":
        values = torch.randint(-3, 4, (n,), generator=generator).to(dtype)
    else:
        values = (torch.randn(n, generator=generator) * 1e-3).to(dtype)
    if kind == "non-finite":
        values[::7] = float("nan")
        values[3::11] = float("-inf")
        values[5::13] = float("inf")
    if kind == "signed zeros":
        values[::3] = -0.0
        values[1::3] = 0.0
    return values.reshape(shape)


def end_rank() -> None:
    """Ends a spawned rank's process after its results are saved and its process group destroyed,
    skipping the interpreter's finalisation. Ranks have at times been aborted (SIGABRT, "terminate
    called without an active exception" from gloo's threads: 1 failure in 24 runs of
    test_stats_gloo.py here, most beside a CPU hog); finalisation after the work is the suspect,
    not proven (not root-caused)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def llama_family(root, layers: int = 2) -> None:
    """A small LLaMA base and three fine-tunes (base + small noise), saved by transformers under
    root/DTYPE/NAME for DTYPE float32, bfloat16 and float16 and NAME base, a, b, c."""
    import transformers  # only the checkpoint tests and benchmarks need it

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config)
    models = {"base": base}
    for name in "abc":
        tuned = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for p, q in zip(tuned.parameters(), base.parameters()):
                p.copy_(q + 0.02 * torch.randn_like(q))
        models[name] = tuned
    for dtype in ("float32", "bfloat16", "float16"):
        for name, model in models.items():
            model.to(getattr(torch, dtype)).save_pretrained(root / dtype / name)
