"""An engine dataset folder: SA-1B files beside their images, and a manifest of what is done.

Layout of ``DATASET_DIR``::

    sa1b/NAME.jpg         a copy of the source image (its bytes, unchanged): the folder is self-contained
    sa1b/NAME.json        its annotations, SA-1B format (segany.io.sa1b)
    manifest.sqlite       what is done, by which run (model, settings), and the stage of every annotation
    reports/              stage-2 "still uncovered" reports
    .lock                 held while a run writes (one writer at a time)

The image and its JSON sit side by side as in the SA-1B release, so the training pipeline reads the
folder as it is: ``{type: sa1b, root: DATASET_DIR/sa1b}``.

Why SQLite for the manifest, not a ``manifest.json``: the manifest is updated once per image, and a JSON
file would have to be rewritten whole each time (quadratic in the number of images, megabytes per update
at SA-1B scale); SQLite updates one row in a transaction that survives SIGKILL and power loss (its
rollback journal), needs nothing beyond the standard library, and can be queried with any SQLite tool.

Crash safety: per image, the image copy and then the JSON are written atomically (segany.io.atomic), and
only then is the image marked done in the manifest. The manifest is the record of what is done: after a
kill between the JSON write and the commit the image is simply done again (its files replaced
atomically), so every image ends with exactly one complete annotation file, and the manifest lists each
image once (``name`` is unique). A run removes the temporary files a killed run left behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segany.errors import SegAnyError
from segany.io.images import IMAGE_SUFFIXES

DATA_DIR = "sa1b"
MANIFEST = "manifest.sqlite"
REPORTS_DIR = "reports"
LOCK = ".lock"
SCHEMA_VERSION = 1
#: Annotation stages of the SAM data engine.
STAGES = ("automatic", "semi-automatic", "manual")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started TEXT NOT NULL,
    finished TEXT,
    stage TEXT NOT NULL,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    model_file TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    settings TEXT NOT NULL,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,            -- the SA-1B image_id
    name TEXT NOT NULL UNIQUE,         -- sa1b/NAME.json
    source TEXT NOT NULL,              -- where the image was read from
    image_file TEXT,                   -- relative to the dataset folder
    annotation_file TEXT,
    image_bytes INTEGER,
    annotation_bytes INTEGER,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending | done | failed
    run_id INTEGER REFERENCES runs(id),
    n_masks INTEGER,
    n_predicted INTEGER,               -- masks added by this run's model (they have a predicted IoU)
    mean_predicted_iou REAL,           -- their mean predicted IoU
    error TEXT,
    updated TEXT
);
CREATE TABLE IF NOT EXISTS annotations (
    image_id INTEGER NOT NULL REFERENCES images(id),
    ann_id INTEGER NOT NULL,           -- the id in the SA-1B file
    stage TEXT NOT NULL,               -- automatic | semi-automatic | manual
    run_id INTEGER REFERENCES runs(id),
    PRIMARY KEY (image_id, ann_id)
);
"""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- layout ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetLayout:
    """Where everything of one dataset folder goes."""

    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / DATA_DIR

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def reports_dir(self) -> Path:
        return self.root / REPORTS_DIR

    def annotation(self, name: str) -> Path:
        return self.data_dir / f"{name}.json"

    def image(self, name: str, suffix: str) -> Path:
        return self.data_dir / f"{name}{suffix}"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def dataset_names(images: Sequence[Path]) -> list[str]:
    """One name per image for ``sa1b/NAME.json`` and ``sa1b/NAME.<suffix>``.

    The names of ``segany everything`` (path relative to the common folder, without suffix), except that
    where two images differ only by suffix (``x.jpg`` / ``x.png``) the suffix becomes part of the name as
    ``x_jpg``: the training reader pairs ``NAME.json`` with ``NAME.<image suffix>``, which ``x.jpg.json``
    would break.
    """
    from segany.automatic.folder import output_names

    names = []
    for n in output_names(list(images)):
        p = Path(n)
        names.append(p.with_name(p.stem + "_" + p.suffix[1:]).as_posix() if p.suffix.lower() in IMAGE_SUFFIXES else n)
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n.casefold() in seen:
            j = seen[n.casefold()]
            raise SegAnyError(f"{images[j]} and {images[i]} would both be stored as {DATA_DIR}/{n}: rename one")
        seen[n.casefold()] = i
    return names


@contextlib.contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Hold ``root/.lock`` (flock) for the duration: a second writer gets a clear error, not a mix-up."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SegAnyError(f"{root}: another segany run is writing this dataset (wait for it to finish)") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock; the kernel releases it too when the process dies


# -- the manifest ----------------------------------------------------------------------------------


@dataclass
class ImageRow:
    """One image of the manifest."""

    id: int
    name: str
    source: str
    image_file: str | None
    annotation_file: str | None
    image_bytes: int | None
    annotation_bytes: int | None
    status: str
    run_id: int | None
    n_masks: int | None
    n_predicted: int | None
    mean_predicted_iou: float | None
    error: str | None


class Manifest:
    """``DATASET_DIR/manifest.sqlite`` (see the module docstring). Use as a context manager."""

    def __init__(self, path: Path, create: bool = True) -> None:
        self.path = path
        if not create and not path.is_file():
            raise SegAnyError(f"{path}: no such manifest (not a segany dataset folder?)")
        try:
            self.db = sqlite3.connect(path, timeout=30.0, isolation_level=None)  # autocommit; explicit BEGIN
            self.db.execute("PRAGMA foreign_keys = ON")
            if create:
                self.db.executescript(_SCHEMA)
                self.db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            version = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise SegAnyError(f"{path}: not a readable segany manifest ({e})") from None
        if version is None or int(version[0]) != SCHEMA_VERSION:
            raise SegAnyError(f"{path}: manifest schema {version and version[0]}, this segany reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- runs --

    def start_run(self, stage: str, backend: str, model: str, model_file: str, sha256: str, settings: dict) -> int:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO runs (started, stage, backend, model, model_file, model_sha256, settings) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (now(), stage, backend, model, model_file, sha256, json.dumps(settings, sort_keys=True)),
            )
            return int(cur.lastrowid)

    def finish_run(self, run_id: int, summary: dict) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET finished = ?, summary = ? WHERE id = ?", (now(), json.dumps(summary), run_id))

    def runs(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM runs ORDER BY id")
        cols = [c[0] for c in cur.description]
        out = []
        for row in cur.fetchall():
            r = dict(zip(cols, row))
            r["settings"] = json.loads(r["settings"])
            r["summary"] = json.loads(r["summary"]) if r["summary"] else None
            out.append(r)
        return out

    # -- images --

    def register(self, names: Sequence[str], sources: Sequence[Path]) -> dict[str, int]:
        """Add images not seen before (ids follow the order given); returns name -> image id."""
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO images (name, source, updated) VALUES (?, ?, ?)",
                [(n, str(s), now()) for n, s in zip(names, sources)],
            )
            db.executemany("UPDATE images SET source = ? WHERE name = ?", [(str(s), n) for n, s in zip(names, sources)])
        return {r.name: r.id for r in self.images(names)}

    def images(self, names: Sequence[str] | None = None) -> list[ImageRow]:
        cols = ", ".join(ImageRow.__dataclass_fields__)
        rows = [ImageRow(*r) for r in self.db.execute(f"SELECT {cols} FROM images ORDER BY id").fetchall()]
        if names is None:
            return rows
        wanted = set(names)
        return [r for r in rows if r.name in wanted]

    def mark_done(
        self,
        name: str,
        run_id: int,
        image_file: str,
        annotation_file: str,
        image_bytes: int,
        annotation_bytes: int,
        stages: Sequence[str],
        predicted_ious: Sequence[float],
    ) -> None:
        """One transaction: the image is done, with one stage per annotation (ids 1, 2, ...) and the
        predicted IoUs of the masks this run's model added."""
        mean_iou = float(sum(predicted_ious) / len(predicted_ious)) if predicted_ious else None
        with self.transaction() as db:
            (image_id,) = db.execute("SELECT id FROM images WHERE name = ?", (name,)).fetchone()
            db.execute(
                "UPDATE images SET status = 'done', run_id = ?, image_file = ?, annotation_file = ?, image_bytes = ?,"
                " annotation_bytes = ?, n_masks = ?, n_predicted = ?, mean_predicted_iou = ?, error = NULL,"
                " updated = ? WHERE id = ?",
                (run_id, image_file, annotation_file, image_bytes, annotation_bytes, len(stages),
                 len(predicted_ious), mean_iou, now(), image_id),
            )
            db.execute("DELETE FROM annotations WHERE image_id = ?", (image_id,))
            db.executemany(
                "INSERT INTO annotations (image_id, ann_id, stage, run_id) VALUES (?, ?, ?, ?)",
                [(image_id, i + 1, s, run_id) for i, s in enumerate(stages)],
            )

    def mark_failed(self, name: str, run_id: int, error: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE images SET status = 'failed', run_id = ?, error = ?, updated = ? WHERE name = ? "
                "AND status != 'done'",
                (run_id, error, now(), name),
            )

    def stages(self) -> dict[str, int]:
        """Annotations per stage, over the whole dataset."""
        return dict(self.db.execute("SELECT stage, COUNT(*) FROM annotations GROUP BY stage").fetchall())

    def stages_of(self, image_id: int) -> list[str]:
        rows = self.db.execute("SELECT stage FROM annotations WHERE image_id = ? ORDER BY ann_id", (image_id,))
        return [r[0] for r in rows.fetchall()]


def is_done_on_disk(layout: DatasetLayout, row: ImageRow) -> bool:
    """The manifest says done and both files are there with the sizes it recorded (cheap: no parsing)."""
    if row.status != "done" or not row.image_file or not row.annotation_file:
        return False
    for rel, size in ((row.image_file, row.image_bytes), (row.annotation_file, row.annotation_bytes)):
        try:
            if (layout.root / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True
