"""Redis restarted empty, and Redis paused, mid-run: a private redis-server the services use, never the shared one."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.faults.support import Pipeline, Reference, Row, assert_clean, audit, disturbed_run, private_redis


def test_redis_restarted_empty_mid_run(
    tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    with private_redis(tmp_path) as server, Pipeline(tmp_path / "pipeline", redis_url=server.url) as pipeline:

        def restart_empty() -> float:
            server.kill()
            time.sleep(2)
            server.start()  # no persistence: it comes back empty
            return time.monotonic()

        update, recovery = disturbed_run(pipeline, source_run, restart_empty)
        result = audit(pipeline, "Redis restarted empty", reference, recovery, record_row, update)
        assert_clean(result, update, reference)


def test_redis_paused_15_s_mid_run(
    tmp_path: Path, source_run: Path, reference: Reference, record_row: Callable[[Row], None]
) -> None:
    with private_redis(tmp_path) as server, Pipeline(tmp_path / "pipeline", redis_url=server.url) as pipeline:

        def pause() -> float:
            server.client().execute_command("CLIENT", "PAUSE", "15000", "ALL")
            time.sleep(15)
            return time.monotonic()

        update, recovery = disturbed_run(pipeline, source_run, pause)
        result = audit(pipeline, "Redis paused 15 s", reference, recovery, record_row, update)
        assert_clean(result, update, reference)
