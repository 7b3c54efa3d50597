"""Small reference models for tests, benchmarks and the merging demo.

Each architecture is written the way people usually write it in PyTorch (torchvision / nanoGPT /
Hugging Face conventions), so that a tracer that derives permutable weight axes from a
``torch.export`` graph sees the same patterns it will see in real models. Default sizes are
small, so a CPU forward pass takes milliseconds.

Every factory takes keyword-only size options and builds the model from the current global RNG
state: ``torch.manual_seed(s); model = factory()`` gives the same weights for the same ``s``.
Every model is exportable with ``torch.export.export(model.eval(), args, strict=False)`` and has
no dropout, so eval-mode outputs are deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgumentError

__all__ = [
    "GPT2",
    "MLP",
    "VGG",
    "BasicBlock",
    "Llama",
    "ResNet20",
    "ViT",
    "gpt2",
    "llama",
    "mlp",
    "resnet20",
    "vgg",
    "vit",
]


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")


def _check_divides(what: str, divisor_name: str, value: int, divisor: int) -> None:
    if value % divisor != 0:
        raise InvalidArgumentError(
            f"{what}={value} is not divisible by {divisor_name}={divisor}; "
            f"pick sizes where {divisor_name} divides {what}"
        )


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """A stack of Linear layers with ReLU between them (none after the last one).

    Layers live in ``self.layers`` (an ``nn.Sequential`` of Linear, ReLU, ..., Linear).

    Input:  ``(B, in_features)`` float.
    Output: ``(B, out_features)`` logits.
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...], out_features: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.ReLU()]
            prev = width
        layers.append(nn.Linear(prev, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def mlp(
    *, in_features: int = 64, hidden: tuple[int, ...] = (32, 32), out_features: int = 10
) -> MLP:
    """Build a ReLU MLP.

    Args:
        in_features: Size of the input vector (64 = a flattened 8x8 digit).
        hidden: Width of each hidden layer, in order; ``()`` gives a single Linear.
        out_features: Number of outputs (classes).

    Returns:
        An :class:`MLP` mapping ``(B, in_features)`` to ``(B, out_features)``.

    Raises:
        InvalidArgumentError: A size is not a positive int.
    """
    hidden = tuple(hidden)
    _check_positive(in_features=in_features, out_features=out_features)
    for i, width in enumerate(hidden):
        _check_positive(**{f"hidden[{i}]": width})
    return MLP(in_features, hidden, out_features)


# --------------------------------------------------------------------------------------------
# VGG (with or without BatchNorm)
# --------------------------------------------------------------------------------------------


class VGG(nn.Module):
    """A VGG-style CNN, torchvision layout (``features`` / ``classifier``).

    ``features``: per width, ``[Conv3x3, ReLU, Conv3x3, ReLU, MaxPool2x2]``; with ``batch_norm``
    each conv is followed by a BatchNorm2d (torchvision's ``vgg*_bn``: conv, BN, ReLU).
    ``classifier``: ``[Linear(C*H*W, fc_hidden), ReLU, Linear(fc_hidden, num_classes)]``.

    Input:  ``(B, in_channels, image_size, image_size)`` float.
    Output: ``(B, num_classes)`` logits.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        widths: tuple[int, ...],
        fc_hidden: int,
        num_classes: int,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for width in widths:
            for c_in in (prev, width):
                layers.append(nn.Conv2d(c_in, width, kernel_size=3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU(inplace=True))
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            prev = width
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Linear(prev * side * side, fc_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(fc_hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg(
    *,
    in_channels: int = 1,
    image_size: int = 8,
    widths: tuple[int, ...] = (16, 32),
    fc_hidden: int = 64,
    num_classes: int = 10,
    batch_norm: bool = False,
) -> VGG:
    """Build a VGG-style CNN (with ``batch_norm``: a BatchNorm2d after every conv).

    Args:
        in_channels: Channels of the input image.
        image_size: Height = width of the input; must be divisible by ``2 ** len(widths)``
            (each block halves it with a 2x2 max-pool).
        widths: Output channels of each two-conv block.
        fc_hidden: Width of the hidden Linear layer of the classifier.
        num_classes: Number of output logits.
        batch_norm: Conv-BN-ReLU instead of conv-ReLU.

    Returns:
        A :class:`VGG` mapping ``(B, in_channels, image_size, image_size)`` to
        ``(B, num_classes)``. The first classifier Linear takes
        ``widths[-1] * (image_size // 2**len(widths))**2`` features.

    Raises:
        InvalidArgumentError: A size is not a positive int, or ``image_size`` is not divisible
            by ``2 ** len(widths)``.
    """
    widths = tuple(widths)
    if not widths:
        raise InvalidArgumentError("widths must name at least one conv block, got ()")
    _check_positive(
        in_channels=in_channels, image_size=image_size, fc_hidden=fc_hidden,
        num_classes=num_classes,
    )
    for i, width in enumerate(widths):
        _check_positive(**{f"widths[{i}]": width})
    _check_divides("image_size", "2 ** len(widths)", image_size, 2 ** len(widths))
    return VGG(in_channels, image_size, widths, fc_hidden, num_classes, batch_norm=bool(batch_norm))


# --------------------------------------------------------------------------------------------
# ResNet-20 (CIFAR style, BatchNorm, projection shortcuts)
# --------------------------------------------------------------------------------------------


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, add the shortcut, ReLU.

    ``downsample`` is ``None`` (identity shortcut) or ``Sequential(Conv1x1(stride), BN)``.

    Input:  ``(B, in_planes, H, W)``.
    Output: ``(B, planes, H / stride, W / stride)`` (rounded up).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class ResNet20(nn.Module):
    """CIFAR-style ResNet (ResNet-20 with 3 blocks per stage), torchvision naming.

    ``conv1``/``bn1`` stem, ``layer1``..``layer3`` of :class:`BasicBlock` with 16w, 32w, 64w
    channels (``layer2``/``layer3`` start with a stride-2 block with a projection shortcut),
    ``avgpool`` to 1x1, ``fc``.

    Input:  ``(B, in_channels, H, W)`` float, any ``H, W >= 1`` (8x8 and 28x28 tested).
    Output: ``(B, num_classes)`` logits.
    """

    def __init__(
        self, in_channels: int, width: int, num_classes: int, blocks_per_stage: int
    ) -> None:
        super().__init__()
        planes = [16 * width, 32 * width, 64 * width]
        self.conv1 = _conv3x3(in_channels, planes[0])
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.in_planes = planes[0]
        self.layer1 = self._make_layer(planes[0], blocks_per_stage, stride=1)
        self.layer2 = self._make_layer(planes[1], blocks_per_stage, stride=2)
        self.layer3 = self._make_layer(planes[2], blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[2], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(self.in_planes, planes, stride)]
        self.in_planes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet20(
    *, in_channels: int = 1, width: int = 1, num_classes: int = 10, blocks_per_stage: int = 3
) -> ResNet20:
    """Build a CIFAR-style ResNet-20 with BatchNorm.

    Args:
        in_channels: Channels of the input image.
        width: Width multiplier; the stages have ``16*width``, ``32*width``, ``64*width``
            channels.
        num_classes: Number of output logits.
        blocks_per_stage: BasicBlocks per stage (3 gives ResNet-20: 6*3 + 2 layers).

    Returns:
        A :class:`ResNet20` mapping ``(B, in_channels, H, W)`` to ``(B, num_classes)``; the
        spatial size is reduced 4x by the two stride-2 stages, then pooled to 1x1.

    Raises:
        InvalidArgumentError: A size is not a positive int.
    """
    _check_positive(
        in_channels=in_channels, width=width, num_classes=num_classes,
        blocks_per_stage=blocks_per_stage,
    )
    return ResNet20(in_channels, width, num_classes, blocks_per_stage)


# --------------------------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------------------------


class ViTBlock(nn.Module):
    """Pre-LN transformer encoder block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``.

    Input and output: ``(B, N, dim)``.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        x = x + h
        x = x + self.mlp(self.norm2(x))
        return x


class ViT(nn.Module):
    """A small Vision Transformer with a class token.

    ``patch_embed`` (Conv2d, kernel = stride = patch) -> tokens ``(B, N, dim)``; prepend
    ``cls_token`` ``(1, 1, dim)``; add ``pos_embed`` ``(1, N + 1, dim)``; ``blocks`` of
    :class:`ViTBlock`; ``norm`` (LayerNorm); ``head`` (Linear) on the class token.

    Input:  ``(B, in_channels, image_size, image_size)`` float.
    Output: ``(B, num_classes)`` logits.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # (B, dim, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def vit(
    *,
    image_size: int = 8,
    patch_size: int = 2,
    in_channels: int = 1,
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    mlp_dim: int = 64,
    num_classes: int = 10,
) -> ViT:
    """Build a small pre-LN Vision Transformer using ``nn.MultiheadAttention``.

    Args:
        image_size: Height = width of the input; must be divisible by ``patch_size``.
        patch_size: Side of a square patch; there are ``(image_size // patch_size)**2`` patches.
        in_channels: Channels of the input image.
        dim: Token width; must be divisible by ``heads``.
        depth: Number of transformer blocks.
        heads: Attention heads per block.
        mlp_dim: Hidden width of each block's MLP.
        num_classes: Number of output logits.

    Returns:
        A :class:`ViT` mapping ``(B, in_channels, image_size, image_size)`` to
        ``(B, num_classes)``.

    Raises:
        InvalidArgumentError: A size is not a positive int, or a divisibility rule fails.
    """
    _check_positive(
        image_size=image_size, patch_size=patch_size, in_channels=in_channels, dim=dim,
        depth=depth, heads=heads, mlp_dim=mlp_dim, num_classes=num_classes,
    )
    _check_divides("image_size", "patch_size", image_size, patch_size)
    _check_divides("dim", "heads", dim, heads)
    return ViT(image_size, patch_size, in_channels, dim, depth, heads, mlp_dim, num_classes)


# --------------------------------------------------------------------------------------------
# GPT-2 (nanoGPT style, hand-written attention, tied LM head)
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused ``c_attn`` and a tril mask buffer.

    Input and output: ``(B, T, dim)`` with ``T <= block_size``.
    """

    def __init__(self, dim: int, heads: int, block_size: int) -> None:
        super().__init__()
        self.n_head = heads
        self.n_embd = dim
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.register_buffer(
            "bias",
            torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class GPT2MLP(nn.Module):
    """``c_proj(GELU_tanh(c_fc(x)))``. Input and output: ``(B, T, dim)``."""

    def __init__(self, dim: int, mlp_ratio: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, mlp_ratio * dim)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class GPT2Block(nn.Module):
    """Pre-LN GPT-2 block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, dim: int, heads: int, block_size: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, block_size)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = GPT2MLP(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT2(nn.Module):
    """A GPT-2-style decoder (nanoGPT layout) whose LM head is tied to ``wte`` by default.

    ``wte`` (token) + ``wpe`` (position) embeddings, ``h`` (ModuleList of
    :class:`GPT2Block`), ``ln_f``, then ``logits = F.linear(x, wte.weight)``: there is no
    separate LM-head parameter (with ``tie_embeddings=False``: an ``lm_head`` Linear).

    Input:  ``(B, T)`` int64 token ids in ``[0, vocab_size)``, ``T <= block_size``.
    Output: ``(B, T, vocab_size)`` logits.
    """

    def __init__(
        self, vocab_size: int, block_size: int, dim: int, depth: int, heads: int, mlp_ratio: int,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = nn.Embedding(block_size, dim)
        self.h = nn.ModuleList(
            [GPT2Block(dim, heads, block_size, mlp_ratio) for _ in range(depth)]
        )
        self.ln_f = nn.LayerNorm(dim)
        # untied: a separate lm_head (GPT-2 with tie_word_embeddings=False)
        self.lm_head = None if tie_embeddings else nn.Linear(dim, vocab_size, bias=False)

        # GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * depth).
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.size()
        if T > self.block_size:
            raise InvalidArgumentError(
                f"idx has sequence length {T} > block_size {self.block_size}; "
                "pass at most block_size tokens or build the model with a larger block_size"
            )
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return F.linear(x, self.wte.weight) if self.lm_head is None else self.lm_head(x)


def gpt2(
    *,
    vocab_size: int = 64,
    block_size: int = 16,
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    mlp_ratio: int = 4,
    tie_embeddings: bool = True,
) -> GPT2:
    """Build a small GPT-2-style decoder with hand-written causal attention and a tied head.

    Args:
        vocab_size: Number of tokens (rows of ``wte``, columns of the logits).
        block_size: Longest sequence; size of ``wpe`` and of the causal-mask buffer.
        dim: Model width; must be divisible by ``heads``.
        depth: Number of transformer blocks.
        heads: Attention heads per block.
        mlp_ratio: MLP hidden width is ``mlp_ratio * dim``.
        tie_embeddings: The LM head reads ``wte``'s weight (GPT-2); False: its own ``lm_head``.

    Returns:
        A :class:`GPT2` mapping int64 ``(B, T)``, ``T <= block_size``, to
        ``(B, T, vocab_size)`` logits.

    Raises:
        InvalidArgumentError: A size is not a positive int, or ``heads`` does not divide
            ``dim``.
    """
    _check_positive(
        vocab_size=vocab_size, block_size=block_size, dim=dim, depth=depth, heads=heads,
        mlp_ratio=mlp_ratio,
    )
    _check_divides("dim", "heads", dim, heads)
    return GPT2(vocab_size, block_size, dim, depth, heads, mlp_ratio, tie_embeddings)


# --------------------------------------------------------------------------------------------
# LLaMA (RMSNorm, RoPE, grouped-query attention, SwiGLU, untied head)
# --------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim: ``cat(-x2, x1)``."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary embeddings to ``q`` ``(B, H, T, hd)`` and ``k`` ``(B, Hkv, T, hd)``.

    ``cos`` and ``sin`` are ``(T, hd)`` and broadcast over batch and heads.
    """
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(B, Hkv, T, hd)`` -> ``(B, Hkv * n_rep, T, hd)``, each KV head repeated ``n_rep`` times
    consecutively (same as ``torch.repeat_interleave(x, n_rep, dim=1)``)."""
    if n_rep == 1:
        return x
    B, kv_heads, T, head_dim = x.shape
    x = x[:, :, None, :, :].expand(B, kv_heads, n_rep, T, head_dim)
    return x.reshape(B, kv_heads * n_rep, T, head_dim)


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables ``cos``/``sin`` ``(max_seq_len, head_dim)``, non-persistent.

    ``forward(T)`` returns the first ``T`` rows of both.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (max_seq_len, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, head_dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]


class LlamaAttention(nn.Module):
    """Grouped-query causal self-attention with RoPE and ``F.scaled_dot_product_attention``.

    Input and output: ``(B, T, dim)``.
    """

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.num_kv_heads = kv_heads
        self.head_dim = dim // heads
        self.num_kv_groups = heads // kv_heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, self.num_kv_groups)
        v = repeat_kv(v, self.num_kv_groups)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``. Input/output ``(B, T, dim)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-norm LLaMA block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, kv_heads: int, hidden_dim: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.self_attn = LlamaAttention(dim, heads, kv_heads)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.mlp = LlamaMLP(dim, hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Llama(nn.Module):
    """A LLaMA-style decoder (Hugging Face naming) with an untied ``lm_head``.

    ``embed_tokens``, ``layers`` (ModuleList of :class:`LlamaBlock`), ``norm`` (RMSNorm),
    ``lm_head``; ``rotary`` holds the RoPE tables as non-persistent buffers (not in
    ``state_dict``).

    Input:  ``(B, T)`` int64 token ids in ``[0, vocab_size)``, ``T <= max_seq_len``.
    Output: ``(B, T, vocab_size)`` logits.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int,
        kv_heads: int,
        hidden_dim: int,
        max_seq_len: int,
        rope_theta: float,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.rotary = RotaryEmbedding(dim // heads, max_seq_len, rope_theta)
        self.layers = nn.ModuleList(
            [LlamaBlock(dim, heads, kv_heads, hidden_dim, eps) for _ in range(depth)]
        )
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.max_seq_len:
            raise InvalidArgumentError(
                f"input_ids has sequence length {T} > max_seq_len {self.max_seq_len}; "
                "pass fewer tokens or build the model with a larger max_seq_len"
            )
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(T)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        return self.lm_head(x)


def llama(
    *,
    vocab_size: int = 64,
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    hidden_dim: int = 64,
    max_seq_len: int = 16,
    rope_theta: float = 10000.0,
) -> Llama:
    """Build a small LLaMA-style decoder (RMSNorm, RoPE, GQA, SwiGLU, untied head, no biases).

    Args:
        vocab_size: Number of tokens.
        dim: Model width; must be divisible by ``heads`` with an even ``head_dim = dim//heads``.
        depth: Number of transformer blocks.
        heads: Query heads per block.
        kv_heads: Key/value heads per block; must divide ``heads`` (``kv_heads == heads`` is
            plain multi-head attention, ``kv_heads == 1`` multi-query attention).
        hidden_dim: Hidden width of the SwiGLU MLP.
        max_seq_len: Longest sequence; rows of the precomputed RoPE tables.
        rope_theta: RoPE base frequency.

    Returns:
        A :class:`Llama` mapping int64 ``(B, T)``, ``T <= max_seq_len``, to
        ``(B, T, vocab_size)`` logits.

    Raises:
        InvalidArgumentError: A size is not a positive int, or a divisibility rule fails.
    """
    _check_positive(
        vocab_size=vocab_size, dim=dim, depth=depth, heads=heads, kv_heads=kv_heads,
        hidden_dim=hidden_dim, max_seq_len=max_seq_len,
    )
    _check_divides("dim", "heads", dim, heads)
    _check_divides("heads", "kv_heads", heads, kv_heads)
    if (dim // heads) % 2 != 0:
        raise InvalidArgumentError(
            f"head_dim = dim // heads = {dim // heads} must be even for rotary embeddings; "
            "change dim or heads"
        )
    if not rope_theta > 0:
        raise InvalidArgumentError(f"rope_theta must be > 0, got {rope_theta!r}")
    return Llama(vocab_size, dim, depth, heads, kv_heads, hidden_dim, max_seq_len, rope_theta)
