"""Label-map folders: the layout of every real data set under ``shared/data``.

A folder holds::

    images/<stem>.jpg|png     the photo
    masks/<stem>.png          label map, uint8 or uint16: 0 = background/void, 1.. = one object each,
                              255 = void (ignore in losses and metrics)
    splits/<name>.txt         optional, one stem per line
    meta/<stem>.json          optional, names of ids: ``{"<id>": "<name>"}`` or a COCO-panoptic style
                              ``{"segments": [{"instance_label": id, "category": name, "iscrowd": bool}]}``
    sequences.txt             optional (DAVIS): video sequences, stems are ``<sequence>_<frame>``;
                              the last :data:`DAVIS_HELD_OUT` sequences are the evaluation split

:class:`LabelMapFolder` lists and loads such a folder; :func:`split_label_map` turns one label map into
per-instance boolean masks (the training code resizes the label map once and calls it afterwards).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from segany.errors import SegAnyError
from segany.io.images import IMAGE_SUFFIXES, load_image

#: Label value meaning "void / ignore" in every label map (uint8 and uint16 alike).
VOID_ID = 255
#: How many of the last sequences in ``sequences.txt`` are held out for evaluation (``"davis_val"``).
DAVIS_HELD_OUT = 5
#: Special split names for folders with a ``sequences.txt``.
DAVIS_SPLITS = ("davis_train", "davis_val")


@dataclass
class Sample:
    """One image with its instance masks.

    ``masks`` is ``N x H x W`` bool (one per label id, in increasing id order; N may be 0), ``ignore`` is
    ``H x W`` bool (void pixels, plus crowd regions where the meta flags them), ``names[i]`` names
    ``masks[i]`` (None where unknown) and ``ids[i]`` is its label value in the map.
    """

    image: np.ndarray
    masks: np.ndarray
    ignore: np.ndarray
    names: list[str | None]
    stem: str
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """Read a label-map PNG as an ``H x W`` integer array (uint8 or uint16 as stored, int32 for mode I).

    Raises:
        SegAnyError: missing, unreadable, or not a single-channel label map.
    """
    path = Path(path)
    if not path.is_file():
        raise SegAnyError(f"{path}: no such label map")
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
                raise SegAnyError(f"{path}: a label map must be single-channel, got PIL mode {mode}")
            arr = np.asarray(img)
    except SegAnyError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SegAnyError(f"{path}: cannot read the label map ({e})") from None
    if arr.ndim != 2:
        raise SegAnyError(f"{path}: a label map must be 2-D, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)


def split_label_map(
    label_map: np.ndarray,
    ignore_ids: set[int] | frozenset[int] = frozenset(),
    void_id: int | None = VOID_ID,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a label map into ``(masks N x H x W bool, ids (N,) int64, ignore H x W bool)``.

    Every value except 0, ``void_id`` and ``ignore_ids`` is one instance; ``void_id`` and ``ignore_ids``
    pixels form the ignore map. Ids come out sorted.
    """
    if label_map.ndim != 2:
        raise ValueError(f"split_label_map expects an H x W map, got {label_map.shape}")
    h, w = label_map.shape
    values = np.unique(label_map)
    skip = {0} | {int(i) for i in ignore_ids}
    if void_id is not None:
        skip.add(int(void_id))
    ids = np.array([int(v) for v in values if int(v) not in skip], dtype=np.int64)
    present = {int(x) for x in values}
    ign_vals = [v for v in skip if v != 0 and v in present]
    ignore = np.isin(label_map, ign_vals) if ign_vals else np.zeros((h, w), dtype=bool)
    if len(ids) == 0:
        return np.zeros((0, h, w), dtype=bool), ids, ignore
    masks = label_map[None, :, :] == ids.astype(label_map.dtype)[:, None, None]
    return masks, ids, ignore


def _read_names(path: Path) -> tuple[dict[int, str], set[int]]:
    """Parse ``meta/<stem>.json``: ``(names by id, crowd ids)``."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SegAnyError(f"{path}: cannot read the meta JSON ({e})") from None
    names: dict[int, str] = {}
    crowd: set[int] = set()
    if not isinstance(meta, dict):
        raise SegAnyError(f"{path}: meta must be a JSON object")
    if isinstance(meta.get("segments"), list):
        for seg in meta["segments"]:
            if not isinstance(seg, dict):
                continue
            lab = seg.get("instance_label")
            if isinstance(lab, int) and not isinstance(lab, bool):
                cat = seg.get("category")
                if isinstance(cat, str):
                    names[lab] = cat
                if seg.get("iscrowd"):
                    crowd.add(lab)
        return names, crowd
    for k, v in meta.items():
        try:
            i = int(k)
        except ValueError:
            continue
        if isinstance(v, str):
            names[i] = v
    return names, crowd


class LabelMapFolder:
    """A folder of ``images/`` + ``masks/`` label maps, optionally restricted to one split.

    Args:
        root: the folder.
        split: ``None`` for every image that has a mask; the name of a file in ``splits/`` (``"train"``,
            ``"val2017"``, ...); or, for a folder with ``sequences.txt``, ``"davis_train"`` (all but the last
            :data:`DAVIS_HELD_OUT` sequences) / ``"davis_val"`` (the last ones).
        crowd_as_ignore: ids flagged ``iscrowd`` in the meta become ignore pixels instead of masks.

    Raises:
        SegAnyError: missing folder / ``images`` / ``masks``, unknown split, a split stem without files.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None, crowd_as_ignore: bool = True):
        self.root = Path(root)
        self.split = split
        self.crowd_as_ignore = crowd_as_ignore
        if not self.root.is_dir():
            raise SegAnyError(f"{self.root}: no such data folder")
        for sub in ("images", "masks"):
            if not (self.root / sub).is_dir():
                raise SegAnyError(f"{self.root}: not a label-map folder (no {sub}/ inside)")
        self._images: dict[str, Path] = {}
        for p in sorted((self.root / "images").iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                self._images.setdefault(p.stem, p)
        masks = {p.stem for p in (self.root / "masks").iterdir() if p.suffix.lower() == ".png"}
        if split is None:
            stems = sorted(s for s in self._images if s in masks)
        else:
            stems = self._split_stems(split)
            for s in stems:
                if s not in self._images:
                    raise SegAnyError(f"{self.root}: split {split!r} lists {s!r} but images/ has no such image")
                if s not in masks:
                    raise SegAnyError(f"{self.root}: split {split!r} lists {s!r} but masks/{s}.png is missing")
        self.stems: list[str] = stems

    # -- listing ---------------------------------------------------------------------------------

    def available_splits(self) -> list[str]:
        """Split names this folder accepts (files in ``splits/`` plus the DAVIS ones)."""
        out = []
        if (self.root / "splits").is_dir():
            out = sorted(p.stem for p in (self.root / "splits").glob("*.txt"))
        if (self.root / "sequences.txt").is_file():
            out += list(DAVIS_SPLITS)
        return out

    def sequences(self) -> list[str]:
        """Sequence names from ``sequences.txt`` (empty when the folder has none)."""
        p = self.root / "sequences.txt"
        if not p.is_file():
            return []
        return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]

    def sequence_of(self, stem: str) -> str | None:
        """The sequence a stem belongs to (longest ``<sequence>_`` prefix), or None."""
        best = None
        for seq in self.sequences():
            if stem.startswith(seq + "_") and (best is None or len(seq) > len(best)):
                best = seq
        return best

    def _split_stems(self, split: str) -> list[str]:
        if split in DAVIS_SPLITS and (self.root / "sequences.txt").is_file():
            seqs = self.sequences()
            if len(seqs) <= DAVIS_HELD_OUT:
                raise SegAnyError(f"{self.root}/sequences.txt: {len(seqs)} sequences, need more than {DAVIS_HELD_OUT}")
            wanted = set(seqs[-DAVIS_HELD_OUT:]) if split == "davis_val" else set(seqs[:-DAVIS_HELD_OUT])
            masks = {p.stem for p in (self.root / "masks").iterdir() if p.suffix.lower() == ".png"}
            return sorted(s for s in self._images if s in masks and self.sequence_of(s) in wanted)
        if os.sep in split or "/" in split or split.startswith("."):
            raise SegAnyError(f"{self.root}: bad split name {split!r}")
        p = self.root / "splits" / f"{split}.txt"
        if not p.is_file():
            avail = ", ".join(self.available_splits()) or "none"
            raise SegAnyError(f"{self.root}: no split {split!r} (available: {avail})")
        stems = []
        seen = set()
        for ln in p.read_text(encoding="utf-8").splitlines():
            s = ln.strip()
            if s and not s.startswith("#") and s not in seen:
                seen.add(s)
                stems.append(s)
        return stems

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int) -> Sample:
        return self.load(self.stems[i])

    def __repr__(self) -> str:
        return f"LabelMapFolder({str(self.root)!r}, split={self.split!r}, n={len(self)})"

    # -- loading ---------------------------------------------------------------------------------

    def image_path(self, stem: str) -> Path:
        if stem not in self._images:
            raise SegAnyError(f"{self.root}: no image for {stem!r}")
        return self._images[stem]

    def mask_path(self, stem: str) -> Path:
        return self.root / "masks" / f"{stem}.png"

    def load_image(self, stem: str) -> np.ndarray:
        """``H x W x 3`` uint8 RGB."""
        return load_image(self.image_path(stem))

    def load_label_map(self, stem: str) -> np.ndarray:
        """The raw ``H x W`` label map (uint8 or uint16)."""
        return read_label_map(self.mask_path(stem))

    def load_meta(self, stem: str) -> tuple[dict[int, str], set[int]]:
        """``(names by id, crowd ids)`` from ``meta/<stem>.json``; empty when there is no meta."""
        p = self.root / "meta" / f"{stem}.json"
        if not p.is_file():
            return {}, set()
        return _read_names(p)

    def load_raw(self, stem: str) -> tuple[np.ndarray, np.ndarray, dict[int, str], set[int]]:
        """``(image, label map, names by id, ids to ignore)`` with the sizes checked.

        The ids to ignore are the crowd ids when ``crowd_as_ignore`` (255 is always void).
        """
        image = self.load_image(stem)
        lm = self.load_label_map(stem)
        if lm.shape != image.shape[:2]:
            raise SegAnyError(
                f"{self.mask_path(stem)}: mask is {lm.shape[1]}x{lm.shape[0]} but its image "
                f"{self.image_path(stem).name} is {image.shape[1]}x{image.shape[0]}"
            )
        names, crowd = self.load_meta(stem)
        return image, lm, names, (crowd if self.crowd_as_ignore else set())

    def load(self, stem: str) -> Sample:
        """Load one image with its masks, ignore map and names."""
        image, lm, names, ignore_ids = self.load_raw(stem)
        masks, ids, ignore = split_label_map(lm, ignore_ids)
        return Sample(
            image=image,
            masks=masks,
            ignore=ignore,
            names=[names.get(int(i)) for i in ids],
            stem=stem,
            ids=ids,
        )


def is_label_map_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "images").is_dir() and (p / "masks").is_dir()


def find_label_map_folders(root: str | os.PathLike, max_depth: int = 3) -> list[Path]:
    """Label-map folders at or below ``root`` (not looking inside a found folder), sorted.

    Raises:
        SegAnyError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise SegAnyError(f"{root}: no such folder")
    found: list[Path] = []

    def walk(p: Path, depth: int) -> None:
        if is_label_map_folder(p):
            found.append(p)
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
        except OSError:
            return
        for c in children:
            walk(c, depth + 1)

    walk(root, 0)
    return sorted(found)
