"""Start every service as its own process, and stop them again (``sfx up``/``down``, ``sfx demo``, tests, benchmarks).

Each service is started as ``python -m services.<name>`` (the same command a container runs), in its own process
group, with its log in ``<work_dir>/logs/<name>.log`` and its process id in ``<work_dir>/pids/<name>.pid``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from libs.runtime.processes import signal_group

SERVICES = ("ingest", "dispatcher", "merger")
"""The long-running services; analysis jobs are started by the dispatcher, not here."""


def pid_file(work_dir: Path, service: str) -> Path:
    return work_dir / "pids" / f"{service}.pid"


def start_services(work_dir: Path, services: tuple[str, ...] = SERVICES, env: dict[str, str] | None = None) -> None:
    """Start each service unless it already runs; environment ``env`` is added to the current one."""
    (work_dir / "pids").mkdir(parents=True, exist_ok=True)
    (work_dir / "logs").mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "SFX_WORK_DIR": str(work_dir), **(env or {})}
    for service in services:
        if running_pid(work_dir, service) is not None:
            print(f"{service}: already running")
            continue
        with open(work_dir / "logs" / f"{service}.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", f"services.{service}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=environment,
                cwd=Path(__file__).resolve().parents[1],  # the repository, so `-m services.x` resolves
            )
        pid_file(work_dir, service).write_text(str(process.pid))
        print(f"{service}: started (pid {process.pid}, log {work_dir / 'logs' / f'{service}.log'})")


def running_pid(work_dir: Path, service: str) -> int | None:
    path = pid_file(work_dir, service)
    if not path.exists():
        return None
    pid = int(path.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        path.unlink()
        return None
    return pid


def stop_services(work_dir: Path, services: tuple[str, ...] = SERVICES, timeout: float = 20.0) -> None:
    """SIGTERM each service's process group, then SIGKILL what is still there after ``timeout`` seconds."""
    pids = {s: p for s in services if (p := running_pid(work_dir, s)) is not None}
    for pid in pids.values():
        signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for service, pid in pids.items():
        while time.monotonic() < deadline and _exists(pid):
            time.sleep(0.1)
        if _exists(pid):
            signal_group(pid, signal.SIGKILL)
        pid_file(work_dir, service).unlink(missing_ok=True)
        print(f"{service}: stopped")


def _exists(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
