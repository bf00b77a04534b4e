"""``segany dataset-stats``: the numbers and figures the SAM paper gives for SA-1B (figure 5 / 6).

* masks per image: mean / median / range, and the share of images in the paper's bins (1-10, 11-50,
  51-100, 101-200, >200);
* relative mask size: ``sqrt(mask area / image area)``, the paper's measure (so a mask of a quarter of the
  image is 0.5), as a histogram of the share of masks;
* for an engine dataset, the annotations per stage (from the manifest) and the predicted IoUs.

Written as ``stats.json`` plus ``masks_per_image.png`` and ``relative_mask_size.png`` (matplotlib, Agg,
imported only here).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from segany.errors import SegAnyError

#: The paper's bins of masks per image (upper bounds, inclusive).
MASK_COUNT_BINS = ((0, 0), (1, 10), (11, 50), (51, 100), (101, 200), (201, None))
SIZE_BINS = np.linspace(0.0, 1.0, 21)


def _sa1b_files(root: Path) -> tuple[list[Path], int]:
    """SA-1B JSONs under ``root`` (an engine dataset: its ``sa1b/``), and how many other JSONs were seen."""
    from segany.engine.dataset import DATA_DIR, MANIFEST
    from segany.io.sa1b import read_json

    if not root.is_dir():
        raise SegAnyError(f"{root}: no such folder")
    if (root / MANIFEST).is_file():
        return sorted((root / DATA_DIR).glob("**/*.json")), 0
    found, other = [], 0
    for p in sorted(root.rglob("*.json")):
        data = read_json(p)
        if isinstance(data, dict) and "image" in data and "annotations" in data:
            found.append(p)
        else:  # e.g. reports, COCO files, configs next to the annotations
            other += 1
    return found, other


def _bin_label(lo: int, hi: int | None) -> str:
    return f">{lo - 1}" if hi is None else (str(lo) if lo == hi else f"{lo}-{hi}")


def dataset_stats(root: str | Path) -> dict[str, Any]:
    """The statistics of a dataset folder (see the module docstring).

    Raises:
        SegAnyError: no such folder, no SA-1B file in it, or a malformed one (named).
    """
    from segany.io.sa1b import read_sa1b

    root = Path(root)
    files, other = _sa1b_files(root)
    if not files:
        raise SegAnyError(f"{root}: no SA-1B annotation files found")
    counts, rel_sizes, ious, pixels = [], [], [], []
    for p in files:
        info, anns = read_sa1b(p)
        image_area = info["height"] * info["width"]
        counts.append(len(anns))
        pixels.append(image_area)
        rel_sizes.extend(math.sqrt(a["area"] / image_area) for a in anns)
        ious.extend(a["predicted_iou"] for a in anns if "predicted_iou" in a)
    counts_a, sizes = np.asarray(counts), np.asarray(rel_sizes, dtype=np.float64)
    per_bin = {}
    for lo, hi in MASK_COUNT_BINS:
        n = int(np.count_nonzero((counts_a >= lo) & (counts_a <= (hi if hi is not None else np.inf))))
        per_bin[_bin_label(lo, hi)] = round(n / len(counts_a), 4)
    hist, _ = np.histogram(sizes, bins=SIZE_BINS)
    stats: dict[str, Any] = {
        "root": str(root),
        "images": len(files),
        "masks": int(counts_a.sum()),
        "other_json_files": other,
        "masks_per_image": {
            "mean": round(float(counts_a.mean()), 3),
            "median": float(np.median(counts_a)),
            "min": int(counts_a.min()),
            "max": int(counts_a.max()),
            "share_of_images": per_bin,
            "counts": counts,
        },
        "relative_mask_size": {
            "definition": "sqrt(mask area / image area)",
            "quantiles": (
                {q: round(float(np.quantile(sizes, float(q))), 4) for q in ("0.1", "0.25", "0.5", "0.75", "0.9")}
                if sizes.size else {}
            ),
            "bin_edges": [round(float(e), 3) for e in SIZE_BINS],
            "share_of_masks": [round(float(h) / max(sizes.size, 1), 4) for h in hist],
        },
        "image_megapixels_mean": round(float(np.mean(pixels)) / 1e6, 4),
        "predicted_iou": (
            {"mean": round(float(np.mean(ious)), 4), "masks": len(ious)} if ious else None
        ),
    }
    stages = _stages(root)
    if stages is not None:
        stats["stages"] = stages
    return stats


def _stages(root: Path) -> dict[str, int] | None:
    from segany.engine.dataset import MANIFEST, Manifest

    if not (root / MANIFEST).is_file():
        return None
    with Manifest(root / MANIFEST, create=False) as m:
        return m.stages()


def format_stats(stats: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    mpi, rel = stats["masks_per_image"], stats["relative_mask_size"]
    lines = [
        f"{stats['images']} images, {stats['masks']} masks; masks per image: mean {mpi['mean']:.1f}, "
        f"median {mpi['median']:g}, range {mpi['min']}-{mpi['max']}",
        "share of images by masks per image: "
        + ", ".join(f"{k}: {100 * v:.0f}%" for k, v in mpi["share_of_images"].items()),
    ]
    if rel["quantiles"]:
        q = rel["quantiles"]
        lines.append(f"relative mask size sqrt(area / image area): median {q['0.5']:.3f} "
                     f"(10% {q['0.1']:.3f}, 90% {q['0.9']:.3f})")
    if stats.get("predicted_iou"):
        lines.append(f"mean predicted IoU {stats['predicted_iou']['mean']:.3f}")
    if stats.get("stages"):
        lines.append("annotations by stage: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["stages"].items())))
    return "\n".join(lines)


def write_stats(stats: dict[str, Any], out_dir: Path) -> list[Path]:
    """``stats.json`` and, with matplotlib, the two figures; returns the paths written."""
    from segany.io.atomic import atomic_write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "stats.json"]
    atomic_write_json(paths[0], stats, indent=1)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # the numbers are the product; the figures are a bonus
        return paths
    from segany.io.atomic import atomic_write_bytes

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write_bytes(out_dir / name, buf.getvalue())
        paths.append(out_dir / name)

    mpi = stats["masks_per_image"]
    fig = Figure(figsize=(5, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    labels = list(mpi["share_of_images"])
    ax.bar(labels, [100 * v for v in mpi["share_of_images"].values()], color="tab:blue")
    ax.set(xlabel="number of masks per image", ylabel="percent of images",
           title=f"masks per image ({stats['images']} images, mean {mpi['mean']:.1f})")
    ax.grid(axis="y", alpha=0.3)
    save(fig, "masks_per_image.png")

    rel = stats["relative_mask_size"]
    fig = Figure(figsize=(5, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    edges = rel["bin_edges"]
    ax.bar(edges[:-1], [100 * v for v in rel["share_of_masks"]], width=np.diff(edges), align="edge",
           color="tab:green", edgecolor="white")
    ax.set(xlabel="relative segmentation mask size", ylabel="percent of masks", xlim=(0, 1),
           title=f"mask sizes ({stats['masks']} masks)")
    ax.grid(axis="y", alpha=0.3)
    save(fig, "relative_mask_size.png")
    return paths
