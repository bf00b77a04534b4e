"""Converting checkpoints: weight means, parts of one model put into another, another input size, settings.

``segany convert`` runs :func:`convert_checkpoint`; MODELS.md says which conversions made the shipped files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from segany.checkpoint import load_model, save_model
from segany.errors import SegAnyError
from segany.modeling.build import at_image_size, build_sam, with_crop_refiner, with_settings
from segany.modeling.config import EfficientNetConfig, SamConfig
from segany.modeling.dense_prompt_encoder import MASK_MAP
from segany.modeling.sam import Sam


def average_models(sources: Sequence[str | os.PathLike]) -> Sam:
    """The uniform mean of the weights of checkpoints of one architecture (a "model soup": e.g. two
    training stages of one model, where the mean often beats both; MODELS.md measures it).

    Text heads are left out: a head is tied to the weights it was trained on."""
    if not sources:
        raise ValueError("no checkpoint to average")
    models = [load_model(s, text_head=None) for s in sources]
    first = models[0]
    for src, m in zip(sources[1:], models[1:]):
        if m.config != first.config:
            raise SegAnyError(f"{src}: its architecture differs from {sources[0]}'s; only one model's weights average")
    states = [m.state_dict() for m in models]
    mean = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            # summed from the first tensor, not from 0: 0 + (-0.0) is +0.0, and a part the checkpoints share
            # must come out bit for bit (a text head's base fingerprint reads the bytes)
            total = v.double()
            for sd in states[1:]:
                total = total + sd[k].double()
            mean[k] = (total / len(states)).to(v.dtype)
        else:
            mean[k] = v
    first.load_state_dict(mean)
    return first


def with_correction_decoder(model: Sam, source: Sam, skip_mask: bool = True) -> Sam:
    """``model`` with ``source``'s mask decoder as its correction decoder (``SamConfig.correction_decoder``):
    prompts with a mask input get ``source``'s answers, every other prompt ``model``'s, exactly. ``source``
    is a run of ``model``'s architecture (``mask_skip`` options aside) whose decoder learnt corrections while
    its first prompts were kept near ``model``'s (``first_prompt_distill``). The correction decoder reads the
    first decoder's projected high-resolution features, so ``source``'s own projections are left out.
    ``skip_mask=False`` (``mask_skip_prompts`` only): the skip's weights on the previous mask set to zero, so
    it reads the clicks and the box alone and the mask reaches the decoder through the dense embedding only
    (better on every held-out set, zoom-in's crops included: MODELS.md)."""
    flags = ("mask_skip", "mask_skip_prompts")
    cfg, src_cfg = getattr(model, "config", None), getattr(source, "config", None)
    if not isinstance(cfg, SamConfig) or not isinstance(src_cfg, SamConfig) or cfg.correction_decoder:
        raise SegAnyError("a correction decoder is added to a segany model without one, from a segany model")
    if src_cfg.correction_decoder or cfg.to_dict() | {f: getattr(src_cfg, f) for f in flags} != src_cfg.to_dict():
        raise SegAnyError("the correction decoder's source must be a run of the model's architecture")
    if not skip_mask and not src_cfg.mask_skip_prompts:
        raise SegAnyError("dropping the mask from the skip needs a source with mask_skip_prompts")
    new = build_sam(SamConfig.from_dict(cfg.to_dict() | {"correction_decoder": True} |
                                        {f: getattr(src_cfg, f) for f in flags}))
    result = new.load_state_dict(model.state_dict(), strict=False)
    if result.unexpected_keys or any(not k.startswith("correction_decoder.") for k in result.missing_keys):
        raise SegAnyError(f"the weights do not fit the model with a correction decoder ({result})")
    decoder = new.correction_decoder
    wanted = decoder.state_dict().keys()
    decoder.load_state_dict({k: v for k, v in source.mask_decoder.state_dict().items() if k in wanted})
    if not skip_mask:  # strict load above: every tensor of the correction decoder came from source
        with torch.no_grad():
            decoder.conv_m0.weight[:, MASK_MAP] = 0
    return new.eval()


def convert_checkpoint(
    src: str | os.PathLike | Sequence[str | os.PathLike],
    dst: str | os.PathLike,
    half: bool = False,
    image_size: int | None = None,
    max_image_size: int | None | str = "keep",
    correction_decoder: str | os.PathLike | None = None,
    correction_skip_mask: bool = True,
    crop_refiner: str | os.PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
) -> SamConfig:
    """Convert any loadable checkpoint to our ``.safetensors`` format; returns its config.

    Several sources: their weights' uniform mean (:func:`average_models`) is written. ``image_size``,
    ``max_image_size``: the model's input sizes changed (:func:`with_image_size`). ``correction_decoder``:
    a checkpoint whose mask decoder becomes the model's correction decoder (:func:`with_correction_decoder`,
    ``correction_skip_mask`` its ``skip_mask``). ``crop_refiner``: a checkpoint whose point refiner becomes
    the model's crop refiner (:func:`~segany.modeling.build.with_crop_refiner`). ``settings``: :class:`SamConfig`
    fields that keep every weight, changed (e.g. ``decode_padding``, ``first_prompt_threshold``)."""
    if isinstance(src, (str, os.PathLike)):
        model = load_model(src, text_head=None)  # the text head keeps its own file (save_model skips it)
    else:
        model = average_models(list(src))
    if correction_decoder is not None:
        model = with_correction_decoder(model, load_model(correction_decoder, text_head=None), correction_skip_mask)
    if image_size is not None or max_image_size != "keep":
        model = with_image_size(model, image_size, max_image_size)
    if crop_refiner is not None:
        refiner = load_model(crop_refiner, text_head=None).point_refiner
        if refiner is None:
            raise SegAnyError(f"{crop_refiner}: no point refiner in it")
        model = with_crop_refiner(model, refiner)
    if settings:
        model = with_settings(model, **settings)
    save_model(model, dst, half=half)
    return model.config


def with_image_size(model: Sam, image_size: int | None = None, max_image_size: int | None | str = "keep") -> Sam:
    """The same weights run at another input size (longest side, pixels; the embedding, mask and prompt
    grids follow it) or with another ``max_image_size`` (:class:`SamConfig`; "keep": the model's where it
    is at least the new size, else none), sharing ``model``'s parameters. Only for encoders whose weights do
    not depend on the input size: EfficientNet-Lite's convolutions (segany's default); a ViT's position
    embeddings and TinyViT's attention biases have one size. An attached text head comes along."""
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, SamConfig) or not isinstance(cfg.encoder, EfficientNetConfig):
        raise SegAnyError("the input size can be changed for EfficientNet-Lite models only (segany's default)")
    size = cfg.image_size if image_size is None else image_size
    if size % 32 or not 128 <= size <= 2048:
        raise SegAnyError(f"image size {size}: must be a multiple of 32 in [128, 2048]")
    if max_image_size == "keep":
        max_image_size = cfg.max_image_size if (cfg.max_image_size or 0) >= size else None
    if max_image_size is not None and (max_image_size % 32 or not size <= max_image_size <= 2048):
        raise SegAnyError(f"max image size {max_image_size}: must be a multiple of 32 in [{size}, 2048]")
    return at_image_size(model, size, max_image_size)
