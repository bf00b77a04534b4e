"""SAM 2 / 2.1 checkpoints (``sam2.1_hiera_*.pt``, ``sam2_hiera_*.pt``): key layout and architecture.

The official files hold ``{"model": state_dict}`` with the image encoder under ``image_encoder.*``, the
heads under ``sam_prompt_encoder.*`` / ``sam_mask_decoder.*`` (two-way MLPs as ``mlp.layers.{0,1}``),
``no_mem_embed`` and the video modules. :func:`image_state_dict` maps the image part onto segany's names
and sets the video tensors aside (an image model has no use for them; a video predictor will load them
from the same file). :func:`infer_sam2_config` reads the architecture off the tensors; what the tensors
do not show (heads, global-attention blocks, windows) comes from the official layout with the same stage
depths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from segany.errors import SegAnyError
from segany.modeling.sam2_config import OFFICIAL_HIERA, Sam2Config, hiera_config

_TRUNK = "image_encoder.trunk."
#: Official top-level prefixes of the image model -> segany's.
_IMAGE_PREFIXES = {
    "image_encoder.": "image_encoder.",
    "sam_prompt_encoder.": "prompt_encoder.",
    "sam_mask_decoder.": "mask_decoder.",
    "no_mem_embed": "no_mem_embed",
}
_TWO_WAY_MLP = re.compile(r"^(mask_decoder\.transformer\.layers\.\d+\.mlp\.)layers\.([01])\.")


def is_sam2_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for a SAM 2 state dict (official or segany layout): it has a Hiera trunk."""
    return _TRUNK + "patch_embed.proj.weight" in sd


def is_official_sam2(sd: Mapping[str, torch.Tensor]) -> bool:
    return is_sam2_state_dict(sd) and "sam_mask_decoder.iou_token.weight" in sd


def image_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official SAM 2 state dict -> the image model's tensors under segany's names (video tensors,
    e.g. ``memory_attention.*``, ``memory_encoder.*``, ``obj_ptr_proj.*``, ``maskmem_tpos_enc``, dropped)."""
    out = {}
    for key, value in sd.items():
        for old, new in _IMAGE_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                out[_TWO_WAY_MLP.sub(lambda m: m.group(1) + ("lin1." if m.group(2) == "0" else "lin2."), key)] = value
                break
    return out


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_sam2_config(sd: Mapping[str, torch.Tensor], image_size: int | None = None) -> Sam2Config:
    """The :class:`Sam2Config` of a SAM 2 state dict in segany's names (see :func:`image_state_dict`)."""
    try:
        depth = _count(sd, r"image_encoder\.trunk\.blocks\.(\d+)\.")
        starts = [i for i in range(depth) if f"{_TRUNK}blocks.{i}.proj.weight" in sd]
        bounds = [0, *starts, depth]
        stages = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        if stages not in OFFICIAL_HIERA:
            known = ", ".join(str(list(s)) for s in OFFICIAL_HIERA)
            raise SegAnyError(
                f"SAM 2 checkpoint with Hiera stages {list(stages)}: not an official layout ({known}); "
                "its attention heads and windows are not in the tensors, so pass a config"
            )
        enc = hiera_config(stages, sd[_TRUNK + "patch_embed.proj.weight"].shape[0])
        enc.window_pos_embed_bkg_spatial_size = tuple(sd[_TRUNK + "pos_embed"].shape[-2:])
        win = sd[_TRUNK + "pos_embed_window"].shape[-1]
        enc.window_spec = (win, *enc.window_spec[1:])
        pe, md = "prompt_encoder.", "mask_decoder."
        d = sd[pe + "point_embeddings.0.weight"].shape[1]
        obj_mlp = md + "pred_obj_score_head.layers.0.weight" in sd
        return Sam2Config(
            encoder=enc,
            image_size=image_size or 1024,
            prompt_embed_dim=d,
            mask_in_chans=sd[pe + "mask_downscaling.3.weight"].shape[0],
            decoder_depth=_count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\."),
            # Heads of the decoder are not visible in the tensors; SAM 2 uses 8, as SAM.
            decoder_num_heads=8 if d >= 256 else max(1, d // 16),
            decoder_mlp_dim=sd[md + "transformer.layers.0.mlp.lin1.weight"].shape[0],
            num_multimask_outputs=sd[md + "mask_tokens.weight"].shape[0] - 1,
            iou_head_depth=_count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
            iou_head_hidden_dim=sd[md + "iou_prediction_head.layers.0.weight"].shape[0],
            use_high_res_features=md + "conv_s0.weight" in sd,
            pred_obj_scores=md + "obj_score_token.weight" in sd,
            pred_obj_scores_mlp=obj_mlp,
        )
    except KeyError as e:
        raise SegAnyError(f"not a SAM 2 checkpoint: missing tensor {e.args[0]!r}") from None
