"""The automatic mask generator's options as one table: name, type, default and help, and their checks.

``segany everything`` declares them with the official :class:`SamAutomaticMaskGenerator` defaults (the
predicted-IoU threshold left to the generator, whose default follows the model family, as the official
SAM and SAM 2 generators differ),
``segany annotate`` / ``segany engine`` with SA-1B's quality filters (:data:`SA1B_DEFAULTS`); both check
them with :func:`check_generator_options`, whose messages name the command-line option (``--points-per-side``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from segany.errors import SegAnyError


@dataclass(frozen=True)
class GeneratorOption:
    """One keyword argument of :class:`SamAutomaticMaskGenerator` as a command-line option."""

    name: str  #: the keyword argument (``points_per_side``); the option is ``--points-per-side``
    type: type
    default: Any  #: the official default
    metavar: str
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


GENERATOR_OPTIONS: tuple[GeneratorOption, ...] = (
    GeneratorOption("points_per_side", int, 32, "N", "grid of N x N prompts (32)"),
    GeneratorOption("points_per_batch", int, 64, "N", "prompts decoded at once (64)"),
    # None: the official generator's default for the model's family (SAM 2's own generator keeps 0.8).
    GeneratorOption("pred_iou_thresh", float, None, "F", "keep predicted IoU > F (SAM: 0.88, SAM 2: 0.8)"),
    GeneratorOption("stability_score_thresh", float, 0.95, "F", "(0.95)"),
    GeneratorOption("stability_score_offset", float, 1.0, "F", "(1.0)"),
    GeneratorOption("box_nms_thresh", float, 0.7, "F", "NMS within a crop (0.7)"),
    GeneratorOption("crop_n_layers", int, 0, "N", "zoomed crop layers (0)"),
    GeneratorOption("crop_nms_thresh", float, 0.7, "F", "NMS across crops (0.7)"),
    GeneratorOption("crop_overlap_ratio", float, 512 / 1500, "F", "(0.341)"),
    GeneratorOption("crop_n_points_downscale_factor", int, 1, "N", "(1)"),
    GeneratorOption("min_mask_region_area", int, 0, "N", "remove holes/islands < N px"),
    GeneratorOption(
        "max_mask_region_fraction", float, None, "F",
        "drop masks covering more than F of the image (SA-1B uses 0.95; default: keep)",
    ),
)

#: SA-1B's filters (paper, appendix B): confident (predicted IoU 0.88) and stable (0.95) masks, NMS,
#: small holes and islands removed, near-whole-image masks dropped: the data engine's defaults.
SA1B_DEFAULTS: dict[str, Any] = {"pred_iou_thresh": 0.88, "min_mask_region_area": 100, "max_mask_region_fraction": 0.95}
SA1B_HELP: dict[str, str] = {
    "pred_iou_thresh": "keep predicted IoU > F (0.88, as SA-1B)",
    "min_mask_region_area": "remove holes/islands < N px (100)",
    "max_mask_region_fraction": "drop masks covering more than F of the image (0.95, as SA-1B)",
}


def check_generator_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The generator's keyword arguments (``output_mode="coco_rle"``) from ``options`` (every name of
    :data:`GENERATOR_OPTIONS`), checked.

    Raises:
        SegAnyError: a value out of range, with a message that names the command-line option.
    """

    def need(ok: bool, name: str, what: str) -> None:
        if not ok:
            raise SegAnyError(f"--{name.replace('_', '-')} must be {what}, got {options[name]}")

    for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
        need(options[name] >= 1, name, ">= 1")
    for name in ("crop_n_layers", "min_mask_region_area"):
        need(options[name] >= 0, name, ">= 0")
    for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
        if name == "pred_iou_thresh" and options[name] is None:
            continue  # the model family's default, which the generator picks
        need(0.0 <= options[name] <= 1.0, name, "in [0, 1]")
    need(0.0 <= options["stability_score_offset"] < float("inf"), "stability_score_offset", "a number >= 0")
    need(0.0 <= options["crop_overlap_ratio"] < 1.0, "crop_overlap_ratio", "in [0, 1)")
    f = options["max_mask_region_fraction"]
    need(f is None or 0.0 < f <= 1.0, "max_mask_region_fraction", "in (0, 1]")
    layers, factor = options["crop_n_layers"], options["crop_n_points_downscale_factor"]
    need(layers <= 4, "crop_n_layers", "<= 4 (layer 4 already has 256 crops)")
    need(options["points_per_side"] // factor**layers >= 1, "points_per_side",
         f">= {factor ** layers} with these crop options (no points would be left in the last crop layer)")
    return {**{o.name: options[o.name] for o in GENERATOR_OPTIONS}, "output_mode": "coco_rle"}
