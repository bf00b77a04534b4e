"""The data-engine commands: ``segany annotate``, ``segany dataset-stats``, ``segany engine``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segany.cli import add_model_arg, register

#: The generator options of ``segany everything`` (same names, checks and help), re-declared here with
#: the SA-1B quality filters as defaults.
GENERATOR_OPTIONS = (
    "points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh", "stability_score_offset",
    "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio", "crop_n_points_downscale_factor",
    "min_mask_region_area", "max_mask_region_fraction",
)
#: SA-1B's filters (paper, appendix B): confident (predicted IoU 0.88) and stable (0.95) masks, NMS,
#: small holes and islands removed, near-whole-image masks dropped.
ENGINE_DEFAULTS = {"min_mask_region_area": 100, "max_mask_region_fraction": 0.95}
_HELP = {
    "min_mask_region_area": "remove holes/islands < N px (100)",
    "max_mask_region_fraction": "drop masks covering more than F of the image (0.95, as SA-1B)",
}


def _one_line_errors(p: argparse.ArgumentParser, command: str) -> None:
    """argparse errors as one line and exit 2, like every other error."""

    def error(message: str) -> None:
        print(f"segany {command}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    p.error = error  # type: ignore[method-assign]


def add_generator_args(p: argparse.ArgumentParser) -> None:
    """The generator options, taken from ``segany everything``'s parser so both stay one definition."""
    from segany.automatic import run as everything

    donor = argparse.ArgumentParser(add_help=False)
    everything.add_args(donor)
    g = p.add_argument_group("generator (SamAutomaticMaskGenerator options; SA-1B's quality filters by default)")
    for a in donor._actions:  # argparse has no public way to list a parser's options
        if a.dest in GENERATOR_OPTIONS:
            g.add_argument(*a.option_strings, dest=a.dest, type=a.type, metavar=a.metavar,
                           default=ENGINE_DEFAULTS.get(a.dest, a.default), help=_HELP.get(a.dest, a.help))


def generator_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from segany.automatic.run import generator_kwargs as checked

    return checked(args)


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray (optional: pip install \"segany[ray]\")")
    g.add_argument("--ray", metavar="ADDRESS", help="run on Ray: 'local' (start it here) or a cluster address")
    g.add_argument("--ray-actors", type=int, metavar="N", help="model actors (default: one per GPU / per CPU but one)")
    g.add_argument("--ray-cpus-per-actor", type=float, default=1.0, metavar="F", help="(1)")
    g.add_argument("--ray-gpus-per-actor", type=float, default=0.0, metavar="F", help="(0; 1 to run on GPUs)")


def ray_options(args: argparse.Namespace) -> Any:
    if not args.ray:
        return None
    from segany.engine.ray_backend import RayOptions

    opts = RayOptions(args.ray, args.ray_actors, args.ray_cpus_per_actor, args.ray_gpus_per_actor)
    opts.check()
    return opts


# -- annotate --------------------------------------------------------------------------------------


def _annotate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="IMAGES", help="image files and/or folders (searched recursively)")
    p.add_argument("-o", "--out", required=True, metavar="DATASET_DIR", help="dataset folder (created / resumed)")
    p.add_argument("--redo", action="store_true", help="annotate again the images already done")
    s = p.add_argument_group("stage 2, semi-automatic")
    s.add_argument("--semi", action="store_true", help="keep each image's existing masks, add automatic ones off them")
    s.add_argument("--existing", metavar="DIR", help="SA-1B JSONs of the existing masks, by relative path "
                   "(default: NAME.json beside each image)")
    s.add_argument("--existing-stage", default="manual", metavar="STAGE",
                   help="stage recorded for the existing masks: manual (default), automatic, semi-automatic")
    s.add_argument("--max-overlap", type=float, default=0.2, metavar="F",
                   help="drop new masks with more than F of their area on labelled pixels (0.2)")
    s.add_argument("--report-min-region", type=float, default=0.005, metavar="F",
                   help="report unlabelled regions of at least F of the image (0.005)")
    s.add_argument("--report-attention", type=float, default=0.2, metavar="F",
                   help="list images with more than F unlabelled for people (0.2)")
    add_generator_args(p)
    add_ray_args(p)
    add_model_arg(p)
    _one_line_errors(p, "annotate")


def _annotate_run(args: argparse.Namespace) -> int:
    from segany.automatic.run import collect_images
    from segany.engine.annotate import AnnotateSettings, annotate

    settings = AnnotateSettings(
        generator_kwargs(args), semi=args.semi, existing_dir=Path(args.existing) if args.existing else None,
        existing_stage=args.existing_stage, max_overlap=args.max_overlap, report_min_region=args.report_min_region,
        report_attention=args.report_attention, redo=args.redo,
    )
    settings.check()
    ray = ray_options(args)
    out = Path(args.out)
    images = collect_images(args.inputs, out)
    res = annotate(images, out, settings, model=args.model, device=args.device, ray=ray)
    iou = f", mean predicted IoU {res.mean_predicted_iou:.3f}" if res.mean_predicted_iou is not None else ""
    print(
        f"annotate: {res.images} images ({res.done} done, {res.skipped} skipped, {res.failed} failed), "
        f"{res.masks} masks ({res.masks_per_image:.1f} per image{iou}), {res.seconds:.1f} s -> {out}"
    )
    for path in res.report:
        if path.suffix == ".txt":
            print(path.read_text(encoding="utf-8").rstrip())
            print(f"report: {path} (and {path.with_suffix('.json').name})")
    return 1 if res.failed else 0


# -- dataset-stats ---------------------------------------------------------------------------------


def _stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DIR", help="an engine dataset folder, or any folder of SA-1B JSONs")
    p.add_argument("-o", "--out", metavar="OUT_DIR", help="where the figures and stats.json go (default: DIR/stats)")
    _one_line_errors(p, "dataset-stats")


def _stats_run(args: argparse.Namespace) -> int:
    from segany.engine.stats import dataset_stats, format_stats, write_stats

    root = Path(args.dataset)
    stats = dataset_stats(root)
    paths = write_stats(stats, Path(args.out) if args.out else root / "stats")
    print(format_stats(stats))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


# -- engine ----------------------------------------------------------------------------------------


def _engine_args(p: argparse.ArgumentParser) -> None:
    from segany.engine.loop import add_loop_args

    add_loop_args(p)
    add_generator_args(p)
    add_ray_args(p)
    add_model_arg(p)
    _one_line_errors(p, "engine")


def _engine_run(args: argparse.Namespace) -> int:
    from segany.engine.loop import run_from_args

    return run_from_args(args, generator_kwargs(args), ray_options(args))


def _commands() -> list[tuple[str, str, Callable, Callable]]:
    return [
        ("annotate", "annotate images into a training dataset (SA-1B files + manifest; stage 3, or 2 with --semi)",
         _annotate_args, _annotate_run),
        ("dataset-stats", "masks per image and mask sizes of a dataset, as the SA-1B paper's figures",
         _stats_args, _stats_run),
        ("engine", "the data engine loop: annotate -> train -> evaluate, for N rounds", _engine_args, _engine_run),
    ]


for _name, _help, _add, _run in _commands():
    register(_name, _help, _add, _run)
