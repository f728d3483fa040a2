"""Forged or broken messages are refused at the boundary with a MessageError that names the defect.

A MessageError is what the consumer dead-letters on first delivery; anything else (RecursionError, OverflowError,
MemoryError) would be retried until the delivery limit, or crash the service.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from libs.contracts.messages import (
    MAX_FRAMES_PER_RUN,
    MAX_MESSAGE_BYTES,
    FrameResult,
    JobState,
    JobStatus,
    MergeUpdate,
    MessageError,
    ReflectionTable,
    ReprocessRequest,
    decode_message,
)
from libs.contracts.parameters import AnalysisParameters, with_overrides
from services.analysis.job import JobError, confined_to


def frame(**fields: object) -> dict[str, object]:
    values: dict[str, object] = {
        "type": "frame_result",
        "run_id": "r0001",
        "trial": "live",
        "frame_index": 3,
        "started_at": 1.0,
        "finished_at": 2.0,
    }
    values.update(fields)
    return values


def refused(payload: object, expected_words: str) -> None:
    body = payload if isinstance(payload, bytes | str) else json.dumps(payload)
    with pytest.raises(MessageError) as caught:
        decode_message(body)
    assert expected_words in str(caught.value), str(caught.value)


def test_a_valid_frame_result_passes() -> None:
    assert decode_message(json.dumps(frame())).frame_index == 3  # type: ignore[attr-defined]


def test_deeply_nested_json_is_a_message_error() -> None:
    refused("[" * 200_000 + "]" * 200_000, "nested too deeply")


def test_an_oversized_body_is_refused_before_parsing() -> None:
    refused(b" " * (MAX_MESSAGE_BYTES + 1), "exceeds the limit")


def test_an_array_shape_of_two_to_the_seventy_is_a_message_error() -> None:
    table = ReflectionTable.from_columns(np.zeros((1, 3)), np.ones(1), np.ones(1), np.ones(1))
    packed = json.loads(table.model_dump_json())
    for shape, words in (([2**70, 3], "exceeds the limit"), ([2**35, 2**35], "exceeds the limit")):
        packed["miller"]["shape"] = shape
        cell = [79.1, 79.1, 38.0, 90, 90, 90]
        A = np.eye(3).tolist()
        refused(frame(indexed=True, hit=True, cell=cell, A=A, reflections=packed), words)


def test_a_frame_index_beyond_any_run_is_refused() -> None:
    refused(frame(frame_index=2**32 - 1), "frame_index")
    refused(frame(frame_index=MAX_FRAMES_PER_RUN), "frame_index")


@pytest.mark.parametrize("trial", ["../../x", "/etc/x", "..", ".hidden", "a/b", "", "x" * 101])
def test_a_trial_that_could_escape_its_folder_is_refused(trial: str) -> None:
    refused(frame(trial=trial), "trial")
    refused({**frame(), "type": "reprocess_request", "run_ids": ["r1"], "trial": trial}, "trial")
    with pytest.raises(ValueError, match="trial"):
        JobState(job_id="j", run_id="r1", trial=trial, status=JobStatus.QUEUED)
    with pytest.raises(ValueError, match="trial"):
        MergeUpdate(dataset_id="d", trial=trial)


@pytest.mark.parametrize("run_id", ["../r1", "..", "r/1", "/etc/passwd", "r 1"])
def test_a_run_id_that_could_escape_its_folder_is_refused(run_id: str) -> None:
    refused(frame(run_id=run_id), "run_id")
    with pytest.raises(ValueError, match="run_ids"):
        ReprocessRequest(run_ids=[run_id], trial="t1")


def test_a_reprocess_request_names_at_most_a_thousand_runs() -> None:
    ReprocessRequest(run_ids=[f"r{i}" for i in range(1000)], trial="t1")
    with pytest.raises(ValueError, match="run_ids"):
        ReprocessRequest(run_ids=[f"r{i}" for i in range(1001)], trial="t1")


def test_ordinary_ids_still_pass() -> None:
    for run_id in ("r0042", "run_1.h5", "exp:run-7", "_tmp"):
        for trial in ("live", "sigma.4", "t-2", "_a"):
            assert isinstance(decode_message(json.dumps(frame(run_id=run_id, trial=trial))), FrameResult)


@pytest.mark.parametrize(
    "override",
    [
        {"indexing.max_seed_pairs": 10**12},
        {"indexing.max_candidates": 10**9},
        {"spotfinding.sigma_strong": float("inf")},
        {"spotfinding.gain": float("nan")},
        {"integration.background_radius": 1e6},
        {"hitfinding.min_spots": 10**9},
    ],
)
def test_analysis_parameters_that_ask_for_unbounded_work_are_refused_naming_them(override: dict[str, object]) -> None:
    (name,) = override
    with pytest.raises(ValueError, match=name.split(".")[1]):
        with_overrides(AnalysisParameters(), override)


def test_run_files_outside_the_landing_directories_are_refused(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    confined_to([str(landing / "r1.h5"), None, str(landing / "sub" / "r1.geom")], [landing])
    for escaping in ("/etc/shadow", str(landing / ".." / "secret.h5"), str(tmp_path / "landing-other" / "r.h5")):
        with pytest.raises(JobError, match="outside the landing directories"):
            confined_to([escaping], [landing])
    confined_to(["/anywhere/r.h5"], [])  # no landing directory configured: nothing to check against


@pytest.mark.parametrize("job_id", ["../../x", "/etc/x", "a/b", ".."])
def test_a_job_id_that_could_name_a_folder_outside_the_jobs_is_refused(job_id: str) -> None:
    with pytest.raises(ValueError, match="job_id"):
        JobState(job_id=job_id, run_id="r1", trial="live", status=JobStatus.QUEUED)
    with pytest.raises(MessageError, match="job_id"):
        decode_message(json.dumps({"type": "cancel_request", "job_id": job_id}))
