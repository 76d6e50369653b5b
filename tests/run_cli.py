"""Run the ``tinyrt`` command in a subprocess, as a shell script would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tinyrt_cli(*args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m tinyrt.cli ARGS`` from the repository root; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "tinyrt.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )
