"""SA-1B JSON, COCO instances JSON and PNG label maps: round trips (checked with pycocotools) and
malformed files (a SegAnyError that names the file and the problem)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segany.errors import SegAnyError
from segany.io.coco import CocoWriter, read_coco, write_coco
from segany.io.rle import decode_rle, encode_rle, rle_to_bbox
from segany.io.sa1b import iter_sa1b_masks, read_sa1b, write_sa1b
from segany.utils.masks import mask_to_rle_pytorch

H, W = 24, 31


def make_masks(n: int = 5, h: int = H, w: int = W, seed: int = 0) -> list[np.ndarray]:
    """Blobs, specks, an empty mask, a full mask and edge-touching shapes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = [np.zeros((h, w), bool), np.ones((h, w), bool)]
    edge = np.zeros((h, w), bool)
    edge[:, -1] = True
    edge[0, :] = True
    out.append(edge)
    while len(out) < n:
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, 8)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        m |= rng.uniform(size=(h, w)) > 0.97
        out.append(m)
    return out[:n]


def make_records(masks: list[np.ndarray]) -> list[dict]:
    """Generator-style records, mixing mask / compressed / uncompressed segmentations and numpy types."""
    recs = []
    for i, m in enumerate(masks):
        if i % 3 == 0:
            seg = m
        elif i % 3 == 1:
            seg = encode_rle(m)
        else:
            seg = mask_to_rle_pytorch(torch.from_numpy(m)[None])[0]
        recs.append(
            {
                "segmentation": seg,
                "area": int(m.sum()),
                "bbox": rle_to_bbox(encode_rle(m)),
                "predicted_iou": np.float32(0.5 + i / 100),
                "stability_score": torch.tensor(0.9),
                "point_coords": np.array([[1.5, 2.0 + i]]),
                "crop_box": [0, 0, W, H],
            }
        )
    return recs


INFO = {"image_id": 7, "width": W, "height": H, "file_name": "img_7.jpg"}


def no_tmp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# -- SA-1B ---------------------------------------------------------------------------------------------


def test_sa1b_round_trip(tmp_path):
    masks = make_masks(9)
    path = tmp_path / "sa_7.json"
    write_sa1b(path, INFO, make_records(masks))
    assert no_tmp_files(tmp_path)
    raw = json.loads(path.read_text())
    assert raw["image"] == INFO
    assert [a["id"] for a in raw["annotations"]] == list(range(1, 10))
    keys = {
        "id",
        "segmentation",
        "bbox",
        "area",
        "predicted_iou",
        "stability_score",
        "point_coords",
        "crop_box",
    }
    assert all(set(a) == keys for a in raw["annotations"])
    assert all(isinstance(a["segmentation"]["counts"], str) for a in raw["annotations"])

    info, anns = read_sa1b(path)
    assert info == INFO and len(anns) == 9
    assert anns[3]["predicted_iou"] == pytest.approx(0.53)
    assert anns[4]["point_coords"] == [[1.5, 6.0]]
    info2, decoded = iter_sa1b_masks(path)
    assert info2 == INFO
    for m, d, a in zip(masks, decoded, anns):
        assert d.dtype == bool
        np.testing.assert_array_equal(d, m)
        # Independent decoder: pycocotools straight from the file's RLE.
        rle = {"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), m)
        assert a["area"] == m.sum()


def test_sa1b_fills_area_and_bbox(tmp_path):
    m = np.zeros((H, W), bool)
    m[3:6, 10:20] = True
    write_sa1b(tmp_path / "a.json", INFO, [{"segmentation": m}])
    _, (ann,) = read_sa1b(tmp_path / "a.json")
    assert ann["area"] == 30 and ann["bbox"] == [10.0, 3.0, 10.0, 3.0]
    assert "predicted_iou" not in ann
    # pycocotools' own RLE (bytes counts) is accepted as well.
    coco_rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    write_sa1b(tmp_path / "b.json", INFO, [{"segmentation": coco_rle}])
    np.testing.assert_array_equal(iter_sa1b_masks(tmp_path / "b.json")[1][0], m)


def test_sa1b_empty_annotations(tmp_path):
    write_sa1b(tmp_path / "e.json", INFO, [])
    assert read_sa1b(tmp_path / "e.json") == (INFO, [])


def test_sa1b_write_errors_leave_old_file(tmp_path):
    path = tmp_path / "x.json"
    write_sa1b(path, INFO, make_records(make_masks(3)))
    before = path.read_bytes()
    with pytest.raises(SegAnyError, match=r"x\.json: record 1: mask of shape \(5, 5\)"):
        write_sa1b(path, INFO, [{"segmentation": np.zeros((H, W), bool)}, {"segmentation": np.zeros((5, 5))}])
    with pytest.raises(SegAnyError, match="segmentation size"):
        write_sa1b(path, INFO, [{"segmentation": encode_rle(np.zeros((5, 5), bool))}])
    with pytest.raises(SegAnyError, match="no 'height'"):
        write_sa1b(path, {"image_id": 1, "width": 3, "file_name": "a"}, [])
    with pytest.raises(SegAnyError, match="bbox"):
        write_sa1b(path, INFO, [{"segmentation": np.zeros((H, W), bool), "bbox": [1, 2, 3]}])
    assert path.read_bytes() == before and no_tmp_files(tmp_path)


def _valid_sa1b() -> dict:
    m = np.zeros((20, 30), bool)
    m[2:5, 3:9] = True
    ann = {
        "id": 1,
        "segmentation": encode_rle(m),
        "bbox": [3.0, 2.0, 6.0, 3.0],
        "area": 18,
        "predicted_iou": 0.9,
        "stability_score": 0.95,
        "point_coords": [[4.0, 3.0]],
        "crop_box": [0, 0, 30, 20],
    }
    ann2 = dict(copy.deepcopy(ann), id=2)
    return {
        "image": {"image_id": 1, "width": 30, "height": 20, "file_name": "a.jpg"},
        "annotations": [ann, ann2],
    }


def _set(path, value):
    def f(d):
        *head, last = path
        for k in head:
            d = d[k]
        if value is _DEL:
            del d[last]
        else:
            d[last] = value

    return f


_DEL = object()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set(["image"], _DEL), "expected an object with 'image' and 'annotations'"),
        (_set(["annotations"], {}), "'annotations' must be a list"),
        (_set(["image", "height"], _DEL), "has no 'height'"),
        (_set(["image", "width"], "30"), "width must be a positive integer"),
        (_set(["image", "width"], 0), "width must be a positive integer"),
        (_set(["image", "image_id"], 1.5), "image_id must be an integer"),
        (_set(["image", "file_name"], None), "file_name must be a string"),
        (_set(["annotations", 1], [1, 2]), "annotation 1: must be an object"),
        (_set(["annotations", 1, "bbox"], _DEL), "annotation 1: missing key 'bbox'"),
        (_set(["annotations", 0, "segmentation"], _DEL), "annotation 0: missing key 'segmentation'"),
        (_set(["annotations", 1, "bbox"], [1, 2, 3]), "annotation 1: bbox must be a list of 4 numbers"),
        (_set(["annotations", 1, "bbox"], [1, 2, "3", 4]), "bbox must be a list of 4 numbers"),
        (_set(["annotations", 1, "bbox"], [1, 2, -3, 4]), "negative width"),
        (_set(["annotations", 1, "area"], "18"), "area must be a non-negative number"),
        (_set(["annotations", 1, "area"], True), "area must be a non-negative number"),
        (_set(["annotations", 1, "id"], "2"), "id must be an integer"),
        (_set(["annotations", 1, "id"], 1), "annotation 1: id 1 is used twice"),
        (_set(["annotations", 1, "predicted_iou"], "high"), "predicted_iou must be a number"),
        (_set(["annotations", 1, "point_coords"], [[1, 2, 3]]), "point_coords must be a list of"),
        (_set(["annotations", 1, "crop_box"], [0, 0]), "crop_box must be a list of 4 numbers"),
        (_set(["annotations", 1, "segmentation"], "abc"), "segmentation must be an RLE object"),
        (
            _set(["annotations", 1, "segmentation", "size"], [10, 10]),
            r"annotation 1: segmentation size \[10, 10\] does not match the image \(height 20, width 30\)",
        ),
        (_set(["annotations", 1, "segmentation", "size"], [20]), "size must be"),
        (_set(["annotations", 1, "segmentation", "counts"], "ab cd{}"), "outside the COCO RLE alphabet"),
        (_set(["annotations", 1, "segmentation", "counts"], [5, 5]), "counts sum to 10, expected 20"),
        (_set(["annotations", 1, "segmentation", "counts"], 12), "'counts' must be a string"),
    ],
)
def test_sa1b_malformed(tmp_path, mutate, message):
    data = _valid_sa1b()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SegAnyError, match=message) as err:
        read_sa1b(path)
    assert str(path) in str(err.value)


def test_sa1b_valid_fixture_reads(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(_valid_sa1b()))
    info, masks = iter_sa1b_masks(path)
    assert info["height"] == 20 and len(masks) == 2 and masks[0].sum() == 18


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"image": {', r"not valid JSON \(Expecting .* at line 1"),
        ("", "not valid JSON"),
        ("[1, 2]", "expected an object"),
        ('{"image": {"image_id": 1, "width": NaN', "not valid JSON"),
    ],
)
def test_sa1b_bad_json(tmp_path, text, message):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(SegAnyError, match=message):
        read_sa1b(path)


def test_sa1b_missing_and_binary(tmp_path):
    with pytest.raises(SegAnyError, match="no such file"):
        read_sa1b(tmp_path / "nope.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SegAnyError, match="not valid JSON"):
        read_sa1b(tmp_path / "bin.json")
    bad = _valid_sa1b()
    bad["annotations"][0]["area"] = float("nan")
    (tmp_path / "nan.json").write_text(json.dumps(bad))  # Python writes the NaN literal
    with pytest.raises(SegAnyError, match="area must be a non-negative number"):
        read_sa1b(tmp_path / "nan.json")


# -- COCO ----------------------------------------------------------------------------------------------


def test_coco_round_trip_with_pycocotools(tmp_path):
    masks_a, masks_b = make_masks(6, seed=1), make_masks(4, h=17, w=12, seed=2)
    info_b = {"image_id": 3, "width": 12, "height": 17, "file_name": "b.png"}
    path = tmp_path / "instances.json"
    write_coco(
        path,
        [
            (INFO, make_records(masks_a)),
            (info_b, [{"segmentation": m} for m in masks_b]),
            ({"image_id": 9, "width": 5, "height": 5, "file_name": "empty.jpg"}, []),
        ],
    )
    assert no_tmp_files(tmp_path)

    coco = COCO(str(path))
    assert sorted(coco.getImgIds()) == [3, 7, 9]
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "object", "supercategory": "object"}]
    for image_id, masks in [(7, masks_a), (3, masks_b)]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(anns) == len(masks)
        for ann, m in zip(anns, masks):
            assert ann["iscrowd"] == 0 and ann["category_id"] == 1
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), m)
            assert ann["area"] == m.sum()
    ann_ids = [a["id"] for a in coco.dataset["annotations"]]
    assert ann_ids == list(range(1, 11))
    assert coco.dataset["annotations"][2]["score"] == pytest.approx(0.52)
    assert "score" not in coco.dataset["annotations"][7]

    ours = read_coco(path)
    assert list(ours) == [7, 3, 9]
    assert ours[9] == ({"image_id": 9, "width": 5, "height": 5, "file_name": "empty.jpg"}, [])
    info, anns = ours[3]
    assert info == info_b
    for ann, m in zip(anns, masks_b):
        np.testing.assert_array_equal(decode_rle(ann["segmentation"]), m)


def test_coco_writer_ids_and_categories(tmp_path):
    cats = [{"id": 5, "name": "cat"}, {"id": 8, "name": "dog"}]
    w = CocoWriter(cats)
    m = make_masks(4)[3]
    assert w.add({"width": W, "height": H, "file_name": "a.jpg"}, [{"segmentation": m}]) == 1
    assert (
        w.add({"width": W, "height": H, "file_name": "b.jpg"}, [{"segmentation": m, "category_id": 8}]) == 2
    )
    with pytest.raises(SegAnyError, match="image id 2 is used twice"):
        w.add({"image_id": 2, "width": W, "height": H, "file_name": "c.jpg"}, [])
    with pytest.raises(SegAnyError, match=r"c\.jpg: record 0: category_id 3 is not one of \[5, 8\]"):
        w.add({"width": W, "height": H, "file_name": "c.jpg"}, [{"segmentation": m, "category_id": 3}])
    w.write(tmp_path / "c.json")
    coco = COCO(str(tmp_path / "c.json"))
    assert [a["category_id"] for a in coco.dataset["annotations"]] == [5, 8]
    assert [a["image_id"] for a in coco.dataset["annotations"]] == [1, 2]
    with pytest.raises(SegAnyError, match="category id 1 is used twice"):
        CocoWriter([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])


def test_read_coco_polygons_and_crowd(tmp_path):
    h, w = 40, 50
    poly = [[5.0, 5.0, 30.0, 6.0, 20.0, 30.0], [35, 30, 45, 30, 45, 38, 35, 38]]
    crowd = np.zeros((h, w), bool)
    crowd[30:38, 2:20] = True
    data = {
        "images": [{"id": 1, "width": w, "height": h, "file_name": "p.jpg", "license": 2}],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 2,
                "segmentation": poly,
                "bbox": [5, 5, 40, 33],
                "area": 400,
            },
            {
                "id": 11,
                "image_id": 1,
                "category_id": 2,
                "iscrowd": 1,
                "segmentation": mask_to_rle_pytorch(torch.from_numpy(crowd)[None])[0],
                "bbox": [2, 30, 18, 8],
                "area": 144,
            },
        ],
        "categories": [{"id": 2, "name": "thing"}],
    }
    path = tmp_path / "poly.json"
    path.write_text(json.dumps(data))
    coco = COCO(str(path))
    info, anns = read_coco(path)[1]
    assert info == {"image_id": 1, "width": w, "height": h, "file_name": "p.jpg", "license": 2}
    assert [a["iscrowd"] for a in anns] == [0, 1]
    for ann in anns:
        assert isinstance(ann["segmentation"]["counts"], str)
        ref = coco.annToMask(coco.anns[ann["id"]]).astype(bool)
        np.testing.assert_array_equal(decode_rle(ann["segmentation"]), ref)
        assert ref.any()
    np.testing.assert_array_equal(decode_rle(anns[1]["segmentation"]), crowd)


def _valid_coco() -> dict:
    m = np.zeros((20, 30), bool)
    m[2:5, 3:9] = True
    ann = {
        "id": 1,
        "image_id": 4,
        "category_id": 1,
        "segmentation": encode_rle(m),
        "bbox": [3, 2, 6, 3],
        "area": 18,
        "iscrowd": 0,
    }
    return {
        "images": [{"id": 4, "width": 30, "height": 20, "file_name": "a.jpg"}],
        "annotations": [ann, dict(copy.deepcopy(ann), id=2)],
        "categories": [{"id": 1, "name": "object"}],
    }


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set(["images"], _DEL), "expected 'images' and 'annotations' lists"),
        (_set(["annotations"], "x"), "expected 'images' and 'annotations' lists"),
        (_set(["categories"], {}), "'categories' must be a list"),
        (_set(["categories", 0, "id"], "1"), "category 0 must be an object with an integer id"),
        (_set(["images", 0, "height"], _DEL), "image 0: the image entry has no 'height'"),
        (_set(["images", 0, "id"], None), "image id must be an integer"),
        (lambda d: d["images"].append(dict(d["images"][0])), "image 1: image id 4 is used twice"),
        (_set(["annotations", 1, "image_id"], 5), r"annotation 1: image_id 5 is not in 'images'"),
        (_set(["annotations", 1, "image_id"], [4]), r"image_id \[4\] is not in 'images'"),
        (_set(["annotations", 1, "category_id"], 3), "category_id 3 is not in 'categories'"),
        (_set(["annotations", 1, "id"], 1), "id 1 is used twice"),
        (_set(["annotations", 1, "area"], _DEL), "missing key 'area'"),
        (_set(["annotations", 1, "iscrowd"], 2), "iscrowd must be 0 or 1"),
        (_set(["annotations", 1, "bbox"], [0, 0, 1]), "bbox must be a list of 4 numbers"),
        (_set(["annotations", 1, "segmentation", "size"], [30, 20]), "does not match the image"),
        (_set(["annotations", 1, "segmentation"], [[1, 2, 3, 4]]), "polygon segmentation must be"),
        (_set(["annotations", 1, "segmentation"], []), "polygon segmentation must be"),
        (_set(["annotations", 1, "segmentation"], [[1, 2, 3, 4, 5, "6"]]), "polygon segmentation must be"),
        (_set(["annotations", 1, "score"], "x"), "score must be a number"),
    ],
)
def test_coco_malformed(tmp_path, mutate, message):
    data = _valid_coco()
    mutate(data)
    path = tmp_path / "bad_coco.json"
    path.write_text(json.dumps(data))
    with pytest.raises(SegAnyError, match=message) as err:
        read_coco(path)
    assert str(path) in str(err.value)


def test_coco_valid_fixture_and_bad_json(tmp_path):
    data = _valid_coco()
    (tmp_path / "ok.json").write_text(json.dumps(data))
    out = read_coco(tmp_path / "ok.json")
    assert len(out[4][1]) == 2 and out[4][1][0]["area"] == 18
    no_cats = copy.deepcopy(data)
    del no_cats["categories"]
    (tmp_path / "nocat.json").write_text(json.dumps(no_cats))
    assert len(read_coco(tmp_path / "nocat.json")[4][1]) == 2
    (tmp_path / "bad.json").write_text('{"images": [}')
    with pytest.raises(SegAnyError, match=r"bad\.json: not valid JSON"):
        read_coco(tmp_path / "bad.json")
