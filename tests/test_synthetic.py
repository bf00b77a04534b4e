"""Tests for segany.training.synthetic (small canvases, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segany.io.labelmaps import LabelMapFolder
from segany.training.augment import AugmentConfig
from segany.training.data import collate_samples
from segany.training.synthetic import (
    PALETTE,
    SHAPES,
    CopyPasteScenes,
    SyntheticScenes,
    generate_scene,
    position_name,
)

S = 96


def test_scene_masks_exact() -> None:
    for seed in range(5):
        sc = generate_scene(np.random.default_rng(seed), 80, 120, min_area=10)
        masks = sc["masks"]
        assert sc["image"].shape == (80, 120, 3) and sc["image"].dtype == np.uint8
        assert masks.dtype == bool and masks.shape[1:] == (80, 120)
        assert (masks.sum(axis=0) <= 1).all()  # disjoint after occlusion
        assert (masks.sum(axis=(1, 2)) >= 10).all()  # none empty or tiny
        assert not (sc["ignore"] & masks.any(axis=0)).any()
        assert len(sc["attributes"]) == len(sc["phrases"]) == len(masks)
        for a, ph in zip(sc["attributes"], sc["phrases"], strict=True):
            assert a["color"] in PALETTE and a["shape"] in SHAPES
            assert a["position"] in ("left", "right", "top", "bottom", "center")
            assert f"the {a['color']} {a['shape']}" in ph


def test_position_name() -> None:
    assert position_name(50, 50, 100, 100) == "center"
    assert position_name(5, 50, 100, 100) == "left"
    assert position_name(95, 40, 100, 100) == "right"
    assert position_name(50, 5, 100, 100) == "top"
    assert position_name(45, 95, 100, 100) == "bottom"


def test_synthetic_dataset_format_and_determinism() -> None:
    ds = SyntheticScenes(4, image_size=S, seed=3, max_masks=6)
    a, b = ds[1], ds[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
    assert a["image"].shape == (3, S, S) and a["masks"].shape == (6, S, S)
    other = SyntheticScenes(4, image_size=S, seed=4, max_masks=6)
    assert torch.equal(other[0]["image"], ds[1]["image"])  # item i comes from seed + i
    assert not torch.equal(ds[0]["image"], ds[1]["image"])
    n = int(a["mask_valid"].sum())
    assert n >= 1
    assert len(a["phrases"]) == 6 and all(a["phrases"][i] for i in range(n))
    assert a["phrases"][n:] == [[]] * (6 - n) and a["attributes"][n] is None if n < 6 else True
    assert (a["masks"][:n].sum(dim=(1, 2)) > 0).all()
    assert (a["masks"].sum(dim=0) <= 1).all()
    batch = collate_samples([ds[0], ds[2]])
    assert batch["masks"].shape == (2, 6, S, S) and len(batch["phrases"]) == 2


def test_synthetic_with_augmentation() -> None:
    ds = SyntheticScenes(3, image_size=S, seed=0, max_masks=8, augment=AugmentConfig())
    for i in range(3):
        it = ds[i]
        vh, vw = it["valid_hw"].tolist()
        assert not it["masks"][:, vh:].any() and not it["masks"][:, :, vw:].any()
        assert (it["masks"].sum(dim=0) <= 1).all()
    assert torch.equal(ds[2]["masks"], ds[2]["masks"])


def _folder(root: Path) -> LabelMapFolder:
    for sub in ("images", "masks", "meta"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        lm = np.zeros((60, 80), np.uint8)
        lm[10:40, 10:40] = 1
        lm[30:55, 45:75] = 2
        lm[0:5, 0:5] = 255
        img = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / f"x{i}.png")
        Image.fromarray(lm).save(root / "masks" / f"x{i}.png")
        (root / "meta" / f"x{i}.json").write_text(json.dumps({"1": "box", "2": "ball"}))
    return LabelMapFolder(root)


def test_copy_paste(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "f")
    ds = CopyPasteScenes(folder, 6, image_size=S, seed=0, max_masks=10, min_area=4)
    total_pasted = 0
    for i in range(6):
        it = ds[i]
        ids = it["mask_ids"].tolist()
        total_pasted += sum(1 for k in ids if k > 255)
        n = int(it["mask_valid"].sum())
        assert (it["masks"].sum(dim=0) <= 1).all()  # occlusion keeps masks disjoint
        assert (it["masks"][:n].sum(dim=(1, 2)) > 0).all()
        assert all(it["names"][j] in ("box", "ball") for j in range(n))
    assert total_pasted > 0
    assert torch.equal(ds[2]["image"], ds[2]["image"])
    only = CopyPasteScenes(folder, 2, image_size=S, seed=0, background_unlabelled=True, min_area=4)
    it = only[0]
    assert all(k > 255 for k in it["mask_ids"].tolist() if k >= 0)
