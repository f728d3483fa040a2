"""The outside programs some tests cross-check against (DIALS, cctbx): present, or the test fails saying how to get
them. They are installed by the project (``make system``), so their absence is a broken setup, never a skip."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEM_PYTHON = "/usr/bin/python3"
"""Debian's python, which the python3-dials and python3-cctbx packages install into."""
INSTALL_COMMAND = "bash scripts/install-system-packages.sh (or: make system)"


def _fail_missing(tool: str, problem: str) -> None:
    pytest.fail(f"{tool} is needed by this test but {problem}; install it with: {INSTALL_COMMAND}", pytrace=False)


def require_program(name: str) -> str:
    """The path of the program ``name`` on PATH; fails the test if there is none."""
    path = shutil.which(name)
    if path is None:
        _fail_missing(name, "it is not on PATH")
    assert path is not None
    return path


def require_system_modules(*modules: str) -> str:
    """Debian's python, checked to import ``modules``; fails the test naming what it could not import."""
    if not Path(SYSTEM_PYTHON).exists():
        _fail_missing(SYSTEM_PYTHON, "it does not exist")
    imports = "; ".join(f"import {module}" for module in modules)
    checked = subprocess.run([SYSTEM_PYTHON, "-c", imports], capture_output=True, text=True, timeout=120)
    if checked.returncode != 0:
        error = (checked.stderr.strip().splitlines() or ["no error message"])[-1]
        _fail_missing(f"{', '.join(modules)} under {SYSTEM_PYTHON}", f"importing failed ({error})")
    return SYSTEM_PYTHON
