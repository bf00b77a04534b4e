"""``segany annotate`` (stage 3): dataset layout, manifest, SIGKILL + rerun, idempotence, bad inputs."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import synthetic_image

from segany.cli import main
from segany.engine.annotate import PAUSE_ENV
from segany.io.sa1b import read_sa1b
from tests.reliability_tally import KILL_ENV, write_tally

# Tiny model, few prompts, no quality filters: fast, and the random model still yields masks.
FAST = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
        "--min-mask-region-area", "0"]


def make_images(folder: Path, n: int = 6) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(synthetic_image(32, 40, seed=i)).save(p)
        paths.append(p)
    return paths


def manifest_rows(ds: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(ds / "manifest.sqlite")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def check_dataset(ds: Path, n: int) -> None:
    """Exactly one valid SA-1B file and one image per input, no temp files, manifest lists each once."""
    files = sorted(p.name for p in (ds / "sa1b").iterdir())
    assert files == sorted([f"img{i}.json" for i in range(n)] + [f"img{i}.png" for i in range(n)]), files
    assert not [p for p in ds.rglob("*") if p.name.endswith(".tmp")]
    ids = set()
    for i in range(n):
        info, anns = read_sa1b(ds / "sa1b" / f"img{i}.json")
        assert info["file_name"] == f"img{i}.png" and (info["height"], info["width"]) == (32, 40)
        ids.add(info["image_id"])
        (n_masks,) = manifest_rows(ds, f"SELECT n_masks FROM images WHERE name = 'img{i}'")[0]
        assert n_masks == len(anns)
        stages = manifest_rows(
            ds, f"SELECT stage FROM annotations a JOIN images i ON a.image_id = i.id WHERE i.name = 'img{i}'"
        )
        assert [s for (s,) in stages] == ["automatic"] * len(anns)
    assert len(ids) == n
    rows = manifest_rows(ds, "SELECT name, status FROM images ORDER BY name")
    assert rows == [(f"img{i}", "done") for i in range(n)]


def run_cli(args: list[str]) -> int:
    """``main``'s exit status, argparse's exits included."""
    try:
        return main(args)
    except SystemExit as e:
        return int(e.code)


def annotate_cmd(images: Path, ds: Path, model: Path) -> list[str]:
    entry = "import sys; from segany.cli import main; sys.exit(main())"
    return [sys.executable, "-c", entry, "annotate", str(images), "-o", str(ds), "--model", str(model), *FAST]


def test_sigkill_mid_run_then_rerun(tmp_path, tiny_checkpoint):
    images, ds = tmp_path / "images", tmp_path / "ds"
    make_images(images)
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_ENV: "3"}
    proc = subprocess.Popen(annotate_cmd(images, ds, tiny_checkpoint), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        # the first annotation file appears, then the run pauses before marking it done: kill it there
        while not list((ds / "sa1b").glob("*.json")) if (ds / "sa1b").is_dir() else True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no annotation file appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    written = list((ds / "sa1b").glob("*.json"))
    done = manifest_rows(ds, "SELECT COUNT(*) FROM images WHERE status = 'done'")[0][0]
    assert len(written) >= 1 and done < len(written)  # killed between the file and the manifest
    (ds / "sa1b" / ".img5.json.abc123.tmp").write_text("{half a fi")  # as a kill inside a write leaves

    env.pop(PAUSE_ENV)
    rerun = subprocess.run(annotate_cmd(images, ds, tiny_checkpoint), env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "6 images" in rerun.stdout and "0 failed" in rerun.stdout
    check_dataset(ds, 6)
    # the killed run never finished; the rerun did
    assert len(manifest_rows(ds, "SELECT id FROM runs WHERE finished IS NOT NULL")) == 1
    write_tally(KILL_ENV, {
        "what": "`segany annotate` (6 images, tiny model)",
        "killed": f"SIGKILL after {len(written)} SA-1B file(s) written and {done} marked done (between writing an "
                  "image's file and marking it done), plus a half-written `.tmp` file added",
        "checked": "the same command again: exit 0, '6 images', '0 failed'; one SA-1B JSON that reads back and one "
                   "image per input (each image annotated exactly once), each marked done once in the manifest, no "
                   "`.tmp` left, one finished run",
        "outcome": "all 6 images annotated once",
    }, append=True)


def test_rerun_is_idempotent_and_redoes_damage(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    images, ds = tmp_path / "images", tmp_path / "ds"
    make_images(images, 3)
    args = ["annotate", str(images), "-o", str(ds), "--model", str(tiny_checkpoint), *FAST]
    assert main(args) == 0
    assert "3 done, 0 skipped" in capsys.readouterr().out
    check_dataset(ds, 3)
    before = {p.name: p.stat().st_mtime_ns for p in (ds / "sa1b").iterdir()}
    ids = manifest_rows(ds, "SELECT name, id FROM images ORDER BY id")

    assert main(args) == 0
    assert "0 done, 3 skipped" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (ds / "sa1b").iterdir()} == before

    (ds / "sa1b" / "img1.json").unlink()  # someone deleted one: it is done again, with the same image id
    assert main(args) == 0
    assert "1 done, 2 skipped" in capsys.readouterr().out
    check_dataset(ds, 3)
    assert manifest_rows(ds, "SELECT name, id FROM images ORDER BY id") == ids


def test_dataset_feeds_training(tmp_path, tiny_checkpoint, monkeypatch):
    """The folder is what the training pipeline reads: ``{type: sa1b, root: DATASET_DIR/sa1b}``."""
    from segany.training.data import SA1BDataset

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    images, ds = tmp_path / "images", tmp_path / "ds"
    make_images(images, 2)
    assert main(["annotate", str(images), "-o", str(ds), "--model", str(tiny_checkpoint), *FAST]) == 0
    data = SA1BDataset(ds / "sa1b", image_size=128, max_masks=4, min_area=1)
    assert len(data) == 2
    assert data[0]["image"].shape == (3, 128, 128)


def test_unreadable_image_is_reported_and_others_done(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    images, ds = tmp_path / "images", tmp_path / "ds"
    make_images(images, 2)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    assert main(["annotate", str(images), "-o", str(ds), "--model", str(tiny_checkpoint), *FAST]) == 1
    out, err = capsys.readouterr()
    assert "2 done, 0 skipped, 1 failed" in out and "broken.jpg" in err
    assert manifest_rows(ds, "SELECT status FROM images WHERE name = 'broken'") == [("failed",)]
    assert not (ds / "sa1b" / "broken.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pred-iou-thresh", "2"], "--pred-iou-thresh must be in [0, 1]"),
        (["--existing", "."], "--existing goes with --semi"),
        (["--semi", "--max-overlap", "1.5"], "--max-overlap must be in [0, 1]"),
        (["--semi", "--existing-stage", "robot"], "--existing-stage must be one of"),
        (["--ray-actors", "0", "--ray", "local"], "--ray-actors must be >= 1"),
        (["--points-per-side", "x"], "invalid int value"),
    ],
)
def test_bad_options_exit_2(tmp_path, tiny_checkpoint, capsys, extra, message):
    images = tmp_path / "images"
    make_images(images, 1)
    assert run_cli(["annotate", str(images), "-o", str(tmp_path / "ds"), "--model", str(tiny_checkpoint), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("segany annotate: error:")


def test_bad_inputs_exit_2(tmp_path, tiny_checkpoint, capsys):
    assert main(["annotate", str(tmp_path / "nope"), "-o", str(tmp_path / "ds")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    images = make_images(tmp_path / "images", 1)
    (tmp_path / "file").write_text("x")
    assert main(["annotate", str(images[0]), "-o", str(tmp_path / "file"), "--model", str(tiny_checkpoint)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["annotate", str(images[0]), "-o", str(tmp_path / "ds"), "--model", str(tmp_path / "no.pt")]) == 2
    assert capsys.readouterr().err.startswith("segany annotate: error:")


def test_empty_masks_and_undefined_scores_are_dropped(tmp_path, tiny_checkpoint, monkeypatch):
    """Hole removal can empty a mask, whose stability is then 0 / 0: neither is written (SA-1B has neither)."""
    import json

    import numpy as np

    from segany.engine import annotate as annotate_mod
    from segany.engine.annotate import AnnotateSettings, Generated, annotate
    from segany.io.rle import encode_rle

    mask = np.zeros((32, 40), bool)
    mask[2:9, 3:12] = True
    good = {"segmentation": encode_rle(mask), "predicted_iou": 0.9, "stability_score": 0.96}
    bad = {"segmentation": encode_rle(mask), "predicted_iou": 0.9, "stability_score": float("nan")}
    empty = {"segmentation": encode_rle(np.zeros_like(mask)), "area": 0, "predicted_iou": 0.9, "stability_score": 1.0}

    def fake(paths, model_file, device, kwargs):
        for i, _ in enumerate(paths):
            yield Generated(i, 32, 40, json.dumps([bad, good, empty]))

    monkeypatch.setattr(annotate_mod, "generate_in_process", fake)
    images = make_images(tmp_path / "images", 1)
    res = annotate(images, tmp_path / "ds", AnnotateSettings({}), model=str(tiny_checkpoint), progress=False)
    assert (res.done, res.masks) == (1, 1)
    assert read_sa1b(tmp_path / "ds" / "sa1b" / "img0.json")[1][0]["stability_score"] == 0.96
