"""Scale-out on Ray: the generator as a Ray Data pipeline with a pool of model-holding actors.

    read_binary_files(images)  ->  map_batches(_Annotator, concurrency=N actors, CPU or GPU)  ->  driver

Each actor loads the model once (the checkpoint's bytes travel through the object store, so workers need
no copy of the weights) and runs :func:`segany.engine.annotate.generate_one`, the function the
in-process backend runs, so both give the same masks. The masks stream back to the driver, which writes
the SA-1B files and the manifest (one writer: the resumability of :mod:`segany.engine.dataset` holds as
it is). On a multi-node cluster the images must be readable from every node (a shared folder, or any
filesystem pyarrow reads, given as such paths).

Ray is optional (``pip install "segany[ray]"``); it is imported only here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segany.automatic.folder import Generated, generate_one
from segany.errors import SegAnyError


@dataclass
class RayOptions:
    """Where and how wide to run: ``address`` is ``local`` (start Ray in this process) or a cluster address
    (e.g. ``auto`` or ``ray://host:10001``); ``actors`` None picks one per GPU, or per CPU but one."""

    address: str = "local"
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    num_cpus: int | None = None  #: local only: CPUs Ray may use (None: all)

    def check(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise SegAnyError(f"--ray-actors must be >= 1, got {self.actors}")
        if self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise SegAnyError("--ray-cpus-per-actor must be > 0 and --ray-gpus-per-actor >= 0")


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise SegAnyError('--ray needs Ray Data: pip install "segany[ray]" (or "ray[data]")') from None
    return ray


class _Annotator:
    """A Ray actor: the model, loaded once; ``__call__`` annotates a batch of encoded images."""

    def __init__(self, model_ref: Any, model_suffix: str, device: str, kwargs: dict) -> None:
        import ray

        from segany.automatic.generator import SamAutomaticMaskGenerator
        from segany.checkpoint import load_model

        model_bytes = ray.get(model_ref[0])  # wrapped in a list: passed as it is, resolved here
        with tempfile.TemporaryDirectory() as d:  # load_model reads files; the format follows the suffix
            path = Path(d) / f"model{model_suffix}"
            path.write_bytes(model_bytes)
            model = load_model(path, device=device)
        self.generator = SamAutomaticMaskGenerator(model, **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"path": [], "height": [], "width": [], "records_json": [], "error": []}
        for data, path in zip(batch["bytes"], batch["path"]):
            g = generate_one(self.generator, bytes(data), str(path), -1)  # the driver maps paths to indices
            out["path"].append(str(path))
            out["height"].append(g.height)
            out["width"].append(g.width)
            out["records_json"].append(g.records_json)
            out["error"].append(g.error or "")
        return {k: np.asarray(v, dtype=np.int64 if k in ("height", "width") else object) for k, v in out.items()}


def _key(path: str) -> str:
    """Paths as the reader reports them and as we listed them compare equal after this."""
    return os.path.normpath(os.path.abspath(path.removeprefix("file://")))


def _default_actors(ray: Any, opts: RayOptions) -> int:
    res = ray.cluster_resources()
    if opts.gpus_per_actor > 0:
        return max(1, int(res.get("GPU", 0) // opts.gpus_per_actor))
    # leave a CPU to the readers and the driver: a pool that takes every CPU starves the read stage
    return max(1, int((res.get("CPU", 1) - 1) // opts.cpus_per_actor))


def generate_on_ray(
    paths: Sequence[Path], model_file: str, device: str, kwargs: dict, opts: RayOptions
) -> Iterator[Generated]:
    """Yield one :class:`Generated` per image, in the order they finish (``index`` into ``paths``).

    Starts Ray for ``address="local"`` (and shuts it down at the end) unless it is already running in this
    process, in which case that instance is used as it is.
    """
    opts.check()
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        try:
            if opts.address == "local":
                ray.init(num_cpus=opts.num_cpus, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=opts.address, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise SegAnyError(f"cannot start or reach Ray at {opts.address!r}: {e}") from None
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver shows one bar for the whole run
        actors = opts.actors or _default_actors(ray, opts)
        index = {_key(str(p)): i for i, p in enumerate(paths)}
        model_ref = ray.put(Path(model_file).read_bytes())
        ds = ray.data.read_binary_files([str(p) for p in paths], include_paths=True)
        ds = ds.map_batches(
            _Annotator,
            fn_constructor_args=([model_ref], Path(model_file).suffix, device, kwargs),
            batch_size=1,  # images differ in size; the model batches prompts within an image
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=opts.cpus_per_actor,
            num_gpus=opts.gpus_per_actor or None,
        )
        for row in ds.iter_rows():
            i = index.get(_key(str(row["path"])))
            if i is None:
                raise SegAnyError(f"Ray returned an image that was not asked for: {row['path']}")
            err = str(row["error"]) or None
            yield Generated(i, int(row["height"]), int(row["width"]), str(row["records_json"]), err)
    except SegAnyError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors in many types; report them as one line
        msg = str(e).strip().splitlines()
        raise SegAnyError(f"the Ray pipeline failed: {type(e).__name__}: {msg[-1] if msg else ''}") from None
    finally:
        if started:
            ray.shutdown()
