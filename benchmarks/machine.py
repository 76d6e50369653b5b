"""What the benchmark scripts record about the machine and the code they measured."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpuinfo() -> dict[str, str]:
    """``/proc/cpuinfo``'s first value of each key (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_name() -> str:
    """The CPU's model name (x86 and ARM spell the key differently)."""
    info = cpuinfo()
    for key in ("model name", "Model", "Hardware", "CPU part"):
        if info.get(key):
            return info[key]
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The checked-out commit, ``(modified)`` if tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' (modified)' if dirty else ''}" if head else "unknown"
