"""Reference models (the official classes, small custom configs, randomized weights) and checkpoints
in the official on-disk layouts."""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .shim import import_mobile_sam, import_reference


def randomize_(model: nn.Module, seed: int, extra: dict[str, float] | None = None) -> nn.Module:
    """Overwrite EVERY floating parameter and buffer so that parity is non-trivial: no zero tables
    (rel-pos, TinyViT attention biases, ViT pos_embed), no unit norms, no default BN statistics.

    Scales keep activations O(1): weights N(0, 1/fan_in), biases N(0, 0.05), norm weights 1 + N(0, 0.1),
    embeddings N(0, 1), rel-pos N(0, 0.1), attention biases N(0, 0.5), BN running var U(0.5, 1.5).
    ``extra``: scales for other named tensors (e.g. SAM 2's ``no_mem_embed``), drawn N(0, scale^2).
    """
    g = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    with torch.no_grad():
        for mname, module in model.named_modules():
            tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for name, t in tensors:
                full = f"{mname}.{name}" if mname else name
                if not t.is_floating_point():
                    continue  # num_batches_tracked, attention_bias_idxs
                if name == "running_var":
                    new = 0.5 + torch.rand(t.shape, generator=g)
                elif name == "running_mean" or name in ("rel_pos_h", "rel_pos_w"):
                    new = 0.1 * randn(t.shape)
                elif name == "attention_biases":
                    new = 0.5 * randn(t.shape)
                elif name == "pos_embed":
                    new = 0.2 * randn(t.shape)
                elif name == "positional_encoding_gaussian_matrix":
                    new = randn(t.shape)
                elif name == "ab":
                    continue  # TinyViT eval-mode cache of attention_biases, refreshed below
                elif name in ("pixel_mean", "pixel_std"):
                    continue  # fixed constants, not in the state dict
                elif isinstance(module, nn.Embedding):
                    new = randn(t.shape)
                elif name == "weight" and t.ndim == 1:  # LayerNorm / LayerNorm2d / BatchNorm
                    new = 1.0 + 0.1 * randn(t.shape)
                elif name == "bias" and t.ndim == 1:
                    new = 0.05 * randn(t.shape)
                elif name == "weight" and t.ndim >= 2:
                    fan_in = t.shape[1] * math.prod(t.shape[2:])
                    if isinstance(module, nn.ConvTranspose2d):  # weight is in x out x k x k, stride k
                        fan_in = t.shape[0]
                    new = randn(t.shape) / math.sqrt(fan_in)
                elif extra and name in extra:
                    new = extra[name] * randn(t.shape)
                else:
                    raise AssertionError(f"randomize_: no rule for {full} {tuple(t.shape)}")
                t.copy_(new)
    model.eval()  # re-creates TinyViT's eval-mode ``ab`` cache from the new attention_biases
    return model


def _prompt_and_decoder(
    sam_pkg: types.ModuleType,
    image_size: int,
    prompt_embed_dim: int,
    mask_in_chans: int,
    decoder_depth: int,
    decoder_mlp_dim: int,
    decoder_num_heads: int,
    iou_head_hidden_dim: int,
):
    m = sam_pkg.modeling
    emb = image_size // 16
    prompt_encoder = m.PromptEncoder(
        embed_dim=prompt_embed_dim,
        image_embedding_size=(emb, emb),
        input_image_size=(image_size, image_size),
        mask_in_chans=mask_in_chans,
    )
    mask_decoder = m.MaskDecoder(
        num_multimask_outputs=3,
        transformer=m.TwoWayTransformer(
            depth=decoder_depth, embedding_dim=prompt_embed_dim, mlp_dim=decoder_mlp_dim, num_heads=decoder_num_heads
        ),
        transformer_dim=prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=iou_head_hidden_dim,
    )
    return prompt_encoder, mask_decoder


def reference_vit_encoder(
    m: types.ModuleType,
    embed_dim: int,
    depth: int,
    num_heads: int,
    global_attn_indexes: Sequence[int],
    image_size: int,
    window_size: int,
    out_chans: int,
) -> nn.Module:
    """``m.ImageEncoderViT`` (``m``: a reference package's ``modeling``) as the official builders make it."""
    return m.ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=list(global_attn_indexes),
        window_size=window_size,
        out_chans=out_chans,
    )


def build_reference_vit(
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    image_size: int = 1024,
    window_size: int = 14,
    prompt_embed_dim: int = 256,
    mask_in_chans: int = 16,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    iou_head_hidden_dim: int = 256,
    seed: int = 0,
):
    """The official ``segment_anything`` Sam (built as its ``_build_sam`` does, with these params) with
    randomized weights, in eval mode. The defaults are vit_b."""
    sa = import_reference()
    m = sa.modeling
    prompt_encoder, mask_decoder = _prompt_and_decoder(
        sa,
        image_size,
        prompt_embed_dim,
        mask_in_chans,
        decoder_depth,
        decoder_mlp_dim,
        decoder_num_heads,
        iou_head_hidden_dim,
    )
    sam = m.Sam(
        image_encoder=reference_vit_encoder(
            m, embed_dim, depth, num_heads, global_attn_indexes, image_size, window_size, prompt_embed_dim
        ),
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return randomize_(sam, seed)


def _forward_features_any_size(self, x: torch.Tensor) -> torch.Tensor:
    # MobileSAM's TinyViT.forward_features with ``x.view(B, 64, 64, C)`` replaced by the real size.
    x = self.patch_embed(x)
    x = self.layers[0](x)
    for i in range(1, len(self.layers)):
        x = self.layers[i](x)
    b, _, c = x.size()
    s = self.img_size // 16
    x = x.view(b, s, s, c).permute(0, 3, 1, 2)
    return self.neck(x)


def build_reference_tiny_vit(
    embed_dims: Sequence[int] = (64, 128, 160, 320),
    depths: Sequence[int] = (2, 2, 6, 2),
    num_heads: Sequence[int] = (2, 4, 5, 10),
    window_sizes: Sequence[int] = (7, 7, 14, 7),
    image_size: int = 1024,
    mask_in_chans: int = 16,
    decoder_depth: int = 2,
    decoder_mlp_dim: int = 2048,
    decoder_num_heads: int = 8,
    iou_head_hidden_dim: int = 256,
    seed: int = 0,
):
    """MobileSAM's Sam with a TinyViT encoder (built as its ``build_sam_vit_t``, with these params) and
    randomized weights, in eval mode. The defaults are vit_t (MobileSAM).

    MobileSAM's TinyViT has two hard-coded assumptions: ``forward_features`` views the tokens as
    ``64 x 64`` (i.e. a 1024 input), and PatchMerging uses stride 1 only when ``out_dim`` is 320, 448 or
    576 (so ``embed_dims[3]`` must be one of those and ``embed_dims[2]`` must not). The prompt embed dim
    is 256 because its neck is hard-coded to 256 channels. At ``image_size == 1024`` the model is used
    exactly as shipped; for another size this instance's ``forward_features`` is replaced by a copy
    that only swaps the ``64`` for ``image_size // 16`` (the rest of the network already follows
    ``img_size``). Note that a TinyViT checkpoint carries no trace of its input size: a loader that is
    not told the size must assume MobileSAM's 1024, so the checkpoint tests use 1024.
    """
    if embed_dims[3] not in (320, 448, 576) or embed_dims[2] in (320, 448, 576):
        raise ValueError("MobileSAM's PatchMerging needs embed_dims[3] in (320, 448, 576), embed_dims[2] not")
    ms = import_mobile_sam()
    m = ms.modeling
    prompt_encoder, mask_decoder = _prompt_and_decoder(
        ms, image_size, 256, mask_in_chans, decoder_depth, decoder_mlp_dim, decoder_num_heads, iou_head_hidden_dim
    )
    encoder = m.TinyViT(
        img_size=image_size,
        in_chans=3,
        num_classes=1000,
        embed_dims=list(embed_dims),
        depths=list(depths),
        num_heads=list(num_heads),
        window_sizes=list(window_sizes),
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    if image_size != 1024:
        encoder.forward_features = types.MethodType(_forward_features_any_size, encoder)
    sam = m.Sam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return randomize_(sam, seed)


def save_official_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """``torch.save(model.state_dict(), path)``: the layout of the official ``sam_vit_*.pth`` files.
    For a MobileSAM model the state dict keeps the unused classifier keys (``image_encoder.norm_head.*``,
    ``image_encoder.head.*``), as ``mobile_sam.pt`` does."""
    path = Path(path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path
