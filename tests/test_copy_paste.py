"""Copy-paste augmentation (segany.training.copy_paste) and its use by LabelMapDataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segany.io.labelmaps import VOID_ID
from segany.training.augment import AugmentConfig
from segany.training.copy_paste import paste_objects
from segany.training.data import LabelMapDataset


def _target() -> tuple[np.ndarray, np.ndarray]:
    lm = np.zeros((60, 80), np.uint8)
    lm[10:50, 10:70] = 1
    lm[0:4, 0:4] = VOID_ID
    return np.full((60, 80, 3), 50, np.uint8), lm


def _donor() -> tuple[np.ndarray, np.ndarray]:
    lm = np.zeros((40, 40), np.uint8)
    lm[5:15, 5:15] = 7  # an object
    lm[20:35, 20:35] = 9  # a crowd (skipped)
    lm[0:40, 38:40] = VOID_ID
    img = np.zeros((40, 40, 3), np.uint8)
    img[lm == 7] = (255, 0, 0)
    img[lm == 9] = (0, 0, 255)
    return img, lm


@pytest.mark.parametrize("seed", range(8))
def test_pasted_object_has_fresh_id_pixels_and_name(seed: int) -> None:
    img, lm = _target()
    dimg, dlm = _donor()
    out_img, out_lm, names = paste_objects(
        img,
        lm,
        {1: "table"},
        dimg,
        dlm,
        {7: "cup", 9: "people"},
        {9},
        np.random.default_rng(seed),
        scale_range=(1.0, 1.0),
    )
    assert (img == 50).all() and lm.max() == VOID_ID  # inputs untouched
    new = sorted(set(np.unique(out_lm).tolist()) - set(np.unique(lm).tolist()))
    assert len(new) == 1 and new[0] not in (0, 1, VOID_ID)  # only the object, never the crowd or void
    pasted = out_lm == new[0]
    assert pasted.any() and names[new[0]] == "cup" and names[1] == "table"
    # the pasted pixels are the donor's object colour, everything else is unchanged
    assert (out_img[pasted] == (255, 0, 0)).all()
    assert (out_img[~pasted] == 50).all() and (out_lm[~pasted] == lm[~pasted]).all()
    # scale 1.0 of the fit (the donor scaled by 1.5): the 10 x 10 object is 15 x 15, at least half inside
    assert 8 * 8 <= pasted.sum() <= 15 * 15


def test_ids_skip_void_and_widen_uint8() -> None:
    img, lm = _target()
    lm[20:22, 20:22] = 254  # the next id would be 255, the void id
    dimg, dlm = _donor()
    dlm[25:30, 5:10] = 8
    out_img, out_lm, _ = paste_objects(
        img, lm, {}, dimg, dlm, {}, {9}, np.random.default_rng(0), max_objects=2, scale_range=(1.0, 1.0)
    )
    new = set(np.unique(out_lm).tolist()) - set(np.unique(lm).tolist())
    assert VOID_ID not in new and new <= {256, 257} and out_lm.dtype == np.uint16


def test_no_eligible_object_returns_inputs() -> None:
    img, lm = _target()
    dimg, _ = _donor()
    empty = np.zeros((40, 40), np.uint8)
    out = paste_objects(img, lm, {}, dimg, empty, {}, set(), np.random.default_rng(0))
    assert out[0] is img and out[1] is lm


def test_augment_config_checks_copy_paste() -> None:
    with pytest.raises(ValueError):
        AugmentConfig(copy_paste_p=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(copy_paste_scale_min=0.9, copy_paste_scale_max=0.5)


def test_dataset_pastes_objects_of_its_folder(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for sub in ("images", "masks", "meta", "splits"):
        (root / sub).mkdir(parents=True)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i, c in enumerate(colours):
        lm = np.zeros((48, 64), np.uint8)
        lm[8:32, 8:40] = 1
        img = np.zeros((48, 64, 3), np.uint8)
        img[lm == 1] = c
        Image.fromarray(img).save(root / "images" / f"s{i}.png")
        Image.fromarray(lm).save(root / "masks" / f"s{i}.png")
        (root / "meta" / f"s{i}.json").write_text(json.dumps({"1": f"thing{i}"}))
    (root / "splits" / "train.txt").write_text("s0\ns1\ns2\n")
    quiet = dict(scale_min=1.0, scale_max=1.0, hflip_p=0.0, color_p=0.0)
    plain = LabelMapDataset(root, "train", image_size=64, max_masks=4, augment=AugmentConfig(**quiet), seed=3)
    pasting = LabelMapDataset(
        root, "train", image_size=64, max_masks=4, augment=AugmentConfig(**quiet, copy_paste_p=1.0), seed=3
    )
    assert all(int(plain[i]["mask_valid"].sum()) == 1 for i in range(3))
    items = [pasting[i] for i in range(3)]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(items, [pasting[i] for i in range(3)]))
    # every item gained a mask, whose pixels carry a colour of the folder's images
    for item in items:
        assert int(item["mask_valid"].sum()) == 2
        pasted = item["masks"][1]
        pix = item["image"].permute(1, 2, 0)[pasted]
        assert len(pix) > 0 and any((pix == torch.tensor(c, dtype=torch.uint8)).all() for c in colours)
        assert item["names"][1].startswith("thing")
