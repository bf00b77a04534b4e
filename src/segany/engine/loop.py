"""``segany engine``: the data engine loop of the SAM paper, round after round.

Round ``r`` (1..N), with ``model_0`` the ``--model`` given:

1. annotate the images with ``model_{r-1}`` (stage 3, :func:`segany.engine.annotate.annotate`) into
   ``OUT/round_r/dataset``;
2. train on those masks plus any human ones (``--human``), starting from ``model_{r-1}``'s weights
   (:func:`segany.training.trainer.train`) -> ``OUT/round_r/train/final.safetensors`` = ``model_r``;
3. evaluate ``model_r`` on a held-out labelled set: clicks (mIoU@1) and boxes (mIoU)
   (:mod:`segany.evaluation.protocols`).

Row 0 of the table evaluates ``model_0``. The table (images, masks per image, mean predicted IoU of the
masks, held-out mIoU@1 and box mIoU) is printed and written as ``OUT/rounds.json``, ``OUT/rounds.md`` and
``OUT/rounds.png``. The loop resumes: a finished round (``round_r/result.json``) is not redone, and an
interrupted one resumes its annotation and its training; so one ``OUT`` is one experiment (a rerun with
other options keeps the rounds already done).

The held-out images must not be among the annotated ones (checked); when ``--images`` is a label-map
folder only its ``images/`` are read, never its masks.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segany.errors import SegAnyError

#: Training settings for a round when no ``--train-config`` is given: a short fine-tuning from the
#: previous weights (small lr, short warm-up), light enough for a CPU.
ROUND_TRAINING = {
    "max_steps": 100,
    "batch_size": 2,
    "max_masks": 8,
    "num_iterations": 3,
    "lr": 1.0e-4,
    "weight_decay": 0.05,
    "warmup_steps": 10,
    "grad_clip": 1.0,
    "num_workers": 0,
    "log_every": 10,
    "ckpt_every": 50,
    "precision": "auto",
}
TABLE_COLUMNS = (
    ("round", "round"), ("images", "images"), ("masks", "masks"), ("masks_per_image", "masks/img"),
    ("mean_predicted_iou", "mean pred. IoU"), ("train_steps", "train steps"), ("click_miou1", "mIoU@1"),
    ("box_miou", "box mIoU"), ("minutes", "minutes"),
)


# -- inputs ----------------------------------------------------------------------------------------


def engine_images(images: str, split: str | None, max_images: int | None, out_dir: Path) -> list[Path]:
    """The images to annotate (a label-map folder contributes its images only)."""
    from segany.automatic.folder import collect_images
    from segany.io.labelmaps import LabelMapFolder, is_label_map_folder

    if max_images is not None and max_images < 1:
        raise SegAnyError(f"--max-images must be >= 1, got {max_images}")
    if is_label_map_folder(images):
        folder = LabelMapFolder(images, split)
        found = [folder.image_path(s).resolve() for s in folder.stems]
    elif split:
        raise SegAnyError(f"--images-split needs a label-map folder (images/ + masks/), {images} is not one")
    else:
        found = collect_images([images], out_dir)
    return found[:max_images]


def human_specs(items: list[str]) -> list[dict[str, Any]]:
    """``DIR[:SPLIT]`` -> training dataset specs (label-map folders, else SA-1B folders)."""
    from segany.io.labelmaps import is_label_map_folder

    specs = []
    for item in items:
        root, _, split = item.partition(":") if not Path(item).exists() else (item, "", "")
        if not Path(root).is_dir():
            raise SegAnyError(f"--human {item}: no such folder")
        if is_label_map_folder(root):
            specs.append({"type": "labelmap", "root": root, **({"split": split} if split else {})})
        else:
            specs.append({"type": "sa1b", "root": root})
    return specs


def load_val(root: str, split: str | None, max_images: int, engine_imgs: list[Path]) -> list[Any]:
    """The held-out samples (loaded once for every round); none of them may be annotated by the engine."""
    from segany.io.labelmaps import LabelMapFolder

    if max_images < 1:
        raise SegAnyError(f"--val-max-images must be >= 1, got {max_images}")
    folder = LabelMapFolder(root, split)
    stems = folder.stems[:max_images]
    if not stems:
        raise SegAnyError(f"{root}: no labelled images to evaluate on" + (f" in split {split!r}" if split else ""))
    ours = {p.resolve() for p in engine_imgs}
    clash = [s for s in stems if folder.image_path(s).resolve() in ours]
    if clash:
        raise SegAnyError(
            f"held-out images are also annotated by the engine: {', '.join(clash[:5])} (use other splits)"
        )
    return [folder.load(s) for s in stems]


# -- one round -------------------------------------------------------------------------------------


def evaluate(model_path: str, samples: list[Any], device: str, max_objects: int) -> dict[str, float | None]:
    """Held-out mIoU@1 (simulated click) and box mIoU of a model."""
    from segany.checkpoint import load_model
    from segany.evaluation.protocols import run_box, run_clicks
    from segany.predictor import SamPredictor

    predictor = SamPredictor(load_model(model_path, device=device))
    clicks = run_clicks(predictor, samples, max_clicks=1, max_objects_per_image=max_objects).summary()
    boxes = run_box(predictor, samples, max_objects_per_image=max_objects).summary()

    def num(v: Any) -> float | None:
        return float(v) if v is not None and math.isfinite(v) else None

    return {"click_miou1": num(clicks.get("mIoU@1")), "box_miou": num(boxes.get("mIoU")),
            "val_objects": clicks.get("num_objects")}


def round_config(base: dict[str, Any], out_dir: Path, checkpoint: str, data: list[dict], steps: int | None,
                 device: str) -> Any:
    from segany.training.config import TrainConfig

    cfg = {**ROUND_TRAINING, **base}
    cfg.update(out_dir=str(out_dir), checkpoint=checkpoint, train_data=data, val_data=[], resume=True)
    if steps is not None:
        cfg["max_steps"] = steps
    if "device" not in base:
        cfg["device"] = device
    return TrainConfig.from_dict(cfg)


@dataclass
class DataEngineLoop:
    """The data engine's rounds: their inputs (checked by ``segany engine``) and :meth:`run`."""

    out: Path
    images: list[Path]
    val: list[Any]
    rounds: int
    model: str
    device: str
    generator: dict[str, Any]
    ray: Any
    train_base: dict[str, Any]
    human: list[dict[str, Any]]
    steps: int | None
    val_max_objects: int

    def round_dir(self, r: int) -> Path:
        return self.out / f"round_{r}"

    def run(self) -> list[dict[str, Any]]:
        from segany.checkpoint import resolve_model_path

        rows = []
        model = str(resolve_model_path(self.model).resolve())
        for r in range(self.rounds + 1):
            done = self.round_dir(r) / "result.json"
            if done.is_file():
                from segany.io.sa1b import read_json

                row = read_json(done)
            else:
                row = self.round(r, model)
                from segany.io.atomic import atomic_write_json

                atomic_write_json(done, row, indent=1)
            rows.append(row)
            model = row["model_out"]
            write_table(rows, self.out)
            print(format_row(row), flush=True)
        return rows

    def round(self, r: int, model: str) -> dict[str, Any]:
        """Round 0: evaluate the starting model. Round r: annotate, train, evaluate."""
        from segany.engine.annotate import AnnotateSettings, annotate
        from segany.training.trainer import train

        t0 = time.perf_counter()
        row: dict[str, Any] = {"round": r, "model_in": model, "model_out": model}
        if r > 0:
            res = annotate(self.images, self.round_dir(r) / "dataset", AnnotateSettings(dict(self.generator)),
                           model=model, device=self.device, ray=self.ray)
            row.update(images=res.done + res.skipped, failed=res.failed, masks=res.masks,
                       masks_per_image=round(res.masks_per_image, 3), mean_predicted_iou=res.mean_predicted_iou)
            if res.masks == 0:
                print(f"engine: round {r}: no masks passed the filters; training skipped (the model is unchanged)")
                row["train_steps"] = 0
            else:
                data = [{"type": "sa1b", "root": str(self.round_dir(r) / "dataset" / "sa1b")}, *self.human]
                cfg = round_config(self.train_base, self.round_dir(r) / "train", model, data, self.steps,
                                   self.device)
                result = train(cfg)
                row["train_steps"] = result.step
                row["model_out"] = str(Path(cfg.out_dir) / "final.safetensors")
        row.update(evaluate(row["model_out"], self.val, self.device, self.val_max_objects))
        row["minutes"] = round((time.perf_counter() - t0) / 60, 2)
        return row


# -- the table -------------------------------------------------------------------------------------


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def format_row(row: dict[str, Any]) -> str:
    return "engine: " + ", ".join(f"{label} {_cell(row.get(key))}" for key, label in TABLE_COLUMNS)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(label for _, label in TABLE_COLUMNS) + " |"
    sep = "|" + "|".join("---:" for _ in TABLE_COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r.get(k)) for k, _ in TABLE_COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def write_table(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """``rounds.json``, ``rounds.md`` and (with matplotlib) ``rounds.png``."""
    from segany.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

    paths = [out / "rounds.json", out / "rounds.md"]
    atomic_write_json(paths[0], rows, indent=1)
    atomic_write_text(paths[1], "Round 0 evaluates the starting model; round r annotates with the model of round "
                      "r-1, trains from it, and evaluates the result.\n\n" + markdown_table(rows))
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return paths
    fig = Figure(figsize=(6, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [r["round"] for r in rows]
    nan = float("nan")
    for key, label in (("click_miou1", "held-out mIoU@1"), ("box_miou", "held-out box mIoU"),
                       ("mean_predicted_iou", "mean predicted IoU of the masks")):
        ax.plot(xs, [nan if r.get(key) is None else r[key] for r in rows], marker="o", label=label)
    ax.set(xlabel="round", ylabel="IoU", ylim=(0, 1), xticks=xs, title="data engine")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.bar(xs, [r.get("masks_per_image") or 0 for r in rows], alpha=0.2, color="gray", label="masks per image")
    ax2.set_ylabel("masks per image")
    ax.set_zorder(ax2.get_zorder() + 1)  # the lines over the bars
    ax.patch.set_visible(False)
    lines = ax.get_legend_handles_labels()
    bars = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + bars[0], lines[1] + bars[1], fontsize=8, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out / "rounds.png", buf.getvalue())
    return [*paths, out / "rounds.png"]
