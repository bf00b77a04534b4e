"""Training augmentation in numpy / OpenCV: large-scale jitter, crops zoomed on one object, horizontal flip,
colour jitter.

Geometry is one affine map per sample (resize + optional flip + crop offset), applied straight into
the ``S x S`` output, so no 2x-upscaled intermediate is ever built: ``cv2.warpAffine(INTER_LINEAR)``
for the image, and an exact nearest-neighbour gather (numpy indexing, the pixel centres of
``cv2.INTER_NEAREST_EXACT``) for label maps and mask stacks, so a label map and masks cut
from it always agree. The map reproduces ``cv2.resize`` (half-pixel centres), and without jitter it is
SAM's preprocessing: longest side to ``S``, content at the top left, zero padding at the bottom / right.

A zoomed crop (``zoom_p``, FocalClick's focus crops) replaces the jitter's scale and offset by a square
window around one object's box, grown by a random context factor and scaled to fill the ``S x S`` output:
objects that fill the frame (a close-up of a cat's face) and boundary detail at a finer scale than the
whole image gives, both rare under plain jitter of datasets of small objects such as COCO.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from segany.transforms import get_preprocess_shape


@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation settings (``None`` in the datasets means: validation, no randomness).

    ``scale_min``/``scale_max``: longest side of the resized content as a fraction of ``image_size``
    (large-scale jitter, SAM/Copy-Paste use 0.1-2.0). ``hflip_p``: horizontal flip probability.
    ``brightness``/``contrast``/``saturation``: factors drawn from ``[1-x, 1+x]``; ``hue``: shift as a
    fraction of the full hue circle, drawn from ``[-hue, hue]``. ``color_p``: probability of colour jitter.
    ``zoom_p``: probability of a crop zoomed on one object (see the module docstring); its window's side is
    the object's longer box side times a factor drawn from ``[zoom_context_min, zoom_context_max]``, and
    the zoomed image is between 1 and ``zoom_max_scale`` times its plain resize. A factor below 1 cuts
    the object at the window's sides: an object larger than the frame, as in a close-up.
    ``copy_paste_p``: probability that label-map items get 1 to ``copy_paste_max_objects`` objects of another
    image of their folder pasted in, scaled by ``[copy_paste_scale_min, copy_paste_scale_max]`` times the
    fit (:mod:`segany.training.copy_paste`).
    """

    scale_min: float = 0.1
    scale_max: float = 2.0
    hflip_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    color_p: float = 0.8
    zoom_p: float = 0.0
    zoom_context_min: float = 1.2
    zoom_context_max: float = 2.0
    zoom_max_scale: float = 4.0
    copy_paste_p: float = 0.0
    copy_paste_max_objects: int = 3
    copy_paste_scale_min: float = 0.3
    copy_paste_scale_max: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")
        probabilities = (self.hflip_p, self.color_p, self.zoom_p, self.copy_paste_p)
        if not all(0 <= p <= 1 for p in probabilities):
            raise ValueError("probabilities must be in [0, 1]")
        if not 0.5 <= self.zoom_context_min <= self.zoom_context_max or self.zoom_max_scale < 1:
            raise ValueError("need 0.5 <= zoom_context_min <= zoom_context_max and zoom_max_scale >= 1")
        if self.copy_paste_max_objects < 1 or not 0 < self.copy_paste_scale_min <= self.copy_paste_scale_max:
            raise ValueError("need copy_paste_max_objects >= 1 and 0 < copy_paste_scale_min <= copy_paste_scale_max")


@dataclass(frozen=True)
class Geometry:
    """Where a source ``src_hw`` image lands in the ``out x out`` square.

    The source is resized to ``resized_hw``, optionally flipped left-right, then the window starting at
    ``crop_yx`` is taken; the content occupies the top-left ``valid_hw`` of the output.
    """

    src_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    flip: bool
    crop_yx: tuple[int, int]
    out: int

    @property
    def valid_hw(self) -> tuple[int, int]:
        return (
            min(self.resized_hw[0] - self.crop_yx[0], self.out),
            min(self.resized_hw[1] - self.crop_yx[1], self.out),
        )

    def matrix(self) -> np.ndarray:
        """2x3 affine map from source pixel coordinates (centres at integers) to output ones."""
        (h, w), (nh, nw) = self.src_hw, self.resized_hw
        sx, sy = nw / w, nh / h
        # cv2.resize convention: dst = s * (src + 0.5) - 0.5
        ax, bx = sx, 0.5 * sx - 0.5
        ay, by = sy, 0.5 * sy - 0.5
        if self.flip:
            ax, bx = -ax, (nw - 1) - bx
        bx -= self.crop_yx[1]
        by -= self.crop_yx[0]
        return np.array([[ax, 0.0, bx], [0.0, ay, by]], dtype=np.float64)

    def apply_coords(self, xy: np.ndarray) -> np.ndarray:
        """Map ``(..., 2)`` source ``(x, y)`` pixel coordinates to output coordinates."""
        m = self.matrix()
        xy = np.asarray(xy, dtype=np.float64)
        return xy @ m[:, :2].T + m[:, 2]


def sample_geometry(
    h: int,
    w: int,
    image_size: int,
    cfg: AugmentConfig | None,
    rng: np.random.Generator | None,
    focus_box: np.ndarray | None = None,
) -> Geometry:
    """Draw a geometry; with ``cfg=None`` it is plain resize-longest-side + pad (no randomness).

    ``focus_box`` (``x0, y0, x1, y1`` source pixels, inclusive) makes it a crop zoomed on that box.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"empty image {h}x{w}")
    if cfg is None or rng is None:
        return Geometry((h, w), get_preprocess_shape(h, w, image_size), False, (0, 0), image_size)
    if focus_box is not None:
        return _zoom_geometry(h, w, image_size, cfg, rng, np.asarray(focus_box, dtype=np.float64))
    scale = float(rng.uniform(cfg.scale_min, cfg.scale_max))
    nh, nw = get_preprocess_shape(h, w, max(1, round(image_size * scale)))
    flip = bool(rng.random() < cfg.hflip_p)
    y0 = int(rng.integers(0, nh - image_size + 1)) if nh > image_size else 0
    x0 = int(rng.integers(0, nw - image_size + 1)) if nw > image_size else 0
    return Geometry((h, w), (nh, nw), flip, (y0, x0), image_size)


def focus_box(
    rng: np.random.Generator,
    label_map: np.ndarray | None,
    skip: set[int],
    masks: np.ndarray | Sequence[Callable[[], np.ndarray]] | None,
) -> np.ndarray | None:
    """The box (``x0, y0, x1, y1``) of one object drawn at random for a zoomed crop, or None if none.

    Lazily decoded masks (SA-1B) give none: their boxes would cost a decode of every mask."""
    if label_map is not None:
        ids = [int(i) for i in np.unique(label_map) if int(i) not in skip]
        if not ids:
            return None
        ys, xs = np.nonzero(label_map == ids[int(rng.integers(len(ids)))])
    elif isinstance(masks, np.ndarray) and len(masks):
        ys, xs = np.nonzero(masks[int(rng.integers(len(masks)))])
        if not len(ys):
            return None
    else:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()])


def _zoom_geometry(
    h: int, w: int, image_size: int, cfg: AugmentConfig, rng: np.random.Generator, box: np.ndarray
) -> Geometry:
    """A square window around ``box`` (its longer side times the context factor) scaled to the output."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0 + 1, y1 - y0 + 1) * float(rng.uniform(cfg.zoom_context_min, cfg.zoom_context_max))
    # between the plain resize (an object as large as the image is not shrunk) and zoom_max_scale x it
    longest = float(np.clip(max(h, w) * image_size / side, image_size, cfg.zoom_max_scale * image_size))
    nh, nw = get_preprocess_shape(h, w, max(1, round(longest)))
    flip = bool(rng.random() < cfg.hflip_p)
    cx, cy = (x0 + x1 + 1) / 2 * nw / w, (y0 + y1 + 1) / 2 * nh / h  # the box centre in resized pixels
    if flip:
        cx = nw - cx
    # the window centred on the box, shifted back inside the resized image where it would stick out
    ox = int(np.clip(round(cx - image_size / 2), 0, max(nw - image_size, 0)))
    oy = int(np.clip(round(cy - image_size / 2), 0, max(nh - image_size, 0)))
    return Geometry((h, w), (nh, nw), flip, (oy, ox), image_size)


def _warp(arr: np.ndarray, geom: Geometry, interp: int) -> np.ndarray:
    out = cv2.warpAffine(
        arr,
        geom.matrix(),
        (geom.out, geom.out),
        flags=interp,
        borderMode=cv2.BORDER_REPLICATE,
    )
    if out.ndim == 2 and arr.ndim == 3:  # cv2 drops a trailing channel of size 1
        out = out[:, :, None]
    vh, vw = geom.valid_hw
    out[vh:] = 0
    out[:, vw:] = 0
    return out


def nearest_indices(geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Source row / column of every content row / column of the output (nearest neighbour).

    The map has no rotation, so nearest sampling is separable: ``out[y, x] = src[rows[y], cols[x]]``.
    Done in numpy rather than ``cv2.warpAffine(INTER_NEAREST)`` because OpenCV breaks exact ties
    differently for different channel counts, which would let a label map and a mask stack disagree.
    """
    m = geom.matrix()
    (h, w), (vh, vw) = geom.src_hw, geom.valid_hw
    rows = np.floor((np.arange(vh) - m[1, 2]) / m[1, 1] + 0.5).astype(np.intp)
    cols = np.floor((np.arange(vw) - m[0, 2]) / m[0, 0] + 0.5).astype(np.intp)
    return np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)


def _gather(arr: np.ndarray, geom: Geometry) -> np.ndarray:
    """Nearest-neighbour warp of ``H x W [x C]`` into ``S x S [x C]``, zero outside the content."""
    rows, cols = nearest_indices(geom)
    out = np.zeros((geom.out, geom.out, *arr.shape[2:]), dtype=arr.dtype)
    out[: len(rows), : len(cols)] = arr[rows][:, cols]
    return out


def warp_image(image: np.ndarray, geom: Geometry) -> np.ndarray:
    """``H x W x 3`` uint8 -> ``S x S x 3`` uint8 (bilinear), zero outside the content."""
    return _warp(np.ascontiguousarray(image), geom, cv2.INTER_LINEAR)


def warp_label_map(label_map: np.ndarray, geom: Geometry) -> np.ndarray:
    """``H x W`` integer label map -> ``S x S`` (nearest), 0 outside the content; dtype kept."""
    return _gather(label_map, geom)


def warp_masks(masks: np.ndarray, geom: Geometry) -> np.ndarray:
    """``N x H x W`` bool -> ``N x S x S`` bool (nearest, the same gather as :func:`warp_label_map`)."""
    rows, cols = nearest_indices(geom)
    out = np.zeros((masks.shape[0], geom.out, geom.out), dtype=bool)
    if masks.shape[0]:
        out[:, : len(rows), : len(cols)] = masks.astype(bool, copy=False)[:, rows][:, :, cols]
    return out


def color_jitter(image: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast, saturation and hue on an ``H x W x 3`` uint8 RGB image."""
    if image.size == 0 or rng.random() >= cfg.color_p:
        return image
    img = image.astype(np.float32)
    b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    s = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    hshift = rng.uniform(-cfg.hue, cfg.hue)
    img *= b
    gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = (img - gray.mean()) * c + gray.mean()
    gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = (img - gray[..., None]) * s + gray[..., None]
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if abs(hshift) > 1e-6:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV_FULL)
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(hshift * 256)) % 256
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
    return out


def jitter_content(image: np.ndarray, geom: Geometry, cfg: AugmentConfig, rng: np.random.Generator) -> None:
    """Colour-jitter the content region of an output image in place (the padding stays zero)."""
    vh, vw = geom.valid_hw
    image[:vh, :vw] = color_jitter(np.ascontiguousarray(image[:vh, :vw]), cfg, rng)
