"""A LoRA adapter merged into its model on read: mergekit's `model+lora` references.

`path/to/model+path/to/adapter` names the model with the PEFT LoRA adapter folder
(adapter_config.json and adapter_model.safetensors/.bin) merged in, as PEFT's merge_and_unload
does: W + transpose?(B @ A) * scaling for every adapted Linear (scaling = lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora; the product in float32 when the adapter is half precision,
then in the adapter's dtype, as PEFT on a CPU), W + (B @ A)^T * scaling for an adapted embedding,
and the adapter's full copies of `modules_to_save` in place of the model's. Each tensor is merged
when it is read, so nothing is written to a cache. Refused in one line: other PEFT types, DoRA,
per-module rank/alpha patterns, trained biases, adapted convolutions.

Checked equal to PEFT and mergekit on float32 models. On half-precision models the sum is rounded
once to the weight's dtype; mergekit merges through a copy saved in the dtype transformers loads
the model in, so the two can differ by that rounding there.
"""

from __future__ import annotations

import json
import math
import os

import torch

from ..errors import CheckpointError

CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


def split_reference(path: str) -> tuple[str, str] | None:
    """(model, adapter) of a `model+adapter` reference whose two parts exist (and the whole does
    not), else None."""
    if os.path.exists(path) or "+" not in path:
        return None
    for i in [i for i, c in enumerate(path) if c == "+"]:
        model, adapter = path[:i], path[i + 1:]
        if os.path.exists(model) and os.path.isdir(adapter):
            return model, adapter
    return None


class LoraAdapter:
    """The deltas of one adapter folder, by the model tensor they apply to."""

    def __init__(self, folder: str, model_keys, open_weights) -> None:
        """`open_weights`: opens the adapter's weights file (the reader's Checkpoint)."""
        config = self._config(folder)
        self.folder = folder
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
        if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
            raise CheckpointError(f"{folder}/{CONFIG}: r must be a positive integer and lora_alpha a number")
        self.scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        weights = next((os.path.join(folder, n) for n in ("adapter_model.safetensors", "adapter_model.bin")
                        if os.path.isfile(os.path.join(folder, n))), None)
        if weights is None:
            raise CheckpointError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
        self.weights = open_weights(weights)
        keys = set(model_keys)
        self.pairs: dict[str, tuple[str, str, bool]] = {}  # model tensor -> (A, B, embedding)
        self.replaced: dict[str, str] = {}  # model tensor -> adapter tensor (modules_to_save)
        for key in self.weights.keys():
            name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            for a_suffix, b_suffix, target, embedding in ((".lora_A.weight", ".lora_B.weight", ".weight", False),
                                                          (".lora_embedding_A", ".lora_embedding_B", ".weight", True)):
                if name.endswith(a_suffix):
                    module = name[: -len(a_suffix)]
                    b_key = key[: -len(a_suffix)] + b_suffix
                    if b_key not in self.weights:
                        raise CheckpointError(f"{weights}: {key} has no {b_suffix.lstrip('.')} partner")
                    self._target(keys, module + target, weights)
                    if not embedding and len(self.weights.shape(key)) != 2:
                        raise CheckpointError(f"{weights}: {key} adapts a convolution; fastmerge merges LoRA of "
                                              "Linear and Embedding layers only")
                    self.pairs[module + target] = (key, b_key, embedding)
                    break
            else:
                if any(part in name for part in (".lora_B.", ".lora_embedding_B", ".lora_magnitude")):
                    if ".lora_magnitude" in name:
                        raise CheckpointError(f"{weights}: DoRA adapters are not supported by fastmerge")
                    continue
                # a full copy: modules_to_save, or an adapted embedding's own weight (PEFT saves it;
                # loading the adapter puts it in place before the update applies)
                name = name.replace(".base_layer.", ".")
                self.replaced[self._target(keys, name, weights)] = key

    @staticmethod
    def _config(folder: str) -> dict:
        try:
            with open(os.path.join(folder, CONFIG), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder}: cannot read {CONFIG} ({str(exc)[:200]}); a model+lora reference needs "
                                  "a PEFT adapter folder") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{folder}/{CONFIG}: not a JSON object")
        kind = config.get("peft_type", "LORA")
        why = (f"peft_type {kind} (fastmerge merges LORA adapters)" if kind != "LORA" else
               "DoRA (use_dora)" if config.get("use_dora") else
               "per-module ranks or alphas (rank_pattern/alpha_pattern)" if config.get("rank_pattern")
               or config.get("alpha_pattern") else
               f"trained biases (bias: {config.get('bias')})" if config.get("bias", "none") != "none" else
               "trained biases (lora_bias)" if config.get("lora_bias") else
               "layer_replication" if config.get("layer_replication") else
               "trainable_token_indices" if config.get("trainable_token_indices") else "")
        if why:
            raise CheckpointError(f"{folder}: {why} is not supported by fastmerge's model+lora merge")
        return config

    @staticmethod
    def _target(keys: set, name: str, weights: str) -> str:
        if name not in keys:
            raise CheckpointError(f"{weights}: adapts {name!r}, which the model does not have; is it the adapter "
                                  "of this model?")
        return name

    def __contains__(self, name: str) -> bool:
        return name in self.pairs or name in self.replaced

    def files(self) -> list[str]:
        return self.weights.files() + [os.path.abspath(os.path.join(self.folder, CONFIG))]

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Model tensor `name` (its stored value `weight`) with the adapter merged in."""
        if name in self.replaced:
            value = self.weights.read(self.replaced[name])
            if tuple(value.shape) != tuple(weight.shape):
                raise CheckpointError(f"{self.folder}: its copy of {name!r} has shape {tuple(value.shape)}, the "
                                      f"model's {tuple(weight.shape)}")
            weight = value.to(weight.dtype)
        if name not in self.pairs:
            return weight
        a_key, b_key, embedding = self.pairs[name]
        a, b = self.weights.read(a_key), self.weights.read(b_key)
        dtype = a.dtype
        if dtype in (torch.float16, torch.bfloat16):  # PEFT on a CPU: the product in float32
            a, b = a.float(), b.float()
        delta = b @ a
        if embedding or self.fan_in_fan_out:
            delta = delta.T
        delta = (delta * self.scaling).to(dtype)
        if tuple(delta.shape) != tuple(weight.shape):
            raise CheckpointError(f"{self.folder}: the update of {name!r} has shape {tuple(delta.shape)}, the "
                                  f"model's {tuple(weight.shape)}")
        return (weight + delta).to(weight.dtype)
