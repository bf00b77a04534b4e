"""``segany everything``: formats, resume, failures and bad options, run in-process on a tiny model."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_image
from PIL import Image

from segany import cli
from segany.automatic.generator import SamAutomaticMaskGenerator
from segany.io.labelmaps import read_label_map
from segany.io.png import label_ids
from segany.io.sa1b import read_sa1b

# Thresholds low enough for the tiny random model (logits within +-0.3, predicted IoUs about 0.2).
LOW = [
    "--points-per-side", "8", "--pred-iou-thresh", "0.1", "--stability-score-thresh", "0.3",
    "--stability-score-offset", "0.01",
]
SIZES = {"a/x.png": (96, 128), "b/x.png": (80, 100), "c.jpg": (64, 72)}  # two images share the stem "x"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds overhead (badly so on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    for i, (rel, (h, w)) in enumerate(SIZES.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_image(h, w, seed=i)).save(path, quality=95)
    return root


def everything(*argv: str | os.PathLike) -> tuple[int, str, str]:
    """Run ``segany everything ARGV`` in-process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(["everything", *map(str, argv)])
        except SystemExit as e:  # argparse errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def summary(stdout: str) -> str:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("everything:")]
    assert len(lines) == 1, stdout
    return lines[0]


def messages(stderr: str) -> list[str]:
    """stderr lines that are not the progress bar."""
    return [p.strip() for ln in stderr.splitlines() for p in ln.split("\r") if p.startswith("segany")]


# -- formats ---------------------------------------------------------------------------------------


def test_sa1b(images, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    code, stdout, _ = everything(images, "-o", out, "--model", tiny_checkpoint, *LOW)
    assert code == 0
    assert "3 images (3 done, 0 skipped, 0 failed)" in summary(stdout)
    n = 0
    for rel, (h, w) in SIZES.items():
        info, anns = read_sa1b(out / Path(rel).with_suffix(".json"))
        assert (info["height"], info["width"], info["file_name"]) == (h, w, rel)
        n += len(anns)
    assert n >= 3 and f"{n} masks" in summary(stdout)


def test_coco(images, tmp_path, tiny_checkpoint):
    from pycocotools.coco import COCO

    out = tmp_path / "out"
    code, _, _ = everything(images, "-o", out, "--format", "coco", "--model", tiny_checkpoint, *LOW)
    assert code == 0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(out / "annotations.json"))
    assert sorted(im["file_name"] for im in coco.dataset["images"]) == sorted(SIZES)
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) >= 3
    for img in coco.dataset["images"]:
        h, w = SIZES[img["file_name"]]
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            assert coco.annToMask(ann).shape == (h, w)
    parts = sorted(p.relative_to(out / ".parts").as_posix() for p in (out / ".parts").rglob("*.json"))
    assert parts == ["a/x.json", "b/x.json", "c.json"]


def test_png_label_maps(images, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    code, _, _ = everything(images, "-o", out, "--format", "png", "--model", tiny_checkpoint, *LOW)
    assert code == 0
    total = 0
    for rel, (h, w) in SIZES.items():
        lm = read_label_map(out / Path(rel).with_suffix(".png"))
        assert lm.shape == (h, w)
        ids = set(np.unique(lm).tolist()) - {0}
        assert ids <= set(label_ids(len(ids) + 10))
        total += len(ids)
    assert total >= 3


def test_overlay_and_cutouts(images, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    code, _, _ = everything(images, "-o", out, "--overlay", "--cutouts", "--model", tiny_checkpoint, *LOW)
    assert code == 0
    for rel, (h, w) in SIZES.items():
        name = Path(rel).with_suffix("")
        with Image.open(out / f"{name}_overlay.png") as im:
            assert (im.size, im.mode) == ((w, h), "RGB")
        _, anns = read_sa1b(out / f"{name}.json")
        cut = sorted((out / f"{name}_cutouts").glob("*.png"))
        assert [p.name for p in sorted(cut, key=lambda p: int(p.stem))] == [f"{i}.png" for i in range(1, len(anns) + 1)]
        for p, ann in zip(sorted(cut, key=lambda p: int(p.stem)), anns):
            with Image.open(p) as im:
                assert im.mode == "RGBA"
                bw, bh = ann["bbox"][2] + 1, ann["bbox"][3] + 1  # the generator's boxes are inclusive
                assert im.size == (round(bw), round(bh))


def test_same_stem_in_one_folder(tmp_path, tiny_checkpoint):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(synthetic_image(40, 48, 0)).save(folder / "x.png")
    Image.fromarray(synthetic_image(40, 48, 1)).save(folder / "x.jpg")
    out = tmp_path / "out"
    code, _, _ = everything(folder, "-o", out, "--model", tiny_checkpoint, *LOW)
    assert code == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["x.jpg.json", "x.png.json"]


# -- resume, failures, killed runs -----------------------------------------------------------------


def test_resume_skips_done_images(images, tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "out"
    assert everything(images, "-o", out, "--model", tiny_checkpoint, *LOW)[0] == 0
    outputs = sorted(out.rglob("*.json"))
    mtimes = {p: p.stat().st_mtime_ns for p in outputs}

    calls = []
    real = SamAutomaticMaskGenerator.generate
    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate", lambda self, im: calls.append(1) or real(self, im))
    code, stdout, _ = everything(images, "-o", out, "--model", tiny_checkpoint, *LOW)
    assert code == 0 and calls == []
    assert "3 images (0 done, 3 skipped, 0 failed), 0 masks" in summary(stdout)
    assert {p: p.stat().st_mtime_ns for p in outputs} == mtimes

    (out / "b" / "x.json").unlink()
    code, stdout, _ = everything(images, "-o", out, "--model", tiny_checkpoint, *LOW)
    assert code == 0 and len(calls) == 1
    assert "(1 done, 2 skipped, 0 failed)" in summary(stdout)
    assert read_sa1b(out / "b" / "x.json")[0]["file_name"] == "b/x.png"


def test_resume_redoes_images_missing_asked_for_extras(images, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    assert everything(images, "-o", out, "--model", tiny_checkpoint, *LOW)[0] == 0
    code, stdout, _ = everything(images, "-o", out, "--overlay", "--model", tiny_checkpoint, *LOW)
    assert code == 0 and "(3 done, 0 skipped" in summary(stdout)
    assert len(list(out.rglob("*_overlay.png"))) == 3


def test_corrupt_image_is_reported_and_skipped(images, tmp_path, tiny_checkpoint):
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    code, stdout, stderr = everything(images, "-o", out, "--format", "coco", "--model", tiny_checkpoint, *LOW)
    assert code == 1
    msgs = messages(stderr)
    assert len(msgs) == 2 and "broken.jpg" in msgs[0] and "empty.png" in msgs[1], msgs
    assert "Traceback" not in stderr
    assert "5 images (3 done, 0 skipped, 2 failed)" in summary(stdout)
    data = json.loads((out / "annotations.json").read_text())
    assert sorted(im["file_name"] for im in data["images"]) == sorted(SIZES)
    # A rerun skips the good ones and still fails the broken ones.
    code, stdout, _ = everything(images, "-o", out, "--format", "coco", "--model", tiny_checkpoint, *LOW)
    assert code == 1 and "(0 done, 3 skipped, 2 failed)" in summary(stdout)


def test_killed_run_is_recovered(images, tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "out"
    real = SamAutomaticMaskGenerator.generate
    calls = []

    def dies_on_the_second_image(self, image):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C, or the process was killed here
        return real(self, image)

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate", dies_on_the_second_image)
    code, _, stderr = everything(images, "-o", out, "--format", "coco", "--model", tiny_checkpoint, *LOW)
    assert code == 130 and "interrupted" in stderr
    assert not (out / "annotations.json").exists()
    assert len(list((out / ".parts").rglob("*.json"))) == 1
    # What a hard kill leaves: a temporary file of an atomic write, and a part cut short by some other tool.
    stray = out / ".parts" / "b" / ".x.json.k1ll3d.tmp"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_text('{"image": {"image_id": 2')
    (out / ".parts" / "c.json").write_text('{"image": {"image_id": 3, "width": 72, "hei')

    monkeypatch.setattr(SamAutomaticMaskGenerator, "generate", real)
    code, stdout, _ = everything(images, "-o", out, "--format", "coco", "--model", tiny_checkpoint, *LOW)
    assert code == 0
    assert "(2 done, 1 skipped, 0 failed)" in summary(stdout)
    assert not stray.exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    data = json.loads((out / "annotations.json").read_text())
    assert [im["id"] for im in data["images"]] == [1, 2, 3]
    for part in (out / ".parts").rglob("*.json"):
        read_sa1b(part)


def test_output_folder_inside_the_input_folder(images, tiny_checkpoint):
    out = images / "segs"
    args = (images, "-o", out, "--overlay", "--cutouts", "--model", tiny_checkpoint, *LOW)
    assert everything(*args)[0] == 0
    code, stdout, _ = everything(*args)
    assert code == 0 and "3 images (0 done, 3 skipped, 0 failed)" in summary(stdout)


# -- bad options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--points-per-side", "-4"], "--points-per-side"),
        (["--points-per-side", "0"], "--points-per-side"),
        (["--points-per-batch", "0"], "--points-per-batch"),
        (["--pred-iou-thresh", "1.5"], "--pred-iou-thresh"),
        (["--stability-score-thresh", "-0.1"], "--stability-score-thresh"),
        (["--stability-score-offset", "nan"], "--stability-score-offset"),
        (["--box-nms-thresh", "2"], "--box-nms-thresh"),
        (["--crop-overlap-ratio", "1"], "--crop-overlap-ratio"),
        (["--crop-n-layers", "-1"], "--crop-n-layers"),
        (["--max-mask-region-fraction", "0"], "--max-mask-region-fraction"),
        (["--min-mask-region-area", "-5"], "--min-mask-region-area"),
        (["--points-per-side", "2", "--crop-n-layers", "2", "--crop-n-points-downscale-factor", "2"], "points"),
        (["--points-per-side", "many"], "--points-per-side"),
        (["--format", "tiff"], "--format"),
    ],
)
def test_bad_options(images, tmp_path, tiny_checkpoint, argv, needle):
    code, stdout, stderr = everything(images, "-o", tmp_path / "out", "--model", tiny_checkpoint, *argv)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("segany everything: error:") and needle in lines[0], stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists()  # checked before anything is written


@pytest.mark.parametrize("case", ["missing input", "no -o", "empty folder", "out is a file", "bad model"])
def test_bad_inputs(images, tmp_path, tiny_checkpoint, case):
    argv: list = [images, "-o", tmp_path / "out", "--model", tiny_checkpoint, *LOW]
    if case == "missing input":
        argv[0] = tmp_path / "no_such_folder"
    elif case == "no -o":
        argv = [images, "--model", tiny_checkpoint]
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        argv[0] = tmp_path / "empty"
    elif case == "out is a file":
        (tmp_path / "out").write_text("x")
    else:
        argv[4] = tmp_path / "no_such_model.safetensors"
    code, _, stderr = everything(*argv)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in stderr, stderr
