"""scripts/plot_learning_curve.py: branches that were not shipped leave the main line, and the plot is written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_learning_curve.py"
FIELDS = "stage,images_seen,davis_miou1,davis_miou5,davis_box,coco_miou1,coco_miou5,coco_box,shipped"


def _script():
    spec = importlib.util.spec_from_file_location("plot_learning_curve", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(stages: list[tuple[str, int]]) -> list[dict[str, str]]:
    return [dict(zip(FIELDS.split(","), [s, str(n), "0.5", "0.6", "0.6", "0.4", "0.6", "0.6", "0"]))
            for s, n in stages]


def test_branches_start_at_the_row_they_left_and_the_line_skips_them():
    plot = _script()
    rows = _rows([("a", 10), ("b", 20), ("c (not shipped)", 25), ("c (not shipped)", 30),
                  ("d (not shipped)", 22), ("e", 21), ("f (not shipped)", 40)])
    line, side = plot.branches(rows)
    assert line == [0, 1, 5]
    assert side == [[1, 2, 3], [1, 4], [5, 6]]


def test_plot_writes_a_png(tmp_path):
    plot = _script()
    out = tmp_path / "curve.png"
    plot.plot(_rows([("a", 10), ("b", 20), ("b (not shipped)", 30)]), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
