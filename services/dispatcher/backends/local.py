"""Where analysis jobs run. A backend starts, polls and cancels jobs; one poll covers all of its jobs.

The first backend runs ``mpiexec`` on this machine. Each job gets a folder ``<work_dir>/jobs/<job_id>/`` holding
its spec, its logs, the process id and, when it ends, its exit code. Those files are the backend's own view of its
jobs, so a restarted dispatcher finds the jobs it started before (no job is forgotten or started twice).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from libs.contracts.messages import JobSpec
from libs.runtime.processes import signal_group

CANCEL_GRACE_SECONDS = 10.0


class BackendError(RuntimeError):
    """A job could not be started or controlled; the text says which and why."""


class RunState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"


class BackendJobStatus(BaseModel):
    """What the backend knows of one job."""

    job_id: str
    backend_id: str
    state: RunState
    exit_code: int | None = None
    detail: str = ""


class Backend(Protocol):
    """The interface every backend (local mpiexec, Slurm, Kubernetes) implements."""

    name: str

    def start(self, spec: JobSpec) -> str:
        """Start the job; returns the backend's handle for it."""
        ...

    def poll(self) -> dict[str, BackendJobStatus]:
        """The state of every job this backend knows, in one call."""
        ...

    def cancel(self, job_id: str) -> None:
        """Stop a job (no error when it already ended)."""
        ...

    def forget(self, job_id: str) -> None:
        """Leave an ended job out of future polls."""
        ...


class LocalMpiBackend:
    """Runs each job as ``mpiexec -n RANKS python -m services.analysis --job SPEC`` in its own process group."""

    name = "local"

    def __init__(self, work_dir: Path, mpiexec: str | None = None, python: str | None = None) -> None:
        self.jobs_dir = work_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.mpiexec = mpiexec or str(Path(sys.executable).with_name("mpiexec"))
        self.python = python or sys.executable
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def start(self, spec: JobSpec) -> str:
        folder = self.job_dir(spec.job_id)
        if (folder / "pid").exists() and not (folder / "exit_code").exists():
            raise BackendError(f"job {spec.job_id} is already running in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "exit_code").unlink(missing_ok=True)
        spec_path = folder / "spec.json"
        spec_path.write_bytes(spec.encode())
        command = [
            self.mpiexec,
            "-n",
            str(spec.ranks),
            self.python,
            "-m",
            "services.analysis",
            "--job",
            str(spec_path),
        ]
        # The shell records the exit code in a file, so a dispatcher started later still learns how the job ended.
        script = f"{shlex.join(command)}; echo $? > {shlex.quote(str(folder / 'exit_code'))}"
        with open(folder / "job.log", "ab") as log:
            process = subprocess.Popen(
                ["/bin/sh", "-c", script],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=Path(__file__).resolve().parents[2],
            )
        (folder / "pid").write_text(str(process.pid))
        self._children[spec.job_id] = process
        return str(process.pid)

    def poll(self) -> dict[str, BackendJobStatus]:
        statuses: dict[str, BackendJobStatus] = {}
        for folder in sorted(self.jobs_dir.iterdir()):
            pid_file = folder / "pid"
            if not pid_file.exists():
                continue
            job_id, pid = folder.name, int(pid_file.read_text())
            child = self._children.get(job_id)
            if child is not None:
                child.poll()  # reap our own child so it does not linger as a zombie
            exit_file = folder / "exit_code"
            if exit_file.exists() and exit_file.read_text().strip():
                code = int(exit_file.read_text().strip())
                state = RunState.SUCCEEDED if code == 0 else RunState.FAILED
                statuses[job_id] = BackendJobStatus(
                    job_id=job_id, backend_id=str(pid), state=state, exit_code=code, detail=_log_tail(folder)
                )
            elif _alive(pid):
                statuses[job_id] = BackendJobStatus(job_id=job_id, backend_id=str(pid), state=RunState.RUNNING)
            else:
                statuses[job_id] = BackendJobStatus(
                    job_id=job_id,
                    backend_id=str(pid),
                    state=RunState.LOST,
                    detail="process ended without recording an exit code",
                )
        return statuses

    def cancel(self, job_id: str) -> None:
        """SIGTERM to the job's process group (mpiexec and its ranks); SIGKILL if it has not ended within 10 s."""
        pid_file = self.job_dir(job_id) / "pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text())
        if not signal_group(pid, signal.SIGTERM):
            return
        for final_signal in (signal.SIGKILL, None):
            deadline = time.monotonic() + CANCEL_GRACE_SECONDS
            while _group_alive(pid, self._children.get(job_id)):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return
            if final_signal is None:
                raise BackendError(f"job {job_id} (process group {pid}) survived SIGTERM and SIGKILL")
            signal_group(pid, final_signal)

    def forget(self, job_id: str) -> None:
        """Drop a finished job's folder from future polls (its logs stay)."""
        (self.job_dir(job_id) / "pid").unlink(missing_ok=True)
        self._children.pop(job_id, None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status_file = Path(f"/proc/{pid}/status")
    # A zombie has ended: it only waits to be reaped by its parent.
    return not (status_file.exists() and "\nState:\tZ" in status_file.read_text())


def _group_alive(pid: int, child: subprocess.Popen[bytes] | None) -> bool:
    """True while any process of the group led by ``pid`` exists (our own child is reaped first)."""
    if child is not None:
        child.poll()
    return signal_group(pid, 0)


def _log_tail(folder: Path, lines: int = 20) -> str:
    log = folder / "job.log"
    if not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
