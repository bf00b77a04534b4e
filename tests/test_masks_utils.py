"""segany.utils.masks against the official segment-anything 1.0 amg.py and a numpy reference NMS."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segany.errors import SegAnyError
from segany.io.rle import decode_rle, encode_rle, rle_area
from segany.utils import masks as M

HSET = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load_official_amg():
    """Load segment_anything/utils/amg.py alone: the package __init__ imports torchvision (absent)."""
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or spec.submodule_search_locations is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "amg.py"
    if not path.is_file():
        return None
    mod_spec = importlib.util.spec_from_file_location("ref_amg", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)  # amg.py needs only numpy, torch and the standard library
    return mod


ref = _load_official_amg()
needs_ref = pytest.mark.skipif(ref is None, reason="segment-anything 1.0 not installed")


def np_nms(boxes: np.ndarray, scores: np.ndarray, thr: float, idxs: np.ndarray | None = None) -> list[int]:
    """Plain greedy NMS, the torchvision CPU kernel transcribed (float32 arithmetic, stable order)."""
    boxes = boxes.astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for a, i in enumerate(order):
            if suppressed[i]:
                continue
            keep.append(int(i))
            for j in order[a + 1 :]:
                if suppressed[j] or (idxs is not None and idxs[i] != idxs[j]):
                    continue
                w = max(np.float32(0), min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
                h = max(np.float32(0), min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
                inter = np.float32(w * h)
                if inter / (area[i] + area[j] - inter) > thr:
                    suppressed[j] = True
    return keep


def random_boxes(rng: np.random.Generator, n: int, size: float = 100.0) -> np.ndarray:
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(0, size / 3, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


# -- grids and crops -------------------------------------------------------------------------------


@needs_ref
@pytest.mark.parametrize("n", [1, 2, 7, 16, 32, 64])
def test_point_grid_matches_official(n):
    ours = M.build_point_grid(n)
    assert ours.shape == (n * n, 2)
    np.testing.assert_array_equal(ours, ref.build_point_grid(n))
    assert ours.min() > 0 and ours.max() < 1


@needs_ref
@pytest.mark.parametrize(("n", "layers", "scale"), [(32, 0, 1), (32, 1, 2), (32, 3, 2), (20, 2, 3)])
def test_all_layer_grids_match_official(n, layers, scale):
    ours = M.build_all_layer_point_grids(n, layers, scale)
    theirs = ref.build_all_layer_point_grids(n, layers, scale)
    assert len(ours) == len(theirs) == layers + 1
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)


@needs_ref
@pytest.mark.parametrize("size", [(480, 640), (640, 480), (1500, 2250), (1, 1), (7, 999), (1024, 1024)])
@pytest.mark.parametrize("layers", [0, 1, 2, 3])
@pytest.mark.parametrize("overlap", [0.0, 512 / 1500, 0.5])
def test_crop_boxes_match_official(size, layers, overlap):
    assert M.generate_crop_boxes(size, layers, overlap) == ref.generate_crop_boxes(size, layers, overlap)


def test_crop_boxes_cover_image():
    boxes, layers = M.generate_crop_boxes((300, 400), 2, 512 / 1500)
    assert boxes[0] == [0, 0, 400, 300] and layers[:1] == [0]
    assert layers.count(1) == 4 and layers.count(2) == 16
    for lay in (1, 2):
        cover = np.zeros((300, 400), bool)
        for b, li in zip(boxes, layers):
            if li == lay:
                cover[b[1] : b[3], b[0] : b[2]] = True
        assert cover.all()


# -- stability, boxes, uncropping --------------------------------------------------------------------


@needs_ref
def test_stability_score_matches_official():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, 50, generator=g) * 4
    logits[0] = -10  # empty at both thresholds: 0 / 0
    for thr, off in [(0.0, 1.0), (0.5, 0.25), (-1.0, 2.0)]:
        ours = M.calculate_stability_score(logits, thr, off)
        theirs = ref.calculate_stability_score(logits, thr, off)
        torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert torch.isnan(M.calculate_stability_score(logits, 0.0, 1.0)[0])


def test_stability_score_exact():
    logits = torch.tensor([[[3.0, 0.5, -0.5, -3.0]]])
    # > 1: one pixel; > -1: three pixels.
    assert M.calculate_stability_score(logits, 0.0, 1.0).item() == pytest.approx(1 / 3)


@needs_ref
def test_mask_to_box_matches_official():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(3, 4, 30, 20, generator=g) > 0.97
    masks[0, 0] = False
    masks[1, 2] = True
    torch.testing.assert_close(M.batched_mask_to_box(masks), ref.batched_mask_to_box(masks))
    torch.testing.assert_close(M.batched_mask_to_box(masks[0, 1]), ref.batched_mask_to_box(masks[0, 1]))
    assert M.batched_mask_to_box(torch.zeros(0, 5, 5, dtype=torch.bool)).shape == (0, 4)


@given(arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 12))))
@HSET
def test_mask_to_box_property(mask):
    box = M.batched_mask_to_box(torch.from_numpy(mask)).tolist()
    if not mask.any():
        assert box == [0, 0, 0, 0]
        return
    ys, xs = np.nonzero(mask)
    assert box == [xs.min(), ys.min(), xs.max(), ys.max()]


@needs_ref
def test_uncrop_helpers_match_official():
    crop = [10, 20, 60, 50]
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 2.0, 49.0, 29.0]])
    torch.testing.assert_close(M.uncrop_boxes_xyxy(boxes, crop), ref.uncrop_boxes_xyxy(boxes, crop))
    torch.testing.assert_close(
        M.uncrop_boxes_xyxy(boxes[None], crop), ref.uncrop_boxes_xyxy(boxes[None], crop)
    )
    pts = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(M.uncrop_points(pts, crop), ref.uncrop_points(pts, crop))
    torch.testing.assert_close(M.uncrop_points(pts[None], crop), ref.uncrop_points(pts[None], crop))
    masks = torch.rand(2, 30, 50) > 0.5
    torch.testing.assert_close(M.uncrop_masks(masks, crop, 70, 80), ref.uncrop_masks(masks, crop, 70, 80))
    assert M.uncrop_masks(masks, [0, 0, 50, 30], 30, 50) is masks
    orig = [0, 0, 80, 70]
    near = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 30.0, 20.0], [30.0, 10.0, 49.0, 29.0]])
    torch.testing.assert_close(
        M.is_box_near_crop_edge(near, crop, orig), ref.is_box_near_crop_edge(near, crop, orig)
    )
    assert M.is_box_near_crop_edge(near, [0, 0, 80, 70], orig).tolist() == [False, False, False]


def test_box_xyxy_to_xywh_and_batches():
    assert M.box_xyxy_to_xywh(torch.tensor([[1, 2, 4, 8]])).tolist() == [[1, 2, 3, 6]]
    assert M.box_xyxy_to_xywh(torch.tensor([1.0, 2.0, 4.0, 8.0])).tolist() == [1, 2, 3, 6]
    assert list(M.batch_iterator(2, [1, 2, 3], "abc")) == [[[1, 2], "ab"], [[3], "c"]]
    with pytest.raises(ValueError):
        list(M.batch_iterator(2, [1, 2], [1]))


# -- NMS -------------------------------------------------------------------------------------------


def test_box_iou_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 2.0, 2.0]])
    torch.testing.assert_close(M.box_iou(a, b), torch.tensor([[1 / 7, 0.0, 1.0]]))
    assert M.box_iou(torch.zeros(0, 4), b).shape == (0, 3)


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 0.95])
def test_nms_matches_reference(thr):
    rng = np.random.default_rng(int(thr * 100))
    boxes = random_boxes(rng, 300)
    scores = rng.uniform(size=300).astype(np.float32)
    scores[::7] = 0.5  # ties
    keep = M.box_nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr)
    assert keep.dtype == torch.int64
    assert keep.tolist() == np_nms(boxes, scores, thr)


def test_nms_edge_cases():
    empty = M.box_nms(torch.zeros(0, 4), torch.zeros(0), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    same = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    assert M.box_nms(same, torch.tensor([0.5, 0.5, 0.5]), 0.5).tolist() == [0]  # ties: first wins
    assert M.box_nms(same, torch.tensor([0.1, 0.9, 0.5]), 0.5).tolist() == [1]
    assert M.box_nms(same, torch.tensor([0.1, 0.9, 0.5]), 1.0).tolist() == [1, 2, 0]  # IoU 1 is not > 1
    # Zero-area boxes: IoU is 0/0, never above the threshold, so both stay (as torchvision).
    dots = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert M.box_nms(dots, torch.tensor([1.0, 2.0]), 0.5).tolist() == [1, 0]
    ints = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10]])
    assert M.box_nms(ints, torch.tensor([1.0, 2.0]), 0.5).tolist() == [1]
    with pytest.raises(ValueError):
        M.box_nms(torch.zeros(3, 4), torch.zeros(2), 0.5)


def test_batched_nms_matches_reference():
    rng = np.random.default_rng(5)
    boxes = random_boxes(rng, 400)
    scores = rng.uniform(size=400).astype(np.float32)
    idxs = rng.integers(0, 4, 400)
    keep = M.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(idxs), 0.4)
    assert keep.tolist() == np_nms(boxes, scores, 0.4, idxs)
    # All in one category: plain NMS.
    zeros = torch.zeros(400, dtype=torch.int64)
    assert M.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), zeros, 0.4).tolist() == (
        M.box_nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.4).tolist()
    )


@given(
    st.integers(0, 40).flatmap(
        lambda n: st.tuples(
            arrays(np.float32, (n, 4), elements=st.integers(0, 20).map(float)),
            arrays(np.float32, n, elements=st.sampled_from([0.1, 0.2, 0.5, 0.9])),
            st.sampled_from([0.0, 0.2, 0.5, 0.8]),
        )
    )
)
@HSET
def test_nms_property(case):
    raw, scores, thr = case
    # Integer coordinates and few distinct scores make exact ties and touching boxes common.
    boxes = np.concatenate([np.minimum(raw[:, :2], raw[:, 2:]), np.maximum(raw[:, :2], raw[:, 2:])], axis=1)
    keep = M.box_nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).tolist()
    assert keep == np_nms(boxes, scores, thr)


def test_nms_scales_to_thousands():
    rng = np.random.default_rng(0)
    boxes = torch.from_numpy(random_boxes(rng, 3000, size=1000.0))
    scores = torch.from_numpy(rng.uniform(size=3000).astype(np.float32))
    keep = M.box_nms(boxes, scores, 0.7)  # speed lives in benchmarks/, not in unit tests
    iou = M.box_iou(boxes[keep], boxes[keep])
    iou.fill_diagonal_(0)
    assert float(iou.max()) <= 0.7  # no kept pair overlaps above the threshold


# -- small regions -----------------------------------------------------------------------------------


def _blobby(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[5:25, 5:30] = True
    m[10:12, 10:12] = False  # a 4-pixel hole
    m[15:22, 15:22] = False  # a 49-pixel hole
    m[30:32, 35:37] = True  # a 4-pixel island
    m[rng.uniform(size=(h, w)) > 0.98] ^= True  # speckle
    return m


@needs_ref
@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("thresh", [0, 3, 5, 50, 10_000])
def test_remove_small_regions_matches_official(mode, thresh):
    m = _blobby(np.random.default_rng(thresh), 40, 45)
    ours, changed = M.remove_small_regions(m, thresh, mode)
    theirs, their_changed = ref.remove_small_regions(m, thresh, mode)
    assert changed == their_changed
    np.testing.assert_array_equal(ours, theirs)
    assert ours.dtype == bool


@needs_ref
@given(arrays(np.bool_, st.tuples(st.integers(1, 14), st.integers(1, 14))), st.integers(0, 20))
@HSET
def test_remove_small_regions_property(mask, thresh):
    for mode in ("holes", "islands"):
        ours, changed = M.remove_small_regions(mask, thresh, mode)
        theirs, their_changed = ref.remove_small_regions(mask, thresh, mode)
        assert changed == their_changed
        np.testing.assert_array_equal(ours, theirs)


def test_remove_small_regions_behaviour():
    m = np.zeros((20, 20), bool)
    m[2:18, 2:18] = True
    m[8:10, 8:10] = False
    filled, changed = M.remove_small_regions(m, 10, "holes")
    assert changed and filled[2:18, 2:18].all()
    same, changed = M.remove_small_regions(m, 2, "holes")
    assert not changed and same is m
    tiny = np.zeros((20, 20), bool)
    tiny[0, 0] = tiny[10:12, 10:12] = True
    kept, changed = M.remove_small_regions(tiny, 100, "islands")
    assert changed and kept.sum() == 4 and kept[10:12, 10:12].all()  # all small: keep the largest
    with pytest.raises(SegAnyError, match="mode"):
        M.remove_small_regions(m, 10, "both")


# -- uncompressed RLE --------------------------------------------------------------------------------


@needs_ref
def test_uncompressed_rle_matches_official():
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(5, 17, 23, generator=g) > 0.6
    masks[0] = False
    masks[1] = True
    masks[2, 0, 0] = True
    ours = M.mask_to_rle_pytorch(masks)
    assert ours == ref.mask_to_rle_pytorch(masks)
    for rle, m in zip(ours, masks.numpy()):
        np.testing.assert_array_equal(M.rle_to_mask(rle), m)
        np.testing.assert_array_equal(ref.rle_to_mask(rle), m)
        assert rle_area(rle) == ref.area_from_rle(rle) == m.sum()
    assert M.masks_to_uncompressed_rle is M.mask_to_rle_pytorch


@given(arrays(np.bool_, st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12))))
@HSET
def test_uncompressed_rle_round_trip(masks):
    rles = M.mask_to_rle_pytorch(torch.from_numpy(masks))
    for rle, m in zip(rles, masks):
        assert sum(rle["counts"]) == m.size
        np.testing.assert_array_equal(decode_rle(rle), m)
        np.testing.assert_array_equal(decode_rle(encode_rle(decode_rle(rle))), m)


def _shape_masks():
    """Random masks plus the shapes that break RLE code: empty, full, one pixel, corners, stripes."""
    hw = st.tuples(st.integers(1, 16), st.integers(1, 16))

    def special(shape):
        h, w = shape
        opts = [np.zeros((h, w), bool), np.ones((h, w), bool)]
        for y, x in [(0, 0), (h - 1, w - 1), (h // 2, w // 2), (0, w - 1)]:
            m = np.zeros((h, w), bool)
            m[y, x] = True
            opts.append(m)
            opts.append(~m)
        stripes = np.zeros((h, w), bool)
        stripes[:, ::2] = True
        opts += [stripes, stripes.T.copy() if h == w else ~stripes]
        return st.sampled_from(opts)

    return st.one_of(hw.flatmap(special), hw.flatmap(lambda s: arrays(np.bool_, s)))


@given(_shape_masks())
@HSET
def test_rle_round_trip_property(mask):
    rle = encode_rle(mask)
    assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(decode_rle(rle), mask)
    assert rle_area(rle) == mask.sum()
    (unc,) = M.mask_to_rle_pytorch(torch.from_numpy(mask)[None])
    np.testing.assert_array_equal(M.rle_to_mask(unc), mask)
