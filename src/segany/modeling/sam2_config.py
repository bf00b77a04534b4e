"""SAM 2 / 2.1 configurations (image prediction): the Hiera encoder and SAM 2's heads.

A :class:`Sam2Config` is a :class:`~segany.modeling.config.SamConfig` (same prompt encoder and two-way
transformer fields) with a :class:`HieraConfig` encoder and the SAM 2 head switches. The official
sizes are registered as ``sam2.1_hiera_{t,s,b+,l}`` and ``sam2_hiera_{t,s,b+,l}``: for images, SAM 2.0
and 2.1 have the same architecture (they differ in the video memory), so both names build the same
network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from segany.errors import SegAnyError
from segany.modeling.config import SamConfig, register_config

# ImageNet statistics in [0, 1] units: SAM 2 scales pixels to [0, 1] before normalizing.
SAM2_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM2_PIXEL_STD = (0.229, 0.224, 0.225)


@dataclass
class HieraConfig:
    """Hiera trunk + FPN neck (see :class:`segany.modeling.hiera.Hiera`)."""

    kind: Literal["hiera"] = "hiera"
    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (1, 2, 7, 2)
    global_att_blocks: tuple[int, ...] = (5, 7, 9)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)
    mlp_ratio: float = 4.0
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    scalp: int = 1

    @property
    def stride(self) -> int:
        """Input pixels per cell of the embedding the decoder reads (the neck's stride-16 level)."""
        return 16


@dataclass
class Sam2Config(SamConfig):
    """A SAM 2 image model. ``prompt_embed_dim`` is the neck's ``d_model``.

    Head switches (all on in the official 2.0 / 2.1 configs):
        use_high_res_features: stride-4 and stride-8 features go into the mask upscaling.
        iou_prediction_use_sigmoid: the IoU head ends in a sigmoid.
        pred_obj_scores / pred_obj_scores_mlp: an object-score token and its head (linear or 3-layer MLP).
        dynamic_multimask_via_stability: with ``multimask_output=False``, an unstable single mask is
            replaced by the best of the three (``build_sam2``'s default post-processing).
    """

    family: Literal["sam2"] = "sam2"
    encoder: HieraConfig = field(default_factory=HieraConfig)  # type: ignore[assignment]
    pixel_mean: tuple[float, float, float] = SAM2_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM2_PIXEL_STD
    use_high_res_features: bool = True
    iou_prediction_use_sigmoid: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    directly_add_no_mem_embed: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sam2Config:
        """Inverse of ``to_dict``; unknown keys are an error."""
        d = dict(d)
        enc = dict(d.pop("encoder", {}))
        if enc.get("kind", "hiera") != "hiera":
            raise SegAnyError(f"a SAM 2 config needs a 'hiera' encoder, got {enc.get('kind')!r}")
        for what, keys, names in (
            ("encoder", enc, {f.name for f in dataclasses.fields(HieraConfig)}),
            ("model", d, {f.name for f in dataclasses.fields(cls)}),
        ):
            bad = set(keys) - names
            if bad:
                raise SegAnyError(f"unknown {what} config keys: {sorted(bad)}")
        try:
            enc = {k: tuple(v) if isinstance(v, list) else v for k, v in enc.items()}
            d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
            return cls(encoder=HieraConfig(**enc), **d)
        except TypeError as e:
            raise SegAnyError(f"invalid model config: {e}") from None


#: The official trunks, keyed by their stage depths (which the tensors show; heads, global blocks
#: and windows they do not): name, first-stage heads, global blocks, windows, background grid.
OFFICIAL_HIERA: dict[tuple[int, ...], tuple[str, int, tuple[int, ...], tuple[int, ...], tuple[int, int]]] = {
    (1, 2, 7, 2): ("t", 1, (5, 7, 9), (8, 4, 14, 7), (7, 7)),
    (1, 2, 11, 2): ("s", 1, (7, 10, 13), (8, 4, 14, 7), (7, 7)),
    (2, 3, 16, 3): ("b+", 2, (12, 16, 20), (8, 4, 14, 7), (14, 14)),
    (2, 6, 36, 4): ("l", 2, (23, 33, 43), (8, 4, 16, 8), (7, 7)),
}
_WIDTHS = {"t": 96, "s": 96, "b+": 112, "l": 144}


def hiera_config(stages: tuple[int, ...], embed_dim: int) -> HieraConfig:
    """The trunk config of an official stage layout at width ``embed_dim``."""
    _name, heads, global_blocks, windows, bkg = OFFICIAL_HIERA[tuple(stages)]
    return HieraConfig(
        embed_dim=embed_dim,
        num_heads=heads,
        stages=tuple(stages),
        global_att_blocks=global_blocks,
        window_spec=windows,
        window_pos_embed_bkg_spatial_size=bkg,
    )


def _register(stages: tuple[int, ...]) -> None:
    size = OFFICIAL_HIERA[stages][0]

    def make() -> Sam2Config:
        return Sam2Config(encoder=hiera_config(stages, _WIDTHS[size]))

    for version in ("sam2", "sam2.1"):
        register_config(f"{version}_hiera_{size}")(make)


for _stages in OFFICIAL_HIERA:
    _register(_stages)


@register_config("sam2_tiny_test")
def sam2_tiny_test() -> Sam2Config:
    """A very small SAM 2 for unit tests (random weights, 128-pixel input): the tiny layout, narrow."""
    return Sam2Config(
        HieraConfig(embed_dim=8, num_heads=1, window_spec=(4, 4, 4, 2), window_pos_embed_bkg_spatial_size=(4, 4)),
        image_size=128,
        prompt_embed_dim=32,
        mask_in_chans=8,
        decoder_num_heads=2,
        decoder_mlp_dim=64,
        iou_head_hidden_dim=32,
    )
