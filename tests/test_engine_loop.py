"""``segany engine``: 2 rounds with the tiny model on tiny images, resume, table files, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_image
from test_engine_annotate import FAST, make_images

from segany.cli import main


def make_label_map_folder(root: Path, n: int = 2) -> Path:
    """A held-out folder: images/ + masks/ with the rectangle (1) and the disc (2) of synthetic_image."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    h, w = 32, 40
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        Image.fromarray(synthetic_image(h, w, seed=100 + i)).save(root / "images" / f"v{i}.png")
        lm = np.zeros((h, w), np.uint8)
        lm[h // 4 : h // 2, w // 5 : w // 2] = 1
        lm[(yy - 3 * h // 4) ** 2 + (xx - 3 * w // 4) ** 2 < (min(h, w) // 6) ** 2] = 2
        Image.fromarray(lm).save(root / "masks" / f"v{i}.png")
    return root


@pytest.fixture()
def engine_args(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_images(tmp_path / "images", 4)
    make_label_map_folder(tmp_path / "val")
    return ["engine", "--images", str(tmp_path / "images"), "--val", str(tmp_path / "val"), "--rounds", "2",
            "--steps", "2", "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint), *FAST]


def test_two_rounds(tmp_path, engine_args, capsys):
    assert main(engine_args) == 0
    out = capsys.readouterr().out
    assert "| round | images | masks |" in out
    rows = json.loads((tmp_path / "out" / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0.0 <= r["click_miou1"] <= 1.0 and 0.0 <= r["box_miou"] <= 1.0
    for r in rows[1:]:
        assert r["images"] == 4 and r["masks"] > 0 and r["train_steps"] == 2
        assert Path(r["model_out"]).is_file()
    # round 2 annotated with round 1's weights, and trained from them
    assert rows[2]["model_in"] == rows[1]["model_out"] != rows[0]["model_out"]
    assert (tmp_path / "out" / "round_2" / "dataset" / "sa1b" / "img3.json").is_file()
    assert "| 2 | 4 |" in (tmp_path / "out" / "rounds.md").read_text()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "rounds.png").read_bytes()[:4] == b"\x89PNG"

    # a rerun finds every round done and only prints the table again
    assert main(engine_args) == 0
    assert json.loads((tmp_path / "out" / "rounds.json").read_text()) == rows


def test_label_map_images_and_held_out_overlap(tmp_path, tiny_checkpoint, capsys):
    val = make_label_map_folder(tmp_path / "val")
    base = ["engine", "--val", str(val), "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint)]
    assert main([*base, "--images", str(val)]) == 2
    assert "held-out images are also annotated" in capsys.readouterr().err
    assert main([*base, "--images", str(tmp_path / "val" / "images"), "--images-split", "train"]) == 2
    assert "--images-split needs a label-map folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [(["--rounds", "0"], "--rounds must be >= 1"), (["--steps", "0"], "--steps must be >= 1"),
     (["--max-images", "0"], "--max-images must be >= 1"), (["--train-config", "nope.yaml"], "nope.yaml")],
)
def test_bad_options(engine_args, capsys, extra, message):
    assert main([*engine_args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("segany engine: error:")
