"""``segany annotate --semi`` (stage 2): existing masks kept, new ones only off them, the uncovered report."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_image

from segany.cli import main
from segany.engine import annotate as annotate_mod
from segany.engine.annotate import AnnotateSettings, Generated, annotate
from segany.engine.semi import new_masks_off_existing, uncovered_regions
from segany.io.rle import encode_rle
from segany.io.sa1b import read_sa1b, write_sa1b

H, W = 32, 40


def box_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def record(mask: np.ndarray, iou: float = 0.9) -> dict:
    ys, xs = np.nonzero(mask)
    return {"segmentation": encode_rle(mask), "area": int(mask.sum()),
            "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
            "predicted_iou": iou, "stability_score": 0.97, "point_coords": [[float(xs.mean()), float(ys.mean())]],
            "crop_box": [0, 0, W, H]}


LEFT_HALF = box_mask(0, 0, 20, H)  # what people labelled
ON_EXISTING = box_mask(0, 0, 10, H)  # a part of it: dropped
OFF_EXISTING = box_mask(25, 5, 35, 15)  # new: kept
HALF_ON = box_mask(15, 20, 25, 30)  # half on the labelled part: dropped at max_overlap 0.2


def test_new_masks_off_existing():
    existing = [{"segmentation": encode_rle(LEFT_HALF)}]
    recs = [record(ON_EXISTING), record(OFF_EXISTING), record(HALF_ON)]
    kept = new_masks_off_existing(recs, existing, H, W, max_overlap=0.2)
    assert [r["bbox"] for r in kept] == [record(OFF_EXISTING)["bbox"]]
    assert len(new_masks_off_existing(recs, existing, H, W, max_overlap=0.5)) == 2  # half-on passes at 0.5
    assert len(new_masks_off_existing(recs, [], H, W, max_overlap=0.0)) == 3


def test_uncovered_regions():
    union = LEFT_HALF | OFF_EXISTING
    frac, regions = uncovered_regions(union, min_fraction=0.01, max_regions=5)
    assert frac == pytest.approx((H * 20 - 100) / (H * W))
    assert regions == [{"bbox": [20, 0, 20, H], "area": H * 20 - 100, "fraction": round((H * 20 - 100) / (H * W), 4)}]
    assert uncovered_regions(np.ones((H, W), bool), 0.01, 5) == (0.0, [])


@pytest.fixture()
def semi_folder(tmp_path):
    """Two images; a.png has people's masks (a.json beside it), b.png has none."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, name in enumerate(("a", "b")):
        Image.fromarray(synthetic_image(H, W, seed=i)).save(folder / f"{name}.png")
    write_sa1b(folder / "a.json", {"image_id": 7, "width": W, "height": H, "file_name": "a.png"},
               [{"segmentation": encode_rle(LEFT_HALF)}])
    return folder


def fake_generator(paths, model_file, device, kwargs):
    """Stands in for the model: the same three masks for every image."""
    recs = [record(ON_EXISTING), record(OFF_EXISTING, 0.8), record(HALF_ON)]
    for i, _ in enumerate(paths):
        yield Generated(i, H, W, json.dumps(recs))


def test_semi_keeps_existing_and_reports(tmp_path, semi_folder, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(annotate_mod, "generate_in_process", fake_generator)
    ds = tmp_path / "ds"
    images = sorted(semi_folder.glob("*.png"))
    res = annotate(images, ds, AnnotateSettings({}, semi=True), model=str(tiny_checkpoint), progress=False)
    assert (res.done, res.failed) == (2, 0)

    _, a = read_sa1b(ds / "sa1b" / "a.json")
    assert [x["id"] for x in a] == [1, 2]
    assert a[0]["segmentation"] == encode_rle(LEFT_HALF) and a[1]["bbox"] == record(OFF_EXISTING)["bbox"]
    _, b = read_sa1b(ds / "sa1b" / "b.json")
    assert len(b) == 3  # nothing labelled there: every mask is new

    db = sqlite3.connect(ds / "manifest.sqlite")
    stages = db.execute("SELECT i.name, a.stage FROM annotations a JOIN images i ON a.image_id = i.id "
                        "ORDER BY i.name, a.ann_id").fetchall()
    db.close()
    assert stages == [("a", "manual"), ("a", "semi-automatic")] + [("b", "semi-automatic")] * 3
    assert res.masks == 5 and res.masks_added == 4
    assert res.mean_predicted_iou == pytest.approx((0.8 + 0.9 + 0.8 + 0.9) / 4)  # a: the 0.8 one; b: all three

    report = json.loads((ds / "reports" / "uncovered.json").read_text())
    by_file = {e["file"]: e for e in report["per_image"]}
    assert by_file["sa1b/a.json"]["uncovered_fraction"] == pytest.approx((H * 20 - 100) / (H * W), abs=1e-4)
    assert by_file["sa1b/a.json"]["regions"][0]["bbox"] == [20, 0, 20, H]
    assert report["per_image"][0]["file"] == "sa1b/b.json"  # the least labelled first
    text = (ds / "reports" / "uncovered.txt").read_text()
    assert "2 images" in text and "sa1b/a.json: 42% unlabelled" in text


def test_semi_existing_of_wrong_size_fails_that_image(tmp_path, semi_folder, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(annotate_mod, "generate_in_process", fake_generator)
    write_sa1b(semi_folder / "b.json", {"image_id": 1, "width": 10, "height": 10, "file_name": "b.png"}, [])
    res = annotate(sorted(semi_folder.glob("*.png")), tmp_path / "ds", AnnotateSettings({}, semi=True),
                   model=str(tiny_checkpoint), progress=False)
    assert (res.done, res.failed) == (1, 1)
    assert "10x10 image, but the image is 40x32" in res.failures[0]


def test_semi_cli_with_existing_folder(tmp_path, semi_folder, tiny_checkpoint, capsys, monkeypatch):
    """The real (tiny) model end to end; existing annotations from another folder, by relative path."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    existing = tmp_path / "people"
    existing.mkdir()
    (semi_folder / "a.json").rename(existing / "a.json")
    rc = main(["annotate", str(semi_folder), "-o", str(tmp_path / "ds"), "--semi", "--existing", str(existing),
               "--model", str(tiny_checkpoint), "--points-per-side", "4", "--pred-iou-thresh", "0",
               "--stability-score-thresh", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 done" in out and "uncovered.txt" in out
    _, a = read_sa1b(tmp_path / "ds" / "sa1b" / "a.json")
    assert a[0]["segmentation"] == encode_rle(LEFT_HALF)
    assert Path(tmp_path / "ds" / "reports" / "uncovered.json").is_file()
