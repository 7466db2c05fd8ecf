"""The package's layering: dependencies point one way (pyproject.toml, [tool.importlinter]).

``wire <- config/pool/counters <- core <- io <- assembly <- api <- network <- compat <- cli``:
a module imports only from layers below its own, TYPE_CHECKING imports included. A change that
makes an io driver import the assembly (or the core import io) fails here, in CI.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_imports_follow_the_layers() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is a test dependency (pip install -e '.[test]')"
    out = subprocess.run(
        [lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_no_module_below_the_assembly_imports_it() -> None:
    """The specific defect the layering fixed: io/ reaching back into the assembled instance."""
    src = ROOT / "src" / "guestnet"
    offenders = [
        str(path.relative_to(src))
        for sub in ("io", "core", "wire")
        for path in (src / sub).rglob("*.py")
        if "guestnet.assembly" in path.read_text() or "guestnet.instance" in path.read_text()
    ]
    assert offenders == []
