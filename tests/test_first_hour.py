"""What a new user met in their first hour (issue 20): every "0 masks" comes with its reason, a box gives
one mask inside it, empty candidates are reported as such, commands show progress and their defaults,
bad input exits 2, the install is quiet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segany.automatic.generator import FILTERS, SamAutomaticMaskGenerator, describe_filter_counts
from segany.cli import main
from segany.utils.masks import keep_parts_touching_box
from tests.conftest import synthetic_image

ROOT = Path(__file__).resolve().parents[1]


# -- 1. "segment everything" says what its filters removed ------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
        {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.5, "stability_score_offset": 0.5},
        {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "crop_n_layers": 1, "min_mask_region_area": 20,
         "max_mask_region_fraction": 0.5},
    ],
)
def test_filter_counts_add_up(tiny_model, kwargs):
    gen = SamAutomaticMaskGenerator(tiny_model, points_per_side=2, **kwargs)
    records = gen.generate(synthetic_image())
    counts = gen.filter_counts
    assert list(counts) == ["candidates", *FILTERS, "kept"]
    assert counts["kept"] == len(records)
    crops = 1 + 4 * kwargs.get("crop_n_layers", 0)
    assert counts["candidates"] == crops * 2 * 2 * 3  # prompts x the 3 multimask outputs, per crop
    assert counts["candidates"] - sum(counts[f] for f in FILTERS) == counts["kept"]


def test_filter_counts_name_the_filter_that_removed_everything(tiny_model):
    gen = SamAutomaticMaskGenerator(tiny_model, points_per_side=4, pred_iou_thresh=1.0)
    assert gen.generate(synthetic_image()) == []
    assert gen.filter_counts["pred_iou_thresh"] == 48 and gen.filter_counts["kept"] == 0
    assert describe_filter_counts(gen.filter_counts) == "0 of 48 candidates kept: pred_iou_thresh removed 48"
    gen = SamAutomaticMaskGenerator(tiny_model, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=1.0,
                                    stability_score_offset=10.0)
    gen.generate(synthetic_image())
    assert gen.filter_counts["stability_score_thresh"] > 0 and gen.filter_counts["pred_iou_thresh"] == 0


def test_everything_command_says_why_there_are_no_masks(tmp_path, tiny_checkpoint, image_file, capsys):
    code = main(["everything", str(image_file), "-o", str(tmp_path / "out"), "--points-per-side", "4",
                 "--pred-iou-thresh", "1", "--model", str(tiny_checkpoint)])
    err = capsys.readouterr().err
    assert code == 0
    assert "no masks: 0 of 48 candidates kept: pred_iou_thresh removed 48" in err
    assert "lower --pred-iou-thresh 1.0 / --stability-score-thresh 0.95" in err


def test_everything_on_only_unreadable_files_is_bad_input(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not an image")
    (folder / "b.png").write_bytes(b"\x89PNG broken")
    code = main(["everything", str(folder), "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint)])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: none of the 2 images could be read" in err and "Traceback" not in err


def test_everything_with_some_unreadable_files_is_a_partial_failure(tmp_path, tiny_checkpoint, image_file, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not an image")
    (folder / "good.png").write_bytes(image_file.read_bytes())
    code = main(["everything", str(folder), "-o", str(tmp_path / "out"), "--points-per-side", "2",
                 "--model", str(tiny_checkpoint)])
    assert code == 1 and "skipped" in capsys.readouterr().err


# -- 2. a box keeps its mask inside it ----------------------------------------------------------------


def test_parts_wholly_outside_the_box_are_dropped():
    mask = np.zeros((40, 50), bool)
    mask[10:20, 10:20] = True  # inside the box
    mask[15:18, 18:30] = True  # reaches out of it: the same part, kept whole
    mask[35:38, 45:48] = True  # a speck elsewhere
    out = keep_parts_touching_box(mask, [8, 8, 22, 22])
    want = mask.copy()
    want[35:38, 45:48] = False
    assert np.array_equal(out, want)
    assert not keep_parts_touching_box(mask, [0, 30, 5, 39]).any()  # nothing in the box: nothing kept
    assert np.array_equal(keep_parts_touching_box(mask, [46.5, 36.2, 46.6, 36.3]), mask & ~want)  # sub-pixel box
    empty = np.zeros((4, 4), bool)
    assert not keep_parts_touching_box(empty, [0, 0, 3, 3]).any()


def test_segment_box_is_one_mask_inside_the_box(tmp_path, tiny_checkpoint, image_file, capsys):
    code = main(["segment", str(image_file), "--box", "20,20,70,50", "-o", str(tmp_path / "o"),
                 "--model", str(tiny_checkpoint)])
    assert code == 0
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    (record,) = result["masks"]
    mask = np.asarray(Image.open(tmp_path / "o" / "mask.png")) > 127
    assert np.array_equal(mask, keep_parts_touching_box(mask, [20, 20, 70, 50]))
    assert record["area"] == int(mask.sum())


# -- 3. empty candidates are reported as such --------------------------------------------------------


def test_multimask_reports_empty_candidates(tmp_path, tiny_checkpoint, image_file, capsys, monkeypatch):
    from segany.predictor import SamPredictor

    h, w = np.asarray(Image.open(image_file)).shape[:2]
    masks = np.zeros((3, h, w), bool)
    masks[0, 10:40, 10:60] = True
    masks[1, 20:30, 20:30] = True  # masks[2] is empty: the model found nothing for that output

    def predict(self, *args, **kwargs):
        return masks, np.array([0.9, 0.5, 0.1], np.float32), np.zeros((3, 32, 32), np.float32)

    monkeypatch.setattr(SamPredictor, "predict", predict)
    code = main(["segment", str(image_file), "--point", "30,20", "--multimask", "-o", str(tmp_path / "o"),
                 "--model", str(tiny_checkpoint)])
    out = capsys.readouterr().out
    assert code == 0
    assert "3 mask(s) (1 empty: mask_2.png), best score 0.900" in out
    records = json.loads((tmp_path / "o" / "result.json").read_text())["masks"]
    assert [(r["file"], r["empty"], r["area"]) for r in records] == [
        ("mask_0.png", False, 1500), ("mask_1.png", False, 100), ("mask_2.png", True, 0)]


# -- 6. progress, help texts with defaults, a quiet install -------------------------------------------


def _label_map_folder(root: Path, n: int = 2) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image = synthetic_image(64, 80, seed=i)
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        labels = np.zeros((64, 80), np.uint8)
        labels[10:30, 10:40] = 1
        labels[40:60, 50:75] = 2
        Image.fromarray(labels).save(root / "masks" / f"im{i}.png")
    return root


def test_eval_shows_progress(tmp_path, tiny_checkpoint, capsys):
    data = _label_map_folder(tmp_path / "data")
    code = main(["eval", "--data", str(data), "--protocol", "box", "--model", str(tiny_checkpoint)])
    captured = capsys.readouterr()
    assert code == 0
    assert "eval box" in captured.err and "2/2" in captured.err  # the progress bar, on stderr
    assert json.loads(captured.out)["num_images"] == 2  # stdout stays the JSON summary


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("eval", ["--protocol", "(default: clicks)", "(default: 32)", "(default: 20)"]),
        ("serve", ["(default: 8000)", "(default: 1024)"]),
    ],
)
def test_help_shows_what_options_do_and_their_defaults(command, shown, capsys):
    pytest.importorskip("fastapi")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in shown:
        assert s in text


def test_project_license_is_an_spdx_string():
    """A TOML table here makes setuptools print a deprecation warning on every install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])


def test_predict_docstring_states_the_low_res_size(tiny_model):
    from segany.predictor import SamPredictor

    assert "256 x 256``" not in SamPredictor.predict.__doc__
    pred = SamPredictor(tiny_model)
    pred.set_image(synthetic_image())
    s = tiny_model.image_size // 4
    assert pred.predict(np.array([[10, 10]]), np.array([1]))[2].shape == (3, s, s)
    assert "model.image_size // 4" in SamPredictor.predict.__doc__
