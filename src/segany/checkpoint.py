"""Loading and saving models.

``load_model`` accepts a known name ("default", "vit_b" config names for random init are NOT loaded
silently), an official SAM ``.pth``, MobileSAM's ``.pt`` or our ``.safetensors``. The architecture is
read from the tensors themselves, so no model type is needed. Pickles are opened with
``torch.load(weights_only=True)``: a file that carries code is refused without running it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from segany.errors import SegAnyError
from segany.modeling.build import build_sam
from segany.modeling.config import EfficientNetConfig, SamConfig, TinyViTConfig, ViTConfig
from segany.modeling.efficientnet import variant_in_state_dict
from segany.modeling.sam import Sam, model_weights

WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_METADATA_KEY = "segany_config"

#: Names users can pass instead of a path: name -> (file names looked for, description).
KNOWN_MODELS: dict[str, tuple[tuple[str, ...], str]] = {
    "default": (
        ("segany_default.safetensors",),
        "segany's default model (EfficientNet-Lite0, 640 px, trained by this project), shipped in the package",
    ),
    "default_v1": (
        ("segany_default_v1.safetensors",),
        "segany's first default model (TinyViT, 256 px), kept for comparison, shipped in the package",
    ),
    "vit_b": (("sam_vit_b_01ec64.pth",), "official SAM ViT-B (Meta), 375 MB"),
    "vit_l": (("sam_vit_l_0b3195.pth",), "official SAM ViT-L (Meta), 1.25 GB"),
    "vit_h": (("sam_vit_h_4b8939.pth",), "official SAM ViT-H (Meta), 2.56 GB"),
    "vit_t": (("mobile_sam.pt",), "MobileSAM TinyViT, 39 MB"),
    "sam2.1_hiera_tiny": (("sam2.1_hiera_tiny.pt",), "official SAM 2.1 Hiera-T (Meta), 38.9 M parameters"),
    "sam2.1_hiera_small": (("sam2.1_hiera_small.pt",), "official SAM 2.1 Hiera-S (Meta), 46 M parameters"),
    "sam2.1_hiera_base_plus": (("sam2.1_hiera_base_plus.pt",), "official SAM 2.1 Hiera-B+ (Meta), 80.8 M parameters"),
    "sam2.1_hiera_large": (("sam2.1_hiera_large.pt",), "official SAM 2.1 Hiera-L (Meta), 224.4 M parameters"),
    "sam2_hiera_tiny": (("sam2_hiera_tiny.pt",), "official SAM 2.0 Hiera-T (Meta), 38.9 M parameters"),
    "sam2_hiera_small": (("sam2_hiera_small.pt",), "official SAM 2.0 Hiera-S (Meta), 46 M parameters"),
    "sam2_hiera_base_plus": (("sam2_hiera_base_plus.pt",), "official SAM 2.0 Hiera-B+ (Meta), 80.8 M parameters"),
    "sam2_hiera_large": (("sam2_hiera_large.pt",), "official SAM 2.0 Hiera-L (Meta), 224.4 M parameters"),
    "sam_hq_vit_b": (("sam_hq_vit_b.pth",), "SAM-HQ ViT-B (SysCV), SAM ViT-B + HQ token"),
    "sam_hq_vit_l": (("sam_hq_vit_l.pth",), "SAM-HQ ViT-L (SysCV)"),
    "sam_hq_vit_h": (("sam_hq_vit_h.pth",), "SAM-HQ ViT-H (SysCV)"),
}

# Keys some official files carry that the model does not use (MobileSAM's classification head).
_IGNORED_KEY_PATTERNS = (re.compile(r"^image_encoder\.(norm_head|head)\."),)


def model_search_dirs() -> list[Path]:
    """Folders searched for known model files: $SEGANY_MODELS, ~/.cache/segany, the package weights."""
    dirs = []
    if os.environ.get("SEGANY_MODELS"):
        dirs += [Path(p) for p in os.environ["SEGANY_MODELS"].split(os.pathsep) if p]
    dirs += [Path.home() / ".cache" / "segany", Path.cwd(), WEIGHTS_DIR]
    return dirs


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A path for a known model name or a file path. Raises SegAnyError when nothing is found."""
    s = str(name_or_path)
    if s in KNOWN_MODELS:
        files, desc = KNOWN_MODELS[s]
        for d in model_search_dirs():
            for f in files:
                if (d / f).is_file():
                    return d / f
        where = ", ".join(str(d) for d in model_search_dirs())
        raise SegAnyError(
            f"model {s!r} ({desc}) needs the file {files[0]}; put it in one of: {where} "
            f"(or set SEGANY_MODELS), or pass its path with --model"
        )
    p = Path(s)
    if p.is_file():
        return p
    if p.is_dir() and (p / "config.json").is_file():
        return p  # a Hugging Face SamModel folder (segany.checkpoint_hf)
    if p.exists():
        raise SegAnyError(f"{p}: is not a file (nor a folder with a config.json)")
    raise SegAnyError(f"unknown model {s!r}: not a file, and not one of {', '.join(KNOWN_MODELS)}")


# ---------------------------------------------------------------------------------------------
# reading state dicts


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a checkpoint file, never unpickling code."""
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors" or (len(head) == 8 and not head.startswith(b"PK") and head[:1] != b"\x80"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            return load_file(str(path)), meta
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise SegAnyError(f"{path}: not a valid .safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text suggests weights_only=False, which is exactly what must not be done with a
        # stranger's file: say what happened in our own words.
        what = "code or objects other than tensors" if "GLOBAL" in str(e) or "global" in str(e) else "unsafe content"
        raise SegAnyError(
            f"{path}: refused: the file is a pickle that carries {what}; only plain state dicts of tensors are loaded"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for truncated/corrupt files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SegAnyError(
            f"{path}: cannot read the checkpoint ({first[:200]}); is it truncated or not a model file?"
        ) from None
    meta: dict[str, str] = {}
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        if isinstance(obj.get("model_config"), str):  # segany's training checkpoints (last.pt)
            meta[CONFIG_METADATA_KEY] = obj["model_config"]
        obj = obj["model"]  # training checkpoints wrap the weights
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SegAnyError(f"{path}: the checkpoint is not a state dict of tensors")
    return dict(obj), meta


# ---------------------------------------------------------------------------------------------
# architecture detection


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_config(sd: Mapping[str, torch.Tensor], image_size: int | None = None) -> SamConfig:
    """Read a :class:`SamConfig` off the tensors of a SAM state dict (official key layout)."""
    from segany.checkpoint_sam2 import infer_sam2_config, is_sam2_state_dict

    if is_sam2_state_dict(sd):
        return infer_sam2_config(sd, image_size)
    if "mask_decoder.hf_token.weight" in sd:  # SAM-HQ: SAM's layout plus the HQ token's tensors
        from segany.modeling.sam_hq import SamHQConfig

        base = infer_config({k: v for k, v in sd.items() if not k.startswith(_HQ_ONLY)}, image_size)
        return SamHQConfig(**vars(base))
    try:
        pe = "prompt_encoder."
        md = "mask_decoder."
        d = sd[pe + "point_embeddings.0.weight"].shape[1]
        mask_in = sd[pe + "mask_downscaling.3.weight"].shape[0]
        dec_depth = _count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\.")
        mlp_dim = sd[md + "transformer.layers.0.mlp.lin1.weight"].shape[0]
        n_mask_tokens = sd[md + "mask_tokens.weight"].shape[0]
        iou_depth = _count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.")
        iou_hidden = sd[md + "iou_prediction_head.layers.0.weight"].shape[0]
        # Heads of the decoder are not visible in the tensors; SAM uses 8 (and one per 32 channels).
        dec_heads = 8 if d >= 256 else max(1, d // 16)
        if "image_encoder.patch_embed.proj.weight" in sd:
            w = sd["image_encoder.patch_embed.proj.weight"]
            embed_dim, patch = w.shape[0], w.shape[-1]
            depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.")
            grid = sd["image_encoder.pos_embed"].shape[1]
            size = image_size or grid * patch
            rel = [sd.get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
            use_rel = rel[0] is not None
            if use_rel:
                head_dim = rel[0].shape[1]
                lengths = [r.shape[0] for r in rel]
                global_len = 2 * grid - 1
                global_idx = tuple(i for i, n in enumerate(lengths) if n == global_len)
                window_lens = [n for n in lengths if n != global_len]
                window = (window_lens[0] + 1) // 2 if window_lens else grid
            else:
                head_dim, global_idx, window = 64, (), 14
            enc: ViTConfig | TinyViTConfig | EfficientNetConfig = ViTConfig(
                embed_dim=embed_dim,
                depth=depth,
                num_heads=embed_dim // head_dim,
                patch_size=patch,
                window_size=window,
                global_attn_indexes=global_idx,
                mlp_ratio=sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
                qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd,
                use_rel_pos=use_rel,
            )
        elif "image_encoder.patch_embed.seq.0.c.weight" in sd:
            dims = [sd["image_encoder.layers.0.blocks.0.conv1.c.weight"].shape[1]]
            depths = [_count(sd, r"image_encoder\.layers\.0\.blocks\.(\d+)\.")]
            expand = sd["image_encoder.layers.0.blocks.0.conv1.c.weight"].shape[0] / dims[0]
            heads, windows = [1], [7]
            for i in range(1, 4):
                p = f"image_encoder.layers.{i}.blocks.0."
                dims.append(sd[p + "attn.norm.weight"].shape[0])
                depths.append(_count(sd, rf"image_encoder\.layers\.{i}\.blocks\.(\d+)\."))
                bias = sd[p + "attn.attention_biases"]
                heads.append(bias.shape[0])
                windows.append(int(round(bias.shape[1] ** 0.5)))
            heads[0] = heads[1] // 2 or 1  # the conv stage has no heads; keep MobileSAM's value
            enc = TinyViTConfig(
                embed_dims=tuple(dims),
                depths=tuple(depths),
                num_heads=tuple(heads),
                window_sizes=tuple(windows),
                mlp_ratio=sd["image_encoder.layers.1.blocks.0.mlp.fc1.weight"].shape[0] / dims[1],
                mbconv_expand_ratio=expand,
                local_conv_size=sd["image_encoder.layers.1.blocks.0.local_conv.c.weight"].shape[-1],
            )
            size = image_size or 1024
        elif "image_encoder.stem.weight" in sd:
            laterals = _count(sd, r"image_encoder\.lateral\.(\d+)\.")
            enc = EfficientNetConfig(
                neck_dim=sd["image_encoder.lateral.0.weight"].shape[0],
                stride=64 >> laterals,
                context_blocks=_count(sd, r"image_encoder\.context\.(\d+)\."),
                variant=variant_in_state_dict(sd),
            )
            size = image_size or 512
        else:
            raise SegAnyError(
                "no image encoder found (neither ViT 'patch_embed.proj', TinyViT 'patch_embed.seq' "
                "nor EfficientNet 'stem')"
            )
    except KeyError as e:
        raise SegAnyError(f"not a SAM checkpoint: missing tensor {e.args[0]!r}") from None
    # the mask skip is on the decoder that sees mask inputs: the correction decoder where there is one
    skip = sd.get("correction_decoder.conv_m0.weight", sd.get("mask_decoder.conv_m0.weight"))
    refiner = sd.get("point_refiner.mlp.0.weight")
    return SamConfig(
        encoder=enc,
        image_size=size,
        prompt_embed_dim=d,
        mask_in_chans=mask_in,
        decoder_depth=dec_depth,
        decoder_num_heads=dec_heads,
        decoder_mlp_dim=mlp_dim,
        num_multimask_outputs=n_mask_tokens - 1,
        iou_head_depth=iou_depth,
        iou_head_hidden_dim=iou_hidden,
        dense_prompts=sd[pe + "mask_downscaling.0.weight"].shape[1] > 1,
        high_res_features="mask_decoder.conv_s0.weight" in sd,
        mask_skip=skip is not None,
        mask_skip_prompts=skip is not None and skip.shape[1] > 1,
        correction_decoder="correction_decoder.iou_token.weight" in sd,
        point_refiner=refiner is not None,
        crop_refiner="crop_refiner.mlp.0.weight" in sd,
        second_refiner="second_refiner.mlp.0.weight" in sd,
        **({"point_refiner_hidden": refiner.shape[0]} if refiner is not None else {}),
    )


# Tensors only SAM-HQ's decoder has (the HQ token and the feature fusion).
_HQ_ONLY = tuple(
    f"mask_decoder.{n}."
    for n in ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")
)


def _to_segany_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official layouts that name tensors differently (SAM 2's ``sam_mask_decoder.*``) -> segany's names."""
    from segany.checkpoint_sam2 import image_state_dict, is_official_sam2

    return image_state_dict(sd) if is_official_sam2(sd) else sd


def _load_weights(model: Sam, sd: Mapping[str, torch.Tensor], source: str) -> None:
    sd = {k: v for k, v in sd.items() if not any(p.match(k) for p in _IGNORED_KEY_PATTERNS)}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(sd) & set(own)
        if sd[k].shape != own[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if shapes:
        problems.append(f"shape mismatches: {'; '.join(shapes[:8])}{' ...' if len(shapes) > 8 else ''}")
    if problems:
        raise SegAnyError(f"{source}: the weights do not fit the model ({' | '.join(problems)})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)


def _parse_config(text: str, where: str) -> SamConfig:
    """A SamConfig from JSON text, with errors naming ``where``."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise SegAnyError(f"{where}: the model config is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SegAnyError(f"{where}: the model config must be a JSON object")
    try:
        from segany.modeling.sam2_config import Sam2Config
        from segany.modeling.sam_hq import SamHQConfig

        families = {"sam2": Sam2Config, "sam_hq": SamHQConfig}
        return families.get(data.get("family"), SamConfig).from_dict(data)
    except SegAnyError as e:
        raise SegAnyError(f"{where}: {e}") from None


def load_model(
    name_or_path: str | os.PathLike = "default",
    device: str | torch.device = "cpu",
    config: SamConfig | None = None,
    text_head: str | os.PathLike | None = "auto",
) -> Sam:
    """Load a SAM model from a known name or a checkpoint file, in eval mode.

    Args:
        name_or_path: "default", an official model name (see ``segany models``) or a file path.
        device: where to put the model.
        config: force an architecture instead of detecting it.
        text_head: a text head file to attach as ``model.text_head``; "auto" attaches
            ``<model stem>_text.safetensors`` when it lies beside the model file; None attaches nothing.
    """
    path = resolve_model_path(name_or_path)
    if path.is_dir():
        from segany.checkpoint_hf import read_hf_sam

        sd, hf_config = read_hf_sam(path, _read_state_dict)
        meta: dict[str, str] = {}
        config = config or hf_config
    else:
        sd, meta = _read_state_dict(path)
    sd = _to_segany_names(sd)
    if config is None:
        sidecar = path.with_suffix(".json")
        if CONFIG_METADATA_KEY in meta:
            config = _parse_config(meta[CONFIG_METADATA_KEY], f"{path} (metadata {CONFIG_METADATA_KEY!r})")
        elif sidecar.is_file():
            config = _parse_config(sidecar.read_text(encoding="utf-8", errors="replace"), str(sidecar))
        else:
            config = infer_config(sd)
    try:
        model = build_sam(config)
    except ValueError as e:  # a config whose values no model has (a file's metadata, a sidecar)
        raise SegAnyError(f"{path}: the model config cannot be built ({e})") from None
    _load_weights(model, sd, str(path))
    if text_head is not None:
        from segany.checkpoint_text import attach_text_head, text_head_path

        head_file = text_head_path(path) if str(text_head) == "auto" else Path(text_head)
        if str(text_head) != "auto" or head_file.is_file():
            attach_text_head(model, head_file)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:
        raise SegAnyError(f"cannot use device {device!r}: {e}") from None
    return model.eval()


def save_model(model: Sam, path: str | os.PathLike, half: bool = False) -> None:
    """Write ``model`` as ``.safetensors`` with its config in the metadata (atomically).

    Args:
        half: store floating tensors as fp16 (halves the size; loaded back as fp32).
    """
    from safetensors.torch import save

    from segany.io.atomic import atomic_write_bytes

    if model.config is None:
        raise ValueError("the model has no config; build it with build_sam(config)")
    sd = {}
    for k, v in model_weights(model).items():
        v = v.detach().cpu().contiguous()
        if half and v.is_floating_point():
            v = v.half()
        sd[k] = v
    meta = {CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    atomic_write_bytes(path, save(sd, metadata=meta))


def load_weights(model: Sam, path: str | os.PathLike) -> Sam:
    """Load the checkpoint file ``path`` (any format :func:`load_model` reads) into ``model``, whose
    architecture must match it exactly (a clear error names the keys and shapes that differ)."""
    p = resolve_model_path(path)
    sd, _ = _read_state_dict(p)
    _load_weights(model, sd, str(p))
    return model
