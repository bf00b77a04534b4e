"""Atomic file writes: a killed process never leaves a half-written file behind.

Every file the project writes goes through here: write to a temporary file in the same folder,
flush + fsync, then ``os.replace`` onto the final name (atomic on POSIX), then fsync the folder so the
rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


# Read once at import: os.umask is process-wide, so toggling it later could race with other threads.
_UMASK = _read_umask()
#: The temporary files of :func:`atomic_write`: ".<name>.<random>.tmp" beside the target.
TEMP_FILE = re.compile(r"^\..+\.tmp$")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError("atomic_write supports mode 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # TEMP_FILE
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            # mkstemp creates the file owner-only (0600); give it the usual mode (0666 less the umask).
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Serialize ``obj`` as JSON and write it to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent))


def remove_stray_temp_files(folder: str | os.PathLike, names: Collection[str] | None = None) -> int:
    """Delete the temporary files that killed writers left behind; returns how many.

    Args:
        names: only the temporary files of these targets, directly in ``folder`` (for a folder that
            may hold other people's files); None: every temporary file under ``folder``, recursively.
    Only for a folder that one process writes at a time: another writer's file in flight would go.
    """
    if names is not None:
        paths = [p for name in names for p in Path(folder).glob(f".{glob.escape(name)}.*.tmp")]
    else:
        paths = [Path(root, f) for root, _dirs, files in os.walk(folder) for f in files if TEMP_FILE.match(f)]
    n = 0
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n
