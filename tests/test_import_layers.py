"""The package's import structure: the layers contract and the no-circles contract of ``.importlinter``
(import-linter), and the file-size rule. Run here so that CI's pytest enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "segany"
MAX_LINES = 500


def lint_imports(config: Path) -> subprocess.CompletedProcess:
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_layers_and_no_circles():
    r = lint_imports(ROOT / ".importlinter")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout, r.stdout


def test_the_contract_sees_an_upward_import(tmp_path):
    """The same tool, told that segany.errors sits above segany.io, finds io's imports of errors: the
    contract reads the real import graph, so the check above can fail."""
    config = tmp_path / "reversed.ini"
    config.write_text(
        "[importlinter]\nroot_package = segany\n\n[importlinter:contract:reversed]\nname = reversed\n"
        "type = layers\nlayers =\n    segany.errors\n    segany.io\n",
        encoding="utf-8",
    )
    r = lint_imports(config)
    assert r.returncode != 0 and "segany.io is not allowed to import segany.errors" in r.stdout, r.stdout


def test_no_source_file_over_the_limit():
    sizes = {str(p.relative_to(SRC)): len(p.read_text("utf-8").splitlines()) for p in SRC.rglob("*.py")}
    long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
