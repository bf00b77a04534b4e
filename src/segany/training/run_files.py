"""What a training run writes in its ``out_dir``: the resumable state (``last.pt``: a ``torch.save`` of
tensors and numbers, written atomically, loaded with ``weights_only``), the metrics log
(``metrics.jsonl``) and its plot (``training.png``)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segany.errors import SegAnyError
from segany.io.atomic import atomic_write_bytes, atomic_write_text, remove_stray_temp_files

CHECKPOINT_VERSION = 1
#: What a SAM training run writes directly in ``out_dir`` (the embeddings cache keeps its own folder).
RUN_FILES = ("last.pt", "metrics.jsonl", "training.png", "best.safetensors", "final.safetensors", "summary.json",
             "config.yaml")


class RunFolder:
    """A run's ``out_dir``: its resumable state ``last.pt`` and its ``metrics.jsonl``.

    ``names`` are the files the run writes there: :meth:`prepare` removes their temporary files that a
    killed run left (never valid; other files in the folder are not touched).
    """

    def __init__(self, out_dir: str | Path, names: Sequence[str]):
        self.path = Path(out_dir)
        self.names = tuple(names)
        self.last = self.path / "last.pt"
        self.log = MetricsLog(self.path / "metrics.jsonl")

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        remove_stray_temp_files(self.path, self.names)

    def load_last(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none yet."""
        return load_training_state(self.last) if self.last.is_file() else None

    def save_last(self, state: dict[str, Any]) -> None:
        save_training_state(self.last, state)


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` of a tensors-and-numbers dict, written atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_training_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SegAnyError(f"{path}: cannot resume from this file ({str(e).splitlines()[0] if str(e) else e})") from None


def save_part_state(path: Path, key: str, part: torch.nn.Module, opt: torch.optim.Optimizer, images: int,
                    steps: int) -> None:
    """The resumable state of a run that trains one part of a frozen model (a refiner, a correction decoder):
    ``{key: the part's weights, "optimizer", "images", "steps"}``."""
    save_training_state(path, {key: part.state_dict(), "optimizer": opt.state_dict(), "images": images, "steps": steps})


def resume_part_state(path: Path, key: str, part: torch.nn.Module, opt: torch.optim.Optimizer,
                      progress: bool = True) -> tuple[int, int]:
    """:func:`save_part_state`'s file, where there is one, loaded into ``part`` and ``opt``: the images and steps
    done (``(0, 0)`` without it)."""
    if not path.is_file():
        return 0, 0
    state = load_training_state(path)
    part.load_state_dict(state[key])
    opt.load_state_dict(state["optimizer"])
    if progress:
        print(f"resumed from {path}: {state['images']} images, {state['steps']} steps", flush=True)
    return state["images"], state["steps"]


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line (kind "train" or "val").

    Lines are appended (a log is the one file not rewritten atomically: a crash can at worst leave a
    torn last line, which :meth:`read` skips); on resume lines after the resumed step are dropped
    with an atomic rewrite.
    """

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def truncate_after(self, step: int) -> None:
        recs = [r for r in self.read() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in recs))

    def append(self, rec: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()


def plot_metrics(records: Sequence[dict[str, Any]], path: Path) -> bool:
    """``training.png``: training loss (left) and validation mIoU / loss (right). False without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if train:
        steps = [r["step"] for r in train]
        ax1.plot(steps, [r["loss"] for r in train], label="loss")
        ax1.plot(steps, [r["focal"] * 20 for r in train], label="20 x focal", alpha=0.6)
        ax1.plot(steps, [r["dice"] for r in train], label="dice", alpha=0.6)
        ax1.plot(steps, [r["iou_mse"] for r in train], label="IoU MSE", alpha=0.6)
        ax1.set_yscale("log")
    ax1.set(xlabel="step", title="training loss")
    if train:
        ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    if val:
        steps = [r["step"] for r in val]
        for key, label in (
            ("val_click_miou1", "click mIoU@1"),
            ("val_box_miou", "box mIoU"),
            ("val_iou_last", "mIoU after all iterations (val batches)"),
        ):
            ys = [r.get(key) for r in val]
            if any(y is not None for y in ys):
                ax2.plot(steps, [np.nan if y is None else y for y in ys], marker="o", markersize=3, label=label)
        ax2.set_ylim(0, 1)
        if any(r.get("val_loss") is not None for r in val):
            ax3 = ax2.twinx()
            ax3.plot(
                steps,
                [np.nan if r.get("val_loss") is None else r["val_loss"] for r in val],
                color="gray",
                linestyle="--",
                label="val loss",
            )
            ax3.set_ylabel("val loss")
    ax2.set(xlabel="step", title="validation")
    if val:
        ax2.legend(fontsize=8, loc="lower right")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return True


def jsonable(x: Any) -> Any:
    """``x`` with non-finite floats as None (JSON has no NaN / inf)."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
