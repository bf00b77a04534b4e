"""Property tests and fuzzers (issue 10), part 1, bounded in time (both parts together run in well under
a minute).

Properties: RLE round trips, box utilities against numpy references, coordinate transforms and their
inverse. Fuzzers: arbitrary bytes and structured garbage into the image decoder, SamPredictor's prompt
arrays and the CLI prompt parser; each may only answer with a SegAnyError or a valid result. Part 2
(the SA-1B / COCO readers, the server, and the regression tests for what fuzzing found) is
tests/test_fuzz_readers_server.py; the settings and strategies both use are in tests/fuzz_helpers.py.

``RUNS`` (tests/reliability_tally.py) counts the examples each test executed; the hooks in
tests/conftest.py print them at the end of the session and write them, with the fuzz tests' run time,
as JSON to ``$SEGANY_RELIABILITY_FUZZ_JSON`` when set, for docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segany.cli import parse_box, parse_xy
from segany.errors import SegAnyError
from segany.io.images import decode_image
from segany.io.rle import decode_rle, encode_rle, rle_area, rle_to_bbox
from segany.transforms import ResizeLongestSide, get_preprocess_shape
from segany.utils.masks import batched_mask_to_box, box_iou, box_nms, mask_to_rle_pytorch
from tests.fuzz_helpers import FAST, SLOW, mutated_image
from tests.reliability_tally import RUNS

masks_2d = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda hw: arrays(np.bool_, hw, elements=st.booleans())
)


def blocky_mask(draw, h, w) -> np.ndarray:
    """Random rectangles: long runs, like real masks (random booleans give only short runs)."""
    m = np.zeros((h, w), bool)
    for _ in range(draw(st.integers(0, 4))):
        y0, y1 = sorted(draw(st.tuples(st.integers(0, h), st.integers(0, h))))
        x0, x1 = sorted(draw(st.tuples(st.integers(0, w), st.integers(0, w))))
        m[y0:y1, x0:x1] = ~m[y0:y1, x0:x1]
    return m


@st.composite
def any_mask(draw) -> np.ndarray:
    if draw(st.booleans()):
        return draw(masks_2d)
    h, w = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    return blocky_mask(draw, h, w)


# ------------------------------------------------------------------------------------------------
# RLE


@FAST
@given(any_mask())
def test_rle_round_trip_is_exact(mask):
    RUNS["property: RLE encode/decode round trip"] += 1
    rle = encode_rle(mask)
    assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
    back = decode_rle(json.loads(json.dumps(rle)))  # through JSON, as files carry it
    assert back.dtype == bool and back.shape == mask.shape and (back == mask).all()
    assert rle_area(rle) == int(mask.sum())
    ys, xs = np.nonzero(mask)
    want = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] if len(xs) else [0, 0, 0, 0]
    assert rle_to_bbox(rle) == [float(v) for v in want]


@FAST
@given(
    st.lists(any_mask(), min_size=1, max_size=1).flatmap(
        lambda ms: st.integers(1, 3).map(lambda b: np.stack([ms[0]] * b))
    )
)
def test_uncompressed_rle_from_torch_decodes_exactly(masks):
    RUNS["property: mask_to_rle_pytorch -> decode_rle"] += 1
    masks[-1] = ~masks[-1]
    rles = mask_to_rle_pytorch(torch.from_numpy(masks))
    for m, rle in zip(masks, rles):
        assert sum(rle["counts"]) == m.size
        assert (decode_rle(rle) == m).all()
        assert (decode_rle(encode_rle(decode_rle(rle))) == m).all()


rle_counts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=[chr(c) for c in range(48, 112)], max_size=40),
    st.lists(st.integers(-5, 2000), max_size=12),
    st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.none(), st.booleans()), max_size=5),
    st.binary(max_size=30),
    st.none(),
    st.integers(),
    st.floats(),
)
rle_sizes = st.one_of(
    st.tuples(st.integers(0, 40), st.integers(0, 40)).map(list),
    st.lists(st.one_of(st.integers(-3, 50), st.floats(), st.text(max_size=2), st.booleans()), max_size=3),
    st.none(),
    st.text(max_size=4),
)


@FAST
@given(
    st.one_of(
        st.fixed_dictionaries({"size": rle_sizes, "counts": rle_counts}),
        st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
        st.none(),
        st.integers(),
    )
)
def test_fuzz_decode_rle(rle):
    RUNS["fuzz: decode_rle (garbage RLE)"] += 1
    try:
        m = decode_rle(rle)
    except SegAnyError:
        return
    h, w = rle["size"]
    assert m.dtype == bool and m.shape == (h, w)
    # whatever decodes must re-encode to the same mask
    if h * w:
        assert (decode_rle(encode_rle(m)) == m).all()


# ------------------------------------------------------------------------------------------------
# boxes


def np_mask_box(m: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(m)
    return [0, 0, 0, 0] if len(xs) == 0 else [xs.min(), ys.min(), xs.max(), ys.max()]


@FAST
@given(
    st.tuples(st.integers(1, 4), st.integers(1, 30), st.integers(1, 30)).flatmap(
        lambda s: arrays(np.bool_, s, elements=st.booleans() | st.just(False))
    )
)
def test_batched_mask_to_box_matches_numpy(masks):
    RUNS["property: batched_mask_to_box vs numpy"] += 1
    masks[0] = False  # always include an empty mask
    out = batched_mask_to_box(torch.from_numpy(masks))
    assert out.shape == (masks.shape[0], 4) and out.dtype == torch.int64
    for m, b in zip(masks, out.tolist()):
        assert b == np_mask_box(m)
    # leading batch dimensions are kept
    assert batched_mask_to_box(torch.from_numpy(masks[None])).shape == (1, masks.shape[0], 4)


@st.composite
def boxes_and_scores(draw):
    n = draw(st.integers(0, 40))
    xy = draw(arrays(np.float32, (n, 2), elements=st.floats(0, 100, width=32)))
    wh = draw(arrays(np.float32, (n, 2), elements=st.floats(0, 60, width=32)))
    boxes = np.concatenate([xy, xy + wh], 1)
    if n and draw(st.booleans()):  # exact duplicates, the hard case
        boxes[n // 2 :] = boxes[: n - n // 2]
    scores = draw(arrays(np.float32, (n,), elements=st.floats(0, 1, width=32)))
    thr = draw(st.floats(0.0, 1.0))
    return torch.from_numpy(boxes), torch.from_numpy(scores), thr


@FAST
@given(boxes_and_scores())
def test_box_nms_never_keeps_overlapping_boxes(args):
    RUNS["property: box_nms keeps no pair with IoU > thr"] += 1
    boxes, scores, thr = args
    keep = box_nms(boxes, scores, thr)
    assert len(set(keep.tolist())) == len(keep)
    kept = boxes[keep]
    if len(keep) > 1:
        iou = box_iou(kept, kept)
        iou.fill_diagonal_(0)
        # ~(iou > thr): two zero-area boxes have IoU 0/0 = NaN and never suppress each other, exactly as
        # in torchvision.ops.nms (the automatic generator drops empty masks before NMS).
        assert not (iou > thr + 1e-6).any()
    # scores of kept boxes come out in decreasing order
    ks = scores[keep]
    assert (ks[:-1] >= ks[1:]).all()
    # every dropped box overlaps some kept box with a score at least as high
    dropped = sorted(set(range(len(boxes))) - set(keep.tolist()))
    if dropped:
        iou = box_iou(boxes[dropped], kept) if len(keep) else torch.zeros(len(dropped), 0)
        for row, i in zip(iou, dropped):
            assert ((row > thr) & (ks >= scores[i])).any()


# ------------------------------------------------------------------------------------------------
# coordinate transforms


@FAST
@given(st.integers(1, 100_000), st.integers(1, 100_000), st.sampled_from([128, 256, 1024, 1025, 7]))
def test_get_preprocess_shape_longest_side_exact(h, w, target):
    RUNS["property: get_preprocess_shape"] += 1
    nh, nw = get_preprocess_shape(h, w, target)
    assert nh >= 1 and nw >= 1
    assert max(nh, nw) == target
    if h == w:
        assert nh == nw == target


@FAST
@given(
    st.integers(1, 20_000),
    st.integers(1, 20_000),
    st.sampled_from([128, 1024]),
    arrays(np.float64, (5, 2), elements=st.floats(-1e5, 1e5)),
)
def test_apply_coords_then_scale_back_is_identity(h, w, target, coords):
    RUNS["property: ResizeLongestSide coords round trip"] += 1
    t = ResizeLongestSide(target)
    nh, nw = get_preprocess_shape(h, w, target)
    out = t.apply_coords(coords, (h, w))
    assert out.shape == coords.shape and np.isfinite(out).all()
    back = out * np.array([w / nw, h / nh])
    np.testing.assert_allclose(back, coords, rtol=1e-9, atol=1e-6)
    boxes = coords[:4].reshape(2, 4)
    np.testing.assert_allclose(t.apply_boxes(boxes, (h, w)), out[:4].reshape(2, 4), rtol=1e-12)
    tt = t.apply_coords_torch(torch.from_numpy(coords), (h, w))
    np.testing.assert_allclose(tt.numpy(), out, rtol=1e-5, atol=1e-3)
    # the input is not modified
    assert np.isfinite(coords).all()


# ------------------------------------------------------------------------------------------------
# the image decoder


def check_decode(data: bytes, max_pixels: int = 1 << 20) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            arr = decode_image(data, name="fuzz", max_pixels=max_pixels)
        except SegAnyError as e:
            assert str(e).startswith("fuzz")
            return
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    assert arr.shape[0] >= 1 and arr.shape[1] >= 1 and arr.shape[0] * arr.shape[1] <= max_pixels


@SLOW
@given(st.binary(max_size=2048))
def test_fuzz_decode_image_arbitrary_bytes(data):
    RUNS["fuzz: decode_image arbitrary bytes"] += 1
    check_decode(data)


@SLOW
@given(mutated_image())
def test_fuzz_decode_image_mutated_files(data):
    RUNS["fuzz: decode_image mutated PNG/JPEG/GIF/BMP/TIFF/WebP"] += 1
    check_decode(data)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@SLOW
@given(
    st.integers(0, 2**31 - 1),
    st.integers(0, 2**31 - 1),
    st.sampled_from([1, 2, 4, 8, 16]),
    st.sampled_from([0, 2, 3, 4, 6, 5]),
    st.integers(0, 2),
    st.binary(max_size=64),
    st.booleans(),
)
def test_fuzz_decode_image_png_headers(w, h, depth, ctype, interlace, payload, compress):
    RUNS["fuzz: decode_image structured PNG headers (incl. bombs)"] += 1
    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, interlace)
    idat = zlib.compress(payload) if compress else payload
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    check_decode(data, max_pixels=1 << 16)


# ------------------------------------------------------------------------------------------------
# SamPredictor.predict with arbitrary prompt arrays


@pytest.fixture(scope="module")
def predictor(tiny_model):
    from segany.predictor import SamPredictor
    from tests.conftest import synthetic_image

    p = SamPredictor(tiny_model)
    p.set_image(synthetic_image())
    return p


any_float = st.one_of(st.floats(), st.floats(-300, 300), st.sampled_from([0.0, -1.0, 1e39, -1e300, 95.9, 127.0]))
shapes = st.one_of(
    st.tuples(st.integers(0, 5), st.just(2)),
    st.tuples(st.integers(0, 3)),
    st.tuples(st.integers(0, 3), st.integers(0, 4)),
    st.tuples(st.just(1), st.integers(0, 3), st.just(2)),
)


@SLOW
@given(
    st.one_of(st.none(), shapes.flatmap(lambda sh: arrays(np.float64, sh, elements=any_float))),
    st.one_of(
        st.none(),
        st.tuples(st.integers(0, 6)).flatmap(
            lambda sh: arrays(np.float64, sh, elements=st.sampled_from([0, 1, 2, 3, -1, 5, 0.5, float("nan")]))
        ),
    ),
    st.one_of(
        st.none(),
        st.tuples(st.sampled_from([3, 4, 5, 8])).flatmap(lambda sh: arrays(np.float64, sh, elements=any_float)),
    ),
    st.booleans(),
)
def test_fuzz_predictor_prompts(predictor, coords, labels, box, multimask):
    RUNS["fuzz: SamPredictor.predict prompt arrays"] += 1
    try:
        masks, scores, low = predictor.predict(coords, labels, box, multimask_output=multimask)
    except SegAnyError:
        return
    assert masks.dtype == bool and masks.shape == ((3 if multimask else 1), 96, 128)
    assert np.isfinite(scores).all() and np.isfinite(low).all()


# ------------------------------------------------------------------------------------------------
# the CLI prompt parser

number_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**400), 10**400).map(str),
    st.sampled_from(
        [
            "nan",
            "-nan",
            "inf",
            "-Infinity",
            "1e309",
            "-0",
            "0x10",
            "1_000",
            "",
            " ",
            "1e-400",
            "٣",
            "１２",
            "+5",
            ".5",
            "5.",
            "e5",
            "--1",
            "1,",
            "\x00",
        ]
    ),
    st.text(max_size=6),
)


@FAST
@given(st.one_of(st.text(max_size=30), st.lists(number_text, max_size=5).map(",".join)))
def test_fuzz_parse_xy(text):
    RUNS["fuzz: cli.parse_xy"] += 1
    try:
        x, y = parse_xy(text)
    except SegAnyError as e:
        assert "invalid point" in str(e)
        return
    assert isinstance(x, float) and isinstance(y, float) and math.isfinite(x) and math.isfinite(y)


@FAST
@given(st.one_of(st.text(max_size=40), st.lists(number_text, max_size=6).map(",".join)))
def test_fuzz_parse_box(text):
    RUNS["fuzz: cli.parse_box"] += 1
    try:
        box = parse_box(text)
    except SegAnyError as e:
        assert "invalid box" in str(e)
        return
    assert len(box) == 4 and all(isinstance(v, float) and math.isfinite(v) for v in box)
    assert box[2] > box[0] and box[3] > box[1]
