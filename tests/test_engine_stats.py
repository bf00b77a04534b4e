"""``segany dataset-stats``: numbers on a hand-made dataset, figures, bad inputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from segany.cli import main
from segany.engine.stats import dataset_stats
from segany.io.rle import encode_rle
from segany.io.sa1b import write_sa1b

H, W = 20, 20


def square(side: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[:side, :side] = True
    return m


@pytest.fixture()
def folder(tmp_path):
    """3 images: no mask; 5 masks of 10 x 10 (relative size 0.5); 12 masks of 4 x 4 (0.2)."""
    root = tmp_path / "data"
    for i, (n, side) in enumerate(((0, 1), (5, 10), (12, 4))):
        recs = [{"segmentation": encode_rle(square(side)), "predicted_iou": 0.9} for _ in range(n)]
        write_sa1b(root / f"im{i}.json", {"image_id": i, "width": W, "height": H, "file_name": f"im{i}.jpg"}, recs)
    (root / "notes.json").write_text(json.dumps({"not": "sa1b"}))
    return root


def test_numbers(folder):
    s = dataset_stats(folder)
    assert (s["images"], s["masks"], s["other_json_files"]) == (3, 17, 1)
    mpi = s["masks_per_image"]
    assert (mpi["mean"], mpi["median"], mpi["min"], mpi["max"]) == (round(17 / 3, 3), 5.0, 0, 12)
    assert mpi["share_of_images"] == {"0": round(1 / 3, 4), "1-10": round(1 / 3, 4), "11-50": round(1 / 3, 4),
                                      "51-100": 0.0, "101-200": 0.0, ">200": 0.0}
    rel = s["relative_mask_size"]
    assert rel["quantiles"]["0.1"] == pytest.approx(0.2) and rel["quantiles"]["0.9"] == pytest.approx(0.5)
    shares = dict(zip(rel["bin_edges"], rel["share_of_masks"]))
    assert shares[0.2] == round(12 / 17, 4) and shares[0.5] == round(5 / 17, 4)
    assert math.isclose(sum(rel["share_of_masks"]), 1.0, abs_tol=1e-3)
    assert s["predicted_iou"] == {"mean": 0.9, "masks": 17}


def test_cli_writes_json_and_figures(folder, tmp_path, capsys):
    out = tmp_path / "stats"
    assert main(["dataset-stats", str(folder), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 images, 17 masks" in text and "median 0.200" in text
    assert json.loads((out / "stats.json").read_text())["masks"] == 17
    pytest.importorskip("matplotlib")
    for name in ("masks_per_image.png", "relative_mask_size.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs(tmp_path, folder, capsys):
    assert main(["dataset-stats", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["dataset-stats", str(empty)]) == 2
    assert "no SA-1B annotation files" in capsys.readouterr().err
    (folder / "bad.json").write_text(json.dumps({"image": {"image_id": 1}, "annotations": []}))
    assert main(["dataset-stats", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and len(err.strip().splitlines()) == 1
