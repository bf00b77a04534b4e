"""Tests for segany.io.labelmaps (tiny folders built in tmp_path; one optional real-data test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segany.errors import SegAnyError
from segany.io.labelmaps import (
    LabelMapFolder,
    Sample,
    find_label_map_folders,
    read_label_map,
    split_label_map,
)

SHARED = Path(__file__).parents[2] / "shared" / "data"


def _write(root: Path, stem: str, lm: np.ndarray, meta=None, suffix: str = ".jpg", img_hw=None) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    h, w = img_hw or lm.shape
    img = np.full((h, w, 3), 100, np.uint8)
    Image.fromarray(img).save(root / "images" / f"{stem}{suffix}")
    Image.fromarray(lm).save(root / "masks" / f"{stem}.png")
    if meta is not None:
        (root / "meta").mkdir(exist_ok=True)
        (root / "meta" / f"{stem}.json").write_text(json.dumps(meta))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    lm = np.zeros((8, 10), np.uint8)
    lm[1:3, 1:4] = 1
    lm[4:7, 5:9] = 3
    lm[0, 9] = 255
    _write(root, "a", lm, meta={"1": "cat", "3": "dog"})
    lm2 = np.zeros((6, 6), np.uint8)
    lm2[2:4, 2:4] = 2
    _write(root, "b", lm2, suffix=".png")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("a\n")
    (root / "splits" / "val.txt").write_text("b\n\n")
    return root


def test_load_uint8(folder: Path) -> None:
    ds = LabelMapFolder(folder)
    assert ds.stems == ["a", "b"] and len(ds) == 2
    s = ds.load("a")
    assert isinstance(s, Sample)
    assert s.image.shape == (8, 10, 3) and s.image.dtype == np.uint8
    assert s.masks.shape == (2, 8, 10) and s.masks.dtype == bool
    assert s.names == ["cat", "dog"]
    assert list(s.ids) == [1, 3]
    assert s.masks[0].sum() == 6 and s.masks[1].sum() == 12
    assert s.ignore.sum() == 1 and s.ignore[0, 9]
    b = ds[1]
    assert b.stem == "b" and b.names == [None] and b.masks.shape == (1, 6, 6)


def test_splits(folder: Path) -> None:
    assert LabelMapFolder(folder, "train").stems == ["a"]
    assert LabelMapFolder(folder, "val").stems == ["b"]
    with pytest.raises(SegAnyError, match="no split 'test'.*train, val"):
        LabelMapFolder(folder, "test")
    with pytest.raises(SegAnyError, match="bad split"):
        LabelMapFolder(folder, "../x")
    (folder / "splits" / "bad.txt").write_text("zzz\n")
    with pytest.raises(SegAnyError, match="zzz"):
        LabelMapFolder(folder, "bad")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SegAnyError, match="no such data folder"):
        LabelMapFolder(tmp_path / "nope")
    (tmp_path / "x" / "images").mkdir(parents=True)
    with pytest.raises(SegAnyError, match="no masks/"):
        LabelMapFolder(tmp_path / "x")


def test_size_mismatch(tmp_path: Path) -> None:
    _write(tmp_path, "a", np.zeros((5, 5), np.uint8), img_hw=(6, 5))
    with pytest.raises(SegAnyError, match="mask is 5x5 but its image"):
        LabelMapFolder(tmp_path).load("a")


def test_uint16_and_panoptic_meta(tmp_path: Path) -> None:
    lm = np.zeros((6, 7), np.uint16)
    lm[0:2, :] = 1
    lm[2:4, :] = 300
    lm[4:6, :3] = 2
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "meta").mkdir()
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(tmp_path / "images" / "p.jpg")
    Image.fromarray(lm).save(tmp_path / "masks" / "p.png")
    assert read_label_map(tmp_path / "masks" / "p.png").dtype == np.uint16
    segs = [
        {"instance_label": 1, "category": "person", "iscrowd": False},
        {"instance_label": 2, "category": "people", "iscrowd": True},
        {"instance_label": 300, "category": "car", "iscrowd": False},
        {"instance_label": None, "category": "sky", "iscrowd": False},
    ]
    (tmp_path / "meta" / "p.json").write_text(json.dumps({"segments": segs}))
    s = LabelMapFolder(tmp_path).load("p")
    assert list(s.ids) == [1, 300] and s.names == ["person", "car"]
    assert s.ignore.sum() == 6  # the crowd region
    s2 = LabelMapFolder(tmp_path, crowd_as_ignore=False).load("p")
    assert list(s2.ids) == [1, 2, 300] and s2.ignore.sum() == 0


def test_split_label_map_empty() -> None:
    m, ids, ign = split_label_map(np.zeros((3, 4), np.uint8))
    assert m.shape == (0, 3, 4) and len(ids) == 0 and not ign.any()


def test_davis_splits(tmp_path: Path) -> None:
    seqs = ["s1", "s-2", "s3", "s4", "s5", "s6", "s7"]
    (tmp_path / "sequences.txt").write_text("\n".join(seqs) + "\n")
    for q in seqs:
        for fr in ("00000", "00004"):
            _write(tmp_path, f"{q}_{fr}", np.ones((4, 4), np.uint8))
    tr = LabelMapFolder(tmp_path, "davis_train")
    va = LabelMapFolder(tmp_path, "davis_val")
    assert len(tr) == 4 and len(va) == 10
    assert {tr.sequence_of(s) for s in tr.stems} == {"s1", "s-2"}
    assert not set(tr.stems) & set(va.stems)


def test_find_folders(folder: Path, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    assert find_label_map_folders(tmp_path) == [folder]
    with pytest.raises(SegAnyError):
        find_label_map_folders(tmp_path / "nope")


@pytest.mark.skipif(not (SHARED / "coco_instances_mini").is_dir(), reason="shared data not present")
def test_real_sample() -> None:
    ds = LabelMapFolder(SHARED / "coco_instances_mini", "train")
    assert len(ds) > 0
    s = ds.load(ds.stems[0])
    assert s.image.shape[:2] == s.masks.shape[1:] == s.ignore.shape
    assert len(s.names) == len(s.masks) > 0
    assert all(isinstance(n, str) for n in s.names)
    assert all(m.any() for m in s.masks)
