"""Pack label-map folders into a compact copy (to carry a training set to a GPU machine).

``pack_dataset([(folder, split), ...], out_dir, max_side=512)`` writes, per source folder,
``out_dir/<folder name>/`` in the same layout (so :class:`~segany.io.labelmaps.LabelMapFolder` reads it):

* ``images/<stem>.jpg``: longest side <= ``max_side`` (``INTER_AREA``), JPEG ``quality`` (90); a source
  JPEG that needs no resizing is copied byte for byte when that is smaller than re-encoding it;
* ``masks/<stem>.png``: the label map resized with nearest neighbour (ids unchanged, dtype kept);
* ``meta/<stem>.json``: copied verbatim (names by id stay valid; pixel areas / boxes inside are the
  original resolution's); ``sequences.txt`` is copied too;
* ``splits/<split>.txt``: the stems packed for that split;

plus ``out_dir/pack.json`` (sources, counts, bytes). Every file is written atomically and files already
present are skipped, so an interrupted run resumes where it stopped.

Command line: ``python -m segany.training.pack OUT_DIR FOLDER[:SPLIT] ... [--max-side 512] [--quality 90]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from segany.errors import SegAnyError
from segany.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from segany.io.labelmaps import LabelMapFolder
from segany.io.png import encode_png
from segany.transforms import get_preprocess_shape

JPEG_QUALITY = 90


IMAGE_FORMATS = {"jpeg": ".jpg", "webp": ".webp"}


def _encode_image(image: np.ndarray, quality: int = JPEG_QUALITY, fmt: str = "jpeg") -> bytes:
    buf = io.BytesIO()
    if fmt == "webp":  # about 35% smaller than JPEG at the same look: more images fit a carry limit
        Image.fromarray(image).save(buf, "WEBP", quality=quality, method=6)
    else:
        Image.fromarray(image).save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def pack_one(
    folder: LabelMapFolder, stem: str, out: Path, max_side: int, quality: int = JPEG_QUALITY, fmt: str = "jpeg"
) -> bool:
    """Pack one image + label map (+ meta) into ``out``; returns False when it was already there."""
    img_out = out / "images" / f"{stem}{IMAGE_FORMATS[fmt]}"
    mask_out = out / "masks" / f"{stem}.png"
    meta_src = folder.root / "meta" / f"{stem}.json"
    meta_out = out / "meta" / f"{stem}.json"
    done = img_out.is_file() and mask_out.is_file() and (meta_out.is_file() or not meta_src.is_file())
    if done:
        return False
    image, lm, _names, _ignore = folder.load_raw(stem)  # checks sizes
    h, w = lm.shape
    if max(h, w) > max_side:
        nh, nw = get_preprocess_shape(h, w, max_side)
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        lm = cv2.resize(lm, (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT)
        img_bytes = _encode_image(image, quality, fmt)
    else:
        src = folder.image_path(stem)
        raw = src.read_bytes()
        img_bytes = _encode_image(image, quality, fmt)
        same_format = fmt == "jpeg" and src.suffix.lower() in (".jpg", ".jpeg") and raw[:2] == b"\xff\xd8"
        if same_format and len(raw) <= len(img_bytes):
            img_bytes = raw
    if meta_src.is_file():
        atomic_write_bytes(meta_out, meta_src.read_bytes())
    atomic_write_bytes(mask_out, encode_png(lm, compression=9))  # about half of the default's size
    atomic_write_bytes(img_out, img_bytes)  # last: its presence marks the item done
    return True


def pack_dataset(
    sources: Sequence[tuple[str | os.PathLike, str | None]],
    out_dir: str | os.PathLike,
    max_side: int = 512,
    progress: Callable[[str], None] | None = None,
    quality: int = JPEG_QUALITY,
    fmt: str = "jpeg",
) -> dict[str, Any]:
    """Pack ``(folder, split)`` sources into ``out_dir`` (see the module docstring); returns the manifest.

    Raises:
        SegAnyError: a missing folder or split, or a bad image / label map in a source.
    """
    if max_side < 16:
        raise SegAnyError(f"max_side must be >= 16, got {max_side}")
    if fmt not in IMAGE_FORMATS:
        raise SegAnyError(f"image format must be one of {sorted(IMAGE_FORMATS)}, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise SegAnyError(f"JPEG quality must be 1..100, got {quality}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = [(LabelMapFolder(root, split), split) for root, split in sources]  # validate all first
    t0 = time.time()
    entries = []
    for folder, split in folders:
        out = out_dir / folder.root.name
        written = 0
        for i, stem in enumerate(folder.stems):
            written += pack_one(folder, stem, out, max_side, quality, fmt)
            if progress and (i + 1) % 100 == 0:
                progress(f"{folder.root.name}:{split}: {i + 1}/{len(folder)}")
        atomic_write_text(out / "splits" / f"{split or 'all'}.txt", "".join(s + "\n" for s in folder.stems))
        seq = folder.root / "sequences.txt"
        if seq.is_file():
            atomic_write_bytes(out / "sequences.txt", seq.read_bytes())
        entries.append(
            {
                "source": str(folder.root),
                "name": folder.root.name,
                "split": split,
                "split_file": f"{split or 'all'}.txt",
                "images": len(folder),
                "written": written,
            }
        )
        if progress:
            progress(f"{folder.root.name}:{split}: {len(folder)} images ({written} new)")
    manifest_path = out_dir / "pack.json"
    previous: list[dict[str, Any]] = []
    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8")).get("sources", [])
        except (OSError, ValueError, AttributeError):
            previous = []
    keys = {(e["name"], e["split"]) for e in entries}
    merged = [e for e in previous if (e.get("name"), e.get("split")) not in keys] + entries
    manifest = {
        "max_side": max_side,
        "image_format": fmt,
        "quality": quality,
        "sources": merged,
        "images": sum(
            len(list((out_dir / n).glob(f"images/*{IMAGE_FORMATS[fmt]}"))) for n in {e["name"] for e in merged}
        ),
        "bytes": 0,
        "seconds": round(time.time() - t0, 1),
    }
    manifest["bytes"] = _file_bytes(out_dir)
    atomic_write_json(manifest_path, manifest, indent=1)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m segany.training.pack", description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("sources", nargs="+", help="FOLDER or FOLDER:SPLIT (e.g. data/bsds500:train)")
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--quality", type=int, default=JPEG_QUALITY, help="image quality 1..100 (default 90)")
    ap.add_argument("--format", choices=sorted(IMAGE_FORMATS), default="jpeg", help="image format (default jpeg)")
    args = ap.parse_args(argv)
    sources = []
    for s in args.sources:
        root, _, split = s.partition(":") if ":" in s else (s, "", "")
        sources.append((root, split or None))
    try:
        m = pack_dataset(
            sources,
            args.out_dir,
            args.max_side,
            progress=lambda msg: print(msg, file=sys.stderr),
            quality=args.quality,
            fmt=args.format,
        )
    except SegAnyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{m['images']} images, {m['bytes'] / 2**20:.1f} MiB in {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
