"""The ``local`` backend: ``mpiexec`` on this machine.

Each job gets a folder ``<work_dir>/jobs/<job_id>/`` holding its spec, its log, the process id with the process's
start time, a mark when it was cancelled and, when it ends, its exit code. Those files are the backend's own view of
its jobs, so a restarted dispatcher finds the jobs it started before (no job is forgotten or started twice).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from libs.contracts.messages import JobSpec
from libs.contracts.settings import Settings
from libs.runtime.processes import signal_group
from services.dispatcher.backends import BackendError, BackendJobStatus, RunState

CANCEL_GRACE_SECONDS = 10.0
REPO_ROOT = Path(__file__).resolve().parents[3]  # jobs run ``python -m services.analysis`` from here


class LocalMpiBackend:
    """Runs each job as ``mpiexec -n RANKS python -m services.analysis --job SPEC`` in its own process group."""

    name = "local"

    def __init__(self, work_dir: Path, mpiexec: str | None = None, python: str | None = None) -> None:
        self.jobs_dir = work_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.mpiexec = mpiexec or str(Path(sys.executable).with_name("mpiexec"))
        self.python = python or sys.executable
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalMpiBackend:
        return cls(settings.work_dir)

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def start(self, spec: JobSpec) -> str:
        folder = self.job_dir(spec.job_id)
        if (folder / "pid").exists() and not (folder / "exit_code").exists():
            raise BackendError(f"job {spec.job_id} is already running in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        for previous_attempt in ("exit_code", "cancelled"):
            (folder / previous_attempt).unlink(missing_ok=True)
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
                cwd=REPO_ROOT,
            )
        start_time = process_start_time(process.pid)
        (folder / "pid_start_time").unlink(missing_ok=True)
        if start_time is not None:  # written before the pid: whoever sees the pid sees its start time too
            (folder / "pid_start_time").write_text(str(start_time))
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
            exit_text = exit_file.read_text().strip() if exit_file.exists() else ""
            code = int(exit_text) if exit_text else None
            cancelled = (folder / "cancelled").exists()
            if code == 0:
                state, detail = RunState.SUCCEEDED, _log_tail(folder)
            elif code is None and _is_job_process(folder, pid):
                state, detail = RunState.RUNNING, ""
            elif cancelled:
                state, detail = RunState.CANCELLED, _log_tail(folder)
            elif code is not None:
                state, detail = RunState.FAILED, _log_tail(folder)
            else:
                state, detail = RunState.LOST, "process ended without recording an exit code"
            statuses[job_id] = BackendJobStatus(
                job_id=job_id, backend_id=str(pid), state=state, exit_code=code, detail=detail
            )
        return statuses

    def cancel(self, job_id: str) -> None:
        """SIGTERM to the job's process group (mpiexec and its ranks); SIGKILL if it has not ended within 10 s."""
        folder = self.job_dir(job_id)
        pid_file = folder / "pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text())
        if (folder / "exit_code").exists() or not _is_job_process(folder, pid):
            return  # ended already; a process now holding its pid is someone else's
        (folder / "cancelled").touch()  # before the signal: once the job has ended, it polls as cancelled
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


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (field 22 of /proc/<pid>/stat); None without it.

    A pid alone does not name a process for long: once it ends, the system may give its pid to a new one.
    """
    fields = _stat_fields(pid)
    return int(fields[22]) if fields is not None else None


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat, numbered from 1 as in proc(5) (index 0 unused); None without the file."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command name in parentheses, may itself hold spaces and parentheses: split after the last ")".
    before, _, after = stat.rpartition(")")
    return ["", before.partition(" (")[0], before.partition(" (")[2], *after.split()]


def _is_job_process(folder: Path, pid: int) -> bool:
    """True while the job's own process lives: ``pid`` is alive and started when the job recorded it did."""
    recorded = folder / "pid_start_time"
    # Folders of an older backend have no start time; their pid is all there is to go by.
    if recorded.exists() and process_start_time(pid) != int(recorded.read_text()):
        return False
    return _alive(pid)


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
    """True while a process of the group led by ``pid`` runs (our own child is reaped first).

    Zombies do not count: a leader adopted from an earlier dispatcher may stay one when nobody reaps it (a dispatcher
    that is PID 1 of its container), and its group would otherwise never look ended.
    """
    if child is not None:
        child.poll()
    if not signal_group(pid, 0):
        return False
    if not Path("/proc/self/stat").exists():
        return True  # no /proc: any member, zombie or not, counts
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and fields[5] == str(pid) and fields[3] != "Z":  # 3: state, 5: process group
            return True
    return False


def _log_tail(folder: Path, lines: int = 20) -> str:
    log = folder / "job.log"
    if not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
