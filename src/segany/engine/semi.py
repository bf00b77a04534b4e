"""Stage 2, semi-automatic: add confident automatic masks where people have not labelled yet, and tell
people what is still uncovered.

The SAM paper's stage 2 showed annotators the confident automatic masks and asked for the rest; here
the order serves a tool that already has some masks per image (from people, the web tool, another
data set): the automatic masks that mostly fall on unlabelled pixels are added, and a report lists,
image by image, how much is still unlabelled and where the large unlabelled regions are, for people to
finish.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segany.io.atomic import atomic_write_json, atomic_write_text
from segany.io.rle import decode_rle


def covered(segmentations: Sequence[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """``H x W`` bool: the union of the masks (COCO RLEs)."""
    union = np.zeros((height, width), dtype=bool)
    for seg in segmentations:
        union |= decode_rle(seg)
    return union


def new_masks_off_existing(
    records: Sequence[dict[str, Any]], existing: Sequence[dict[str, Any]], height: int, width: int, max_overlap: float
) -> list[dict[str, Any]]:
    """The generator records whose mask lies on already-labelled pixels for at most ``max_overlap`` of its
    area (a duplicate of an existing mask, or a part of one, lies on them almost entirely)."""
    if not existing:
        return list(records)
    union = covered([a["segmentation"] for a in existing], height, width)
    kept = []
    for r in records:
        m = decode_rle(r["segmentation"])
        area = int(np.count_nonzero(m))
        if area and np.count_nonzero(m & union) / area <= max_overlap:
            kept.append(r)
    return kept


def uncovered_regions(
    union: np.ndarray, min_fraction: float, max_regions: int
) -> tuple[float, list[dict[str, Any]]]:
    """``(unlabelled fraction of the image, [large unlabelled regions])``: connected parts of the
    unlabelled pixels covering at least ``min_fraction`` of the image, largest first, each with its
    ``bbox`` (XYWH) and ``fraction``."""
    import cv2

    free = (~union).astype(np.uint8)
    total = union.size
    n, _labels, stats, _ = cv2.connectedComponentsWithStats(free, connectivity=8)
    regions = []
    for i in range(1, n):  # 0 is the labelled part
        x, y, w, h, area = (int(v) for v in stats[i])
        if area >= min_fraction * total:
            regions.append({"bbox": [x, y, w, h], "area": area, "fraction": round(area / total, 4)})
    regions.sort(key=lambda r: -r["area"])
    return float(np.count_nonzero(free)) / total, regions[:max_regions]


def write_report(
    reports_dir: Path, entries: list[dict[str, Any]], min_fraction: float, attention: float
) -> tuple[Path, Path]:
    """``uncovered.json`` (every image, most unlabelled first) and ``uncovered.txt`` (a short summary for
    people: the images where more than ``attention`` of the area is still unlabelled)."""
    entries = sorted(entries, key=lambda e: -e["uncovered_fraction"])
    fracs = [e["uncovered_fraction"] for e in entries]
    need = [e for e in entries if e["uncovered_fraction"] > attention]
    doc = {
        "images": len(entries),
        "mean_uncovered_fraction": round(float(np.mean(fracs)), 4) if fracs else None,
        "min_region_fraction": min_fraction,
        "attention_threshold": attention,
        "images_needing_attention": len(need),
        "per_image": entries,
    }
    json_path, txt_path = reports_dir / "uncovered.json", reports_dir / "uncovered.txt"
    atomic_write_json(json_path, doc, indent=1)
    lines = [
        f"{len(entries)} images; on average {100 * (doc['mean_uncovered_fraction'] or 0):.1f}% of an image is "
        f"still unlabelled; {len(need)} have more than {100 * attention:.0f}% unlabelled:",
    ]
    for e in need:
        regs = ", ".join(f"[{','.join(str(v) for v in r['bbox'])}] {100 * r['fraction']:.0f}%" for r in e["regions"])
        lines.append(
            f"  {e['file']}: {100 * e['uncovered_fraction']:.0f}% unlabelled, {e['n_masks']} masks"
            + (f"; large regions x,y,w,h: {regs}" if regs else "")
        )
    atomic_write_text(txt_path, "\n".join(lines) + "\n")
    return json_path, txt_path


def report_entry(annotation_file: str | os.PathLike, rel: str, min_fraction: float, max_regions: int) -> dict:
    """The report line of one SA-1B file."""
    from segany.io.sa1b import read_sa1b

    info, anns = read_sa1b(annotation_file)
    union = covered([a["segmentation"] for a in anns], info["height"], info["width"])
    frac, regions = uncovered_regions(union, min_fraction, max_regions)
    return {"file": rel, "n_masks": len(anns), "uncovered_fraction": round(frac, 4), "regions": regions}
