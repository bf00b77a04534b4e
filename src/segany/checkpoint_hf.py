"""Hugging Face ``SamModel`` folders (``facebook/sam-vit-{base,large,huge}``: ``config.json`` +
``model.safetensors``): the architecture from ``config.json``, the tensors renamed to segany's (= the
official SAM) names.

transformers' names differ from the official ones only by renaming (``vision_encoder.layers.N.layer_norm1``
-> ``image_encoder.blocks.N.norm1``, ``mask_embed.conv1`` -> ``mask_downscaling.0``, MLP ``proj_in`` /
``layers.i`` / ``proj_out`` -> ``layers.0`` / ``layers.i+1`` / ``layers.last``, ...); the
``shared_image_embedding`` is the prompt encoder's Gaussian matrix (tied: a file holds it once or twice).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from segany.errors import SegAnyError
from segany.modeling.config import SamConfig, ViTConfig

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# Plain renames, applied in order to every key (regex -> replacement).
_RENAMES = [
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^image_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^image_encoder\.layers\.", "image_encoder.blocks."),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    (
        r"^prompt_encoder\.shared_embedding\.positional_embedding$",
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    ),
    (r"^prompt_encoder\.mask_embed\.conv1\.", "prompt_encoder.mask_downscaling.0."),
    (r"^prompt_encoder\.mask_embed\.layer_norm1\.", "prompt_encoder.mask_downscaling.1."),
    (r"^prompt_encoder\.mask_embed\.conv2\.", "prompt_encoder.mask_downscaling.3."),
    (r"^prompt_encoder\.mask_embed\.layer_norm2\.", "prompt_encoder.mask_downscaling.4."),
    (r"^prompt_encoder\.mask_embed\.conv3\.", "prompt_encoder.mask_downscaling.6."),
    (r"^prompt_encoder\.point_embed\.", "prompt_encoder.point_embeddings."),
    (r"^(mask_decoder\.transformer\.layers\.\d+\.)layer_norm(\d)\.", r"\1norm\2."),
    (r"^mask_decoder\.transformer\.layer_norm_final_attn\.", "mask_decoder.transformer.norm_final_attn."),
    (r"^mask_decoder\.upscale_conv1\.", "mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "mask_decoder.output_upscaling.3."),
]
_MLP = re.compile(
    r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.(proj_in|layers\.(\d+)|proj_out)\."
)


def is_hf_sam_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SegAnyError(f"{path}: cannot read the config ({e})") from None
    if not isinstance(data, dict):
        raise SegAnyError(f"{path}: the config is not a JSON object")
    return data


def hf_sam_config(folder: Path) -> SamConfig:
    """The :class:`SamConfig` of a ``SamModel`` folder's ``config.json``."""
    data = _read_json(folder / "config.json")
    if data.get("model_type") != "sam":
        raise SegAnyError(f"{folder}: config.json is a {data.get('model_type')!r} model, not transformers' 'sam'")
    try:
        v, p, m = data["vision_config"], data.get("prompt_encoder_config", {}), data.get("mask_decoder_config", {})
        width = v.get("hidden_size", 768)
        return SamConfig(
            encoder=ViTConfig(
                embed_dim=width,
                depth=v.get("num_hidden_layers", 12),
                num_heads=v.get("num_attention_heads", 12),
                patch_size=v.get("patch_size", 16),
                window_size=v.get("window_size", 14),
                global_attn_indexes=tuple(v.get("global_attn_indexes", (2, 5, 8, 11))),
                mlp_ratio=v.get("mlp_dim", width * 4) / width,
                qkv_bias=v.get("qkv_bias", True),
                use_rel_pos=v.get("use_rel_pos", True),
            ),
            image_size=v.get("image_size", 1024),
            prompt_embed_dim=p.get("hidden_size", v.get("output_channels", 256)),
            mask_in_chans=p.get("mask_input_channels", 16),
            decoder_depth=m.get("num_hidden_layers", 2),
            decoder_num_heads=m.get("num_attention_heads", 8),
            decoder_mlp_dim=m.get("mlp_dim", 2048),
            num_multimask_outputs=m.get("num_multimask_outputs", 3),
            iou_head_depth=m.get("iou_head_depth", 3),
            iou_head_hidden_dim=m.get("iou_head_hidden_dim", 256),
        )
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise SegAnyError(f"{folder}: config.json is not a SAM config ({e!r})") from None


def segany_names(sd: dict[str, torch.Tensor], mlp_depths: dict[str, int]) -> dict[str, torch.Tensor]:
    """transformers' ``SamModel`` tensor names -> segany's. ``mlp_depths``: layers of each MLP prefix."""
    out = {}
    for key, value in sd.items():
        # The prompt encoder's Gaussian matrix is the image embedding's too: a file may hold either name.
        key = key.replace("shared_image_embedding.", "prompt_encoder.shared_embedding.")
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        m = _MLP.match(key)
        if m:
            prefix, part = m.group(1), m.group(2)
            if part == "proj_in":
                i = 0
            elif part == "proj_out":
                i = mlp_depths[prefix] - 1
            else:
                i = int(m.group(3)) + 1
            key = f"{prefix}.layers.{i}." + key[m.end() :]
        out[key] = value
    return out


def read_hf_sam(folder: Path, read_file) -> tuple[dict[str, torch.Tensor], SamConfig]:
    """Tensors (segany's names) and config of a ``SamModel`` folder. ``read_file(path) -> (sd, meta)`` reads
    one weights file safely (``segany.checkpoint._read_state_dict``)."""
    config = hf_sam_config(folder)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise SegAnyError(f"{folder}: no {' or '.join(WEIGHT_FILES)} beside config.json (sharded files are not read)")
    sd, _ = read_file(weights)
    depths = {f"mask_decoder.output_hypernetworks_mlps.{i}": 3 for i in range(config.num_multimask_outputs + 1)}
    depths["mask_decoder.iou_prediction_head"] = config.iou_head_depth
    return segany_names(sd, depths), config
