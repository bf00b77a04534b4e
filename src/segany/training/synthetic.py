"""Synthetic training data with exact masks.

* :class:`SyntheticScenes`: procedural scenes. A textured background (noise, gradient, stripes,
  checker), then 3-12 shapes (circle, ellipse, rectangle, polygon, star, ring) painted in order, so later
  shapes occlude earlier ones. Shapes are painted into a label map first and the picture is composited
  from it, so each mask is exactly the visible part of its shape, masks never overlap, and shapes that
  end up hidden or smaller than ``min_area`` are dropped (their left-over pixels become ignore pixels).
  Each shape carries attributes (palette colour name, shape name, position from its centroid) and
  phrases for text prompts ("the red circle", "red circle on the left", "a circle").
* :class:`CopyPasteScenes`: 1-4 objects cut from a real :class:`LabelMapFolder` (random scale and
  flip) pasted onto another real image; the background's own masks lose the pasted-over pixels.

Both are deterministic: item ``i`` comes from ``numpy.random.default_rng(seed + i)``. Items have the
format of :func:`segany.training.data.to_training_item` plus, aligned with the mask slots,
``phrases`` (list of str, empty for padding) and ``attributes`` (dict or None).
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from torch.utils.data import Dataset

from segany.io.labelmaps import VOID_ID, LabelMapFolder
from segany.text.phrases import shape_phrases
from segany.training.augment import AugmentConfig
from segany.training.data import DEFAULT_MAX_MASKS, ItemConfig, to_training_item

#: Named colours (RGB). Shapes are tinted with one of these, so the name stays true.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "yellow": (245, 215, 35),
    "orange": (245, 135, 25),
    "purple": (130, 50, 175),
    "pink": (245, 135, 195),
    "brown": (125, 75, 35),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "ellipse", "rectangle", "polygon", "star", "ring")


def position_name(cx: float, cy: float, w: int, h: int) -> str:
    """ "left" / "right" / "top" / "bottom" / "center" from a centroid (the dominant offset wins)."""
    dx, dy = cx / max(w, 1) - 0.5, cy / max(h, 1) - 0.5
    if max(abs(dx), abs(dy)) < 1 / 6:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


# ---------------------------------------------------------------------------------------------------
# textures


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random ``cells``-grid upsampled with bicubic interpolation."""
    gh = max(2, round(cells * h / max(h, w)))
    gw = max(2, round(cells * w / max(h, w)))
    grid = rng.random((gh, gw), dtype=np.float32)
    out = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(out, 0.0, 1.0)


def _pattern(rng: np.random.Generator, h: int, w: int, kind: str) -> np.ndarray:
    """An ``H x W`` float32 pattern in [0, 1]."""
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    ang = rng.uniform(0, math.pi)
    ca, sa = np.float32(math.cos(ang)), np.float32(math.sin(ang))
    u = xs * ca + ys * sa
    if kind == "noise":
        octaves = [_smooth_noise(rng, h, w, int(c)) for c in rng.integers(3, 40, size=2)]
        out = 0.6 * octaves[0] + 0.4 * octaves[1]
    elif kind == "gradient":
        out = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif kind == "stripes":
        period = rng.uniform(0.02, 0.2) * max(h, w)
        out = 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
        if rng.random() < 0.5:
            out = (out > 0.5).astype(np.float32)
    else:  # checker
        period = rng.uniform(0.03, 0.2) * max(h, w)
        v = ys * ca - xs * sa
        out = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    return out.astype(np.float32)


def _texture_two_colours(rng: np.random.Generator, h: int, w: int, c0, c1, kind: str | None = None) -> np.ndarray:
    kind = kind or str(rng.choice(["noise", "gradient", "stripes", "checker"]))
    p = _pattern(rng, h, w, kind)[..., None]
    c0 = np.asarray(c0, np.float32)
    c1 = np.asarray(c1, np.float32)
    return c0 + (c1 - c0) * p


def random_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """``H x W x 3`` uint8 textured background (noise, gradient, stripes or checker; random colours)."""
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    img = _texture_two_colours(rng, h, w, c0, c1)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0, 8))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_fill(rng: np.random.Generator, h: int, w: int, color: tuple[int, int, int]) -> np.ndarray:
    """Fill for a shape: a solid palette colour ``(3,)``, or an ``h x w x 3`` texture around it."""
    base = np.asarray(color, np.float32)
    if rng.random() < 0.5:
        jitter = rng.uniform(-12, 12, size=3).astype(np.float32)
        return np.clip(base + jitter, 0, 255)  # a solid colour: (3,)
    dark = base * rng.uniform(0.6, 0.85)
    light = base + (255 - base) * rng.uniform(0.0, 0.3)
    return _texture_two_colours(rng, h, w, dark, light)


# ---------------------------------------------------------------------------------------------------
# shapes


def _draw_shape(rng: np.random.Generator, shape: str, h: int, w: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A random filled shape: ``(mask of its bounding window, (y0, x0, y1, x1) window in the canvas)``.

    The window may extend past the canvas; callers clip.
    """
    long = max(h, w)
    r = float(np.exp(rng.uniform(np.log(0.03), np.log(0.3)))) * long
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    ang = float(rng.uniform(0, 360))
    pad = math.ceil(r * 1.6) + 2
    size = 2 * pad + 1
    canvas = np.zeros((size, size), np.uint8)
    c = (pad, pad)
    sh = 4  # sub-pixel precision bits for cv2 drawing
    f = 1 << sh

    def pt(x: float, y: float) -> tuple[int, int]:
        return round(x * f), round(y * f)

    if shape == "circle":
        cv2.circle(canvas, pt(*c), round(r * f), 1, -1, cv2.LINE_8, sh)
    elif shape == "ellipse":
        axes = pt(r, r * rng.uniform(0.3, 0.8))
        cv2.ellipse(canvas, pt(*c), axes, ang, 0, 360, 1, -1, cv2.LINE_8, sh)
    elif shape == "ring":
        cv2.circle(canvas, pt(*c), round(r * f), 1, -1, cv2.LINE_8, sh)
        cv2.circle(canvas, pt(*c), round(r * rng.uniform(0.4, 0.75) * f), 0, -1, cv2.LINE_8, sh)
    else:
        if shape == "rectangle":
            hw = (2 * r, 2 * r * rng.uniform(0.3, 1.0))
            pts = cv2.boxPoints(((pad, pad), hw, ang))
        elif shape == "polygon":
            k = int(rng.integers(3, 8))
            t = np.deg2rad(ang) + np.arange(k) * 2 * math.pi / k + rng.uniform(-0.25, 0.25, k) * 2 * math.pi / k
            rad = r * rng.uniform(0.75, 1.0, k)
            pts = np.stack([pad + rad * np.cos(t), pad + rad * np.sin(t)], 1)
        else:  # star
            k = int(rng.integers(5, 9))
            t = np.deg2rad(ang) + np.arange(2 * k) * math.pi / k
            rad = np.where(np.arange(2 * k) % 2 == 0, r, r * rng.uniform(0.35, 0.6))
            pts = np.stack([pad + rad * np.cos(t), pad + rad * np.sin(t)], 1)
        poly = np.round(np.asarray(pts) * f).astype(np.int32)[None]
        cv2.fillPoly(canvas, poly, 1, cv2.LINE_8, sh)
    y0, x0 = round(cy) - pad, round(cx) - pad
    return canvas.astype(bool), (y0, x0, y0 + size, x0 + size)


def _paste_window(dst: np.ndarray, window: tuple[int, int, int, int], src_mask: np.ndarray, value: Any) -> None:
    """``dst[window][src_mask] = value`` with the window clipped to ``dst``."""
    y0, x0, y1, x1 = window
    h, w = dst.shape[:2]
    cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    if cy0 >= cy1 or cx0 >= cx1:
        return
    m = src_mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    dst[cy0:cy1, cx0:cx1][m] = value


def generate_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    n_shapes: tuple[int, int] = (3, 12),
    min_area: int = 16,
) -> dict[str, Any]:
    """One procedural scene at ``height x width``.

    Returns ``{"image": HxWx3 uint8, "masks": NxHxW bool (visible parts, disjoint, each >= min_area),
    "ignore": HxW bool (pixels of dropped shapes), "attributes": [dict], "phrases": [[str]]}``; masks are
    in painting order (back to front).
    """
    image = random_background(rng, height, width).astype(np.float32)
    labels = np.zeros((height, width), np.int32)
    n = int(rng.integers(n_shapes[0], n_shapes[1] + 1))
    drawn: list[tuple[str, str]] = []
    colours = list(PALETTE)
    for k in range(1, n + 1):
        shape = str(rng.choice(SHAPES))
        colour = str(rng.choice(colours))
        mask, win = _draw_shape(rng, shape, height, width)
        _paste_window(labels, win, mask, k)
        y0, x0, y1, x1 = win
        # composite the fill through the shape's mask, clipped to the canvas
        cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
        fill = _shape_fill(rng, max(cy1 - cy0, 1), max(cx1 - cx0, 1), PALETTE[colour])
        if cy0 < cy1 and cx0 < cx1:
            m = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
            image[cy0:cy1, cx0:cx1][m] = fill if fill.ndim == 1 else fill[m]
        drawn.append((shape, colour))
    if rng.random() < 0.5:  # soften the aliased edges a little; masks keep the geometric truth
        image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.4, 1.0)))
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0, 5))
    image_u8 = np.clip(image + 0.5, 0, 255).astype(np.uint8)

    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = [k for k in range(1, n + 1) if counts[k] >= max(min_area, 1)]
    dropped = [k for k in range(1, n + 1) if 0 < counts[k] < max(min_area, 1)]
    ignore = np.isin(labels, dropped) if dropped else np.zeros((height, width), bool)
    masks = np.stack([labels == k for k in keep]) if keep else np.zeros((0, height, width), bool)
    attrs, phrases = [], []
    pairs = [drawn[k - 1] for k in keep]
    for i, k in enumerate(keep):
        shape, colour = drawn[k - 1]
        mom = cv2.moments(masks[i].view(np.uint8), binaryImage=True)
        pos = position_name(mom["m10"] / mom["m00"], mom["m01"] / mom["m00"], width, height)
        attrs.append(
            {
                "shape": shape,
                "color": colour,
                "position": pos,
                "area": int(counts[k]),
                "unique_color_shape": pairs.count((shape, colour)) == 1,
                "unique_shape": sum(p[0] == shape for p in pairs) == 1,
            }
        )
        phrases.append(shape_phrases(colour, shape, pos))
    return {"image": image_u8, "masks": masks, "ignore": ignore, "attributes": attrs, "phrases": phrases}


def _attach(item: dict[str, Any], attributes: list[Any], phrases: list[list[str]]) -> dict[str, Any]:
    """Align per-mask extras with the item's slots via ``mask_ids`` (source indices)."""
    ids = item["mask_ids"].tolist()
    item["attributes"] = [attributes[i] if i >= 0 else None for i in ids]
    item["phrases"] = [list(phrases[i]) if i >= 0 else [] for i in ids]
    return item


class SyntheticScenes(Dataset):
    """``n`` procedural scenes; item ``i`` is generated from ``default_rng(seed + i)``.

    The canvas has its long side ``image_size`` and a random aspect ratio (short side 0.6-1.0 of it);
    ``augment`` optionally adds large-scale jitter / flip / colour jitter on top (same generator). Masks
    are named by their primary phrase ("red circle").
    """

    def __init__(
        self,
        n: int,
        image_size: int = 1024,
        seed: int = 0,
        max_masks: int = DEFAULT_MAX_MASKS,
        augment: AugmentConfig | None = None,
        min_area: int = 16,
        max_coverage: float = 0.9,
        n_shapes: tuple[int, int] = (3, 12),
    ):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not 1 <= n_shapes[0] <= n_shapes[1]:
            raise ValueError(f"n_shapes must be 1 <= lo <= hi, got {n_shapes}")
        self.n = int(n)
        self.seed = int(seed)
        self.n_shapes = n_shapes
        self.cfg = ItemConfig(image_size, max_masks, min_area, max_coverage, augment)

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> tuple[dict[str, Any], np.random.Generator]:
        """The raw scene of item ``index`` (at canvas size) and the generator, positioned after it."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        rng = np.random.default_rng(self.seed + index)
        s = self.cfg.image_size
        short = max(8, round(s * rng.uniform(0.6, 1.0)))
        h, w = (s, short) if rng.random() < 0.5 else (short, s)
        return generate_scene(rng, h, w, self.n_shapes, self.cfg.min_area), rng

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.n
        sc, rng = self.scene(index)
        names = [f"{a['color']} {a['shape']}" for a in sc["attributes"]]
        item = to_training_item(
            sc["image"],
            self.cfg,
            rng if self.cfg.augment is not None else None,
            masks=sc["masks"],
            names=names,
            ignore=sc["ignore"],
            source=f"synthetic:{self.seed + index}",
        )
        return _attach(item, sc["attributes"], sc["phrases"])


class CopyPasteScenes(Dataset):
    """Copy-paste compositing over a real :class:`LabelMapFolder`.

    Item ``i`` (``default_rng(seed + i)``): a random background image from ``folder``, and 1-4
    (``n_paste``) objects cut from other random images, each scaled so its longest side is
    ``object_scale`` (fraction of the background's longest side), randomly flipped, placed at a random
    position (at least partly inside) and pasted on top. Masks of the background's own objects lose the
    covered pixels (objects hidden entirely disappear); with ``background_unlabelled`` they are dropped
    and only pasted objects are masks. Pasted objects' names come from the source meta.
    """

    def __init__(
        self,
        folder: LabelMapFolder,
        n: int,
        image_size: int = 1024,
        seed: int = 0,
        max_masks: int = DEFAULT_MAX_MASKS,
        augment: AugmentConfig | None = None,
        n_paste: tuple[int, int] = (1, 4),
        object_scale: tuple[float, float] = (0.15, 0.7),
        background_unlabelled: bool = False,
        min_area: int = 16,
        max_coverage: float = 0.9,
        min_object_area: int = 64,
    ):
        if len(folder) < 1:
            raise ValueError("CopyPasteScenes needs a non-empty folder")
        self.folder = folder
        self.n = int(n)
        self.seed = int(seed)
        self.n_paste = n_paste
        self.object_scale = object_scale
        self.background_unlabelled = background_unlabelled
        self.min_object_area = min_object_area
        self.cfg = ItemConfig(image_size, max_masks, min_area, max_coverage, augment)

    def __len__(self) -> int:
        return self.n

    def _pick_object(self, rng: np.random.Generator, avoid: str):
        """``(crop image, crop mask, name)`` of a random object from another image, or None."""
        stems = self.folder.stems
        for _ in range(8):
            stem = stems[int(rng.integers(len(stems)))]
            if stem == avoid and len(stems) > 1:
                continue
            image, lm, names, ignore_ids = self.folder.load_raw(stem)
            ids, counts = np.unique(lm, return_counts=True)
            ok = [
                int(i)
                for i, c in zip(ids, counts, strict=True)
                if int(i) not in {0, VOID_ID, *ignore_ids} and c >= self.min_object_area
            ]
            if not ok:
                continue
            oid = ok[int(rng.integers(len(ok)))]
            m = lm == oid
            ys, xs = np.nonzero(m)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            return image[y0:y1, x0:x1], m[y0:y1, x0:x1], names.get(oid)
        return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        rng = np.random.default_rng(self.seed + index)
        stems = self.folder.stems
        bg_stem = stems[int(rng.integers(len(stems)))]
        image, lm, names_by_id, ignore_ids = self.folder.load_raw(bg_stem)
        image = image.copy()
        h, w = lm.shape
        labels = lm.astype(np.int32)
        ignore = np.isin(labels, [VOID_ID, *ignore_ids])
        labels[ignore] = 0
        if self.background_unlabelled:
            labels[:] = 0
            names_by_id = {}
        names_by_id = dict(names_by_id)
        next_id = max(int(labels.max()) + 1, VOID_ID + 1)  # pasted ids never collide with void
        k = int(rng.integers(self.n_paste[0], self.n_paste[1] + 1))
        for _ in range(k):
            obj = self._pick_object(rng, bg_stem)
            if obj is None:
                break
            crop, cmask, name = obj
            target = rng.uniform(*self.object_scale) * max(h, w)
            s = target / max(crop.shape[:2])
            nh, nw = max(1, round(crop.shape[0] * s)), max(1, round(crop.shape[1] * s))
            crop = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_LINEAR)
            cmask = cv2.resize(cmask.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT) > 0
            if rng.random() < 0.5:
                crop, cmask = crop[:, ::-1], cmask[:, ::-1]
            y0 = int(rng.integers(-nh // 2, max(h - nh // 2, -nh // 2 + 1)))
            x0 = int(rng.integers(-nw // 2, max(w - nw // 2, -nw // 2 + 1)))
            win = (y0, x0, y0 + nh, x0 + nw)
            cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y0 + nh, h), min(x0 + nw, w)
            if cy0 >= cy1 or cx0 >= cx1:
                continue
            m = cmask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
            image[cy0:cy1, cx0:cx1][m] = crop[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0][m]
            _paste_window(labels, win, cmask, next_id)
            _paste_window(ignore, win, cmask, False)
            if name is not None:
                names_by_id[next_id] = name
            next_id += 1
        item = to_training_item(
            image,
            self.cfg,
            rng if self.cfg.augment is not None else None,
            label_map=labels,
            names_by_id=names_by_id,
            ignore=ignore if ignore.any() else None,
            source=f"copypaste:{self.folder.root.name}:{bg_stem}:{self.seed + index}",
        )
        return item
