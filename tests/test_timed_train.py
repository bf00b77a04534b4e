"""scripts/timed_train.py: a probe run sets max_steps from the measured rate; the run's weights are exported."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from segany import load_model
from segany.errors import SegAnyError

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("timed_train", ROOT / "scripts" / "timed_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(tmp_path: Path) -> Path:
    cfg = {
        "out_dir": str(tmp_path / "run"),
        "device": "cpu",
        "num_threads": 1,
        "model": "tiny_test",
        "train_data": [{"type": "synthetic", "n": 8, "seed": 0, "n_shapes": [1, 3]}],
        "batch_size": 1,
        "max_masks": 2,
        "num_workers": 0,
        "num_iterations": 2,
        "warmup_steps": 1,
        "progress": False,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_probe_then_run_fills_the_budget(tmp_path):
    mod = _script()
    export = tmp_path / "export"
    argv = ["--config", str(_config(tmp_path)), "--seconds", "4", "--probe-steps", "4", "--export", str(export)]
    assert mod.main(argv + ["--lr", "1e-3"]) == 0
    rate = mod.probe_rate(tmp_path / "run" / "probe" / "metrics.jsonl")
    summary = json.loads((export / "summary.json").read_text())
    assert rate > 0 and summary["steps"] >= 1
    assert summary["steps"] <= max(1, int(rate * 4))  # never more than the whole budget at the probe's rate
    assert yaml.safe_load((export / "config.yaml").read_text())["lr"] == pytest.approx(1e-3)  # a train flag
    assert load_model(export / "final.safetensors").image_size == 128


def test_a_given_rate_skips_the_probe(tmp_path):
    mod = _script()
    argv = [
        "--config",
        str(_config(tmp_path)),
        "--seconds",
        "10",
        "--steps-per-s",
        "0.3",
        "--export",
        str(tmp_path / "e"),
    ]
    assert mod.main(argv) == 0
    assert not (tmp_path / "run" / "probe").exists()
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["steps"] == 2  # int(0.3 * 0.85 * ~10)


def test_a_probe_without_a_logged_step_is_a_clear_error(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"kind": "val", "step": 0}) + "\n")
    with pytest.raises(SegAnyError, match="no training step"):
        _script().probe_rate(tmp_path / "m.jsonl")
