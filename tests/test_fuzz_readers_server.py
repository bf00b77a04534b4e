"""Property tests and fuzzers (issue 10), part 2: fuzzed JSON into the SA-1B / COCO readers, and
arbitrary requests into the server's predict and upload endpoints; each may only answer with a
SegAnyError (HTTP 4xx for the server) or a valid result. Crashes found by fuzzing are kept as explicit
regression tests at the end. Part 1 (properties, the image decoder, prompts and the CLI parser) is
tests/test_fuzz.py; the settings and strategies both use are in tests/fuzz_helpers.py, the seed SA-1B
and COCO documents come from tests/test_hostile_files.py.

``RUNS`` (tests/reliability_tally.py) counts the examples each test executed; the hooks in
tests/conftest.py print them and write them as JSON to ``$SEGANY_RELIABILITY_FUZZ_JSON`` when set.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from segany.errors import SegAnyError
from segany.io.rle import decode_rle, encode_rle
from tests.fuzz_helpers import FAST, SLOW, mutated_image
from tests.reliability_tally import RUNS
from tests.test_hostile_files import coco_doc, sa1b_doc

# ------------------------------------------------------------------------------------------------
# the format readers on fuzzed JSON

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8)
)
json_value = st.recursive(
    json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20
)


def _coco_base():
    """The hostile tests' COCO document plus a polygon annotation."""
    doc = coco_doc()
    polygon = [[0, 0, 4, 0, 4, 4]]
    doc["annotations"].append(
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": polygon, "bbox": [0, 0, 4, 4], "area": 8}
    )
    return doc


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
@given(st.one_of(json_value, mutated_doc(sa1b_doc)), st.one_of(st.none(), st.binary(max_size=64)))
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


num = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(10**30), 10**30),
    st.floats(-200, 200),
    st.sampled_from([0, -1, 1e308, -1e308, 1e39]),
)
# Standard JSON only (what browsers' JSON.stringify sends): the NaN / Infinity literals that Python's
# json writes are covered by test_regression_server_nonfinite_json_literal (a known 500, see there).
finite_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
finite_json = st.recursive(
    finite_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20
)
predict_body = st.one_of(
    finite_json,
    st.fixed_dictionaries(
        {},
        optional={
            "points": st.one_of(st.lists(st.lists(num, min_size=2, max_size=2), max_size=4), finite_json),
            "labels": st.one_of(st.lists(st.integers(-2, 3), max_size=4), finite_json),
            "box": st.one_of(st.lists(num, min_size=4, max_size=4), finite_json),
            "mask_input": st.one_of(st.text(max_size=70), finite_json),
            "multimask": st.one_of(st.booleans(), finite_json),
            "format": st.one_of(st.sampled_from(["rle", "png", "jpeg"]), finite_json),
        },
    ),
)


@SLOW
@given(predict_body)
def test_fuzz_server_predict_never_5xx(server, body):
    client, image_id = server
    RUNS["fuzz: server POST /api/images/{id}/predict"] += 1
    r = client.post(
        f"/api/images/{image_id}/predict",
        content=json.dumps(body, allow_nan=False),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code == 200:
        out = r.json()
        assert out["masks"] and all(math.isfinite(m["score"]) for m in out["masks"] if "score" in m)


@SLOW
@given(
    st.one_of(st.binary(max_size=512), mutated_image()),
    st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain", ""]),
)
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
    for body in (
        '{"points": [[NaN, 1]], "labels": [1]}',
        '{"box": [0, 0, Infinity, 5]}',
        '{"points": [[1e300, 1]], "labels": [1]}',
    ):
        r = client.post(f"/api/images/{image_id}/predict", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (body, r.status_code, r.text)


def test_regression_tiff_tag_of_the_wrong_type_is_refused():
    """Found by test_fuzz_decode_image_mutated_files: a TIFF whose strip offsets are typed RATIONAL made
    Pillow raise TypeError out of decode_image."""
    import struct

    from segany.io.images import decode_image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 0x0111:  # StripOffsets: LONG -> RATIONAL
            struct.pack_into("<H", data, entry + 2, 5)
    with pytest.raises(SegAnyError, match="truncated or corrupt"):
        decode_image(bytes(data), "x.tif")
