"""Tallies that the reliability tests write for ``scripts/reliability_report.py``.

Nothing is written unless the report set the environment variable naming the file; the report turns
the records into the tables of docs/RELIABILITY.md.

The hostile-input tests (tests/test_hostile_*.py) count their cases per class in ``CASES`` through
``expect_error`` / ``expect_ok`` / ``counted``; the fuzz tests (``FUZZ_FILES``) count their examples
in ``RUNS``. The hooks in tests/conftest.py add the fuzz tests' run time to ``FUZZ_SECONDS``, print
the tallies at the end of the session and write them with ``write_session_tallies``, so a run of any
subset of those files works.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from segany.errors import SegAnyError
from segany.io.atomic import atomic_write_json

#: The soak test's numbers (one JSON object).
SOAK_ENV = "SEGANY_RELIABILITY_SOAK_JSON"
#: The kill-and-resume runs (a JSON list, one record per run, appended by each test).
KILL_ENV = "SEGANY_RELIABILITY_KILL_JSON"
#: The hostile-input cases: {"hostile": {class: {"cases", "errors", "ok"}}, "total": n}.
HOSTILE_ENV = "SEGANY_RELIABILITY_JSON"
#: The fuzz examples: {"runs": {name: n}, "total": n, "seconds": s}.
FUZZ_ENV = "SEGANY_RELIABILITY_FUZZ_JSON"

#: class -> {"cases": n, "errors": n (SegAnyError as required), "ok": n (valid result as required)}
CASES: dict[str, dict[str, int]] = defaultdict(lambda: {"cases": 0, "errors": 0, "ok": 0})
#: fuzz / property target -> examples run
RUNS: Counter[str] = Counter()
#: The test files whose call time is summed into ``FUZZ_SECONDS`` (by the conftest hook).
FUZZ_FILES = ("test_fuzz.py", "test_fuzz_readers_server.py")
FUZZ_SECONDS = [0.0]


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


@contextmanager
def counted(cls: str, outcome: str = "errors") -> Iterator[None]:
    """Count one case of ``cls``; it is counted as ``outcome`` ("errors" or "ok") only if the block passes."""
    assert outcome in ("errors", "ok"), outcome
    CASES[cls]["cases"] += 1
    yield
    CASES[cls][outcome] += 1


def expect_error(cls: str, fn, *args, match: str | None = None, **kwargs) -> SegAnyError:
    """``fn(*args)`` must raise SegAnyError (and nothing else), with ``match`` in its message."""
    with counted(cls, "errors"):
        with pytest.raises(SegAnyError) as info:
            fn(*args, **kwargs)
        msg = str(info.value)
        assert msg and "\n" not in msg, msg
        if match is not None:
            assert match.lower() in msg.lower(), msg
    return info.value


def expect_ok(cls: str, value=None):
    """Count one case of ``cls`` that gave a valid result as required (the caller has checked it)."""
    with counted(cls, "ok"):
        pass
    return value


def summary_lines() -> list[str]:
    """The tallies as the tests print them at the end of the session (nothing if nothing was tallied)."""
    lines = []
    if CASES:
        for cls, c in sorted(CASES.items()):
            bad = c["cases"] - c["errors"] - c["ok"]
            lines.append(
                f"{cls}: {c['cases']} cases, {c['errors']} SegAnyError, {c['ok']} valid result"
                + (f" -- ERROR: {bad} not as required" if bad else "")
            )
        lines.append(f"total: {sum(c['cases'] for c in CASES.values())} hostile-input cases")
    if RUNS:
        lines += [f"{name}: {n} examples" for name, n in sorted(RUNS.items())]
        lines.append(f"total: {sum(RUNS.values())} examples in {FUZZ_SECONDS[0]:.1f} s")
    return lines


def write_session_tallies() -> None:
    """Write the hostile and fuzz tallies to ``$SEGANY_RELIABILITY_JSON`` / ``$SEGANY_RELIABILITY_FUZZ_JSON``."""
    if CASES:
        write_tally(HOSTILE_ENV, {"hostile": dict(CASES), "total": sum(c["cases"] for c in CASES.values())})
    if RUNS:
        write_tally(FUZZ_ENV, {"runs": dict(RUNS), "total": sum(RUNS.values()), "seconds": round(FUZZ_SECONDS[0], 1)})
