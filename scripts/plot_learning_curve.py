"""Plot the default model's learning curve (held-out mIoU against training images seen) from a CSV.

    python scripts/plot_learning_curve.py [docs/default_curve.csv] [-o docs/default_curve.png]

The CSV holds one row per evaluated checkpoint, every figure from ``benchmarks/eval_default.py`` on the
whole held-out set (DAVIS's last 5 sequences, COCO instances val; standard clicker): ``stage``,
``images_seen``, ``davis_miou1``, ``davis_miou5``, ``davis_box``, ``coco_miou1``, ``coco_miou5``,
``coco_box``, ``shipped`` (1 on the rows that were shipped as ``default``). Issue 17's targets are drawn
as dashed lines. Rows whose stage says "not shipped" are branches: each stage's rows are drawn thin,
from the last row of the line before them in the file, so the line itself joins only what was built on.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REPO = Path(__file__).resolve().parents[1]
#: issue 17's targets per panel: (metric suffix, value)
TARGETS = {"davis": (("miou1", 0.60), ("miou5", 0.85)), "coco": (("miou5", 0.75), ("box", 0.70))}
SERIES = (("miou1", "mIoU@1", "tab:blue", "o"), ("miou5", "mIoU@5", "tab:orange", "s"),
          ("box", "box mIoU", "tab:green", "^"))
TITLES = {"davis": "DAVIS (last 5 sequences, 91 objects)", "coco": "COCO instances val (767 objects)"}


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{path}: no rows")
    return rows


def branches(rows: list[dict[str, str]]) -> tuple[list[int], list[list[int]]]:
    """Indices of the main line and of each branch (a branch's first index is the main-line row it left)."""
    line: list[int] = []
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if "not shipped" in r["stage"]:
            groups.setdefault(r["stage"], [line[-1]] if line else []).append(i)
        else:
            line.append(i)
    return line, list(groups.values())


def plot(rows: list[dict[str, str]], out: Path) -> None:
    fig = Figure(figsize=(10, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    x = [int(r["images_seen"]) for r in rows]
    line, side = branches(rows)
    # a stage of the main line starts where the previous one's last checkpoint stands
    starts = sorted({x[j] for i, j in zip(line[1:], line) if rows[i]["stage"] != rows[j]["stage"]})
    for i, panel in enumerate(("davis", "coco")):
        ax = fig.add_subplot(1, 2, i + 1)
        for key, label, color, marker in SERIES:
            y = [float(r[f"{panel}_{key}"]) for r in rows]
            ax.plot([x[j] for j in line], [y[j] for j in line], color=color, marker=marker, markersize=3,
                    label=label)
            for b in side:
                ax.plot([x[j] for j in b], [y[j] for j in b], color=color, marker=marker, markersize=2,
                        linewidth=0.7, alpha=0.45)
            shipped = [(xi, yi) for xi, yi, r in zip(x, y, rows) if r.get("shipped") == "1"]
            if shipped:
                ax.plot(*zip(*shipped), linestyle="none", marker="*", markersize=11, color=color)
        for key, value in TARGETS[panel]:
            color = next(c for k, _, c, _ in SERIES if k == key)
            ax.axhline(value, color=color, linestyle="--", linewidth=0.8)
        for s in starts:
            ax.axvline(s, color="gray", linestyle=":", linewidth=0.6)
        ax.set(title=TITLES[panel], xlabel="training images seen (dotted: a stage starts)", ylim=(0.2, 0.9))
        ax.set_ylabel("mIoU" if i == 0 else "")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("default: held-out learning curve (standard clicker; star: shipped; faint: branches not shipped;"
                 " dashed: issue 17 targets)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, format="png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="?", type=Path, default=REPO / "docs" / "default_curve.csv")
    ap.add_argument("-o", "--out", type=Path, default=REPO / "docs" / "default_curve.png")
    args = ap.parse_args()
    plot(read_rows(args.csv), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
