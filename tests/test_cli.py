"""The ``sfx`` command itself: its version, the progress of ``sfx process`` in a log, no password in its output."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

from libs.contracts.settings import Settings, redacted_url
from sfx.cli import main
from tests.conftest import settings_environment

PASSWORD = "sfx-test-secret"


def test_version_names_the_installed_distribution() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "sfx", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert printed == f"sfx-live {importlib.metadata.version('sfx-live')}\n"


@pytest.mark.slow  # runs sfx in subprocesses (10-25 s)
def test_sfx_process_writes_plain_progress_lines_when_not_on_a_terminal(tmp_path: Path) -> None:
    run_file = tmp_path / "run.nxs"
    simulate = ["simulate", "--out", str(run_file), "--frames", "24", "--hit-fraction", "1.0", "--seed", "5"]
    assert main(simulate) == 0
    process = [
        sys.executable, "-m", "sfx", "process", str(run_file), "--cell", "79.1 79.1 38.0 90 90 90",
        "--space-group", "P 43 21 2", "--out", str(tmp_path / "processed"), "--nproc", "1",
    ]  # fmt: skip
    # Both streams are pipes, as when the command runs under a batch system with its output in a log file.
    finished = subprocess.run(process, capture_output=True, text=True, check=True)
    assert "\r" not in finished.stdout and "\r" not in finished.stderr
    progress = re.findall(r"^frames analysed: (\d+)/24 \((\d+) %\), [\d.]+/s$", finished.stderr, re.MULTILINE)
    done = [int(frames) for frames, _ in progress]
    # Frames are analysed in blocks of 8: one line for each block that crosses a 10 % step, the last at 24/24.
    assert done == [8, 16, 24], finished.stderr
    assert [int(percent) for _, percent in progress] == [33, 67, 100]
    assert "CC1/2" in finished.stdout


def test_redacted_url_hides_only_the_password() -> None:
    assert redacted_url(f"redis://:{PASSWORD}@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redacted_url(f"amqp://guest:{PASSWORD}@broker:5672/sfx") == "amqp://guest:***@broker:5672/sfx"
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redacted_url("redis://user@127.0.0.1:6379/0") == "redis://user@127.0.0.1:6379/0"


@pytest.mark.slow  # runs sfx in subprocesses (10-25 s)
def test_sfx_services_never_prints_the_redis_password(settings: Settings) -> None:
    with_password = re.sub(r"^redis://", f"redis://:{PASSWORD}@", settings.redis_url)
    assert PASSWORD in with_password
    # The test Redis has no password of its own (its default user accepts any), so this URL works.
    listed = sfx_services(settings, with_password)
    assert listed.returncode == 0 and listed.stdout == "no live service instances\n"
    assert PASSWORD not in listed.stdout + listed.stderr
    # A Redis it cannot reach: the error names the URL, without the password.
    unreachable = re.sub(r"@[^/]+", "@127.0.0.1:1", with_password)
    failed = sfx_services(settings, unreachable)
    assert failed.returncode == 2, failed.stderr
    assert PASSWORD not in failed.stdout + failed.stderr
    assert f"cannot read Redis at {redacted_url(unreachable)}" in failed.stderr


def sfx_services(settings: Settings, redis_url: str) -> subprocess.CompletedProcess[str]:
    environment = {**settings_environment(settings), "SFX_REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "sfx", "services"], capture_output=True, text=True, env=environment, check=False
    )
