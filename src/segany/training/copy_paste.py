"""Copy-paste: objects of another training image pasted onto this one, before the geometric augmentation.

As in Ghiasi et al., "Simple Copy-Paste is a Strong Data Augmentation Method for Instance Segmentation"
(CVPR 2021): whole objects, cut by their masks, rescaled and placed at random, with hard edges. A pasted
object gets a fresh label id and occludes what it covers, so an object behind it loses those pixels (and is
dropped later when too few remain), and it is seen on a background it never had: a few thousand training
images otherwise show every object in one scene only.
"""

from __future__ import annotations

import cv2
import numpy as np

from segany.io.labelmaps import VOID_ID, LabelMapFolder
from segany.training.augment import AugmentConfig


def paste_from_folder(
    folder: LabelMapFolder,
    image: np.ndarray,
    label_map: np.ndarray,
    names: dict[int, str],
    aug: AugmentConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """:func:`paste_objects` from a random image of ``folder`` (the image itself may be drawn), with
    ``aug``'s copy-paste settings."""
    donor_image, donor_lm, donor_names, donor_skip = folder.load_raw(folder.stems[int(rng.integers(len(folder)))])
    scale_range = (aug.copy_paste_scale_min, aug.copy_paste_scale_max)
    return paste_objects(
        image,
        label_map,
        names,
        donor_image,
        donor_lm,
        donor_names,
        donor_skip,
        rng,
        aug.copy_paste_max_objects,
        scale_range,
    )


def paste_objects(
    image: np.ndarray,
    label_map: np.ndarray,
    names: dict[int, str],
    donor_image: np.ndarray,
    donor_label_map: np.ndarray,
    donor_names: dict[int, str],
    skip_ids: set[int],
    rng: np.random.Generator,
    max_objects: int = 3,
    scale_range: tuple[float, float] = (0.3, 1.0),
    min_fraction: float = 0.005,
    max_fraction: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """``(image, label map, names by id)`` with 1 to ``max_objects`` of the donor's objects pasted in.

    image, donor_image: ``H x W x 3`` / ``h x w x 3`` uint8; label maps ``H x W`` / ``h x w`` (0 background,
    ``VOID_ID`` void; ``skip_ids``: the donor's ids that are not objects, e.g. crowds). Donor objects of
    ``min_fraction`` to ``max_fraction`` of the donor's area can be chosen. The donor is scaled by a factor
    from ``scale_range`` times the one that fits it in the image, and its chosen objects' box is placed so
    that at least half of it on each axis lies inside. The inputs are not modified; without an eligible
    donor object they come back as they are.
    """
    ids, areas = np.unique(donor_label_map, return_counts=True)
    total = donor_label_map.size
    eligible = [
        int(i)
        for i, a in zip(ids, areas)
        if int(i) not in skip_ids and int(i) not in (0, VOID_ID) and min_fraction * total <= a <= max_fraction * total
    ]
    if not eligible:
        return image, label_map, names
    k = int(rng.integers(1, min(max_objects, len(eligible)) + 1))
    chosen = rng.choice(eligible, size=k, replace=False)
    sel = np.isin(donor_label_map, chosen)
    ys, xs = np.nonzero(sel)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1

    h, w = label_map.shape
    fit = min(h / donor_label_map.shape[0], w / donor_label_map.shape[1])
    scale = fit * float(rng.uniform(*scale_range))
    ch, cw = max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale))
    crop_img = cv2.resize(donor_image[y0:y1, x0:x1], (cw, ch), interpolation=cv2.INTER_LINEAR)
    crop_lm = cv2.resize(donor_label_map[y0:y1, x0:x1].astype(np.int32), (cw, ch), interpolation=cv2.INTER_NEAREST)

    # at least half of the pasted box inside the image on each axis
    top = int(rng.integers(-(ch // 2), max(h - (ch + 1) // 2, -(ch // 2)) + 1))
    left = int(rng.integers(-(cw // 2), max(w - (cw + 1) // 2, -(cw // 2)) + 1))
    ty0, ty1, tx0, tx1 = max(top, 0), min(top + ch, h), max(left, 0), min(left + cw, w)
    if ty1 <= ty0 or tx1 <= tx0:
        return image, label_map, names
    src = (slice(ty0 - top, ty1 - top), slice(tx0 - left, tx1 - left))
    dst = (slice(ty0, ty1), slice(tx0, tx1))

    # fresh ids above every id in use, never the void id; wider dtype when uint8 runs out
    used = {int(v) for v in np.unique(label_map)} | set(names)
    new_ids: dict[int, int] = {}
    nxt = max(used - {VOID_ID}, default=0) + 1
    for old in sorted(int(c) for c in chosen):
        nxt += nxt == VOID_ID
        new_ids[old] = nxt
        nxt += 1
    out_lm = label_map.astype(np.uint16) if nxt > 255 and label_map.dtype == np.uint8 else label_map.copy()
    out_img = image.copy()
    region_lm, region_img = crop_lm[src], crop_img[src]
    for old, new in new_ids.items():
        m = region_lm == old
        out_lm[dst][m] = new
        out_img[dst][m] = region_img[m]
    out_names = dict(names)
    for old, new in new_ids.items():
        if old in donor_names:
            out_names[new] = donor_names[old]
    return out_img, out_lm, out_names
