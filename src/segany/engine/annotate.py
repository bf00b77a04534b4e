"""Annotate a folder of images into an engine dataset (stage 3 fully automatic, stage 2 semi-automatic).

:func:`annotate` runs the automatic mask generator over the images that are not done yet, in-process or
as a Ray Data pipeline (:mod:`segany.engine.ray_backend`); either way the masks come back here, to one
writer that copies the image, writes its SA-1B file and marks it done in the manifest
(:mod:`segany.engine.dataset` explains the order and why it survives SIGKILL). So both backends give the
same files, and the manifest has one writer. The generate -> write loop is the folder annotator's
(:mod:`segany.automatic.folder`, which ``segany everything`` runs too); this module adds the dataset.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segany.automatic.folder import Generated, common_root, generate_images, write_results
from segany.engine.dataset import STAGES, DatasetLayout, Manifest, dataset_names, is_done_on_disk, writer_lock
from segany.errors import SegAnyError
from segany.io.atomic import remove_stray_temp_files
from segany.io.sa1b import SCORE_KEYS

#: Test hook: seconds to sleep between writing an image's files and marking it done (the window a kill
#: is most likely to hit in the resumability test). Never set in normal use.
PAUSE_ENV = "SEGANY_ENGINE_TEST_PAUSE"


@dataclass
class AnnotateSettings:
    """What to do besides running the generator (whose keyword arguments are ``generator``)."""

    generator: dict[str, Any]
    semi: bool = False  #: stage 2: keep the existing masks, add automatic ones off them
    #: stage 2: a folder of SA-1B JSONs, ``<image path relative to the inputs, no suffix>.json``;
    #: None: beside the images
    existing_dir: Path | None = None
    existing_stage: str = "manual"  #: the stage recorded for the existing masks
    max_overlap: float = 0.2  #: stage 2: drop new masks with more of their area on labelled pixels
    report_min_region: float = 0.005  #: stage 2 report: smallest unlabelled region listed (fraction of image)
    report_attention: float = 0.2  #: stage 2 report: images with more unlabelled area are listed for people
    report_max_regions: int = 10
    redo: bool = False  #: annotate again images already done

    @property
    def stage(self) -> str:
        return "semi-automatic" if self.semi else "automatic"

    def check(self) -> None:
        if self.existing_stage not in STAGES:
            raise SegAnyError(f"--existing-stage must be one of {', '.join(STAGES)}, got {self.existing_stage!r}")
        if not 0.0 <= self.max_overlap <= 1.0:
            raise SegAnyError(f"--max-overlap must be in [0, 1], got {self.max_overlap}")
        if not 0.0 < self.report_min_region <= 1.0:
            raise SegAnyError(f"--report-min-region must be in (0, 1], got {self.report_min_region}")
        if self.existing_dir is not None and not self.existing_dir.is_dir():
            raise SegAnyError(f"{self.existing_dir}: no such folder of existing annotations")
        if self.existing_dir is not None and not self.semi:
            raise SegAnyError("--existing goes with --semi")

    def to_json(self) -> dict[str, Any]:
        d = {"stage": self.stage, "generator": self.generator}
        if self.semi:
            d.update(existing_dir=str(self.existing_dir) if self.existing_dir else None,
                     existing_stage=self.existing_stage, max_overlap=self.max_overlap)
        return d


@dataclass
class AnnotateResult:
    """What one :func:`annotate` call did, and the state of its images in the dataset."""

    dataset_dir: Path
    images: int
    done: int = 0  #: annotated by this call
    skipped: int = 0  #: already done before
    failed: int = 0
    masks: int = 0  #: masks of all the images given that are done (existing ones included in stage 2)
    masks_added: int = 0  #: masks this call's model added
    mean_predicted_iou: float | None = None  #: over the model-added masks of the images given
    seconds: float = 0.0
    run_id: int | None = None
    failures: list[str] = field(default_factory=list)
    report: list[Path] = field(default_factory=list)

    @property
    def masks_per_image(self) -> float:
        n = self.done + self.skipped
        return self.masks / n if n else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset_dir": str(self.dataset_dir), "images": self.images, "done": self.done,
            "skipped": self.skipped, "failed": self.failed, "masks": self.masks,
            "masks_per_image": round(self.masks_per_image, 3), "masks_added": self.masks_added,
            "mean_predicted_iou": self.mean_predicted_iou, "seconds": round(self.seconds, 2),
            "run_id": self.run_id, "report": [str(p) for p in self.report],
        }


# -- backends --------------------------------------------------------------------------------------


def generate_in_process(paths: Sequence[Path], model_file: str, device: str, kwargs: dict) -> Iterator[Generated]:
    """The in-process backend: one model, the images one after the other."""
    from segany.automatic.generator import SamAutomaticMaskGenerator
    from segany.checkpoint import load_model

    yield from generate_images(paths, SamAutomaticMaskGenerator(load_model(model_file, device=device), **kwargs))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- one image -------------------------------------------------------------------------------------


def _annotation_worthy(record: dict[str, Any]) -> bool:
    """Not an empty mask (hole removal can empty a mask of a weak model; the generator keeps it), and no score
    that is not a number (the stability of an empty mask is 0 / 0): SA-1B has neither."""
    from segany.io.rle import rle_area

    scores = [record.get(k, 0.0) for k in SCORE_KEYS]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores):
        return False
    area = record.get("area")
    return (area if isinstance(area, (int, float)) else rle_area(record["segmentation"])) > 0


def read_existing(path: Path | None, height: int, width: int) -> list[dict[str, Any]]:
    """Stage 2: the existing annotations of an image (none when there is no file)."""
    from segany.io.sa1b import read_sa1b

    if path is None or not path.is_file():
        return []
    info, anns = read_sa1b(path)
    if (info["height"], info["width"]) != (height, width):
        raise SegAnyError(
            f"{path}: annotations for a {info['width']}x{info['height']} image, but the image is {width}x{height}"
        )
    return anns


def write_image(
    layout: DatasetLayout,
    manifest: Manifest,
    run_id: int,
    name: str,
    image_id: int,
    source: Path,
    gen: Generated,
    settings: AnnotateSettings,
    existing_path: Path | None,
) -> int:
    """Copy the image, write its SA-1B file, then mark it done; returns the number of masks.

    Raises:
        SegAnyError: the existing annotations do not fit the image (this image only);
        OSError: the dataset folder cannot be written.
    """
    from segany.engine.semi import new_masks_off_existing
    from segany.io.atomic import atomic_write_bytes
    from segany.io.images import IMAGE_SUFFIXES
    from segany.io.sa1b import write_sa1b

    records = [r for r in gen.records if _annotation_worthy(r)]
    existing = read_existing(existing_path, gen.height, gen.width) if settings.semi else []
    if settings.semi:
        records = new_masks_off_existing(records, existing, gen.height, gen.width, settings.max_overlap)
    suffix = source.suffix.lower()
    image_path, ann_path = layout.image(name, suffix), layout.annotation(name)
    atomic_write_bytes(image_path, source.read_bytes())  # the bytes as they are: no re-encoding loss
    for other in IMAGE_SUFFIXES:  # a copy left by an earlier run from a source of another type
        if other != suffix:
            layout.image(name, other).unlink(missing_ok=True)
    info = {"image_id": image_id, "width": gen.width, "height": gen.height, "file_name": image_path.name}
    write_sa1b(ann_path, info, existing + records)
    pause = float(os.environ.get(PAUSE_ENV) or 0)
    if pause > 0:
        time.sleep(pause)
    stages = [settings.existing_stage] * len(existing) + [settings.stage] * len(records)
    manifest.mark_done(
        name, run_id, layout.relative(image_path), layout.relative(ann_path), image_path.stat().st_size,
        ann_path.stat().st_size, stages, [float(r["predicted_iou"]) for r in records if "predicted_iou" in r],
    )
    return len(stages)


# -- the folder ------------------------------------------------------------------------------------


def annotate(
    images: Sequence[Path],
    dataset_dir: str | os.PathLike,
    settings: AnnotateSettings,
    model: str = "default",
    device: str = "cpu",
    ray: Any = None,
    progress: bool = True,
) -> AnnotateResult:
    """Annotate ``images`` into ``dataset_dir`` (resumable; see the module docstring).

    Args:
        images: image files (e.g. from :func:`segany.automatic.folder.collect_images`).
        settings: generator options, stage 2 options.
        model: anything :func:`segany.checkpoint.load_model` accepts.
        ray: a :class:`segany.engine.ray_backend.RayOptions` to run the model on Ray, or None.
    """
    from segany.checkpoint import resolve_model_path

    t0 = time.perf_counter()
    settings.check()
    images = [Path(p) for p in images]
    if not images:
        raise SegAnyError("no images to annotate")
    layout = DatasetLayout(Path(dataset_dir))
    if layout.root.exists() and not layout.root.is_dir():
        raise SegAnyError(f"{layout.root}: exists and is not a folder")
    names = dataset_names(images)
    root = common_root(images)
    existing_dir = settings.existing_dir or root
    existing = [existing_dir / p.relative_to(root).with_suffix(".json") for p in images]
    res = AnnotateResult(layout.root, len(images))
    with writer_lock(layout.root), Manifest(layout.manifest_path) as manifest:
        remove_stray_temp_files(layout.root)
        ids = manifest.register(names, images)
        rows = {r.name: r for r in manifest.images(names)}
        todo = [i for i, n in enumerate(names) if settings.redo or not is_done_on_disk(layout, rows[n])]
        res.skipped = len(images) - len(todo)
        if todo:
            model_file = resolve_model_path(model).resolve()
            backend = "in-process" if ray is None else f"ray:{ray.address}"
            res.run_id = manifest.start_run(
                settings.stage, backend, str(model), str(model_file), file_sha256(model_file), settings.to_json()
            )
            paths = [images[i] for i in todo]
            if ray is None:
                results = generate_in_process(paths, str(model_file), device, settings.generator)
            else:
                from segany.engine.ray_backend import generate_on_ray

                results = generate_on_ray(paths, str(model_file), device, settings.generator, ray)

            def write(i: int, gen: Generated) -> None:
                write_image(layout, manifest, res.run_id, names[i], ids[names[i]], images[i], gen, settings,
                            existing[i])

            def record_failure(i: int, err: str) -> None:
                res.failures.append(err)
                manifest.mark_failed(names[i], res.run_id, err)

            counts = write_results(results, todo, write, lambda i: f"{names[i]} in {layout.data_dir}", "annotate",
                                   len(images), progress, on_failure=record_failure)
            res.done, res.failed = counts.done, counts.failed
        _totals(manifest, names, res)
        if settings.semi:
            res.report = _report(layout, manifest, names, settings)
        res.seconds = time.perf_counter() - t0
        if res.run_id is not None:
            manifest.finish_run(res.run_id, res.to_json())
    return res


def _totals(manifest: Manifest, names: Sequence[str], res: AnnotateResult) -> None:
    rows = [r for r in manifest.images(names) if r.status == "done"]
    res.masks = sum(r.n_masks or 0 for r in rows)
    n_pred = sum(r.n_predicted or 0 for r in rows)
    res.masks_added = n_pred
    if n_pred:
        res.mean_predicted_iou = sum((r.mean_predicted_iou or 0.0) * (r.n_predicted or 0) for r in rows) / n_pred


def _report(layout: DatasetLayout, manifest: Manifest, names: Sequence[str], settings: AnnotateSettings) -> list[Path]:
    """Stage 2's report over the images given, from their files as they are now (complete after a rerun)."""
    from segany.engine.semi import report_entry, write_report

    entries = [
        report_entry(layout.root / r.annotation_file, r.annotation_file, settings.report_min_region,
                     settings.report_max_regions)
        for r in manifest.images(names)
        if r.status == "done" and r.annotation_file
    ]
    return list(write_report(layout.reports_dir, entries, settings.report_min_region, settings.report_attention))
