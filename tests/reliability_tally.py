"""Tallies that the reliability tests write for ``scripts/reliability_report.py``.

Nothing is written unless the report set the environment variable naming the file; the report turns
the records into the tables of docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from segany.io.atomic import atomic_write_json

#: The soak test's numbers (one JSON object).
SOAK_ENV = "SEGANY_RELIABILITY_SOAK_JSON"
#: The kill-and-resume runs (a JSON list, one record per run, appended by each test).
KILL_ENV = "SEGANY_RELIABILITY_KILL_JSON"


def write_tally(env_var: str, record: dict[str, Any], append: bool = False) -> None:
    """Write ``record`` to the file named by ``$env_var`` (or add it to the list there with ``append``)."""
    out = os.environ.get(env_var)
    if not out:
        return
    path = Path(out)
    value: Any = record
    if append:
        value = (json.loads(path.read_text()) if path.is_file() else []) + [record]
    atomic_write_json(path, value, indent=2)
