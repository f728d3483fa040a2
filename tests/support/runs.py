"""Small simulated runs on disk for tests of jobs: one complete, one that looks still written (a live run)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Runs:
    complete: Path  # two frames, marked complete: a job on it ends by itself
    growing: Path  # the same two frames, marked still being written: a live job on it waits for more until cancelled


def write_runs(folder: Path) -> Runs:
    complete = folder / "run_done.h5"
    subprocess.run(
        [sys.executable, "-m", "sfx", "simulate", "--out", str(complete), "--frames", "2", "--seed", "5"],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    growing = folder / "run_growing.h5"
    shutil.copyfile(complete, growing)
    with h5py.File(growing, "r+") as file:
        file["/entry/run_complete"][()] = np.int8(0)  # as a detector leaves it while writing
    return Runs(complete=complete, growing=growing)
