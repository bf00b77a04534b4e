"""The official ``sam2`` package (PyPI, installed with ``--no-deps``) for parity tests: imported with
stand-ins for the three torchvision transforms it uses, models built by its own ``build_sam2`` from its
own hydra configs (with size overrides), random weights, checkpoints in the official layout."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import shim
from .builders import randomize_

# Parameters of SAM 2 that have no rule in randomize_ (video memory, window embedding, layer scales).
SAM2_EXTRA_SCALES = {
    "pos_embed_window": 0.2,
    "no_mem_embed": 0.5,
    "no_mem_pos_enc": 0.5,
    "maskmem_tpos_enc": 0.5,
    "no_obj_ptr": 0.5,
    "no_obj_embed_spatial": 0.5,
    "gamma": 0.1,
}
_SAM2_MODULES = ("sam2.build_sam", "sam2.sam2_image_predictor", "sam2.automatic_mask_generator")


class ToTensor:
    """``torchvision.transforms.ToTensor`` for an ``H x W x C`` uint8 array: ``C x H x W`` float in [0, 1]."""

    def __call__(self, pic: np.ndarray) -> torch.Tensor:
        if not isinstance(pic, np.ndarray) or pic.dtype != np.uint8 or pic.ndim != 3:
            raise TypeError("ToTensor stand-in only handles H x W x C uint8 arrays")
        return torch.from_numpy(pic.transpose((2, 0, 1))).contiguous().to(torch.get_default_dtype()).div(255)


class Resize(nn.Module):
    """``torchvision.transforms.Resize((h, w))`` on a ``C x H x W`` float tensor: bilinear, antialiased
    (torchvision's tensor path calls ``interpolate`` with ``antialias=True``)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = [int(size[0]), int(size[1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]


class Normalize(nn.Module):
    """``torchvision.transforms.Normalize(mean, std)`` on a ``C x H x W`` tensor."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def import_sam2() -> types.SimpleNamespace:
    """``build_sam2``, ``SAM2ImagePredictor`` and ``SAM2AutomaticMaskGenerator`` of the official package,
    imported with the stand-ins (removed again afterwards, see :mod:`.shim`)."""
    stand_ins = {"Normalize": Normalize, "Resize": Resize, "ToTensor": ToTensor}
    build, predictor, generator = (shim._import_with_stand_ins(n, stand_ins) for n in _SAM2_MODULES)
    return types.SimpleNamespace(
        build_sam2=build.build_sam2,
        SAM2ImagePredictor=predictor.SAM2ImagePredictor,
        SAM2AutomaticMaskGenerator=generator.SAM2AutomaticMaskGenerator,
    )


def build_reference_sam2(
    config: str = "configs/sam2.1/sam2.1_hiera_t.yaml",
    embed_dim: int | None = None,
    image_size: int = 1024,
    seed: int = 0,
    extra_overrides: tuple[str, ...] = (),
) -> nn.Module:
    """The official ``SAM2Base`` for an official config (``embed_dim`` overrides the trunk width, and the
    neck's channel list with it), randomized, in eval mode, on the CPU."""
    sam2 = import_sam2()
    overrides = [f"++model.image_size={image_size}", *extra_overrides]
    if embed_dim is not None:
        chans = [embed_dim * 8, embed_dim * 4, embed_dim * 2, embed_dim]
        overrides += [
            f"++model.image_encoder.trunk.embed_dim={embed_dim}",
            f"++model.image_encoder.neck.backbone_channel_list=[{','.join(map(str, chans))}]",
        ]
    model = sam2.build_sam2(config, None, device="cpu", hydra_overrides_extra=overrides)
    return randomize_(model, seed, extra=SAM2_EXTRA_SCALES)


def reference_predictor(model: nn.Module):
    """``SAM2ImagePredictor`` for ``model``, with its feature sizes for the model's input size (upstream
    hard-codes those of a 1024 input)."""
    p = import_sam2().SAM2ImagePredictor(model)
    s = model.image_size
    p._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return p


def save_official_sam2(model: nn.Module, path: str | Path) -> Path:
    """``{"model": state_dict}``: the layout of ``sam2.1_hiera_*.pt`` (what ``build_sam2`` loads)."""
    path = Path(path)
    torch.save({"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}, path)
    return path
