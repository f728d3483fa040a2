"""Recognising runs in a landing directory from file names and sizes (pure: no I/O).

A landing directory on Lustre or NFS cannot be watched with inotify, so the ingest service polls it and hands the
listings to these functions. A run is either an NXmx master file (``*_master.h5``, ``*.nxs``, or a plain ``*.h5``
that is not a data file of another master) or a CXI file (``*.cxi``) with a CrystFEL ``.geom`` file beside it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

NXMX_DATA_FILE = re.compile(r"^(?P<stem>.+)_data_\d+\.h5$")
SAFE_RUN_ID = re.compile(r"[^A-Za-z0-9_.:\-]+")
IGNORED_SUFFIXES = (".truth.h5", ".reflections.h5", ".tmp", ".part")


@dataclass(frozen=True)
class FileObservation:
    """One file as seen by one poll of a landing directory."""

    path: Path
    size: int
    mtime: float


@dataclass(frozen=True)
class RunCandidate:
    """A run recognised from file names: its main file, the files that hold its data, and its format."""

    run_id: str
    main_file: Path
    data_files: tuple[Path, ...]
    file_format: str
    geometry: Path | None = None

    @property
    def all_files(self) -> tuple[Path, ...]:
        return (self.main_file, *self.data_files)


def run_id_for(path: Path) -> str:
    """A run id from a file name: its stem without ``_master``, restricted to safe characters.

    A stem that had to be altered gets a suffix from the original stem, so ``run 1.h5`` and ``run?1.h5`` stay two runs.
    """
    name = path.name
    for suffix in (".nxs", ".h5", ".cxi"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = name.removesuffix("_master")
    safe = SAFE_RUN_ID.sub("_", name).strip("_.:-") or "run"
    if safe == name:
        return safe
    return f"{safe}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def recognise_runs(paths: Iterable[Path]) -> list[RunCandidate]:
    """Group a directory listing into runs; files that belong to no run are left out."""
    paths = sorted(paths)
    data_files: dict[str, list[Path]] = {}
    for path in paths:
        match = NXMX_DATA_FILE.match(path.name)
        if match:
            data_files.setdefault(str(path.parent / match["stem"]), []).append(path)
    geometry_files = [p for p in paths if p.suffix == ".geom"]
    runs: list[RunCandidate] = []
    for path in paths:
        name = path.name
        if name.endswith(IGNORED_SUFFIXES) or NXMX_DATA_FILE.match(name):
            continue
        if name.endswith(".cxi"):
            runs.append(
                RunCandidate(
                    run_id=run_id_for(path),
                    main_file=path,
                    data_files=(),
                    file_format="cxi",
                    geometry=_geometry_for(path, geometry_files),
                )
            )
        elif name.endswith((".h5", ".nxs")):
            stem = str(path.parent / name.rsplit(".", 1)[0].removesuffix("_master"))
            runs.append(
                RunCandidate(
                    run_id=run_id_for(path),
                    main_file=path,
                    data_files=tuple(data_files.get(stem, [])),
                    file_format="nxmx",
                )
            )
    return runs


def _geometry_for(cxi_file: Path, geometry_files: list[Path]) -> Path | None:
    """The .geom with the same stem, else the only .geom in the same directory."""
    same_stem = cxi_file.with_suffix(".geom")
    if same_stem in geometry_files:
        return same_stem
    siblings = [g for g in geometry_files if g.parent == cxi_file.parent]
    return siblings[0] if len(siblings) == 1 else None


@dataclass
class StabilityTracker:
    """Decides when a file has stopped changing: same size and mtime for ``quiet_seconds``."""

    quiet_seconds: float
    _last: dict[Path, tuple[int, float, float]] = field(default_factory=dict)

    def observe(self, observation: FileObservation, now: float) -> bool:
        """Record a poll; True when the file has not changed for at least ``quiet_seconds``."""
        previous = self._last.get(observation.path)
        if previous is None or previous[:2] != (observation.size, observation.mtime):
            self._last[observation.path] = (observation.size, observation.mtime, now)
            return False
        return now - previous[2] >= self.quiet_seconds

    def forget(self, path: Path) -> None:
        self._last.pop(path, None)
