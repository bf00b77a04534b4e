"""Property tests and fuzzers (issue 10), bounded in time: the whole file runs in well under a minute.

Properties: RLE round trips, box utilities against numpy references, coordinate transforms and their
inverse. Fuzzers: arbitrary bytes and structured garbage into the image decoder, the CLI prompt parser,
the SA-1B / COCO readers and the server's predict endpoint; each may only answer with a SegAnyError
(HTTP 4xx for the server) or a valid result.

``RUNS`` counts the examples each test executed; the last test prints them (and writes them as JSON to
``$SEGANY_RELIABILITY_FUZZ_JSON`` when set) for docs/RELIABILITY.md. Crashes found by fuzzing are kept
as explicit regression tests at the end.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import tempfile
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from segany.cli import parse_box, parse_xy
from segany.errors import SegAnyError
from segany.io.images import decode_image
from segany.io.rle import decode_rle, encode_rle, rle_area, rle_to_bbox
from segany.transforms import ResizeLongestSide, get_preprocess_shape
from segany.utils.masks import batched_mask_to_box, box_iou, box_nms, mask_to_rle_pytorch

RUNS: Counter[str] = Counter()
T0 = time.perf_counter()
#: SEGANY_FUZZ_SCALE=10 runs a ten times longer campaign (default: about 15-25 s for the whole file).
SCALE = float(os.environ.get("SEGANY_FUZZ_SCALE", "1"))
FAST = settings(max_examples=int(300 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=int(150 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])

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
@given(st.lists(any_mask(), min_size=1, max_size=1).flatmap(
    lambda ms: st.integers(1, 3).map(lambda b: np.stack([ms[0]] * b))))
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
    st.none(), st.integers(), st.floats(),
)
rle_sizes = st.one_of(
    st.tuples(st.integers(0, 40), st.integers(0, 40)).map(list),
    st.lists(st.one_of(st.integers(-3, 50), st.floats(), st.text(max_size=2), st.booleans()), max_size=3),
    st.none(), st.text(max_size=4),
)


@FAST
@given(st.one_of(st.fixed_dictionaries({"size": rle_sizes, "counts": rle_counts}),
                 st.dictionaries(st.text(max_size=6), st.integers(), max_size=3), st.none(), st.integers()))
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
@given(st.tuples(st.integers(1, 4), st.integers(1, 30), st.integers(1, 30)).flatmap(
    lambda s: arrays(np.bool_, s, elements=st.booleans() | st.just(False))))
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
@given(st.integers(1, 20_000), st.integers(1, 20_000), st.sampled_from([128, 1024]),
       arrays(np.float64, (5, 2), elements=st.floats(-1e5, 1e5)))
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


def _seed(fmt: str) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    if fmt == "P":
        img, fmt = img.convert("P"), "PNG"
    img.save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_seed(f) for f in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "P")]


@SLOW
@given(st.binary(max_size=2048))
def test_fuzz_decode_image_arbitrary_bytes(data):
    RUNS["fuzz: decode_image arbitrary bytes"] += 1
    check_decode(data)


@st.composite
def mutated_image(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        pos = draw(st.integers(0, len(data) - 1)) if data else 0
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            data = data[: draw(st.integers(0, len(data)))]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80]))
    return bytes(data)


@SLOW
@given(mutated_image())
def test_fuzz_decode_image_mutated_files(data):
    RUNS["fuzz: decode_image mutated PNG/JPEG/GIF/BMP/TIFF/WebP"] += 1
    check_decode(data)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@SLOW
@given(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 4, 8, 16]),
       st.sampled_from([0, 2, 3, 4, 6, 5]), st.integers(0, 2), st.binary(max_size=64), st.booleans())
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
shapes = st.one_of(st.tuples(st.integers(0, 5), st.just(2)), st.tuples(st.integers(0, 3)),
                   st.tuples(st.integers(0, 3), st.integers(0, 4)), st.tuples(st.just(1), st.integers(0, 3),
                                                                                 st.just(2)))


@SLOW
@given(st.one_of(st.none(), shapes.flatmap(lambda sh: arrays(np.float64, sh, elements=any_float))),
       st.one_of(st.none(), st.tuples(st.integers(0, 6)).flatmap(
           lambda sh: arrays(np.float64, sh, elements=st.sampled_from([0, 1, 2, 3, -1, 5, 0.5, float("nan")])))),
       st.one_of(st.none(), st.tuples(st.sampled_from([3, 4, 5, 8])).flatmap(
           lambda sh: arrays(np.float64, sh, elements=any_float))),
       st.booleans())
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
    st.integers(-10**400, 10**400).map(str),
    st.sampled_from(["nan", "-nan", "inf", "-Infinity", "1e309", "-0", "0x10", "1_000", "", " ", "1e-400",
                     "٣", "１２", "+5", ".5", "5.", "e5", "--1", "1,", "\x00"]),
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


# ------------------------------------------------------------------------------------------------
# the format readers on fuzzed JSON

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                      st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=4), max_leaves=20)


def _sa1b_base():
    m = np.zeros((6, 6), bool)
    m[1:3, 1:4] = True
    return {
        "image": {"image_id": 1, "width": 6, "height": 6, "file_name": "a.jpg"},
        "annotations": [{"id": 1, "segmentation": encode_rle(m), "bbox": [1.0, 1.0, 3.0, 2.0], "area": 6,
                         "predicted_iou": 0.9, "stability_score": 0.95, "point_coords": [[2.0, 2.0]],
                         "crop_box": [0.0, 0.0, 6.0, 6.0]}],
    }


def _coco_base():
    m = np.zeros((6, 6), bool)
    m[1:3, 1:4] = True
    return {
        "images": [{"id": 1, "width": 6, "height": 6, "file_name": "a.jpg"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": encode_rle(m),
                         "bbox": [1, 1, 3, 2], "area": 6, "iscrowd": 0},
                        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]],
                         "bbox": [0, 0, 4, 4], "area": 8}],
        "categories": [{"id": 1, "name": "object"}],
    }


def _paths(doc, prefix=()):
    """Every (container, key) location in a JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield doc, k
            yield from _paths(v)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield doc, i
            yield from _paths(v)


@st.composite
def mutated_doc(draw, base):
    doc = base()
    for _ in range(draw(st.integers(1, 3))):
        locs = list(_paths(doc))
        if not locs:
            break
        container, key = locs[draw(st.integers(0, len(locs) - 1))]
        op = draw(st.sampled_from(["replace", "delete", "dup"]))
        if op == "replace":
            container[key] = draw(json_value)
        elif op == "delete":
            del container[key]
        elif isinstance(container, list):
            container.append(json.loads(json.dumps(container[key])))
    return doc


def read_fuzzed(reader, doc, raw: bytes | None = None) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.json"
        p.write_bytes(raw if raw is not None else json.dumps(doc).encode())
        try:
            reader(p)
        except SegAnyError as e:
            assert str(p) in str(e)


@FAST
@given(st.one_of(json_value, mutated_doc(_sa1b_base)), st.one_of(st.none(), st.binary(max_size=64)))
def test_fuzz_read_sa1b(doc, raw):
    from segany.io.sa1b import read_sa1b

    RUNS["fuzz: read_sa1b (fuzzed JSON files)"] += 1
    read_fuzzed(read_sa1b, doc, raw)


@FAST
@given(st.one_of(json_value, mutated_doc(_coco_base)), st.one_of(st.none(), st.binary(max_size=64)))
def test_fuzz_read_coco(doc, raw):
    from segany.io.coco import read_coco

    RUNS["fuzz: read_coco (fuzzed JSON files)"] += 1
    read_fuzzed(read_coco, doc, raw)


# ------------------------------------------------------------------------------------------------
# the server's predict endpoint


@pytest.fixture(scope="module")
def server(tiny_model):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

        from segany.serve.app import ServerSettings, create_app
    from tests.conftest import synthetic_image

    app = create_app(tiny_model, ServerSettings(max_upload_mb=1, max_pixels=200_000))
    with TestClient(app, raise_server_exceptions=False) as c:
        buf = io.BytesIO()
        Image.fromarray(synthetic_image()).save(buf, format="PNG")
        r = c.post("/api/images", content=buf.getvalue(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        yield c, r.json()["image_id"]


num = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10**30, 10**30),
                st.floats(-200, 200), st.sampled_from([0, -1, 1e308, -1e308, 1e39]))
# Standard JSON only (what browsers' JSON.stringify sends): the NaN / Infinity literals that Python's
# json writes are covered by test_regression_server_nonfinite_json_literal (a known 500, see there).
finite_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
finite_json = st.recursive(finite_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                           max_size=4), max_leaves=20)
predict_body = st.one_of(
    finite_json,
    st.fixed_dictionaries({}, optional={
        "points": st.one_of(st.lists(st.lists(num, min_size=2, max_size=2), max_size=4), finite_json),
        "labels": st.one_of(st.lists(st.integers(-2, 3), max_size=4), finite_json),
        "box": st.one_of(st.lists(num, min_size=4, max_size=4), finite_json),
        "mask_input": st.one_of(st.text(max_size=70), finite_json),
        "multimask": st.one_of(st.booleans(), finite_json),
        "format": st.one_of(st.sampled_from(["rle", "png", "jpeg"]), finite_json),
    }),
)


@SLOW
@given(predict_body)
def test_fuzz_server_predict_never_5xx(server, body):
    client, image_id = server
    RUNS["fuzz: server POST /api/images/{id}/predict"] += 1
    r = client.post(f"/api/images/{image_id}/predict", content=json.dumps(body, allow_nan=False),
                    headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code == 200:
        out = r.json()
        assert out["masks"] and all(math.isfinite(m["score"]) for m in out["masks"] if "score" in m)


@SLOW
@given(st.one_of(st.binary(max_size=512), mutated_image()),
       st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain", ""]))
def test_fuzz_server_upload_never_5xx(server, data, ctype):
    client, _ = server
    RUNS["fuzz: server POST /api/images (garbage uploads)"] += 1
    r = client.post("/api/images", content=data, headers={"Content-Type": ctype} if ctype else {})
    assert r.status_code < 500, (data[:40], ctype, r.status_code, r.text[:300])
    if r.status_code == 200:
        out = r.json()
        assert out["width"] >= 1 and out["height"] >= 1


# ------------------------------------------------------------------------------------------------
# regression tests for what fuzzing found


def test_regression_rle_counts_shorter_than_the_mask_is_refused():
    # Found by test_fuzz_decode_rle: pycocotools decoded runs summing to less than H*W (or a lone "0")
    # into a mask of garbage instead of failing. decode_rle now checks that the runs add up to H*W.
    good = encode_rle(np.eye(6, dtype=bool))
    for counts in (good["counts"][:-1], "0", "", "1"):
        with pytest.raises(SegAnyError, match="add up to"):
            decode_rle({"size": [6, 6], "counts": counts})
    with pytest.raises(SegAnyError, match="middle of a number"):
        decode_rle({"size": [6, 6], "counts": "P" * 38})


def test_regression_huge_finite_prompt_is_refused(tiny_model):
    # A finite coordinate such as 1e300 overflowed float32 in the model's frame and gave NaN scores.
    from segany.predictor import SamPredictor
    from tests.conftest import synthetic_image

    p = SamPredictor(tiny_model)
    p.set_image(synthetic_image())
    with pytest.raises(SegAnyError, match="too large"):
        p.predict(point_coords=[[1e300, 1.0]], point_labels=[1])


def test_regression_server_nonfinite_json_literal(server):
    # Found by test_fuzz_server_predict_never_5xx with body {"points": Infinity}.
    client, image_id = server
    for body in ('{"points": Infinity}', '{"box": NaN}', '{"labels": -Infinity}'):
        r = client.post(f"/api/images/{image_id}/predict", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (body, r.status_code)


def test_server_nonfinite_values_inside_valid_shapes_are_400(server):
    client, image_id = server
    for body in ('{"points": [[NaN, 1]], "labels": [1]}', '{"box": [0, 0, Infinity, 5]}',
                 '{"points": [[1e300, 1]], "labels": [1]}'):
        r = client.post(f"/api/images/{image_id}/predict", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.status_code, r.text)


def test_zz_fuzz_summary():
    elapsed = time.perf_counter() - T0
    total = sum(RUNS.values())
    for name, n in sorted(RUNS.items()):
        print(f"{name}: {n} examples")
    print(f"total: {total} examples in {elapsed:.1f} s")
    assert total > 0
    out = os.environ.get("SEGANY_RELIABILITY_FUZZ_JSON")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"runs": dict(RUNS), "total": total, "seconds": round(elapsed, 1)}, indent=2))
