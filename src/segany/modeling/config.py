"""Model configurations: one dataclass describes a whole SAM, and named configs live in a registry.

Every variant (the paper's ViT-B/L/H, MobileSAM's TinyViT, our small default model, tiny test models,
other input sizes) is a :class:`SamConfig`, never new code. ``build_sam(config)`` turns one into a network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from segany.errors import SegAnyError


@dataclass
class ViTConfig:
    """Plain ViT image encoder with windowed + global attention (SAM's encoder)."""

    kind: Literal["vit"] = "vit"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = 16
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_rel_pos: bool = True
    drop_path_rate: float = 0.0

    @property
    def stride(self) -> int:
        """Input pixels per embedding cell: the patch size."""
        return self.patch_size


@dataclass
class TinyViTConfig:
    """TinyViT image encoder (MobileSAM): a conv stage then three windowed-attention stages."""

    kind: Literal["tiny_vit"] = "tiny_vit"
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    drop_path_rate: float = 0.0

    @property
    def stride(self) -> int:
        """Input pixels per embedding cell (the last patch merging keeps the resolution: 4 x 2 x 2)."""
        return 16


@dataclass
class EfficientNetConfig:
    """EfficientNet-Lite trunk with an FPN neck (the default model's encoder); ``stride`` 16 or 8."""

    kind: Literal["efficientnet_lite"] = "efficientnet_lite"
    neck_dim: int = 96
    stride: int = 16
    context_blocks: int = 0  #: transformer blocks on the stride-32 map (``ContextBlock``)
    variant: str = "lite0"  #: the trunk: lite0 | lite1 (one block more in stages 1-5) | lite2 (and 10% wider)


EncoderConfig = ViTConfig | TinyViTConfig | EfficientNetConfig
_ENCODER_KINDS: dict[str, type] = {"vit": ViTConfig, "tiny_vit": TinyViTConfig, "efficientnet_lite": EfficientNetConfig}


@dataclass
class SamConfig:
    """A whole Segment Anything model.

    The image embedding is ``image_size // encoder.stride`` on a side (16 for SAM's encoders, 16 or 8 for
    the EfficientNet one); the low-res masks are 4x that (256 for a 1024 model).
    """

    encoder: EncoderConfig = field(default_factory=ViTConfig)
    image_size: int = 1024
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    #: clicks and box also drawn as maps into the dense embedding (DensePromptEncoder; not in SAM)
    dense_prompts: bool = False
    #: the decoder's upscaling also adds the encoder's stride-4 and stride-8 maps, as SAM 2's does
    #: (:class:`~segany.modeling.sam2_mask_decoder.Sam2MaskDecoder`; EfficientNet encoder only; not in SAM)
    high_res_features: bool = False
    #: a mask input's logits also added at the mask grid inside the upscaling (a 3 x 3 convolution into the
    #: stride-4 features), so a correction keeps the previous mask's detail (needs ``high_res_features``; not in SAM)
    mask_skip: bool = False
    #: with ``mask_skip``: the clicks and the box too, as the dense prompt encoder draws them (its four maps:
    #: the mask's logits, positive and negative click disks, box), so a correction's clicks reach the mask grid
    #: (needs ``dense_prompts``; only prompts with a mask input, as ``mask_skip``; not in SAM)
    mask_skip_prompts: bool = False
    #: prompts with a mask input (corrections: the previous mask fed back) answered by a second mask decoder
    #: of the same shape (``Sam.correction_decoder``, on the first decoder's projected high-resolution
    #: features), which alone takes ``mask_skip`` / ``mask_skip_prompts``: the first decoder never sees a mask,
    #: so training the correction decoder moves no first click, box or "everything" answer (not in SAM)
    correction_decoder: bool = False
    #: a larger image is encoded at its own longest side rounded up to 32 pixels, up to this many, rather
    #: than shrunk to ``image_size`` (the same weights on a larger grid: EfficientNet encoder only; not in SAM)
    max_image_size: int | None = None
    #: the upsampled masks' uncertain pixels corrected at the image's own resolution by a small MLP
    #: (:class:`~segany.modeling.point_refiner.PointRefiner`, ``Sam.point_refiner``; needs
    #: ``high_res_features``; not in SAM)
    point_refiner: bool = False
    point_refiner_hidden: int = 64  #: the point refiner's MLP width
    #: images (or zoom-in's crops) the model's input enlarges by more than this are not given to the point refiner
    #: (but to the crop refiner, if any; ``inf``: no limit)
    point_refiner_max_upscale: float = 2.0
    #: a second point refiner (``Sam.crop_refiner``, ``point_refiner_hidden`` wide) for zoom-in's crops and those
    #: images: one trained on zoom-in's crops (``segany convert --crop-refiner``; needs ``point_refiner``)
    crop_refiner: bool = False
    #: a refiner of the point refiner's own answers to prompts with a mask input (``Sam.second_refiner``, the same
    #: MLP): it corrects ``correction_refiner_budget`` of the refined logits' uncertain pixels again, reading the
    #: refined logits around them; trained on those answers (``segany train-refiner`` with ``second: true``;
    #: needs ``point_refiner``; not in SAM)
    second_refiner: bool = False
    #: False: the mask decoder decodes only the part of the mask grid that the post-processing reads (over the
    #: resized image, not the input's padding) where the predictor tells it that part (``SamPredictor``, so
    #: the CLI, the server, zoom-in and evaluation), and gives the low-res logits beyond it as its edge
    #: (:mod:`segany.modeling.low_res`; needs ``high_res_features``; not in SAM, which decodes the padding too)
    decode_padding: bool = True
    #: the logit above which a pixel is in the point refiner's answer to a first prompt (a click or box without a
    #: mask input, zoom-in's first click answered again on its crop, "everything"'s grid points:
    #: ``SamPredictor.answer_threshold``); every other answer (corrections, unrefined, text) is cut at
    #: ``Sam.mask_threshold`` (0, SAM's). The default model's refined first answers come out a little small: its file
    #: sets -0.5, chosen on the training images (MODELS.md; not in SAM)
    first_prompt_threshold: float = 0.0
    #: how many of its uncertain pixels the point refiner (or crop refiner) corrects in each answer to a prompt with
    #: a mask input (the clicks after the first, answered by the correction decoder where there is one; 0: all of
    #: them); first prompts keep the refiner's own 2,048 (a first click's time). The default model's file sets
    #: 8,192, chosen on the training images (MODELS.md; not in SAM)
    correction_refiner_budget: int = 2048
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.encoder.stride

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error so typos do not pass silently."""
        d = dict(d)
        enc = dict(d.pop("encoder", {}))
        kind = enc.get("kind", "vit")
        enc_cls = _ENCODER_KINDS.get(kind)
        if enc_cls is None:
            raise SegAnyError(f"unknown encoder kind {kind!r} (expected one of {', '.join(map(repr, _ENCODER_KINDS))})")
        try:
            enc_fields = {f.name for f in dataclasses.fields(enc_cls)}
            bad = set(enc) - enc_fields
            if bad:
                raise SegAnyError(f"unknown encoder config keys: {sorted(bad)}")
            enc = {k: tuple(v) if isinstance(v, list) else v for k, v in enc.items()}
            top_fields = {f.name for f in dataclasses.fields(cls)}
            bad = set(d) - top_fields
            if bad:
                raise SegAnyError(f"unknown model config keys: {sorted(bad)}")
            d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
            return cls(encoder=enc_cls(**enc), **d)
        except TypeError as e:
            raise SegAnyError(f"invalid model config: {e}") from None


_REGISTRY: dict[str, Callable[[], SamConfig]] = {}


def register_config(name: str) -> Callable[[Callable[[], SamConfig]], Callable[[], SamConfig]]:
    def deco(fn: Callable[[], SamConfig]) -> Callable[[], SamConfig]:
        _REGISTRY[name] = fn
        return fn

    return deco


def get_config(name: str) -> SamConfig:
    """A fresh copy of a named config (see :func:`list_configs`)."""
    if name not in _REGISTRY:
        raise SegAnyError(f"unknown model config {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def list_configs() -> list[str]:
    return sorted(_REGISTRY)


@register_config("vit_b")
def vit_b() -> SamConfig:
    return SamConfig(ViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)))


@register_config("vit_l")
def vit_l() -> SamConfig:
    return SamConfig(ViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)))


@register_config("vit_h")
def vit_h() -> SamConfig:
    return SamConfig(ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)))


@register_config("vit_t")
def vit_t() -> SamConfig:
    """MobileSAM: TinyViT-5M encoder, the standard prompt encoder and decoder."""
    return SamConfig(TinyViTConfig())


@register_config("tiny_test")
def tiny_test() -> SamConfig:
    """A very small model for unit tests (random weights, 128-pixel input)."""
    return SamConfig(
        ViTConfig(embed_dim=32, depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,)),
        image_size=128,
        prompt_embed_dim=32,
        mask_in_chans=8,
        decoder_num_heads=2,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
    )


@register_config("segany_default")
def segany_default() -> SamConfig:
    """The shipped default model: a small TinyViT at 256 pixels with a narrow decoder.

    Sized to be trained on a 2-core CPU (no accelerator was available for it) and to run fast there:
    see MODELS.md for its measured speed and quality.
    """
    return SamConfig(
        TinyViTConfig(
            embed_dims=(32, 64, 128, 160), depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 5), window_sizes=(7, 8, 8, 8)
        ),
        image_size=256,
        prompt_embed_dim=128,
        mask_in_chans=16,
        decoder_num_heads=4,
        decoder_mlp_dim=512,
        iou_head_hidden_dim=128,
    )


@register_config("segany_default_v2")
def segany_default_v2() -> SamConfig:
    """The default model from issue 17 on: an EfficientNet-Lite0 encoder (ImageNet-initialised) with an
    FPN neck at stride 16 on a 512-pixel input (a 32 x 32 embedding, 128 x 128 low-res masks: SAM's
    geometry at half the size), SAM's two-way decoder at 128 channels, and clicks and box drawn as maps
    into the dense embedding (:class:`~segany.modeling.dense_prompt_encoder.DensePromptEncoder`). See
    MODELS.md for how it was chosen and trained."""
    return SamConfig(
        EfficientNetConfig(neck_dim=96),
        dense_prompts=True,
        image_size=512,
        prompt_embed_dim=128,
        mask_in_chans=16,
        decoder_num_heads=4,
        decoder_mlp_dim=512,
        iou_head_hidden_dim=128,
    )


@register_config("segany_default_v3")
def segany_default_v3() -> SamConfig:
    """``segany_default_v2`` with SAM 2's high-resolution features in the decoder (the trunk's stride-4
    and stride-8 maps): the shipped default model since 2026-12-04 (MODELS.md)."""
    return dataclasses.replace(segany_default_v2(), high_res_features=True)

