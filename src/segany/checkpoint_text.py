"""Saving, loading and attaching text heads (:class:`segany.modeling.text_prompt.TextHead`).

A text head lives in its own ``.safetensors`` file (config in the metadata, no pickles) next to the
model it was trained for: ``<model stem>_text.safetensors``. :func:`segany.load_model` attaches that
file when it is there, so ``load_model("default")`` answers text prompts out of the box, while the
model file itself and everything that reads it (ONNX export, parity tests) stay unchanged. It sits
beside :mod:`segany.checkpoint` (below the predictor and the text package) for that reason.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from segany.errors import SegAnyError
from segany.modeling.mask_decoder import MaskDecoder
from segany.modeling.sam import Sam
from segany.modeling.sam2_mask_decoder import Sam2MaskDecoder
from segany.modeling.text_prompt import TextHead, TextHeadConfig

METADATA_KEY = "segany_text_head"


def text_head_path(model_path: str | os.PathLike) -> Path:
    """Where the text head of the model file ``model_path`` is looked for."""
    p = Path(model_path)
    return p.with_name(f"{p.stem}_text.safetensors")


def base_fingerprint(model: Sam) -> str:
    """SHA-256 (16 hex digits) of the image encoder and prompt encoder weights the head was trained on."""
    h = hashlib.sha256()
    for name, t in sorted({**model.image_encoder.state_dict(prefix="image_encoder."),
                           **model.prompt_encoder.state_dict(prefix="prompt_encoder.")}.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().to(torch.float16).numpy().tobytes())
    return h.hexdigest()[:16]


def new_text_head(model: Sam, cfg: TextHeadConfig | None = None) -> TextHead:
    """A fresh head for ``model``: random projection, a copy of the model's mask decoder."""
    head = TextHead(cfg or TextHeadConfig(), decoder_copy(model.mask_decoder))
    return head.to(model.device)


def decoder_copy(decoder: nn.Module) -> MaskDecoder:
    """The text head's copy of the base model's mask decoder. A decoder with SAM's heads and SAM 2's
    high-resolution features is copied as SAM's plain decoder without its projections: text is decoded
    from the embedding alone, as before those features (the copy is fine-tuned with the head)."""
    if not (isinstance(decoder, Sam2MaskDecoder) and decoder.use_high_res_features):
        return copy.deepcopy(decoder)
    if decoder.pred_obj_scores or decoder.iou_prediction_use_sigmoid:
        raise SegAnyError("a text head needs SAM's decoder heads (no object score, a linear IoU head)")
    head = decoder.iou_prediction_head
    plain = MaskDecoder(
        decoder.transformer_dim,
        copy.deepcopy(decoder.transformer),
        decoder.num_multimask_outputs,
        iou_head_depth=len(head.layers),
        iou_head_hidden_dim=head.layers[0].out_features,
    )
    state = {k: v for k, v in decoder.state_dict().items() if not k.startswith(("conv_s0.", "conv_s1."))}
    plain.load_state_dict(state)
    return plain.to(next(decoder.parameters()).device)


def save_text_head(head: TextHead, model: Sam, path: str | os.PathLike, half: bool = True) -> None:
    """Write ``head`` atomically as ``.safetensors`` (fp16 by default), tied to ``model``'s weights."""
    from safetensors.torch import save

    from segany.io.atomic import atomic_write_bytes

    sd = {}
    for k, v in head.state_dict().items():
        v = v.detach().cpu().contiguous()
        sd[k] = v.half() if half and v.is_floating_point() else v
    meta = {METADATA_KEY: json.dumps({**head.config.to_dict(), "base_fingerprint": base_fingerprint(model)})}
    atomic_write_bytes(path, save(sd, metadata=meta))


def load_text_head(path: str | os.PathLike, model: Sam, check_base: bool = True) -> TextHead:
    """Read a text head for ``model``. Raises :class:`SegAnyError` for a file that is not one, or (with
    ``check_base``) one trained on other encoder weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SegAnyError(f"{path}: no such text head file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise SegAnyError(f"{path}: not a valid .safetensors file ({e})") from None
    if METADATA_KEY not in meta:
        raise SegAnyError(f"{path}: not a segany text head (no {METADATA_KEY!r} metadata)")
    try:
        info = json.loads(meta[METADATA_KEY])
        base = info.pop("base_fingerprint", None)
        cfg = TextHeadConfig(**info)
    except (ValueError, TypeError) as e:
        raise SegAnyError(f"{path}: bad text head metadata ({e})") from None
    if check_base and base is not None and base != base_fingerprint(model):
        raise SegAnyError(f"{path}: this text head was trained for other model weights")
    head = TextHead(cfg, decoder_copy(model.mask_decoder))
    own = head.state_dict()
    if set(own) != set(sd) or any(own[k].shape != sd[k].shape for k in own):
        raise SegAnyError(f"{path}: the text head does not fit this model's mask decoder")
    head.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})
    return head.to(model.device).eval()


def attach_text_head(model: Sam, path: str | os.PathLike) -> Sam:
    """Load the head at ``path`` and set it as ``model.text_head``; returns ``model``."""
    model.text_head = load_text_head(path, model)
    return model
