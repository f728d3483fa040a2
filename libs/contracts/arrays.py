"""Compact numpy arrays inside pydantic messages.

An array travels as ``{"dtype": "<f4", "shape": [500], "data": "<base64 of the raw little-endian bytes>"}``:
a few bytes per value instead of a JSON number each, and readable by any language with base64 and a dtype.
"""

from __future__ import annotations

import base64
import math
from typing import Annotated, Any

import numpy as np
from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

_ALLOWED_KINDS = {"i", "u", "f", "b"}
_MAX_VALUES = 50_000_000
_MAX_DIMENSIONS = 8


def pack_array(array: np.ndarray) -> dict[str, Any]:
    """The JSON form of ``array`` (little-endian, C order)."""
    contiguous = np.ascontiguousarray(array)
    little = contiguous.astype(contiguous.dtype.newbyteorder("<"), copy=False)
    return {
        "dtype": little.dtype.str,
        "shape": list(little.shape),
        "data": base64.b64encode(little.tobytes()).decode("ascii"),
    }


def unpack_array(value: Any) -> np.ndarray:
    """Rebuild an array from its JSON form; a numpy array passes through. Raises ValueError naming the defect."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _ALLOWED_KINDS:
            raise ValueError(f"array dtype {value.dtype} is not numeric")
        return value
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise ValueError("packed array must be an object with exactly the keys dtype, shape and data")
    try:
        dtype = np.dtype(value["dtype"])
    except TypeError as error:
        raise ValueError(f"packed array dtype {value['dtype']!r} is not a numpy dtype") from error
    if dtype.kind not in _ALLOWED_KINDS:
        raise ValueError(f"packed array dtype {dtype} is not numeric")
    shape = value["shape"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"packed array shape {shape!r} must be a list of non-negative integers")
    if len(shape) > _MAX_DIMENSIONS:
        raise ValueError(f"packed array has {len(shape)} dimensions; at most {_MAX_DIMENSIONS} are allowed")
    count = math.prod(shape)  # Python integers: a forged shape cannot overflow into a small count
    if count > _MAX_VALUES:
        raise ValueError(f"packed array of {count} values exceeds the limit of {_MAX_VALUES}")
    try:
        raw = base64.b64decode(value["data"], validate=True)
    except (ValueError, TypeError) as error:
        raise ValueError("packed array data is not valid base64") from error
    if len(raw) != count * dtype.itemsize:
        raise ValueError(
            f"packed array data holds {len(raw)} bytes but shape {shape} of {dtype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


PACKED_ARRAY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "numpy array: little-endian raw bytes in base64, with numpy dtype string and shape",
    "properties": {
        "dtype": {"type": "string", "examples": ["<f4", "<i2"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "data": {"type": "string", "contentEncoding": "base64"},
    },
    "required": ["dtype", "shape", "data"],
    "additionalProperties": False,
}

PackedArray = Annotated[
    np.ndarray,
    PlainValidator(unpack_array),
    PlainSerializer(pack_array, return_type=dict, when_used="json"),
    WithJsonSchema(PACKED_ARRAY_SCHEMA),
]
"""A pydantic field type: a numpy array in Python, the compact packed form on the wire."""
