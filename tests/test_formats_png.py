"""PNG label maps and mask PNGs: round trips (disjoint masks, small masks kept visible, uint16 ids, void)
and malformed maps (a SegAnyError that names the file and the problem)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segany.errors import SegAnyError
from segany.io.png import encode_png, label_ids, label_map_to_masks, read_label_map, write_label_map, write_mask_png
from tests.test_formats import H, W, make_masks, no_tmp_files


def test_label_map_round_trip_disjoint(tmp_path):
    masks = []
    for i in range(6):
        m = np.zeros((H, W), bool)
        m[i * 4 : i * 4 + 3, i : i + 5 + i] = True
        masks.append(m)
    ids = write_label_map(tmp_path / "l.png", masks)
    assert ids == [1, 2, 3, 4, 5, 6] and no_tmp_files(tmp_path)
    lm = read_label_map(tmp_path / "l.png")
    assert lm.dtype == np.uint8 and lm.shape == (H, W)
    back = label_map_to_masks(lm)
    assert list(back) == ids
    for i, m in zip(ids, masks):
        np.testing.assert_array_equal(back[i], m)


def test_label_map_order_keeps_small_masks_visible(tmp_path):
    big = np.zeros((H, W), bool)
    big[2:20, 2:25] = True
    small = np.zeros((H, W), bool)
    small[5:8, 5:8] = True
    write_label_map(tmp_path / "a.png", [small, big])  # default: by area, small on top
    lm = read_label_map(tmp_path / "a.png")
    assert (lm[small] == 1).all() and (lm[big & ~small] == 2).all() and (lm[~big] == 0).all()
    write_label_map(tmp_path / "g.png", [small, big], order="given")  # later on top: small hidden
    lm = read_label_map(tmp_path / "g.png")
    assert (lm[big] == 2).all() and 1 not in label_map_to_masks(lm)
    with pytest.raises(SegAnyError, match="order"):
        write_label_map(tmp_path / "x.png", [small], order="random")


def test_label_map_uint16_skips_void(tmp_path):
    n = 300
    masks = []
    for i in range(n):
        m = np.zeros((20, 20), bool)
        m.flat[i] = True
        masks.append(m)
    ids = write_label_map(tmp_path / "big.png", masks)
    assert ids == label_ids(n) and 255 not in ids and ids[254] == 256 and ids[-1] == 301
    lm = read_label_map(tmp_path / "big.png")
    assert lm.dtype == np.uint16
    back = label_map_to_masks(lm)
    assert list(back) == ids
    for i, m in zip(ids, masks):
        np.testing.assert_array_equal(back[i], m)
    # 254 masks still fit 8 bits without touching 255.
    write_label_map(tmp_path / "254.png", masks[:254])
    assert read_label_map(tmp_path / "254.png").dtype == np.uint8


def test_label_map_void_and_errors(tmp_path):
    lm = np.array([[0, 1, 255], [2, 2, 255]], np.uint8)
    assert sorted(label_map_to_masks(lm)) == [1, 2, 255]
    assert sorted(label_map_to_masks(lm, void=(255,))) == [1, 2]
    write_label_map(tmp_path / "none.png", [], shape=(4, 6))
    assert (read_label_map(tmp_path / "none.png") == 0).all()
    with pytest.raises(SegAnyError, match="shape"):
        write_label_map(tmp_path / "none.png", [])
    with pytest.raises(SegAnyError, match=r"mask 1 has shape \(3, 3\)"):
        write_label_map(tmp_path / "x.png", [np.zeros((4, 4), bool), np.zeros((3, 3), bool)])
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(SegAnyError, match="single-channel"):
        read_label_map(tmp_path / "rgb.png")
    with pytest.raises(SegAnyError, match="H x W"):
        label_map_to_masks(np.zeros((2, 2, 2), np.uint8))


def test_write_mask_png(tmp_path):
    m = make_masks(4)[3]
    write_mask_png(tmp_path / "m.png", m)
    arr = np.asarray(Image.open(tmp_path / "m.png"))
    assert arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 255}
    np.testing.assert_array_equal(arr == 255, m)
    with pytest.raises(SegAnyError, match="H x W"):
        write_mask_png(tmp_path / "m.png", np.zeros((2, 2, 2), bool))
    with pytest.raises(SegAnyError, match="cannot write a PNG"):
        encode_png(np.zeros((2, 2), np.float32))
