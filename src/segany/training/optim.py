"""Optimiser and schedule: AdamW with parameter groups, layer-wise lr decay, warm-up + step decay.

* No weight decay on normalisation weights, biases (any 1-D tensor), embeddings (``nn.Embedding``
  weights: prompt / output tokens) and position tables (``pos_embed``, relative-position tables,
  TinyViT's attention biases).
* Layer-wise lr decay (``layer_decay < 1``): the image encoder's layer ``i`` of ``L`` gets
  ``lr * layer_decay ** (L + 1 - i)``; patch embedding / position table are layer 0, ViT block ``k``
  is layer ``k + 1`` (TinyViT: blocks numbered across stages, a stage's downsampling belongs to its
  last block), the neck is layer ``L + 1`` (and gets the full lr, like the prompt encoder and decoder).
* Schedule: linear warm-up from ~0 over ``warmup_steps``, then the lr is multiplied by ``decay_factor``
  at each of the given fractions of the run (SAM: x0.1 at 60k and 86.7k of 90k steps). The text head
  trains with warm-up then a half cosine down to 0 (:func:`build_cosine_scheduler`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from segany.errors import SegAnyError

_NO_DECAY_NAME = re.compile(
    r"(^|\.)(pos_embed|rel_pos_h|rel_pos_w|rel_pos|attention_biases|positional_encoding_gaussian_matrix)$"
)
_NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Embedding)


def _is_norm_like(module: nn.Module) -> bool:
    # LayerNorm2d and friends: any module class whose name says it normalises
    return isinstance(module, _NO_DECAY_MODULES) or "norm" in type(module).__name__.lower()


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get no weight decay."""
    out: set[str] = set()
    for mod_name, module in model.named_modules():
        norm_like = _is_norm_like(module)
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if norm_like or p.ndim <= 1 or p_name == "bias" or _NO_DECAY_NAME.search(full):
                out.add(full)
    return out


def encoder_num_layers(image_encoder: nn.Module) -> int:
    """``L``: the number of blocks of a ViT (``blocks``) or TinyViT (``layers[*].blocks``) encoder, or of
    stages of a convolutional one (``stages``)."""
    if hasattr(image_encoder, "stages"):
        return len(image_encoder.stages)
    if hasattr(image_encoder, "blocks"):
        return len(image_encoder.blocks)
    if hasattr(image_encoder, "layers"):
        return sum(len(stage.blocks) for stage in image_encoder.layers)
    return 0


def encoder_layer_id(name: str, image_encoder: nn.Module) -> int:
    """Layer index (0 .. L + 1) of an image-encoder parameter name (relative to the encoder)."""
    n_layers = encoder_num_layers(image_encoder)
    if name.startswith(("patch_embed", "pos_embed", "cls_token", "stem.")):
        return 0
    m = re.match(r"stages\.(\d+)\.", name)
    if m and hasattr(image_encoder, "stages"):
        return int(m.group(1)) + 1
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    m = re.match(r"layers\.(\d+)\.(blocks\.(\d+)\.|downsample)", name)
    if m and hasattr(image_encoder, "layers"):
        stage = int(m.group(1))
        before = sum(len(image_encoder.layers[s].blocks) for s in range(stage))
        in_stage = len(image_encoder.layers[stage].blocks)
        block = int(m.group(3)) if m.group(3) is not None else in_stage - 1
        return before + block + 1
    return n_layers + 1  # neck and anything else


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    lr_scales: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups of a :class:`~segany.modeling.sam.Sam` (only parameters that require grad).

    Each group has ``params``, ``weight_decay``, ``lr_scale`` and a ``name`` (``"<layer id>_decay"`` ...).
    ``lr_scales``: parameter-name prefix -> lr multiplier (the first matching prefix; its own group), e.g.
    for parameters that start at zero in an otherwise trained model.
    """
    no_decay = no_weight_decay_names(model)
    encoder = getattr(model, "image_encoder", None)
    n_layers = encoder_num_layers(encoder) if encoder is not None else 0
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if encoder is not None and name.startswith("image_encoder."):
            layer = encoder_layer_id(name[len("image_encoder.") :], encoder)
        else:
            layer = n_layers + 1
        scale = float(layer_decay ** (n_layers + 1 - layer))
        decay = name not in no_decay
        key = f"layer{layer}_{'decay' if decay else 'no_decay'}"
        prefix = next((k for k in lr_scales or {} if name.startswith(k)), None)
        if prefix is not None:
            scale *= float(lr_scales[prefix])
            key += f"_{prefix}"
        g = groups.setdefault(
            key, {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale, "name": key}
        )
        g["params"].append(p)
    unused = [k for k in lr_scales or {} if not any(g["name"].endswith(f"_{k}") for g in groups.values())]
    if unused:
        raise SegAnyError(f"training option lr_scales: no trainable parameter's name starts with {unused}")
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    layer_decay: float = 1.0,
    fused: bool | None = None,
    lr_scales: Mapping[str, float] | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; each group's lr is ``lr * lr_scale``.

    ``fused`` defaults to True when the parameters live on CUDA (one kernel for the whole update).
    """
    groups = param_groups(model, weight_decay, layer_decay, lr_scales)
    if not groups:
        raise ValueError("no trainable parameters")
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    kw: dict[str, Any] = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, **kw)


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_at: Sequence[float], decay_factor: float) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warm-up, then step decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    f = 1.0
    for frac in decay_at:
        if step >= round(float(frac) * total_steps):
            f *= decay_factor
    return f


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    decay_at: Sequence[float] = (0.6667, 0.8889),
    decay_factor: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping :func:`lr_factor` (its state dict holds only numbers)."""
    decay_at = [float(f) for f in decay_at]

    def fn(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, decay_at, decay_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr at ``step`` (0-based): linear warm-up, then a half cosine from 1 down to
    0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def build_cosine_scheduler(
    optimizer: torch.optim.Optimizer, base_lr: float, total_steps: int, warmup_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepping :func:`warmup_cosine_factor` of ``base_lr``, positioned at ``start_step``.

    The lr is a function of the step alone, so a resumed run rebuilds it rather than saving its state.
    """
    for g in optimizer.param_groups:
        g["initial_lr"] = base_lr  # what LambdaLR scales; a resumed optimizer holds its last lr in "lr"

    def fn(step: int) -> float:
        return warmup_cosine_factor(step, total_steps, warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn, last_epoch=start_step - 1)
