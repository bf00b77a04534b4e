"""Overlay pictures, cut-outs and PNG saving."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segany.errors import SegAnyError
from segany.viz import (
    BOX_COLOR,
    NEGATIVE_COLOR,
    POSITIVE_COLOR,
    cutout,
    mask_color,
    overlay_masks,
    palette,
    save_png,
)

H, W = 60, 80


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def _rect(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_palette_is_fixed_and_distinct():
    p = palette(20)
    assert p.shape == (20, 3) and p.dtype == np.uint8
    assert [tuple(c) for c in p] == [mask_color(i) for i in range(20)]
    assert len({tuple(c) for c in p}) == 20
    np.testing.assert_array_equal(palette(5), p[:5])  # colour i does not depend on the count
    assert palette(0).shape == (0, 3)


def test_overlay_blends_in_mask_colours():
    img = _image()
    big, small = _rect(5, 50, 5, 70), _rect(20, 30, 20, 30)
    out = overlay_masks(img, [small, big], alpha=1.0, draw_outline=False)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (out[small] == mask_color(0)).all()  # small drawn last, on top of the big one
    assert (out[big & ~small] == mask_color(1)).all()
    np.testing.assert_array_equal(out[~big], img[~big])
    half = overlay_masks(img, [big], alpha=0.5, draw_outline=False)
    expect = np.round(img[big] * 0.5 + np.array(mask_color(0)) * 0.5).astype(np.uint8)
    assert np.abs(half[big].astype(int) - expect).max() <= 1
    none = overlay_masks(img, [big], alpha=0.0, draw_outline=False)
    np.testing.assert_array_equal(none, img)
    np.testing.assert_array_equal(overlay_masks(img, []), img)


def test_overlay_does_not_touch_input_and_outlines():
    img = _image()
    keep = img.copy()
    m = _rect(10, 40, 10, 50)
    m[20:25, 20:25] = False  # a hole: outlined too
    out = overlay_masks(img, [m], alpha=0.0, draw_outline=True)
    np.testing.assert_array_equal(img, keep)
    assert (out[10, 30] == mask_color(0)).all()  # on the outer boundary
    assert (out[19, 22] == mask_color(0)).all()  # on the hole boundary (mask pixels around it)
    np.testing.assert_array_equal(out[30, 30], img[30, 30])  # well inside: untouched


def test_overlay_points_and_boxes():
    img = np.full((H, W, 3), 128, np.uint8)
    pts = np.array([[20.0, 20.0], [60.0, 40.0], [40.0, 10.0]])
    out = overlay_masks(img, [], points=pts, labels=np.array([1, 0, -1]), boxes=np.array([[5, 45, 30, 55]]))
    assert tuple(out[20, 20]) == POSITIVE_COLOR
    assert tuple(out[40, 60]) == NEGATIVE_COLOR
    np.testing.assert_array_equal(out[10, 40], img[10, 40])  # padding point skipped
    assert tuple(out[45, 15]) == BOX_COLOR  # top edge of the box
    # White border around the star.
    ring = out[8:33, 8:33].reshape(-1, 3)
    assert (ring == 255).all(axis=1).any()
    all_pos = overlay_masks(img, [], points=[[20, 20]])  # labels default to positive
    assert tuple(all_pos[20, 20]) == POSITIVE_COLOR
    corners = overlay_masks(img, [], points=[[20, 20], [50, 40]], labels=[2, 3])
    assert (corners[20, 20] != 128).any() and (corners[40, 50] != 128).any()
    one_box = overlay_masks(img, [], boxes=[10, 10, 30, 30])
    assert tuple(one_box[10, 20]) == BOX_COLOR


def test_overlay_errors():
    img = _image()
    with pytest.raises(SegAnyError, match=r"mask 1 has shape \(5, 5\)"):
        overlay_masks(img, [_rect(0, 5, 0, 5), np.zeros((5, 5), bool)])
    with pytest.raises(SegAnyError, match="2 points but 1 labels"):
        overlay_masks(img, [], points=[[1, 1], [2, 2]], labels=[1])
    with pytest.raises(SegAnyError, match="label 7"):
        overlay_masks(img, [], points=[[1, 1]], labels=[7])
    with pytest.raises(SegAnyError, match="uint8"):
        overlay_masks(img.astype(np.float32), [])
    with pytest.raises(SegAnyError, match="alpha"):
        overlay_masks(img, [], alpha=2.0)
    with pytest.raises(SegAnyError, match="finite"):
        overlay_masks(img, [], points=[[np.nan, 1.0]])
    gray = overlay_masks(img[:, :, 0], [_rect(0, 5, 0, 5)])
    assert gray.shape == (H, W, 3)


def test_cutout():
    img = _image()
    m = np.zeros((H, W), bool)
    m[10:20, 30:45] = True
    m[12, 31] = False
    rgba = cutout(img, m)
    assert rgba.shape == (10, 15, 4) and rgba.dtype == np.uint8
    np.testing.assert_array_equal(rgba[..., :3], img[10:20, 30:45])
    np.testing.assert_array_equal(rgba[..., 3] == 255, m[10:20, 30:45])
    assert set(np.unique(rgba[..., 3])) == {0, 255}
    dot = np.zeros((H, W), bool)
    dot[H - 1, W - 1] = True
    assert cutout(img, dot).shape == (1, 1, 4)
    with pytest.raises(SegAnyError, match="empty"):
        cutout(img, np.zeros((H, W), bool))
    with pytest.raises(SegAnyError, match="shape"):
        cutout(img, np.ones((3, 3), bool))


def test_save_png_round_trip(tmp_path):
    img = _image()
    save_png(tmp_path / "rgb.png", img)
    with Image.open(tmp_path / "rgb.png") as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), img)
    m = np.zeros((H, W), bool)
    m[3:9, 4:7] = True
    rgba = cutout(img, m)
    save_png(tmp_path / "sub" / "cut.png", rgba)
    with Image.open(tmp_path / "sub" / "cut.png") as im:
        assert im.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(im), rgba)
    assert not [p for p in tmp_path.rglob("*.tmp")]
    with pytest.raises(SegAnyError, match=r"bad\.png: cannot write a PNG"):
        save_png(tmp_path / "bad.png", np.zeros((4, 4, 2), np.uint8))
    assert not (tmp_path / "bad.png").exists()
