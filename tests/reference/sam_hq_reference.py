"""The SAM-HQ reference package (``segment-anything-hq``, installed with ``--no-deps``): its ``Sam`` with a
ViT encoder and ``MaskDecoderHQ`` (built as its ``_build_sam``, with these sizes), randomized weights."""

from __future__ import annotations

import types
from collections.abc import Sequence

from torch import nn

from .builders import randomize_, reference_vit_encoder
from .shim import _import_with_stand_ins


def import_sam_hq() -> types.ModuleType:
    """The ``segment_anything_hq`` package (imported with the torchvision / timm stand-ins)."""
    return _import_with_stand_ins("segment_anything_hq")


def build_reference_sam_hq(
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    image_size: int = 1024,
    window_size: int = 14,
    seed: int = 0,
) -> nn.Module:
    """``segment_anything_hq``'s Sam (the official 256-wide prompt encoder and HQ decoder; the ViT sized by
    the arguments, vit_b by default), randomized, in eval mode."""
    m = import_sam_hq().modeling
    emb = image_size // 16
    sam = m.Sam(
        image_encoder=reference_vit_encoder(
            m, embed_dim, depth, num_heads, global_attn_indexes, image_size, window_size, 256
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=256, image_embedding_size=(emb, emb), input_image_size=(image_size, image_size), mask_in_chans=16
        ),
        mask_decoder=m.MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            vit_dim=embed_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return randomize_(sam, seed)
