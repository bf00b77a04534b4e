"""The resumable folder annotator's core: which images, their output names, and the generate -> write loop.

``segany everything`` (:mod:`segany.automatic.everything`) writes SA-1B / COCO / PNG files with it; the
data engine (:mod:`segany.engine.annotate`) extends it with a manifest, a Ray backend and the
semi-automatic stage. Both hand :func:`write_results` an iterator of :class:`Generated` (one per image to
do, from :func:`generate_images` or from Ray) and a ``write`` function; errors of one image (unreadable,
out of memory, a bad existing annotation) skip that image, while a write that the file system refuses ends
the run (every later image would fail the same way).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segany.errors import SegAnyError

# -- inputs and output names -----------------------------------------------------------------------


def collect_images(inputs: Sequence[str | os.PathLike], out_dir: Path) -> list[Path]:
    """Image paths (resolved, unique, sorted as listed), leaving out anything inside ``out_dir``.

    Raises:
        SegAnyError: an input that does not exist, or no image outside ``out_dir``.
    """
    from segany.io.images import list_images

    out = Path(out_dir).resolve()
    seen: set[Path] = set()
    found: list[Path] = []
    for p in list_images(list(inputs)):
        r = p.resolve()
        if r in seen or r == out or out in r.parents:
            continue
        seen.add(r)
        found.append(r)
    if not found:
        raise SegAnyError("no images to process (the inputs hold no images outside the output folder)")
    return found


def common_root(images: Sequence[Path]) -> Path:
    """The deepest folder that holds every image."""
    return Path(os.path.commonpath([str(p.parent) for p in images]))


def relative_files(images: Sequence[Path]) -> list[str]:
    """Each image's path relative to :func:`common_root`, as POSIX text (the ``file_name`` of its record)."""
    root = common_root(images)
    return [p.relative_to(root).as_posix() for p in images]


def output_names(images: Sequence[Path]) -> list[str]:
    """One output name per image: the path relative to the common folder of all images, as POSIX text,
    without the suffix (kept where two images would otherwise share a name, e.g. ``x.jpg`` / ``x.png``)."""
    root = common_root(images)
    rel = [p.relative_to(root) for p in images]
    bare = [r.with_suffix("").as_posix() for r in rel]
    counts: dict[str, int] = {}
    for b in bare:
        counts[b.casefold()] = counts.get(b.casefold(), 0) + 1
    return [b if counts[b.casefold()] == 1 else r.as_posix() for b, r in zip(bare, rel)]


# -- generating ------------------------------------------------------------------------------------


@dataclass
class Generated:
    """The generator's output for one image (``index`` into the list given to the backend)."""

    index: int
    height: int = 0
    width: int = 0
    records_json: str = "[]"  #: the coco_rle records as JSON text (how they cross process boundaries)
    error: str | None = None
    unreadable: bool = False  #: the error is that the image could not be read or decoded
    image: np.ndarray | None = None  #: the decoded image, when the backend keeps it (in-process only)

    @property
    def records(self) -> list[dict[str, Any]]:
        return json.loads(self.records_json)


def generate_one(generator: Any, image_bytes: bytes, name: str, index: int, keep_image: bool = False) -> Generated:
    """Decode and segment one image; errors of this image only come back as ``error``.

    The one function every backend calls, so that in-process and Ray runs give the same masks.
    """
    from segany.io.images import decode_image
    from segany.io.sa1b import to_builtin

    try:
        image = decode_image(image_bytes, name=name)
    except SegAnyError as e:  # unreadable, corrupt, too large: this image only
        return Generated(index, error=str(e), unreadable=True)
    try:
        records = generator.generate(image)
    except Exception as e:  # noqa: BLE001 - out of memory, a generator bug on one image: a long run goes on,
        # and the image is reported as failed with the error (a rerun tries it again)
        return Generated(index, error=f"{name}: {type(e).__name__}: {e}")
    h, w = image.shape[:2]
    return Generated(index, h, w, json.dumps(to_builtin(records)), image=image if keep_image else None)


def generate_images(paths: Sequence[Path], generator: Any, keep_images: bool = False) -> Iterator[Generated]:
    """Read and segment ``paths`` one after the other, in this process."""
    for i, p in enumerate(paths):
        try:
            data = p.read_bytes()
        except OSError as e:
            yield Generated(i, error=f"{p}: cannot read ({e.strerror})", unreadable=True)
            continue
        yield generate_one(generator, data, str(p), i, keep_image=keep_images)


# -- the loop --------------------------------------------------------------------------------------


@dataclass
class WriteCounts:
    """What :func:`write_results` did."""

    done: int = 0
    failed: int = 0
    unreadable: int = 0
    failures: list[tuple[int, str]] = field(default_factory=list)  #: (image index, error)


def write_results(
    results: Iterable[Generated],
    todo: Sequence[int],
    write: Callable[[int, Generated], None],
    describe: Callable[[int], str],
    command: str,
    total: int,
    progress: bool = True,
    on_failure: Callable[[int, str], None] | None = None,
) -> WriteCounts:
    """Write each image's results as they come; ``results[k].index`` is a position in ``todo``, whose
    entries are image indices (what ``write``, ``describe`` and ``on_failure`` receive).

    Args:
        write: writes one image's outputs; a :class:`SegAnyError` fails that image only.
        describe: the image and where it goes, for the message when the file system refuses a write.
        command: the command named in messages (``segany <command>: skipped ...``).
        total: images in the run (the ones done before count as already done in the progress bar).
        on_failure: told each failed image and its error (the manifest records it).

    Raises:
        SegAnyError: a write failed with an OSError (disk full, permissions).
    """
    from tqdm import tqdm

    counts = WriteCounts()
    bar = tqdm(total=total, initial=total - len(todo), desc=command, unit="img", file=sys.stderr,
               dynamic_ncols=True, disable=not progress)
    try:
        for gen in results:
            i = todo[gen.index]
            err = gen.error
            if err is None:
                try:
                    write(i, gen)
                    counts.done += 1
                except SegAnyError as e:  # e.g. existing annotations that do not fit: this image only
                    err = str(e)
                except OSError as e:  # disk full, permissions: every later image would fail the same way
                    raise SegAnyError(f"cannot write {describe(i)}: {e}") from None
            if err is not None:
                counts.failed += 1
                counts.unreadable += int(gen.unreadable)
                counts.failures.append((i, err))
                if on_failure is not None:
                    on_failure(i, err)
                tqdm.write(f"segany {command}: skipped {err}", file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()
    return counts
