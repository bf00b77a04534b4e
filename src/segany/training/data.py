"""Training datasets: label-map folders, SA-1B folders, COCO instance JSON, and a weighted mixer.

Every dataset returns the same fixed-size item (see :func:`to_training_item`), so the default collate
works on the tensors and :func:`collate_samples` also keeps the names::

    image       uint8 [3, S, S]   content resized so its longest side is S*scale, top-left, zero padded
    masks       bool  [M, S, S]   up to ``max_masks`` instance masks, padded with empty masks
    mask_valid  bool  [M]
    ignore      bool  [S, S]      void / crowd pixels (padding is *not* marked: use ``valid_hw``)
    valid_hw    int64 [2]         height, width of the content in the top-left corner
    mask_ids    int64 [M]         label id (label maps) or source index (mask lists) of each slot, -1 = padding
    names       list[str | None]  length M, aligned with ``masks`` (None for unknown and padding)
    source      str               "<dataset>:<stem>"

With ``augment=None`` (validation) the image is only resized (longest side to S) and padded, and the
first ``max_masks`` masks in id order are kept; with an :class:`AugmentConfig` the geometry and colour are
jittered, and the masks kept are a random subset. Masks covering more than ``max_coverage`` of the content
(SAM drops > 90 %) or smaller than ``min_area`` output pixels are dropped first.

Randomness: with ``seed=None`` each item draws its generator from torch's RNG (DataLoader seeds each
worker differently, every epoch); with a seed, item ``i`` of epoch ``e`` uses ``(seed, e, i)``, so runs
repeat exactly (call ``set_epoch``).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from segany.errors import SegAnyError
from segany.io.images import IMAGE_SUFFIXES, load_image
from segany.io.labelmaps import VOID_ID, LabelMapFolder
from segany.io.rle import decode_rle
from segany.io.sa1b import read_sa1b
from segany.training.augment import (
    AugmentConfig,
    Geometry,
    focus_box,
    jitter_content,
    nearest_indices,
    sample_geometry,
    warp_image,
    warp_label_map,
    warp_masks,
)
from segany.training.copy_paste import paste_from_folder

#: Default number of mask slots per item.
DEFAULT_MAX_MASKS = 16
TENSOR_KEYS = ("image", "masks", "mask_valid", "ignore", "valid_hw", "mask_ids")


@dataclass(frozen=True)
class ItemConfig:
    """How raw samples become training items."""

    image_size: int = 1024
    max_masks: int = DEFAULT_MAX_MASKS
    min_area: int = 16
    max_coverage: float = 0.9
    augment: AugmentConfig | None = None

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        if self.max_masks < 1:
            raise ValueError(f"max_masks must be >= 1, got {self.max_masks}")


# ---------------------------------------------------------------------------------------------------
# the one "raw sample -> fixed-size tensors" function


def _select(areas: np.ndarray, content_area: int, cfg: ItemConfig, rng: np.random.Generator | None) -> np.ndarray:
    """Indices of masks to keep: filter by area / coverage, then cap (random subset when augmenting)."""
    ok = np.flatnonzero((areas >= max(cfg.min_area, 1)) & (areas <= cfg.max_coverage * content_area))
    if len(ok) > cfg.max_masks:
        if cfg.augment is not None and rng is not None:
            ok = np.sort(rng.choice(ok, size=cfg.max_masks, replace=False))
        else:
            ok = ok[: cfg.max_masks]
    return ok


def _finish(
    image: np.ndarray,
    masks: np.ndarray,
    ignore: np.ndarray,
    names: list[str | None],
    ids: Sequence[int],
    geom: Geometry,
    cfg: ItemConfig,
    source: str,
) -> dict[str, Any]:
    m, s = cfg.max_masks, cfg.image_size
    mask_ids = np.full(m, -1, dtype=np.int64)
    mask_ids[: len(ids)] = np.asarray(ids, dtype=np.int64)
    out_masks = np.zeros((m, s, s), dtype=bool)
    out_masks[: len(masks)] = masks
    valid = np.zeros(m, dtype=bool)
    valid[: len(masks)] = True
    return {
        "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "masks": torch.from_numpy(out_masks),
        "mask_valid": torch.from_numpy(valid),
        "ignore": torch.from_numpy(np.ascontiguousarray(ignore, dtype=bool)),
        "valid_hw": torch.tensor(geom.valid_hw, dtype=torch.int64),
        "mask_ids": torch.from_numpy(mask_ids),
        "names": list(names) + [None] * (m - len(names)),
        "source": source,
    }


def to_training_item(
    image: np.ndarray,
    cfg: ItemConfig,
    rng: np.random.Generator | None = None,
    *,
    label_map: np.ndarray | None = None,
    names_by_id: dict[int, str] | None = None,
    ignore_ids: set[int] | frozenset[int] = frozenset(),
    masks: np.ndarray | Sequence[Callable[[], np.ndarray]] | None = None,
    names: Sequence[str | None] | None = None,
    ignore: np.ndarray | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Turn one raw sample into the fixed-size item described in the module docstring.

    Give either ``label_map`` (``H x W`` ints: 0 background, ``VOID_ID`` and ``ignore_ids`` ignored,
    every other value one instance, named by ``names_by_id``; it is warped once) or ``masks``: an
    ``N x H x W`` bool array, or a sequence of zero-argument callables each returning one ``H x W`` mask
    (decoded lazily, in random order, only until ``max_masks`` masks pass the filters), with ``names``
    aligned. ``ignore`` (``H x W`` bool) adds ignore pixels in both cases.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    if label_map is not None and label_map.shape != (h, w):
        raise ValueError(f"label map is {label_map.shape}, image is {(h, w)}")
    aug = cfg.augment if rng is not None else None
    skip = {0, VOID_ID, *(int(i) for i in ignore_ids)}
    focus = None
    if aug is not None and aug.zoom_p > 0 and rng.random() < aug.zoom_p:
        focus = focus_box(rng, label_map, skip, masks)
    geom = sample_geometry(h, w, cfg.image_size, aug, rng, focus)
    out_img = warp_image(image, geom)
    if aug is not None:
        jitter_content(out_img, geom, aug, rng)
    vh, vw = geom.valid_hw
    content = vh * vw
    s = cfg.image_size
    out_ignore = np.zeros((s, s), dtype=bool)
    if ignore is not None:
        if ignore.shape != (h, w):
            raise ValueError(f"ignore map is {ignore.shape}, image is {(h, w)}")
        out_ignore |= warp_masks(ignore[None], geom)[0]

    if label_map is not None:
        lm = warp_label_map(label_map, geom)
        ids, areas = np.unique(lm[:vh, :vw], return_counts=True)
        ign = [int(i) for i in ids if int(i) in skip and int(i) != 0]
        if ign:
            out_ignore |= np.isin(lm, ign)
        keep = np.array([int(i) not in skip for i in ids], dtype=bool)
        ids, areas = ids[keep], areas[keep]
        sel = _select(areas, content, cfg, rng if aug is not None else None)
        chosen = ids[sel]
        out_masks = lm[None] == chosen[:, None, None].astype(lm.dtype)
        nb = names_by_id or {}
        out_names = [nb.get(int(i)) for i in chosen]
        return _finish(out_img, out_masks, out_ignore, out_names, chosen, geom, cfg, source)

    if masks is None:
        masks = np.zeros((0, h, w), dtype=bool)
    n = len(masks)
    names = list(names) if names is not None else [None] * n
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} masks")
    if isinstance(masks, np.ndarray):
        if masks.ndim != 3 or masks.shape[1:] != (h, w):
            raise ValueError(f"masks must be N x {h} x {w}, got {masks.shape}")
        warped = warp_masks(masks, geom)
        areas = warped[:, :vh, :vw].sum(axis=(1, 2))
        sel = _select(areas, content, cfg, rng if aug is not None else None)
        return _finish(out_img, warped[sel], out_ignore, [names[i] for i in sel], sel, geom, cfg, source)

    # lazily decoded masks: visit in random order (or in order for validation); each decoded mask is
    # gathered straight to the output size, so full-resolution stacks are never built
    order = rng.permutation(n) if aug is not None else np.arange(n)
    rows, cols = nearest_indices(geom)
    kept: list[np.ndarray] = []
    kept_idx: list[int] = []
    min_area = max(cfg.min_area, 1)
    for i in order:
        mk = np.asarray(masks[i]())
        if mk.shape != (h, w):
            raise ValueError(f"mask {i} is {mk.shape}, image is {(h, w)}")
        small = mk.astype(bool, copy=False)[rows][:, cols]
        area = int(np.count_nonzero(small))
        if min_area <= area <= cfg.max_coverage * content:
            full = np.zeros((s, s), dtype=bool)
            full[:vh, :vw] = small
            kept.append(full)
            kept_idx.append(int(i))
            if len(kept) >= cfg.max_masks:
                break
    if aug is not None:  # keep output order by source index, like the array path
        perm = np.argsort(kept_idx, kind="stable")
        kept = [kept[p] for p in perm]
        kept_idx = [kept_idx[p] for p in perm]
    out_masks = np.stack(kept) if kept else np.zeros((0, s, s), dtype=bool)
    return _finish(out_img, out_masks, out_ignore, [names[i] for i in kept_idx], kept_idx, geom, cfg, source)


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of a batch; ``names`` (list of lists) and ``source`` (list) stay Python lists."""
    if not items:
        raise ValueError("empty batch")
    out: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in TENSOR_KEYS}
    out["names"] = [list(it["names"]) for it in items]
    out["source"] = [it.get("source", "") for it in items]
    for k in items[0]:
        if k not in out:
            out[k] = [it[k] for it in items]
    return out


# ---------------------------------------------------------------------------------------------------
# datasets


class _Base(Dataset):
    """Shared item config, seeding and epoch handling."""

    name = "dataset"

    def __init__(
        self,
        image_size: int = 1024,
        max_masks: int = DEFAULT_MAX_MASKS,
        augment: AugmentConfig | None = None,
        min_area: int = 16,
        max_coverage: float = 0.9,
        seed: int | None = None,
    ):
        self.cfg = ItemConfig(image_size, max_masks, min_area, max_coverage, augment)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator | None:
        """The item's generator (None without augmentation)."""
        if self.cfg.augment is None:
            return None
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        return np.random.default_rng([int(self.seed), self.epoch, int(index)])

    def _check_index(self, index: int) -> int:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        return index


class LabelMapDataset(_Base):
    """Items from a :class:`LabelMapFolder` (or its path + split); crowd ids become ignore pixels."""

    def __init__(self, folder: LabelMapFolder | str | os.PathLike, split: str | None = None, **kw: Any):
        super().__init__(**kw)
        self.folder = folder if isinstance(folder, LabelMapFolder) else LabelMapFolder(folder, split)
        self.name = self.folder.root.name

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        stem = self.folder.stems[index]
        image, lm, names, ignore_ids = self.folder.load_raw(stem)
        rng = self.rng(index)
        aug = self.cfg.augment
        if rng is not None and aug.copy_paste_p > 0 and rng.random() < aug.copy_paste_p:
            image, lm, names = paste_from_folder(self.folder, image, lm, names, aug, rng)
        return to_training_item(
            image,
            self.cfg,
            rng,
            label_map=lm,
            names_by_id=names,
            ignore_ids=ignore_ids,
            source=f"{self.name}:{stem}",
        )


class SA1BDataset(_Base):
    """SA-1B style folder: ``<name>.jpg`` + ``<name>.json`` pairs (searched recursively)."""

    def __init__(self, root: str | os.PathLike, **kw: Any):
        super().__init__(**kw)
        self.root = Path(root)
        if not self.root.is_dir():
            raise SegAnyError(f"{self.root}: no such SA-1B folder")
        self.items: list[tuple[Path, Path]] = []
        for j in sorted(self.root.rglob("*.json")):
            img = None
            for suf in IMAGE_SUFFIXES:
                for cand in (j.with_suffix(suf), j.with_suffix(suf.upper())):
                    if cand.is_file():
                        img = cand
                        break
                if img:
                    break
            if img is not None:
                self.items.append((img, j))
        if not self.items:
            raise SegAnyError(f"{self.root}: no image + JSON pairs found (SA-1B layout)")
        self.name = self.root.name

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        img_path, json_path = self.items[index]
        info, anns = read_sa1b(json_path)
        image = load_image(img_path)
        if image.shape[:2] != (info["height"], info["width"]):
            raise SegAnyError(
                f"{img_path}: image is {image.shape[1]}x{image.shape[0]} but {json_path.name} says "
                f"{info['width']}x{info['height']}"
            )
        lazy = [(lambda seg=a["segmentation"]: decode_rle(seg)) for a in anns]
        return to_training_item(image, self.cfg, self.rng(index), masks=lazy, source=f"{self.name}:{img_path.stem}")


class CocoInstancesDataset(_Base):
    """COCO instances JSON (pycocotools) + image folder; crowd annotations become ignore pixels.

    ``stems``: restrict to these file stems (e.g. a ``splits/*.txt`` list); images without any
    non-crowd annotation are skipped.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike,
        image_dir: str | os.PathLike,
        stems: Sequence[str] | None = None,
        **kw: Any,
    ):
        super().__init__(**kw)
        from pycocotools.coco import COCO

        self.annotation_file = Path(annotation_file)
        self.image_dir = Path(image_dir)
        if not self.annotation_file.is_file():
            raise SegAnyError(f"{self.annotation_file}: no such COCO annotation file")
        if not self.image_dir.is_dir():
            raise SegAnyError(f"{self.image_dir}: no such image folder")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(self.annotation_file))
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise SegAnyError(f"{self.annotation_file}: not a COCO instances file ({e})") from None
        self.cat_names = {int(c["id"]): c.get("name") for c in self.coco.loadCats(self.coco.getCatIds())}
        wanted = set(stems) if stems is not None else None
        self.image_ids: list[int] = []
        for img_id in sorted(self.coco.getImgIds()):
            info = self.coco.imgs[img_id]
            stem = Path(info["file_name"]).stem
            if wanted is not None and stem not in wanted:
                continue
            anns = self.coco.imgToAnns.get(img_id, [])
            if any(not a.get("iscrowd", 0) for a in anns):
                self.image_ids.append(img_id)
        if wanted is not None:
            have = {Path(self.coco.imgs[i]["file_name"]).stem for i in self.coco.getImgIds()}
            missing = sorted(wanted - have)
            if missing:
                raise SegAnyError(
                    f"{self.annotation_file}: {len(missing)} requested images are not in the file (e.g. {missing[0]!r})"
                )
        self.name = self.image_dir.parent.name if self.image_dir.name == "images" else self.image_dir.name

    @classmethod
    def from_folder(cls, root: str | os.PathLike, split: str | None = None, **kw: Any) -> CocoInstancesDataset:
        """``root/annotations/instances.json`` + ``root/images``, optionally limited to ``splits/<split>.txt``."""
        root = Path(root)
        stems = LabelMapFolder(root, split).stems if split is not None else None
        return cls(root / "annotations" / "instances.json", root / "images", stems=stems, **kw)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        img_id = self.image_ids[index]
        info = self.coco.imgs[img_id]
        path = self.image_dir / info["file_name"]
        image = load_image(path)
        h, w = image.shape[:2]
        if (info.get("height"), info.get("width")) != (h, w):
            raise SegAnyError(
                f"{path}: image is {w}x{h} but {self.annotation_file.name} says "
                f"{info.get('width')}x{info.get('height')}"
            )
        anns = self.coco.imgToAnns.get(img_id, [])
        ignore = np.zeros((h, w), dtype=bool)
        lazy, names = [], []
        for a in anns:
            if a.get("iscrowd", 0):
                ignore |= self.coco.annToMask(a).astype(bool)
            else:
                lazy.append(lambda a=a: self.coco.annToMask(a))
                names.append(self.cat_names.get(int(a["category_id"])))
        return to_training_item(
            image,
            self.cfg,
            self.rng(index),
            masks=lazy,
            names=names,
            ignore=ignore if ignore.any() else None,
            source=f"{self.name}:{Path(info['file_name']).stem}",
        )


class MixedDataset(Dataset):
    """Weighted mixture: item ``i`` picks a dataset with probability ``weights`` and a random item of it.

    ``length`` defaults to the sum of the lengths. Deterministic given ``seed`` and the epoch (call
    ``set_epoch``; it is passed on to the parts).
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        weights: Sequence[float] | None = None,
        length: int | None = None,
        seed: int = 0,
    ):
        if not datasets:
            raise ValueError("MixedDataset needs at least one dataset")
        self.datasets = list(datasets)
        sizes = [len(d) for d in self.datasets]
        if any(s == 0 for s in sizes):
            raise ValueError(f"empty dataset in the mixture (sizes {sizes})")
        w = np.asarray(weights if weights is not None else sizes, dtype=np.float64)
        if w.shape != (len(self.datasets),) or (w < 0).any() or w.sum() <= 0 or not np.isfinite(w).all():
            raise ValueError(f"weights must be {len(self.datasets)} non-negative numbers, not all zero")
        self.weights = w / w.sum()
        self.length = int(length) if length is not None else int(sum(sizes))
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)

    def __len__(self) -> int:
        return self.length

    def locate(self, index: int) -> tuple[int, int]:
        """``(dataset number, item index)`` that mixture item ``index`` reads this epoch."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, self.epoch, int(index), 7])
        d = int(rng.choice(len(self.datasets), p=self.weights))
        return d, int(rng.integers(len(self.datasets[d])))

    def __getitem__(self, index: int) -> dict[str, Any]:
        d, j = self.locate(index)
        return self.datasets[d][j]
