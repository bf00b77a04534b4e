"""Turn a :class:`SamConfig` into a network. Every hyper-parameter comes from the config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from segany.errors import SegAnyError
from segany.modeling.config import EfficientNetConfig, SamConfig, TinyViTConfig, ViTConfig
from segany.modeling.dense_prompt_encoder import NUM_PROMPT_MAPS, DensePromptEncoder
from segany.modeling.efficientnet import EfficientNetLiteEncoder
from segany.modeling.fast import fast_class
from segany.modeling.image_encoder import ImageEncoderViT
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.point_refiner import PointRefiner
from segany.modeling.prompt_encoder import PromptEncoder
from segany.modeling.sam import Sam, model_weights
from segany.modeling.sam2_mask_decoder import Sam2MaskDecoder
from segany.modeling.tiny_vit import TinyViT
from segany.modeling.transformer import TwoWayTransformer


def build_image_encoder(cfg: SamConfig, fast: bool = True):
    enc = cfg.encoder
    if isinstance(enc, ViTConfig):
        return fast_class(ImageEncoderViT, fast)(
            img_size=cfg.image_size,
            patch_size=enc.patch_size,
            embed_dim=enc.embed_dim,
            depth=enc.depth,
            num_heads=enc.num_heads,
            mlp_ratio=enc.mlp_ratio,
            out_chans=cfg.prompt_embed_dim,
            qkv_bias=enc.qkv_bias,
            use_rel_pos=enc.use_rel_pos,
            window_size=enc.window_size,
            global_attn_indexes=tuple(enc.global_attn_indexes),
            drop_path_rate=enc.drop_path_rate,
        )
    if isinstance(enc, TinyViTConfig):
        return fast_class(TinyViT, fast)(
            embed_dims=tuple(enc.embed_dims),
            depths=tuple(enc.depths),
            num_heads=tuple(enc.num_heads),
            window_sizes=tuple(enc.window_sizes),
            mlp_ratio=enc.mlp_ratio,
            mbconv_expand_ratio=enc.mbconv_expand_ratio,
            local_conv_size=enc.local_conv_size,
            drop_path_rate=enc.drop_path_rate,
            out_chans=cfg.prompt_embed_dim,
        )
    if isinstance(enc, EfficientNetConfig):
        return fast_class(EfficientNetLiteEncoder, fast)(
            cfg.image_size,
            cfg.prompt_embed_dim,
            enc.neck_dim,
            enc.stride,
            high_res=cfg.high_res_features,
            context_blocks=enc.context_blocks,
            variant=enc.variant,
        )
    raise TypeError(f"unknown encoder config {type(enc).__name__}")


def build_sam(cfg: SamConfig, fast: bool = True) -> Sam:
    """A randomly initialised :class:`Sam` for ``cfg`` (load weights with ``load_state_dict``).

    ``fast``: the modules with inference fast paths (:mod:`segany.modeling.fast`: same weights, same
    outputs); False: the plain modules only.
    """
    from segany.modeling.sam2_config import Sam2Config

    if isinstance(cfg, Sam2Config):
        from segany.modeling.sam2 import build_sam2

        return build_sam2(cfg, lambda cls: fast_class(cls, fast))
    from segany.modeling.sam_hq import SamHQConfig, build_sam_hq

    if isinstance(cfg, SamHQConfig):
        return build_sam_hq(cfg, build_image_encoder(cfg, fast), fast)
    if cfg.image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16, got {cfg.image_size}")
    cap = cfg.max_image_size
    if cap is not None and (not isinstance(cfg.encoder, EfficientNetConfig) or cap % 32 or cap < cfg.image_size):
        raise ValueError(
            f"max_image_size {cfg.max_image_size}: needs the EfficientNet encoder and a multiple of 32 "
            f"no smaller than image_size ({cfg.image_size})"
        )
    emb = cfg.embedding_size
    d = cfg.prompt_embed_dim
    # built in this order (encoder, prompt encoder, decoder): a seeded build draws the same initial values
    image_encoder = build_image_encoder(cfg, fast)
    prompt_encoder = fast_class(DensePromptEncoder if cfg.dense_prompts else PromptEncoder, fast)(
        d, (emb, emb), (cfg.image_size, cfg.image_size), cfg.mask_in_chans
    )
    if cfg.mask_skip and not cfg.high_res_features:
        raise ValueError("mask_skip needs high_res_features")
    if cfg.mask_skip_prompts and not (cfg.mask_skip and cfg.dense_prompts):
        raise ValueError("mask_skip_prompts needs mask_skip and dense_prompts")
    if cfg.high_res_features and not isinstance(image_encoder, EfficientNetLiteEncoder):
        raise ValueError("high_res_features needs the EfficientNet encoder (SAM 2's Hiera has its own config)")
    if cfg.point_refiner and not cfg.high_res_features:
        raise ValueError("point_refiner needs high_res_features")
    if not cfg.decode_padding and not cfg.high_res_features:
        raise ValueError("decode_padding False needs high_res_features (the decoder that takes a region)")

    def mask_decoder(correction: bool) -> MaskDecoder:
        """The first prompt's decoder (``correction`` False), or the one for prompts with a mask input."""
        transformer = fast_class(TwoWayTransformer, fast)(
            cfg.decoder_depth, d, cfg.decoder_num_heads, cfg.decoder_mlp_dim
        )
        heads = dict(
            num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        )
        if not cfg.high_res_features:
            return fast_class(MaskDecoder, fast)(d, transformer, **heads)
        # the mask-skip options belong to the decoder that sees mask inputs
        skip = cfg.mask_skip and (correction or not cfg.correction_decoder)
        # SAM 2's decoder with SAM's heads: no object-score token, a linear IoU head, no stability fallback.
        return fast_class(Sam2MaskDecoder, fast)(
            d,
            transformer,
            **heads,
            high_res_in_chans=image_encoder.high_res_channels,
            mask_skip=skip,
            mask_skip_channels=NUM_PROMPT_MAPS if cfg.mask_skip_prompts else 1,
            iou_prediction_use_sigmoid=False,
            pred_obj_scores=False,
            dynamic_multimask_via_stability=False,
            high_res_projections=not correction,
        )

    decoder = mask_decoder(False)
    correction = mask_decoder(True) if cfg.correction_decoder else None
    refiner = crop_refiner = second_refiner = None
    for name in ("crop_refiner", "second_refiner"):
        if getattr(cfg, name) and not cfg.point_refiner:
            raise ValueError(f"{name} needs point_refiner")
    if cfg.point_refiner:  # reads the decoder's projected stride-4 and stride-8 maps (SAM 2's widths) and the embedding
        maps = (d // 8, d // 4, d)

        def point_refiner(max_upscale: float) -> PointRefiner:
            return fast_class(PointRefiner, fast)(
                maps, hidden=cfg.point_refiner_hidden, max_upscale=max_upscale,
                pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std,
            )

        refiner = point_refiner(cfg.point_refiner_max_upscale)
        crop_refiner = point_refiner(math.inf) if cfg.crop_refiner else None
        second_refiner = point_refiner(cfg.point_refiner_max_upscale) if cfg.second_refiner else None
    return fast_class(Sam, fast)(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=decoder,
        image_size=cfg.image_size,
        pixel_mean=tuple(cfg.pixel_mean),
        pixel_std=tuple(cfg.pixel_std),
        config=cfg,
        correction_decoder=correction,
        point_refiner=refiner,
        crop_refiner=crop_refiner,
        second_refiner=second_refiner,
    )


def input_side(model: Sam, height: int, width: int) -> int:
    """The square input side a ``height x width`` image is encoded at: the model's ``image_size``, or for a
    model with ``config.max_image_size``, a larger image's longest side rounded up to 32, at most that."""
    cfg = getattr(model, "config", None)
    cap = getattr(cfg, "max_image_size", None)
    side = max(height, width)
    if cap is None or side <= model.image_size:
        return model.image_size
    return min(cap, -(-side // 32) * 32)


def _rebuilt(model: Sam, cfg: SamConfig, weights: dict, strict: bool = True) -> Sam:
    """A model built from ``cfg`` (with the fast paths where ``model`` has them: a plain Sam maps to its fast
    subclass) holding ``weights`` themselves (``model``'s, shared), with ``model``'s text head (tied to the
    encoders' weights, which are these), in its mode and on its device."""
    out = build_sam(cfg, fast=fast_class(type(model)) is type(model))
    out.load_state_dict(weights, strict=strict, assign=True)
    head = getattr(model, "text_head", None)
    if head is not None:
        out.text_head = head
    return out.to(model.device).train(model.training)


def at_image_size(model: Sam, image_size: int, max_image_size: int | None = None) -> Sam:
    """``model`` on another input grid (longest side ``image_size``; the embedding, mask and prompt grids
    follow it; ``max_image_size`` as in :class:`SamConfig`), sharing its parameters and buffers, in its mode
    and on its device. Only for encoders whose weights do not depend on the input size (EfficientNet-Lite);
    an attached text head comes along; built with the fast paths where ``model`` has them."""
    cfg = model.config
    if not isinstance(cfg.encoder, EfficientNetConfig):
        raise ValueError("the input size can be changed for EfficientNet-Lite models only")
    changes = {"image_size": image_size, "max_image_size": max_image_size}
    return _rebuilt(model, SamConfig.from_dict({**cfg.to_dict(), **changes}), model_weights(model, keep_vars=True))


def with_settings(model: Sam, **changes: Any) -> Sam:
    """``model`` with its config changed by ``changes`` (settings that keep every weight, e.g. ``decode_padding``;
    a clear error where the weights no longer fit), sharing its parameters and buffers, in its mode and on its
    device. An attached text head comes along."""
    return _rebuilt(model, dataclasses.replace(model.config, **changes), model_weights(model, keep_vars=True))


def with_point_refiner(
    model: Sam, refiner: PointRefiner | str | None, hidden: int | None = None, max_upscale: float | None = None
) -> Sam:
    """``model`` with another point refiner (``SamConfig.point_refiner``): ``refiner``'s weights, "new" (a fresh
    one, which changes nothing until trained; ``hidden`` wide, or as ``model``'s config says) or None (none),
    sharing the rest of ``model``'s weights, in its mode and on its device; ``max_upscale``: its
    ``point_refiner_max_upscale`` (None: as ``model``'s config says). An attached text head comes along."""
    if isinstance(refiner, PointRefiner):
        hidden = refiner.mlp[0].out_features
    changes: dict = {"point_refiner_hidden": hidden} if hidden else {}
    if max_upscale is not None:
        changes["point_refiner_max_upscale"] = float(max_upscale)
    if refiner is None:  # no refiner at all: the model's own masks
        changes["crop_refiner"] = False
    # a second refiner reads the point refiner's answers: it goes with the refiner it was trained after
    cfg = dataclasses.replace(model.config, point_refiner=refiner is not None, second_refiner=False, **changes)
    dropped = ("point_refiner.", "second_refiner.") + (("crop_refiner.",) if refiner is None else ())
    kept = refiner if isinstance(refiner, PointRefiner) else None
    return _rebuilt(model, cfg, _weights_with(model, dropped, "point_refiner.", kept), strict=refiner != "new")


def with_crop_refiner(model: Sam, refiner: PointRefiner | None) -> Sam:
    """``model`` (with a point refiner) with ``refiner``'s weights as its crop refiner (``SamConfig.crop_refiner``:
    zoom-in's crops, and the images the input enlarges more than ``point_refiner_max_upscale``) or with none,
    sharing the rest of its weights."""
    return _with_refiner(model, "crop_refiner", refiner)


def with_second_refiner(model: Sam, refiner: PointRefiner | str | None) -> Sam:
    """``model`` (with a point refiner) with ``refiner``'s weights as its second refiner
    (``SamConfig.second_refiner``: the point refiner's answers to prompts with a mask input refined again), "new"
    (a fresh one, which changes nothing until trained) or none, sharing the rest of its weights."""
    return _with_refiner(model, "second_refiner", refiner)


def _with_refiner(model: Sam, name: str, refiner: PointRefiner | str | None) -> Sam:
    """``model`` with its refiner ``name`` (``crop_refiner`` or ``second_refiner``) replaced."""
    cfg, what = model.config, name.replace("_", " ")
    if not getattr(cfg, "point_refiner", False):
        raise SegAnyError(f"a {what} goes into a model with a point refiner")
    if isinstance(refiner, PointRefiner) and refiner.mlp[0].out_features != cfg.point_refiner_hidden:
        raise SegAnyError(
            f"the {what} is {refiner.mlp[0].out_features} wide, the model's point refiner {cfg.point_refiner_hidden}"
        )
    kept = refiner if isinstance(refiner, PointRefiner) else None
    weights = _weights_with(model, (f"{name}.",), f"{name}.", kept)
    changed = dataclasses.replace(cfg, **{name: refiner is not None})
    return _rebuilt(model, changed, weights, strict=refiner != "new")


def _weights_with(model: Sam, dropped: tuple[str, ...], prefix: str, module: PointRefiner | None) -> dict:
    """``model``'s weights but those under ``dropped``, with ``module``'s (if any) under ``prefix``."""
    weights = {k: v for k, v in model_weights(model, keep_vars=True).items() if not k.startswith(dropped)}
    if module is not None:
        weights.update({f"{prefix}{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    return weights
