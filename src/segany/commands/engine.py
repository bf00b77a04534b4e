"""The data-engine commands: ``segany annotate``, ``segany dataset-stats``, ``segany engine``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from segany.commands.args import add_generator_args, add_model_arg, generator_kwargs, one_line_errors
from segany.errors import SegAnyError


def _add_engine_generator_args(p: argparse.ArgumentParser) -> None:
    """The generator options of ``segany everything`` (same names and checks), with SA-1B's filters as
    defaults."""
    from segany.automatic.options import SA1B_DEFAULTS, SA1B_HELP

    add_generator_args(p, "generator (SamAutomaticMaskGenerator options; SA-1B's quality filters by default)",
                       SA1B_DEFAULTS, SA1B_HELP)


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


def add_annotate_args(p: argparse.ArgumentParser) -> None:
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
    _add_engine_generator_args(p)
    add_ray_args(p)
    add_model_arg(p)
    one_line_errors(p, "annotate")


def run_annotate(args: argparse.Namespace) -> int:
    from segany.automatic.folder import collect_images
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


def add_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", metavar="DIR", help="an engine dataset folder, or any folder of SA-1B JSONs")
    p.add_argument("-o", "--out", metavar="OUT_DIR", help="where the figures and stats.json go (default: DIR/stats)")
    one_line_errors(p, "dataset-stats")


def run_stats(args: argparse.Namespace) -> int:
    from segany.engine.stats import dataset_stats, format_stats, write_stats

    root = Path(args.dataset)
    stats = dataset_stats(root)
    paths = write_stats(stats, Path(args.out) if args.out else root / "stats")
    print(format_stats(stats))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


# -- engine ----------------------------------------------------------------------------------------


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, metavar="DIR",
                   help="images to annotate: a folder, or a label-map folder (its images/ only; masks unread)")
    p.add_argument("--images-split", metavar="S", help="with a label-map folder: only this split's images")
    p.add_argument("--max-images", type=int, metavar="N", help="only the first N images")
    p.add_argument("--rounds", type=int, default=2, metavar="N", help="annotate/train/evaluate rounds (2)")
    p.add_argument("--val", required=True, metavar="DIR", help="held-out label-map folder for evaluation")
    p.add_argument("--val-split", metavar="S", help="its split (e.g. val)")
    p.add_argument("--val-max-images", type=int, default=20, metavar="N", help="evaluate on N images (20)")
    p.add_argument("--val-max-objects", type=int, default=8, metavar="N", help="objects per image (8)")
    p.add_argument("--train-config", metavar="FILE", help="training options (YAML, as segany train); its data, "
                   "checkpoint and out_dir are set by the engine")
    p.add_argument("--steps", type=int, metavar="N", help="training steps per round (default: the config's, or 100)")
    p.add_argument("--human", action="append", default=[], metavar="DIR[:SPLIT]",
                   help="human-labelled data to train on too: a label-map folder (with a split) or SA-1B folder")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="where rounds, datasets, weights go")
    _add_engine_generator_args(p)
    add_ray_args(p)
    add_model_arg(p)
    one_line_errors(p, "engine")


def run_engine(args: argparse.Namespace) -> int:
    from segany.engine.loop import (
        ROUND_TRAINING,
        DataEngineLoop,
        engine_images,
        human_specs,
        load_val,
        markdown_table,
    )
    from segany.training.config import TrainConfig

    generator, ray = generator_kwargs(args), ray_options(args)
    if args.rounds < 1:
        raise SegAnyError(f"--rounds must be >= 1, got {args.rounds}")
    if args.steps is not None and args.steps < 1:
        raise SegAnyError(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SegAnyError(f"{out}: exists and is not a folder")
    base: dict[str, Any] = {}
    if args.train_config:
        base = TrainConfig.from_yaml(args.train_config).to_dict()
        for key in ("out_dir", "checkpoint", "train_data", "val_data", "resume"):
            base.pop(key, None)
        if base.get("device") == "auto":  # then --device decides, as for annotation and evaluation
            del base["device"]
    else:
        TrainConfig.from_dict(dict(ROUND_TRAINING))  # checked before hours of annotation, not after
    images = engine_images(args.images, args.images_split, args.max_images, out)
    val = load_val(args.val, args.val_split, args.val_max_images, images)
    if args.val_max_objects < 1:
        raise SegAnyError(f"--val-max-objects must be >= 1, got {args.val_max_objects}")
    loop = DataEngineLoop(out, images, val, args.rounds, args.model, args.device, generator, ray, base,
                          human_specs(args.human), args.steps, args.val_max_objects)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = loop.run()
    print(markdown_table(rows), end="")
    print(f"engine: {args.rounds} rounds on {len(images)} images, {(time.perf_counter() - t0) / 60:.1f} min -> "
          f"{out / 'rounds.md'}, {out / 'rounds.json'}" + (", rounds.png" if (out / "rounds.png").is_file() else ""))
    return 0
