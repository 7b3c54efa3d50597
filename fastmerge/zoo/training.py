"""Small reference models trained on the built-in data, cached by their full configuration: the
models the demo, the bench, `fastmerge eval` and the tests merge.

Trained models are cached under ~/.cache/fastmerge/demo (FASTMERGE_CACHE overrides), keyed by the
full training configuration, so a second run only loads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..datasets import Split
from ..errors import InvalidArgumentError
from ..threads import is_small_step, single_thread_if
from .models import mlp, resnet20, vgg, vit

# part of the cache key: bump when the data preparation or the training loop changes
RECIPE_VERSION = 2


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "digits"
    hidden: int = 32
    depth: int = 2
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    # "mlp"; CNNs on the images: "vgg" (widths hidden/2, hidden), "vgg_bn" (the same with BatchNorm),
    # "resnet20" (ResNet-20 of width hidden/16: stages of hidden, 2 hidden, 4 hidden channels),
    # "vit" (a pre-LN ViT of width hidden and `depth` blocks on 4x4 patches)
    arch: str = "mlp"
    # "adam" (constant rate) or "sgd" (Nesterov momentum 0.9, one-cycle schedule peaking at lr): the
    # usual recipe for BatchNorm CNNs; with weight decay the weights forget their initialisation,
    # which weight matching needs (after a few epochs of Adam without decay, the random initial
    # weights dominate the weights' inner products and weight matching matches noise); "adamw"
    # (decoupled weight decay, one-cycle schedule peaking at lr): the usual transformer recipe (Adam's
    # coupled L2 of 0.05 shrank the ViT's weights until it reached only 74-82 % on MNIST-5k)
    optimizer: str = "adam"


ARCHS = ("mlp", "vgg", "vgg_bn", "resnet20", "vit")
CNN_ARCHS = ("vgg", "vgg_bn", "resnet20", "vit")  # archs that take images (N, 1, side, side)


def make_model(config: TrainConfig, in_features: int) -> nn.Module:
    if config.arch not in ARCHS:
        raise InvalidArgumentError(f"unknown architecture {config.arch!r}; use one of {ARCHS}")
    if config.arch in ("vgg", "vgg_bn"):
        return vgg(in_channels=1, image_size=image_side(in_features), widths=(config.hidden // 2, config.hidden),
                   fc_hidden=2 * config.hidden, batch_norm=config.arch == "vgg_bn")
    if config.arch == "vit":  # patches of 4x4 pixels (49 tokens on 28x28), 4 heads, MLP 2x wide
        side = image_side(in_features)
        return vit(image_size=side, patch_size=4, in_channels=1, dim=config.hidden, depth=config.depth, heads=4,
                   mlp_dim=2 * config.hidden, num_classes=10)
    if config.arch == "resnet20":
        if config.hidden % 16:
            raise InvalidArgumentError(f"resnet20: hidden must be a multiple of 16 (16 x width), got {config.hidden}")
        image_side(in_features)
        return resnet20(in_channels=1, width=config.hidden // 16)
    return mlp(in_features=in_features, hidden=(config.hidden,) * config.depth, out_features=10)


def image_side(in_features: int) -> int:
    side = int(round(in_features**0.5))
    if side * side != in_features or side % 4:
        raise InvalidArgumentError(f"a CNN needs square images with a side divisible by 4; got {in_features} features")
    return side


def model_inputs(config: TrainConfig, x: torch.Tensor) -> torch.Tensor:
    """The split's flat rows as the model takes them: images (N, 1, side, side) for a CNN."""
    return x.view(-1, 1, image_side(x.shape[1]), image_side(x.shape[1])) if config.arch in CNN_ARCHS else x


def cnn_config(dataset: str, arch: str, hidden: int, epochs: int = 8) -> TrainConfig:
    """The recipe of the BatchNorm CNNs the demo and the bench merge: SGD with weight decay and a
    one-cycle schedule (measured on MNIST-5k validation: VGG-BN 97-98 %, ResNet-20 x1 ~98 % in 8
    epochs)."""
    return TrainConfig(dataset=dataset, arch=arch, hidden=hidden, epochs=epochs, lr=0.05, weight_decay=5e-4,
                       optimizer="sgd")


def _optimizer(config: TrainConfig, model: nn.Module, steps: int):
    """(optimizer, scheduler or None) of the configuration."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay), None
    elif config.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                              weight_decay=config.weight_decay)
    elif config.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        raise InvalidArgumentError(f"unknown optimizer {config.optimizer!r}; use 'adam', 'adamw' or 'sgd'")
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(steps, 1), pct_start=0.15)


def train(config: TrainConfig, split: Split, seed: int) -> nn.Module:
    """The configuration's optimiser on the fit split from initialisation `seed` (data order seeded too)."""
    torch.manual_seed(seed)
    model = make_model(config, split.x_fit.shape[1])
    n = len(split.x_fit)
    opt, schedule = _optimizer(config, model, config.epochs * -(-n // config.batch_size))
    gen = torch.Generator().manual_seed(seed)
    with single_thread_if(is_small_step(model, config.batch_size)):  # tiny steps: one thread
        for _ in range(config.epochs):
            model.train()  # BatchNorm: batch statistics while training
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, config.batch_size):
                idx = order[i : i + config.batch_size]
                loss = nn.functional.cross_entropy(model(model_inputs(config, split.x_fit[idx])), split.y_fit[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if schedule is not None:
                    schedule.step()
    return model.eval()


def cache_dir() -> str:
    return os.environ.get("FASTMERGE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fastmerge", "demo"))


def trained_model(config: TrainConfig, split: Split, seed: int) -> nn.Module:
    """Trains, or loads the cached result of the same configuration and seed."""
    fields = asdict(config)
    if fields["arch"] == "mlp":  # added later: MLP entries keep the keys they were cached under
        del fields["arch"]
    if fields["optimizer"] == "adam":  # added later too
        del fields["optimizer"]
    stem = f"{config.dataset}-{'h' if config.arch == 'mlp' else config.arch}{config.hidden}-s{seed}"
    return cached_model(stem, {**fields, "seed": seed, "recipe": RECIPE_VERSION},
                        lambda: make_model(config, split.x_fit.shape[1]), lambda: train(config, split, seed))


def cached_model(stem: str, fields: dict, make, fit) -> nn.Module:
    """The model `fit()` trains, cached under `stem` and a hash of `fields` (the full configuration:
    with the torch version) in cache_dir(): a later call with the same fields loads it into `make()`."""
    key = hashlib.sha256(json.dumps({**fields, "torch": torch.__version__.split("+")[0]},
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"{stem}-{key}.pt")
    model = make()
    if os.path.exists(path):
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval()
        except (RuntimeError, OSError, EOFError):
            pass  # a damaged cache entry: train again
    model = fit()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()
