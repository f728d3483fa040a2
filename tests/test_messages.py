"""Message contracts: validation, compact arrays, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from libs.contracts.arrays import pack_array, unpack_array
from libs.contracts.messages import (
    FrameResult,
    MessageError,
    RunManifest,
    decode_message,
)
from libs.simulator.results import make_frame_result, random_reflections


def test_frame_result_round_trips_with_exact_arrays() -> None:
    table = random_reflections(500, seed=0)
    result = make_frame_result(
        7,
        started_at=1.0,
        finished_at=2.0,
        A=((0.01, 0, 0), (0, 0.01, 0), (0, 0, 0.02)),
        cell=(79.1, 79.1, 38.0, 90, 90, 90),
        reflections=table,
    )
    decoded = decode_message(result.encode(), FrameResult)
    assert decoded.reflections is not None
    np.testing.assert_array_equal(decoded.reflections.miller, table.miller)
    np.testing.assert_array_equal(decoded.reflections.intensity, table.intensity)
    assert decoded.key == ("r0001", "trial" and "live", 7)
    # compact: far below one JSON number per value
    assert len(result.encode()) < 500 * 18 * 4 / 3 + 2000


def test_packed_array_rejects_wrong_byte_count() -> None:
    packed = pack_array(np.arange(10, dtype=np.float32))
    packed["shape"] = [11]
    with pytest.raises(ValueError, match="needs 44"):
        unpack_array(packed)


def test_unknown_type_and_bad_field_are_named() -> None:
    with pytest.raises(MessageError, match="unknown"):
        decode_message(b'{"type": "nonsense"}')
    with pytest.raises(MessageError, match="not JSON"):
        decode_message(b"\xff\x00")
    manifest = RunManifest(run_id="r1", files=["/data/r1.h5"], file_format="nxmx").model_dump(mode="json")
    manifest["cell"] = [79.1, 79.1, -38.0, 90, 90, 90]
    with pytest.raises(MessageError, match="cell"):
        decode_message(json.dumps(manifest))


def test_indexed_frame_requires_a_matrix() -> None:
    with pytest.raises(ValueError, match="A matrix"):
        FrameResult(run_id="r", trial="t", frame_index=0, started_at=0, finished_at=1, indexed=True)
