"""Per-head outputs of nn.MultiheadAttention, which no hook can see.

nn.MultiheadAttention applies its output projection functionally, so the heads' outputs (the
input of that projection, where heads are matched) never pass through a module call. The tracer
records such taps with kind "heads" on the attention module; the statistics recompute the outputs
from the module's own call: the same functional forward with the output projection replaced by
the identity, so masks, separate q/k/v weights, bias_k/bias_v and batch_first behave exactly as in
the module.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError

_SIGNATURE = inspect.signature(torch.nn.MultiheadAttention.forward)


def multihead_attention_heads(module: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The concatenated head outputs (..., embed_dim), heads major, of one call `module(*args,
    **kwargs)` of an nn.MultiheadAttention in eval mode: what its output projection reads."""
    if not isinstance(module, torch.nn.MultiheadAttention):
        raise InvalidArgumentError(f"a 'heads' tap needs an nn.MultiheadAttention, got {type(module).__name__}")
    call = _SIGNATURE.bind(module, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    query, key, value = a["query"], a["key"], a["value"]
    batched = query.dim() == 3
    if module.batch_first and batched:
        query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    e = module.embed_dim
    eye = torch.eye(e, dtype=module.out_proj.weight.dtype, device=module.out_proj.weight.device)
    separate = not module._qkv_same_embed_dim
    out, _ = F.multi_head_attention_forward(
        query, key, value, e, module.num_heads, module.in_proj_weight, module.in_proj_bias, module.bias_k,
        module.bias_v, module.add_zero_attn, 0.0, eye, None, training=False,
        key_padding_mask=a["key_padding_mask"], need_weights=False, attn_mask=a["attn_mask"],
        use_separate_proj_weight=separate, q_proj_weight=module.q_proj_weight if separate else None,
        k_proj_weight=module.k_proj_weight if separate else None,
        v_proj_weight=module.v_proj_weight if separate else None, is_causal=a["is_causal"])
    return out.transpose(1, 0) if module.batch_first and batched else out
