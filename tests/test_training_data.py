"""Tests for segany.training.{augment,data,pack}: tiny folders in tmp_path, small image sizes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from segany.errors import SegAnyError
from segany.io.labelmaps import LabelMapFolder
from segany.io.rle import encode_rle
from segany.training.augment import (
    AugmentConfig,
    get_preprocess_shape,
    sample_geometry,
    warp_image,
    warp_label_map,
    warp_masks,
)
from segany.training.data import (
    CocoInstancesDataset,
    ItemConfig,
    LabelMapDataset,
    MixedDataset,
    SA1BDataset,
    collate_samples,
    to_training_item,
)
from segany.training.pack import main as pack_main
from segany.training.pack import pack_dataset

S = 64
COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (255, 255, 0)}


def _scene(h: int = 48, w: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """An image whose pixels are a unique colour per label (so alignment can be checked)."""
    lm = np.zeros((h, w), np.uint8)
    lm[5:20, 5:30] = 1
    lm[25:45, 10:40] = 2
    lm[10:40, 50:75] = 3
    lm[0:3, 0:3] = 4  # tiny: dropped after downscaling
    lm[44:48, 70:80] = 255
    img = np.full((h, w, 3), 128, np.uint8)
    for k, c in COLOURS.items():
        img[lm == k] = c
    return img, lm


def _make_folder(root: Path, n: int = 3) -> Path:
    for sub in ("images", "masks", "meta", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    img, lm = _scene()
    for i in range(n):
        Image.fromarray(img).save(root / "images" / f"s{i}.png")
        Image.fromarray(lm).save(root / "masks" / f"s{i}.png")
        (root / "meta" / f"s{i}.json").write_text(json.dumps({"1": "red", "2": "green", "3": "blue"}))
    (root / "splits" / "train.txt").write_text("".join(f"s{i}\n" for i in range(n)))
    return root


def test_preprocess_shape() -> None:
    assert get_preprocess_shape(480, 640, 1024) == (768, 1024)
    assert get_preprocess_shape(640, 480, 64) == (64, 48)


def test_validation_item_is_resize_and_pad() -> None:
    img, lm = _scene()
    item = to_training_item(img, ItemConfig(image_size=S, max_masks=5, min_area=12), label_map=lm)
    assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.uint8
    assert item["masks"].shape == (5, S, S) and item["masks"].dtype == torch.bool
    assert item["valid_hw"].tolist() == [38, 64]  # 48x80 -> longest side 64
    assert item["mask_valid"].tolist() == [True, True, True, False, False]
    assert item["mask_ids"].tolist() == [1, 2, 3, -1, -1]
    assert not item["image"][:, 38:].any() and not item["masks"][:, 38:].any()
    assert item["ignore"].any() and not item["ignore"][:38, :40].any()


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_keeps_alignment(seed: int) -> None:
    img, lm = _scene()
    aug = AugmentConfig(scale_min=0.5, scale_max=2.0, hflip_p=0.5, color_p=0.0)
    cfg = ItemConfig(image_size=S, max_masks=8, min_area=4, augment=aug)
    item = to_training_item(img, cfg, np.random.default_rng(seed), label_map=lm, names_by_id={1: "a", 3: "c"})
    im = item["image"].permute(1, 2, 0).numpy().astype(int)
    for j in np.flatnonzero(item["mask_valid"].numpy()):
        lab = int(item["mask_ids"][j])
        m = item["masks"][j].numpy()
        # pixels inside the mask (away from its edge) have exactly the label's colour
        inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
        if inner.any():
            assert (np.abs(im[inner] - np.array(COLOURS[lab])).max(axis=1) <= 1).all()
        assert item["names"][j] == {1: "a", 3: "c"}.get(lab)
    vh, vw = item["valid_hw"].tolist()
    assert not item["image"][:, vh:].any() and not item["image"][:, :, vw:].any()


def test_mask_stack_matches_label_map() -> None:
    img, lm = _scene()
    rng = np.random.default_rng(3)
    geom = sample_geometry(48, 80, S, AugmentConfig(), rng)
    wl = warp_label_map(lm, geom)
    wm = warp_masks(np.stack([lm == k for k in (1, 2, 3)]), geom)
    for i, k in enumerate((1, 2, 3)):
        assert np.array_equal(wm[i], wl == k)
    assert warp_image(img, geom).shape == (S, S, 3)
    assert warp_masks(np.zeros((0, 48, 80), bool), geom).shape == (0, S, S)
    many = np.random.default_rng(0).random((300, 48, 80)) > 0.5  # > 32 byte planes
    assert np.array_equal(warp_masks(many, geom)[299], warp_masks(many[299:], geom)[0])


def test_zoomed_crop_fills_the_frame_with_one_object() -> None:
    """zoom_p=1: the window is a drawn object's box grown by the context factor, so that object fills the
    output (here 1.5 x its box: about (1/1.5)^2 of it on an axis); image and masks stay aligned."""
    h, w = 300, 400
    lm = np.zeros((h, w), np.uint8)
    lm[200:230, 300:320] = 1  # a 20 x 30 object near the bottom right
    img = np.full((h, w, 3), 90, np.uint8)
    img[lm == 1] = (250, 20, 20)
    zoom = AugmentConfig(zoom_p=1.0, zoom_context_min=1.5, zoom_context_max=1.5, zoom_max_scale=10.0, hflip_p=0.0,
                         color_p=0.0)
    cfg = ItemConfig(image_size=S, max_masks=4, min_area=1, augment=zoom)
    item = to_training_item(img, cfg, np.random.default_rng(0), label_map=lm, names_by_id={1: "a"})
    mask = item["masks"][0].numpy()
    assert item["mask_valid"].tolist() == [True, False, False, False]
    ys, xs = np.nonzero(mask)
    assert ys.max() - ys.min() + 1 == pytest.approx(S / 1.5, abs=2)  # its longer side spans 1/1.5 of S
    assert abs((ys.min() + ys.max()) / 2 - S / 2) <= 2 and abs((xs.min() + xs.max()) / 2 - S / 2) <= 2
    im = item["image"].numpy().transpose(1, 2, 0).astype(int)
    inner = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
    assert (np.abs(im[inner] - (250, 20, 20)).max(axis=1) <= 1).all()
    near = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0  # the bilinear edge blends
    assert (np.abs(im[~near] - 90).max(axis=1) <= 1).all()  # the window lies inside the image: no padding
    # plain jitter at the same sizes leaves it a few pixels wide
    plain = ItemConfig(image_size=S, max_masks=4, min_area=1, augment=AugmentConfig(hflip_p=0.0, color_p=0.0))
    small = to_training_item(img, plain, np.random.default_rng(0), label_map=lm)["masks"][0].numpy()
    assert small.sum() * 20 < mask.sum()
    # a tiny object is enlarged at most zoom_max_scale times the plain resize
    lm2 = np.zeros((h, w), np.uint8)
    lm2[100:102, 100:102] = 1
    capped = ItemConfig(image_size=S, max_masks=1, min_area=1, augment=AugmentConfig(zoom_p=1.0, zoom_max_scale=4.0))
    geom_item = to_training_item(img, capped, np.random.default_rng(1), label_map=lm2)
    assert int(geom_item["masks"][0].sum()) <= (2 * S / w * 4 + 1) ** 2
    # an object as large as the image is not shrunk below the plain resize
    whole = np.ones((h, w), np.uint8)
    big = to_training_item(img, ItemConfig(image_size=S, max_masks=1, min_area=1, max_coverage=1.0, augment=zoom),
                           np.random.default_rng(2), label_map=whole)
    assert big["valid_hw"].tolist() == [S * h // w, S]


def test_zoom_options_are_checked() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        AugmentConfig(zoom_p=1.5)
    with pytest.raises(ValueError, match="zoom_context_min"):
        AugmentConfig(zoom_context_min=0.4)


def test_large_masks_dropped_and_cap() -> None:
    img = np.zeros((40, 40, 3), np.uint8)
    big = np.ones((40, 40), bool)
    big[0, 0] = False  # 99.9 % > 90 %
    small = [np.zeros((40, 40), bool) for _ in range(10)]
    for i, m in enumerate(small):
        m[i * 4 : i * 4 + 3, 5:20] = True
    masks = np.stack([big, *small])
    cfg = ItemConfig(image_size=40, max_masks=4, min_area=4)
    item = to_training_item(img, cfg, masks=masks)
    assert 0 not in item["mask_ids"].tolist()
    assert item["mask_valid"].sum() == 4
    aug = ItemConfig(image_size=40, max_masks=4, min_area=1, augment=AugmentConfig(scale_min=1, scale_max=1))
    seen = set()
    for seed in range(8):
        it = to_training_item(img, aug, np.random.default_rng(seed), masks=masks)
        ids = [i for i in it["mask_ids"].tolist() if i >= 0]
        assert len(ids) == 4 and 0 not in ids
        seen |= set(ids)
    assert len(seen) > 4  # a random subset each time
    lazy = [(lambda m=m: m) for m in masks]
    it = to_training_item(img, aug, np.random.default_rng(0), masks=lazy)
    assert it["mask_valid"].sum() == 4 and 0 not in it["mask_ids"].tolist()


def test_min_area_drops_tiny() -> None:
    img, lm = _scene()
    item = to_training_item(img, ItemConfig(image_size=S, max_masks=8, min_area=8), label_map=lm)
    assert 4 not in item["mask_ids"].tolist()


def test_label_map_dataset_and_collate(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "ds")
    ds = LabelMapDataset(root, "train", image_size=S, max_masks=4, augment=AugmentConfig(), seed=1)
    assert len(ds) == 3 and ds.name == "ds"
    a, b = ds[0], ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], a["image"])
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_samples)))
    assert batch["image"].shape == (2, 3, S, S) and batch["masks"].shape == (2, 4, S, S)
    assert isinstance(batch["names"], list) and len(batch["names"][0]) == 4
    assert batch["source"][0] == "ds:s0"
    with pytest.raises(IndexError):
        ds[3]


def test_mixed_dataset(tmp_path: Path) -> None:
    a = LabelMapDataset(_make_folder(tmp_path / "a"), image_size=S)
    b = LabelMapDataset(_make_folder(tmp_path / "b", n=2), image_size=S)
    mix = MixedDataset([a, b], weights=[0.0, 1.0], length=10, seed=0)
    assert len(mix) == 10 and all(mix.locate(i)[0] == 1 for i in range(10))
    assert mix[0]["source"].startswith("b:")
    mix = MixedDataset([a, b], weights=[1, 1], length=200, seed=0)
    picks = [mix.locate(i)[0] for i in range(200)]
    assert 60 < sum(picks) < 140
    with pytest.raises(ValueError):
        MixedDataset([a, b], weights=[0, 0])


def test_sa1b_dataset(tmp_path: Path) -> None:
    img, lm = _scene()
    Image.fromarray(img).save(tmp_path / "sa_1.jpg")
    anns = []
    for k in (1, 2, 3):
        m = lm == k
        ys, xs = np.nonzero(m)
        anns.append(
            {
                "id": k,
                "segmentation": encode_rle(m),
                "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                "area": int(m.sum()),
            }
        )
    info = {"image_id": 1, "width": 80, "height": 48, "file_name": "sa_1.jpg"}
    (tmp_path / "sa_1.json").write_text(json.dumps({"image": info, "annotations": anns}))
    ds = SA1BDataset(tmp_path, image_size=S, max_masks=4)
    item = ds[0]
    assert item["mask_valid"].sum() == 3
    assert item["masks"][0].sum() > 0
    bad = dict(info, width=81)
    (tmp_path / "sa_1.json").write_text(json.dumps({"image": bad, "annotations": anns}))
    with pytest.raises(SegAnyError):
        ds[0]


def test_coco_dataset(tmp_path: Path) -> None:
    img, lm = _scene()
    Image.fromarray(img).save(tmp_path / "000001.png")
    m1, m2 = lm == 1, lm == 2
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": encode_rle(m1),
         "area": int(m1.sum()), "bbox": [5, 5, 25, 15]},
        {"id": 2, "image_id": 1, "category_id": 7, "iscrowd": 1, "segmentation": encode_rle(m2),
         "area": int(m2.sum()), "bbox": [10, 25, 30, 20]},
        {"id": 3, "image_id": 1, "category_id": 8, "iscrowd": 0,
         "segmentation": [[50, 10, 75, 10, 75, 40, 50, 40]], "area": 750, "bbox": [50, 10, 25, 30]},
    ]  # fmt: skip
    coco = {
        "images": [{"id": 1, "file_name": "000001.png", "height": 48, "width": 80}],
        "annotations": anns,
        "categories": [{"id": 7, "name": "cat"}, {"id": 8, "name": "dog"}],
    }
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    ds = CocoInstancesDataset(tmp_path / "inst.json", tmp_path, image_size=S, max_masks=4)
    item = ds[0]
    assert item["mask_valid"].sum() == 2
    assert item["names"][:2] == ["cat", "dog"]
    assert item["ignore"].sum() > 100  # the crowd region
    with pytest.raises(SegAnyError):
        CocoInstancesDataset(tmp_path / "inst.json", tmp_path, stems=["nope"])


def test_pack_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "src"
    for sub in ("images", "masks", "meta", "splits"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    lm = np.zeros((300, 400), np.uint16)
    lm[50:250, 100:300] = 7
    lm[0:40, 0:40] = 300
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(root / "images" / "a.jpg")
    Image.fromarray(lm).save(root / "masks" / "a.png")
    (root / "meta" / "a.json").write_text('{"7": "thing"}')
    (root / "splits" / "train.txt").write_text("a\n")
    out = tmp_path / "pack"
    m = pack_dataset([(root, "train")], out, max_side=100)
    assert m["images"] == 1 and m["bytes"] > 0
    packed = LabelMapFolder(out / "src", "train")
    s = packed.load("a")
    assert s.image.shape == (75, 100, 3)
    assert list(s.ids) == [7, 300] and s.names == ["thing", None]
    assert s.masks[0].sum() == 50 * 50
    mtime = (out / "src" / "images" / "a.jpg").stat().st_mtime_ns
    m2 = pack_dataset([(root, "train")], out, max_side=100)  # resumes: nothing rewritten
    assert m2["sources"][0]["written"] == 0
    assert (out / "src" / "images" / "a.jpg").stat().st_mtime_ns == mtime
    assert pack_main([str(tmp_path / "p2"), f"{root}:train", "--max-side", "64"]) == 0
    assert pack_main([str(tmp_path / "p3"), f"{root}:nosplit"]) == 2
